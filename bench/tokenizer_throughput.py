"""Encoding throughput of loom's tokenizer against Hugging Face `tokenizers`
on the tokenizer.json files of model families (tests/interop/real_tokenizers.py
rebuilds them from llama.cpp's GGUF vocabularies), one thread each, on the
KJV Bible (4.3 MB, one document per blank-line-separated block). Prints the
time to load the file and the encoding MB/s of both (loom's encoding time is
its run's time less the run's on a one-byte input), and loom's ratio; also
checks that the ids agree.

  LOOM_TOKENIZE=build/tests/loom_tokenize $HOME/.cache/loom/venv/bin/python bench/tokenizer_throughput.py
"""
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' encode_batch on one thread, as loom's below
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))
from real_tokenizers import family_tokenizer_json  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

LOOM_TOKENIZE = os.environ.get("LOOM_TOKENIZE", "build/tests/loom_tokenize")
FAMILIES = ["llama3", "qwen2", "llama2", "gemma4", "phi3", "falcon", "gpt2"]


def corpus():
    text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def main():
    docs = corpus()
    size_mb = sum(len(d.encode()) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "docs.bin"
        source.write_bytes("\0".join(docs).encode())
        tiny = Path(tmp) / "tiny.bin"
        tiny.write_bytes(b"x")
        print(f"{len(docs)} documents, {size_mb:.1f} MB; best of 3 runs, one thread each")
        print("| tokenizer | loom load s | tokenizers load s | loom MB/s | tokenizers MB/s | loom / tokenizers |")
        print("|---|---|---|---|---|---|")
        for family in FAMILIES:
            path = family_tokenizer_json(family)
            loom_load, loom_all, hf_load, hf_best = (float("inf"),) * 4
            for _ in range(3):
                start = time.perf_counter()
                subprocess.run([LOOM_TOKENIZE, "encode", path, tiny], capture_output=True, check=True)
                loom_load = min(loom_load, time.perf_counter() - start)
                start = time.perf_counter()
                out = subprocess.run([LOOM_TOKENIZE, "encode", path, source], capture_output=True, check=True)
                loom_all = min(loom_all, time.perf_counter() - start)
                start = time.perf_counter()
                hf = Tokenizer.from_file(str(path))
                hf_load = min(hf_load, time.perf_counter() - start)
                start = time.perf_counter()
                expected = hf.encode_batch(docs, add_special_tokens=False)
                hf_best = min(hf_best, time.perf_counter() - start)
            got = [list(map(int, line.split())) for line in out.stdout.decode().split("\n")[:-1]]
            assert got == [e.ids for e in expected], f"{family}: loom's ids differ from tokenizers'"
            loom_encode = loom_all - loom_load
            print(f"| {family} | {loom_load:.2f} | {hf_load:.2f} | {size_mb / loom_encode:.1f} | "
                  f"{size_mb / hf_best:.1f} | {hf_best / loom_encode:.2f} |")


if __name__ == "__main__":
    main()
