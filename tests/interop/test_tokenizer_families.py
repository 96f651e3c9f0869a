"""loom's tokenizer against Hugging Face `tokenizers` on the tokenizer.json
files of real model families (Llama-2/Mistral SentencePiece BPE, Phi-3,
Gemma 4, Llama-3, Qwen2 with NFC, Falcon, DeepSeek, StarCoder, GPT-2),
rebuilt without a hub from llama.cpp's GGUF vocabularies
(real_tokenizers.py), and on a Unigram tokenizer trained here.

For each: the ids of llama.cpp's own test strings, of every paragraph of
/usr/share/common-licenses and of 3,000 random mixed-script strings are
those of `tokenizers`, without and with the post-processor's special
tokens; and loom's decode of the ids is `tokenizers`' decode.
"""
import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tokenize_cli import assert_same_ids, loom_decode, loom_encode
from real_tokenizers import FAMILY_VOCABS, family_tokenizer_json, llama_cpp_expected_ids, llama_cpp_test_strings

LOOM_BIN = os.environ.get("LOOM_BIN", "build/loom")

# Scripts and symbols the random strings draw from (ranges of code points).
RANGES = [
    (0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E),  # ASCII, weighted up
    (0xA0, 0x17F),      # Latin-1, Latin Extended-A
    (0x300, 0x36F),     # combining diacritics (what NFC composes)
    (0x391, 0x3C9),     # Greek
    (0x400, 0x44F),     # Cyrillic
    (0x5D0, 0x5EA),     # Hebrew
    (0x620, 0x64A), (0x660, 0x669),  # Arabic letters and digits
    (0x905, 0x939), (0x93E, 0x94D),  # Devanagari letters and signs
    (0xE01, 0xE3A),     # Thai
    (0x1100, 0x1112), (0x1161, 0x1175),  # Hangul jamo (NFC composes them)
    (0xAC00, 0xD7A3),   # Hangul syllables
    (0x3041, 0x3096), (0x30A1, 0x30FA),  # Hiragana, Katakana
    (0x4E00, 0x9FFF),   # CJK
    (0xFF01, 0xFF5E),   # fullwidth forms
    (0x2000, 0x206F),   # general punctuation and odd spaces
    (0x1F300, 0x1F64F),  # emoji
]
WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", " \n ", "\u00a0", "\u3000"]


