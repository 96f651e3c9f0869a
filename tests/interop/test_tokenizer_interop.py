"""loom's tokenizer against the Python `tokenizers` package, on the King James Bible.

For each tokenizer.json below, every document gets the same ids from loom as
from `tokenizers` (`encode(text, add_special_tokens=False)`), loom's decode
equals `tokenizers`' decode (`skip_special_tokens=False`), and
decode(encode(x)) == x:
  (a) GPT-2 style, trained by `tokenizers` (ByteLevelBPETokenizer), also with
      its merges rewritten in the old "a b" string format;
  (b) trained by loom (`loom_tokenize train`), loaded by `tokenizers`;
  (c) SmolLM2 style: Sequence[Digits(individual_digits=True), ByteLevel];
  (d) Llama-3 style: Sequence[Split(Llama-3 regex, Isolated),
      ByteLevel(use_regex=False)] with ignore_merges=True, plus special and
      added tokens with lstrip/rstrip/single_word;
  (e) ByteLevel(add_prefix_space=True).
The documents are the Bible's 1,189 chapters, hand-written edge cases (emoji,
CJK, digits, whitespace runs, contractions, special tokens) and a sweep over
every assigned Unicode code point, which checks that PCRE2's \\p{L}, \\p{N}
and \\s agree with Oniguruma's (Note [onig vs PCRE2] in data/pretokenizer.h).

The corpus comes from Debian's bible-kjv-text, read with the `bible` program
of the bible-kjv package. LOOM_TOKENIZE names the test driver
(default build/tests/loom_tokenize).
"""
import json
import os
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest
from tokenizers import AddedToken, ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenize_cli import LOOM_TOKENIZE, assert_same_ids, loom_decode, loom_encode, run_loom_tokenize

SPECIAL = "<|endoftext|>"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

EDGE_CASES = [
    "",
    " ",
    "a",
    "   leading and trailing spaces   ",
    "Hello, wörld! Ünïcödé façade naïve café",
    "日本語のテキストと中文文本和한국어 텍스트",
    "emoji 🙂🙂 👩‍👩‍👧‍👦 🇩🇪 👍🏽 ✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
    "it's they're we've I'm you'll he'd IT'S THEY'RE 'S 'ſ",
    "digits 0 12 123 1234 12345 3.14159 1,000,000 ١٢٣ ½ Ⅻ ²",
    "tabs\tand\nnewlines\r\n\n\n  trailing   \n",
    "\n\n\n",
    "\t \t \u00a0\u2003\u3000 \u0085 \u180e \u200b \ufeff end",
    "a" * 300 + " " + "b" * 1000,
    " " * 200 + "x" + "\n" * 50,
    f"{SPECIAL}",
    f"before{SPECIAL}after {SPECIAL} {SPECIAL}{SPECIAL}\n{SPECIAL}",
    "<|endoftext|<|endoftext|>|>",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "The Lord's [MASK] said [MASK]  unto Lordship Lord, Lords.",
    "mixed\u00e9\u0301combining e\u0301 \u0915\u094d\u0937 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
]


def require_tools():
    if not Path(LOOM_TOKENIZE).exists():
        pytest.fail(f"loom_tokenize not found at {LOOM_TOKENIZE}: build it, or set LOOM_TOKENIZE")
    if shutil.which("bible") is None:
        pytest.fail("the `bible` program is missing: apt-get install bible-kjv (it reads bible-kjv-text)")


@pytest.fixture(scope="module")
def chapters():
    """The 1,189 chapters of the KJV, each "Book N\\n\\n  1 verse...\\n"."""
    require_tools()
    text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]
    docs = []
    i = 0
    while i < len(blocks):
        if i + 1 < len(blocks) and "\n" not in blocks[i]:  # a chapter title, then its verses
            docs.append(blocks[i] + "\n\n" + blocks[i + 1] + "\n")
            i += 2
        else:
            docs.append(blocks[i] + "\n")
            i += 1
    assert len(docs) == 1189, len(docs)
    return docs


@pytest.fixture(scope="module")
def unicode_sweep():
    """Every assigned code point (Python's Unicode tables) in contexts that
    tell letters, digits, whitespace and the rest apart, 256 per document."""
    points = [cp for cp in range(1, 0x110000)
              if not 0xD800 <= cp < 0xE000 and unicodedata.category(chr(cp)) not in ("Cn", "Co")]
    docs = []
    for start in range(0, len(points), 256):
        docs.append("".join(f"a{c}1{c} {c}{c}'s{c}\n" for c in map(chr, points[start:start + 256])))
    return docs


