"""h5py reads the dataset shards loom writes, and loom reads shards h5py wrote:
the format of docs/data.md is what both sides see.

loom's side is `loom_dataset_tool` (tests/unit/dataset_tool.cpp), named by
LOOM_DATASET_TOOL (default build/tests/loom_dataset_tool).
"""
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import crc32c, record_shard_file

TOOL = os.environ.get(
    "LOOM_DATASET_TOOL", str(Path(__file__).resolve().parents[2] / "build" / "tests" / "loom_dataset_tool"))


def shard_checksum(tokens: np.ndarray, doc_offsets: np.ndarray) -> str:
    """index.json's crc32c: /tokens then /doc_offsets, as little-endian bytes."""
    width = "<u2" if tokens.dtype.itemsize == 2 else "<u4"
    crc = crc32c(tokens.astype(width).tobytes())
    return f"{crc32c(doc_offsets.astype('<u8').tobytes(), crc):08x}"


def run_tool(*args, stdin="", expect=0):
    proc = subprocess.run([TOOL, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == expect, (
        f"loom_dataset_tool {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def random_documents(seed, count, vocab_size, eos_id, max_length):
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        length = int(rng.integers(0, max_length))
        documents.append([int(t) for t in rng.integers(0, vocab_size, size=length)] + [eos_id])
    return documents


def as_text(documents):
    return "".join(" ".join(map(str, document)) + "\n" for document in documents)


@pytest.fixture(scope="module", autouse=True)
def tool_exists():
    if not Path(TOOL).exists():
        pytest.fail(f"{TOOL} does not exist: build the loom_dataset_tool target or set LOOM_DATASET_TOOL")


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (70000, np.uint32)])
def test_h5py_reads_what_loom_wrote(tmp_path, vocab_size, dtype):
    documents = random_documents(vocab_size, 120, vocab_size, eos_id=2, max_length=30)
    documents[5] = [vocab_size - 1, 2]
    out = tmp_path / "data"
    run_tool("write", out, "--vocab-size", vocab_size, "--eos", 2, "--tokenizer-hash", "sha256:abc",
             "--shard-tokens", 200, stdin=as_text(documents))

    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "loom-dataset"
    assert index["format_version"] == 1
    assert (index["vocab_size"], index["eos_id"], index["tokenizer_hash"]) == (vocab_size, 2, "sha256:abc")
    assert index["token_dtype"] == np.dtype(dtype).name
    assert len(index["shards"]) > 1

    read_back = []
    for entry in index["shards"]:
        path = out / entry["file"]
        assert path.stat().st_size == entry["bytes"]
        assert entry["file_crc32c"] == f"{crc32c(path.read_bytes()):08x}"
        with h5py.File(path, "r") as f:
            assert dict(f.attrs) == {"format_version": 1, "vocab_size": vocab_size, "eos_id": 2,
                                     "tokenizer_hash": "sha256:abc"}
            assert f["tokens"].chunks is not None
            tokens = f["tokens"][:]
            offsets = f["doc_offsets"][:]
        assert tokens.dtype == dtype and tokens.ndim == 1
        assert offsets.dtype == np.uint64
        assert len(tokens) == entry["num_tokens"]
        assert len(offsets) == entry["num_documents"] + 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        assert np.all(offsets[1:] >= offsets[:-1])
        assert shard_checksum(tokens, offsets) == entry["crc32c"]
        read_back += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]

    assert read_back == documents
    assert index["num_tokens"] == sum(len(d) for d in documents)
    assert index["num_documents"] == len(documents)


def write_with_h5py(out, shards, vocab_size, eos_id, tokenizer_hash):
    """A dataset written from Python, following docs/data.md alone."""
    out.mkdir()
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    entries = []
    for i, documents in enumerate(shards):
        tokens = np.array([t for d in documents for t in d], dtype=dtype)
        offsets = np.cumsum([0] + [len(d) for d in documents]).astype(np.uint64)
        name = f"shard-{i:05d}.h5"
        with h5py.File(out / name, "w") as f:
            f.create_dataset("tokens", data=tokens, chunks=(max(1, min(len(tokens), 64)),), maxshape=(None,))
            f.create_dataset("doc_offsets", data=offsets)
            f.attrs["format_version"] = 1
            f.attrs["vocab_size"] = vocab_size
            f.attrs["eos_id"] = eos_id
            f.attrs["tokenizer_hash"] = tokenizer_hash
        entries.append({"file": name, "num_tokens": len(tokens), "num_documents": len(documents),
                        "crc32c": shard_checksum(tokens, offsets), "bytes": (out / name).stat().st_size})
    index = {"format": "loom-dataset", "format_version": 1, "vocab_size": vocab_size, "eos_id": eos_id,
             "tokenizer_hash": tokenizer_hash, "token_dtype": np.dtype(dtype).name,
             "num_tokens": sum(e["num_tokens"] for e in entries),
             "num_documents": sum(e["num_documents"] for e in entries), "shards": entries}
    (out / "index.json").write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("vocab_size", [500, 100000])
def test_loom_reads_what_h5py_wrote(tmp_path, vocab_size):
    shards = [random_documents(s, 20, vocab_size, eos_id=1, max_length=15) for s in range(3)]
    write_with_h5py(tmp_path / "data", shards, vocab_size, eos_id=1, tokenizer_hash="from-python")
    proc = run_tool("read", tmp_path / "data", "--verify")
    assert proc.stdout == as_text([d for shard in shards for d in shard])


def test_loom_names_a_shard_that_h5py_modified(tmp_path):
    documents = random_documents(7, 60, 1000, eos_id=0, max_length=20)
    out = tmp_path / "data"
    run_tool("write", out, "--vocab-size", 1000, "--eos", 0, "--shard-tokens", 100, stdin=as_text(documents))
    index = json.loads((out / "index.json").read_text())
    with h5py.File(out / "shard-00001.h5", "r+") as f:
        f["tokens"][0] = (int(f["tokens"][0]) + 1) % 1000
    # The shard's whole-file CRC-32C, checked before HDF5 opens it, tells.
    (out / "index.json").write_text(json.dumps(index))
    proc = run_tool("read", out, expect=2)
    assert "shard-00001.h5: file CRC32C" in proc.stderr and "not opened" in proc.stderr, proc.stderr

    # With the size and file checksum made to agree, only the data checksum can tell.
    record_shard_file(index, 1, out / "shard-00001.h5")
    (out / "index.json").write_text(json.dumps(index))
    run_tool("read", out)  # without --verify the change goes unnoticed
    proc = run_tool("read", out, "--verify", expect=2)
    assert "shard-00001.h5: CRC32C" in proc.stderr and "corrupt" in proc.stderr, proc.stderr


def test_loom_names_a_token_id_outside_the_vocabulary(tmp_path):
    shards = [[[3, 1], [2, 1]], [[4, 999, 1]]]
    write_with_h5py(tmp_path / "data", shards, vocab_size=1000, eos_id=1, tokenizer_hash="")
    with h5py.File(tmp_path / "data" / "shard-00001.h5", "r+") as f:
        f["tokens"][1] = 1000
    index = json.loads((tmp_path / "data" / "index.json").read_text())
    record_shard_file(index, 1, tmp_path / "data" / "shard-00001.h5")
    (tmp_path / "data" / "index.json").write_text(json.dumps(index))
    proc = run_tool("read", tmp_path / "data", expect=2)
    assert "shard-00001.h5: /tokens[1] = 1000 is not below vocab_size 1000" in proc.stderr