def random_strings(count, seed, specials):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.2:
                parts.append(rng.choice(WHITESPACE))
            elif roll < 0.25 and specials:
                parts.append(rng.choice(specials))
            else:
                lo, hi = rng.choice(RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


def license_paragraphs():
    docs = []
    for path in sorted(Path("/usr/share/common-licenses").iterdir()):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            docs += [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    assert len(docs) > 1000, len(docs)
    return docs


@pytest.fixture(scope="module")
def paragraphs():
    return license_paragraphs()


def check_like_tokenizers(tokenizer_json, docs, tmp_path, label):
    hf = Tokenizer.from_file(str(tokenizer_json))
    for special in (False, True):
        expected = [e.ids for e in hf.encode_batch(docs, add_special_tokens=special)]
        got = loom_encode(tokenizer_json, docs, tmp_path, special)
        assert_same_ids(hf, docs, expected, got, f"{label} (add_special_tokens={special})")
    decoded = loom_decode(tokenizer_json, expected, tmp_path)
    hf_decoded = hf.decode_batch(expected, skip_special_tokens=False)
    for i, (want, have) in enumerate(zip(hf_decoded, decoded)):
        assert have == want, f"{label}: decode of document {i} differs: tokenizers {want[:200]!r}, loom {have[:200]!r}"
    return hf


def specials_of(tokenizer_json):
    hf = Tokenizer.from_file(str(tokenizer_json))
    return [t.content for t in hf.get_added_tokens_decoder().values()][:20]


@pytest.mark.parametrize("family", ["llama2", "phi3", "gemma4", "llama3", "qwen2", "falcon", "deepseek-llm",
                                    "starcoder", "gpt2"])
def test_family_matches_tokenizers(family, paragraphs, tmp_path):
    path = family_tokenizer_json(family)
    gguf = FAMILY_VOCABS.get(family, "ggml-vocab-llama-bpe.gguf")
    docs = llama_cpp_test_strings(gguf) + paragraphs + random_strings(3000, seed=hash(family) % 1000,
                                                                      specials=specials_of(path))
    hf = check_like_tokenizers(path, docs, tmp_path, family)
    if family == "gemma4":
        # Built here from the GGUF, not by transformers: llama.cpp's own ids
        # for its test strings say the file is Gemma 4's tokenizer.
        strings = llama_cpp_test_strings(gguf)
        assert loom_encode(path, strings, tmp_path, special=False) == llama_cpp_expected_ids(gguf)
    if family in ("llama2", "phi3", "llama3"):
        # The post-processor starts every document with BOS, as encode does.
        bos = loom_encode(path, ["x"], tmp_path, special=True)[0][0]
        assert hf.id_to_token(bos) in ("<s>", "<|begin_of_text|>")


def test_unigram_trained_by_tokenizers_with_metaspace_and_byte_fallback(paragraphs, tmp_path):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581",
                                                                                  prepend_scheme="always")])
    # The trainer has no byte_fallback option: the 256 byte tokens go in as
    # special tokens, and the model's flag is set in the file.
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(paragraphs, trainer)
    spec = json.loads(tok.to_str())
    assert spec["model"]["type"] == "Unigram"
    spec["model"]["byte_fallback"] = True
    path = tmp_path / "unigram.json"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    docs = paragraphs[::3] + random_strings(3000, seed=7, specials=["<s>", "</s>"])
    check_like_tokenizers(path, docs, tmp_path, "unigram")
    # Characters the training never saw are spelled in <0xXX> bytes.
    ids = loom_encode(path, ["\U0001F642"], tmp_path, special=False)[0]
    assert [tok.id_to_token(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def loom_cli(*args):
    proc = subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"loom {args} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stdout


def dataset_tokens(folder):
    import h5py
    index = json.loads((folder / "index.json").read_text())
    tokens = []
    for shard in index["shards"]:
        with h5py.File(folder / shard["file"], "r") as f:
            tokens += f["tokens"][:].tolist()
    return tokens


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_prepare_frames_each_document_as_encode_does(family, tmp_path):
    path = family_tokenizer_json(family)
    hf = Tokenizer.from_file(str(path))
    docs = ["Hello world.", "Zweites Dokument: \u00e4\u00f6\u00fc \U0001F642", "  third\nline  "]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    eos_token = "</s>" if family == "llama2" else "<|eot_id|>"  # Llama-3.1-Instruct's tokenizer_config names it
    eos = hf.token_to_id(eos_token)
    for special, flags in ((True, []), (False, ["--no-special-tokens"])):
        out = tmp_path / f"data-{special}"
        loom_cli("prepare", "--tokenizer", path, "--input", source, "--output", out, "--eos-token", eos_token, *flags)
        expected = [t for d in docs for t in hf.encode(d, add_special_tokens=special).ids + [eos]]
        assert dataset_tokens(out) == expected
        if special:
            assert dataset_tokens(out)[0] == hf.token_to_id("<s>" if family == "llama2" else "<|begin_of_text|>")


@pytest.mark.parametrize("family", ["qwen2", "gemma4", "phi3"])
def test_tokenizer_encode_command_prints_the_ids_of_encode(family):
    path = family_tokenizer_json(family)
    hf = Tokenizer.from_file(str(path))
    for text in ["Hello  world!", "caf\u00e9 \u4e2d\u6587 12345", " leading and trailing "]:
        assert loom_cli("tokenizer", "encode", path, "--text", text).split() == list(map(str, hf.encode(text).ids))
        ids = loom_cli("tokenizer", "encode", path, "--text", text, "--no-special-tokens").split()
        assert ids == list(map(str, hf.encode(text, add_special_tokens=False).ids))