def assert_same_as_tokenizers(tokenizer_json, docs, tmp_path, round_trip=lambda doc: True):
    """`round_trip(doc)` says whether decode(encode(doc)) must give doc back."""
    hf = Tokenizer.from_file(str(tokenizer_json))
    expected = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
    got = loom_encode(tokenizer_json, docs, tmp_path)
    assert_same_ids(hf, docs, expected, got, tokenizer_json.name)
    decoded = loom_decode(tokenizer_json, got, tmp_path)
    hf_decoded = hf.decode_batch(expected, skip_special_tokens=False)
    for i, doc in enumerate(docs):
        assert decoded[i] == hf_decoded[i], f"{tokenizer_json.name}: decode of document {i} differs"
        if round_trip(doc):
            assert decoded[i] == doc, f"{tokenizer_json.name}: decode(encode(x)) != x for document {i}: {doc[:200]!r}"


def train_with_tokenizers(pre_tokenizer, texts, vocab_size, path, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def test_gpt2_style_trained_by_tokenizers(chapters, unicode_sweep, tmp_path):
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(chapters, vocab_size=4096, special_tokens=[SPECIAL], show_progress=False)
    path = tmp_path / "gpt2_style.json"
    tok.save(str(path))
    assert_same_as_tokenizers(path, chapters + EDGE_CASES + unicode_sweep, tmp_path)

    # The same merges in the old "a b" string format give the same ids.
    spec = json.loads(path.read_text())
    assert isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    legacy = tmp_path / "gpt2_style_legacy_merges.json"
    legacy.write_text(json.dumps(spec))
    assert loom_encode(legacy, chapters[:50], tmp_path) == loom_encode(path, chapters[:50], tmp_path)


def test_trained_by_loom_loads_in_tokenizers(chapters, tmp_path):
    corpus = tmp_path / "kjv.txt"
    corpus.write_text(f"\n{SPECIAL}\n".join(chapters))
    path = tmp_path / "loom_trained.json"
    run_loom_tokenize("train", corpus, "--vocab-size", 4096, "--output", path, "--special", SPECIAL)
    hf = Tokenizer.from_file(str(path))
    assert hf.get_vocab_size() == 4096
    assert hf.token_to_id(SPECIAL) == 0
    # The most frequent pairs of the KJV come first, as byte-level strings.
    merges = json.loads(path.read_text())["model"]["merges"]
    assert len(merges) == 4096 - 257
    assert merges[:3] == [["t", "h"], ["Ġ", "th"], ["Ġth", "e"]]
    assert_same_as_tokenizers(path, chapters + EDGE_CASES, tmp_path)


def test_smollm2_style_digits_then_byte_level(chapters, unicode_sweep, tmp_path):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = train_with_tokenizers(pre, chapters[:400], 2048, tmp_path)
    path = tmp_path / "smollm2_style.json"
    tok.save(str(path))
    assert_same_as_tokenizers(path, chapters + EDGE_CASES + unicode_sweep[::4], tmp_path)


def test_llama3_style_split_regex_ignore_merges_and_added_tokens(chapters, unicode_sweep, tmp_path):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = train_with_tokenizers(pre, chapters[:400], 3000, tmp_path, ignore_merges=True)
    tok.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    tok.add_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True), AddedToken("Lord", single_word=True, normalized=False),
                    AddedToken(" unto", normalized=True)])
    path = tmp_path / "llama3_style.json"
    tok.save(str(path))
    spec = json.loads(path.read_text())
    assert spec["model"]["ignore_merges"] is True
    docs = chapters + EDGE_CASES + unicode_sweep[1::4] + [
        "<|begin_of_text|>In the beginning<|eot_id|>", "x [MASK] y[MASK]z \t[MASK]\t", "Lord LordLord (Lord) Lord's",
    ]
    # lstrip/rstrip make [MASK] swallow the spaces around it, in both libraries.
    assert_same_as_tokenizers(path, docs, tmp_path, round_trip=lambda doc: "[MASK]" not in doc)


def test_byte_level_with_prefix_space(chapters, tmp_path):
    pre = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok = train_with_tokenizers(pre, chapters[:200], 1024, tmp_path)
    path = tmp_path / "prefix_space.json"
    tok.save(str(path))
    docs = chapters[:300] + EDGE_CASES
    # add_prefix_space makes decode(encode(x)) == " " + x for text not starting with a space.
    assert_same_as_tokenizers(path, docs, tmp_path, round_trip=lambda doc: False)
