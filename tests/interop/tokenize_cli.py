"""Driving loom's tokenizer from the interop tests through loom_tokenize
(tests/unit/tokenizer_cli.cpp): documents in, ids out, and back."""
import os
import subprocess
from pathlib import Path

LOOM_TOKENIZE = os.environ.get("LOOM_TOKENIZE",
                               str(Path(__file__).resolve().parents[2] / "build" / "tests" / "loom_tokenize"))


def run_loom_tokenize(*args):
    proc = subprocess.run([LOOM_TOKENIZE, *map(str, args)], capture_output=True, timeout=600)
    assert proc.returncode == 0, f"loom_tokenize {args} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}"
    return proc


def loom_encode(tokenizer_json, docs, tmp_path, special=False):
    """loom's ids of each document (with the post-processor's special tokens when `special`)."""
    assert all("\0" not in d for d in docs)
    src = tmp_path / "docs.bin"
    src.write_bytes("\0".join(docs).encode("utf-8"))
    proc = run_loom_tokenize("encode", tokenizer_json, src, "--threads", "2", *(["--special"] if special else []))
    lines = proc.stdout.decode().split("\n")
    assert lines[-1] == "" and len(lines) == len(docs) + 1
    return [[int(x) for x in line.split()] for line in lines[:-1]]


def loom_decode(tokenizer_json, ids, tmp_path):
    """loom's text of each list of ids."""
    src = tmp_path / "ids.txt"
    src.write_text("".join(" ".join(map(str, row)) + "\n" for row in ids))
    out = run_loom_tokenize("decode", tokenizer_json, src).stdout.decode("utf-8").split("\0")
    assert out[-1] == "" and len(out) == len(ids) + 1
    return out[:-1]


def assert_same_ids(hf, docs, expected, got, label):
    """Fails at the first document whose ids differ, showing the tokens around the difference."""
    import pytest
    for i, (doc, want, have) in enumerate(zip(docs, expected, got)):
        if want != have:
            k = next((k for k, (x, y) in enumerate(zip(want, have)) if x != y), min(len(want), len(have)))
            pytest.fail(f"{label}: document {i} differs at id {k}: tokenizers "
                        f"{[hf.id_to_token(t) for t in want[max(0, k - 3):k + 5]]}, loom "
                        f"{[hf.id_to_token(t) for t in have[max(0, k - 3):k + 5]]}\ndocument: {doc[:300]!r}")
