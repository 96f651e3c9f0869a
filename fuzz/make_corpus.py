"""Writes fuzz/corpus/TARGET/ seed files (small valid inputs of each reader).

Usage (from the checkout, with the loom venv and a main build):
  $HOME/.cache/loom/venv/bin/python fuzz/make_corpus.py --dataset-tool build/tests/loom_dataset_tool

The seeds are committed; this script documents where they came from and
rewrites them. Each file is a valid input that loom accepts, so the fuzzer
starts from inside each format rather than from random bytes. Not written
here: fuzz_checkpoint_manifest's seeds (manifest.json files that `loom train`
wrote in the e2e tests), fuzz_dataset_shard's (a few bytes that only steer
its generator: zeros, 0xff, a counter) and every past finding's input.
"""
import argparse
import json
import os
import shutil
import subprocess
import tempfile

import h5py
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, processors, trainers, Regex

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
TEXT = ("The quick brown fox jumps over the lazy dog. It's 2024 and 3.14159 is pi.\n"
        "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 don't WE'LL   spaced\tout\n") * 4


def target_dir(name):
    # Files are overwritten, never removed: the corpus also holds inputs that
    # were findings (see docs/fuzzing.md) and seeds made otherwise.
    path = os.path.join(CORPUS, name)
    os.makedirs(path, exist_ok=True)
    return path


def configs():
    out = target_dir("fuzz_config")
    for name in ["tiny.yaml", "smollm2-135m.yaml", "llama3-1b.yaml"]:
        shutil.copy(os.path.join(ROOT, "..", "configs", name), os.path.join(out, name))
    with open(os.path.join(out, "interpolated.yaml"), "w") as f:
        f.write("run:\n  name: ${RUN_NAME:-fuzz}\n  seed: 7\nmodel:\n  hidden_size: 64\n  num_layers: 2\n"
                "  num_heads: 4\n  num_kv_heads: 2\n  intermediate_size: 128\n  vocab_size: 256\n"
                "optimizer: {lr: 1.0e-3, weight_decay: 0.1}\nparallel: {tp: 1, pp: 1, dp: auto}\n")


def safetensors_files():
    out = target_dir("fuzz_safetensors")
    rng = np.random.default_rng(0)
    save_file({"w": rng.standard_normal((3, 4)).astype(np.float32),
               "b": np.arange(4, dtype=np.int64)}, os.path.join(out, "two.safetensors"), metadata={"format": "pt"})
    save_file({"h": rng.standard_normal((2, 2)).astype(np.float16), "u": np.array([1, 2], dtype=np.uint8),
               "flag": np.array([True, False]), "scalar": np.array(3.0, dtype=np.float64),
               "empty": np.zeros((0, 5), dtype=np.int32)}, os.path.join(out, "dtypes.safetensors"))
    save_file({}, os.path.join(out, "none.safetensors"))


def tokenizers_json():
    out = target_dir("fuzz_tokenizer")
    # GPT-2 style: ByteLevel pre-tokenizer and decoder.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(os.path.join(out, "bytelevel.json"))
    # Llama-3 style: a Split regex then ByteLevel without its own regex,
    # digits in groups of up to three.
    tok = Tokenizer(models.BPE(ignore_merges=True))
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.save(os.path.join(out, "split_regex.json"))
    # Digits pre-tokenizer and merges written as pairs.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    path = os.path.join(out, "digits_pairs.json")
    tok.save(path)
    with open(path) as f:
        doc = json.load(f)
    doc["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"]]
    with open(path, "w") as f:
        json.dump(doc, f)
    # SentencePiece-style BPE (Llama-2, Mistral): Metaspace, byte fallback,
    # the Replace/ByteFallback/Fuse/Strip decoder and a BOS template.
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(" {3,}"), "  ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out, "sentencepiece_bpe.json"))
    # Unigram with Lowercase/NFKC, the splitting pre-tokenizers and Roberta's frame.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Metaspace()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 1))
    tok.save(os.path.join(out, "unigram.json"))


def datasets(tool):
    index_out = target_dir("fuzz_dataset_index")
    shard_out = target_dir("fuzz_hdf5_bytes")
    with tempfile.TemporaryDirectory() as tmp:
        for name, vocab, shard_tokens, docs in [
                ("u16", 300, 8, ["5 6 7 0", "8 9 0", "1 2 3 4 5 0", "299 0"]),
                ("u32", 70000, 6, ["69999 1 0", "2 3 0", "4 0"]),
                ("one", 10, 100, ["1 2 3 0"])]:
            d = os.path.join(tmp, name)
            subprocess.run([tool, "write", d, "--vocab-size", str(vocab), "--eos", "0", "--tokenizer-hash",
                            "0badf00d", "--shard-tokens", str(shard_tokens)],
                           input="\n".join(docs) + "\n", text=True, check=True)
            shutil.copy(os.path.join(d, "index.json"), os.path.join(index_out, name + "-index.json"))
            shutil.copy(os.path.join(d, "shard-00000.h5"), os.path.join(shard_out, name + "-shard-00000.h5"))
    # Written by h5py rather than loom: contiguous /tokens, a fixed-length
    # string attribute, an empty shard.
    for name, tokens, offsets in [("h5py-contiguous", [3, 1, 0, 2, 0], [0, 3, 5]), ("h5py-empty", [], [0])]:
        with h5py.File(os.path.join(shard_out, name + ".h5"), "w") as f:
            f.attrs["format_version"] = np.int64(1)
            f.attrs["vocab_size"] = np.int64(16)
            f.attrs["eos_id"] = np.int64(0)
            f.attrs["tokenizer_hash"] = np.bytes_("0badf00d")
            f.create_dataset("tokens", data=np.array(tokens, dtype=np.uint16))
            f.create_dataset("doc_offsets", data=np.array(offsets, dtype=np.uint64))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset-tool", required=True)
    args = parser.parse_args()
    configs()
    safetensors_files()
    tokenizers_json()
    datasets(os.path.abspath(args.dataset_tool))


if __name__ == "__main__":
    main()
