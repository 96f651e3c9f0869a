"""Data at cluster scale (docs/data.md, "Large datasets"): a dataset of
1,500+ shards trains on two ranks under `ulimit -n 256`, each rank opening its
shards through the bounded cache and logging how many it opened; a corpus
prepared in 4 parts (`loom prepare --part I/4`) and merged holds the same
documents, in the same order, with the same tokens as one `loom prepare`; and
`loom inspect --verify` under mpirun splits the shards over the ranks.
Tiny shards and the tiny test model: the file takes about a minute on two cores.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from test_tensor_parallel_e2e import mpi_args, mpi_env
from test_train_e2e import LOOM_BIN, data, loom, train_args  # noqa: F401 (data: fixture)

DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(Path(LOOM_BIN).parent / "tests" / "loom_dataset_tool"))


def verses(corpus, count):
    """The first `count` verses of the KJV corpus, as documents."""
    lines = [line for line in corpus.read_text().splitlines() if line and line[0].isdigit()]
    return lines[:count]


def write_documents(path, documents):
    path.write_text("\n\n".join(documents) + "\n")


def read_documents(dataset):
    """Every document of a dataset, in order, as loom_dataset_tool prints them."""
    proc = subprocess.run([DATASET_TOOL, "read", str(dataset)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def index_of(dataset):
    return json.loads((dataset / "index.json").read_text())


@pytest.fixture(scope="module")
def many_shards(data, tmp_path_factory):
    """About 1,700 shards of at most 64 tokens (about one verse each)."""
    d = tmp_path_factory.mktemp("many-shards")
    corpus = d / "verses.txt"
    write_documents(corpus, verses(data["dataset"].parent / "corpus.txt", 1800))
    loom("prepare", "--tokenizer", data["tokenizer"], "--input", corpus, "--output", d / "ds",
         "--shard-tokens", 64)
    assert len(index_of(d / "ds")["shards"]) >= 1500
    return d / "ds"


def test_1500_shards_train_on_2_ranks_under_ulimit_n_256_touching_1000_shards(data, many_shards, tmp_path):
    # 40 steps of 32 sequences per rank read about 2,300 shard ranges on each
    # rank: well over 1,000 distinct shards, far over 256 descriptors if each
    # stayed open.
    args = train_args(data, tmp_path, "run", 40, 0, **{
        "data.train": f"[{many_shards}]", "data.seq_len": 32, "model.max_seq_len": 32,
        "batch.global_batch_size": 64, "batch.micro_batch_size": 32, "parallel.dp": 2,
        "data.check_shard_files": "always", "checkpoint.export_hf_at_end": "false"})
    command = " ".join([*mpi_args(2), LOOM_BIN, *map(lambda a: "'" + str(a) + "'", args)])
    proc = subprocess.run(["bash", "-c", f"ulimit -n 256 && exec {command}"], capture_output=True, text=True,
                          timeout=600, env=mpi_env())
    assert proc.returncode == 0, f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    found = re.search(r"data: opened (\d+) distinct shards of (\d+) \(at most (\d+) open at once, limit (\d+)\), "
                      r"(\d+) checked on first use", proc.stdout)
    assert found, proc.stdout[-3000:]
    opened, shards, peak, limit, checked = map(int, found.groups())
    assert shards == len(index_of(many_shards)["shards"])
    assert opened >= 1000, found.group(0)
    assert opened < shards, "rank 0 should not need every shard in 40 steps"
    assert peak <= limit == 64, found.group(0)
    # check_shard_files: always: every shard rank 0 read was checked first; no
    # more than the read-ahead's shards (4 micro-batches of 32 samples) beyond.
    assert opened <= checked <= opened + 4 * 32 * 2, found.group(0)


def test_prepare_in_4_parts_and_merge_equals_one_prepare(data, tmp_path):
    # 8 input files of whole chapters; shards of 2,000 tokens (several per part).
    chapters = (data["dataset"].parent / "corpus.txt").read_text().split("\n\n")[:160]
    inputs = []
    for i in range(8):
        path = tmp_path / f"input-{i}.txt"
        write_documents(path, chapters[i * 20:(i + 1) * 20])
        inputs.append(path)
    flags = ["--tokenizer", data["tokenizer"], "--shard-tokens", 2000]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    loom("prepare", *flags, "--input", *inputs, "--output", whole)
    for part in (2, 0, 3):  # any order, as array tasks run
        out, _ = loom("prepare", *flags, "--input", *inputs, "--output", parted, "--part", f"{part}/4")
        assert f"part-{part:05d}-of-00004" in out
    # A part missing: the merge names it and writes nothing.
    _, err = loom("prepare", "--merge", parted, expect=2)
    assert "part-00001-of-00004" in err and "--part 1/4" in err, err
    assert not (parted / "index.json").exists()
    loom("prepare", *flags, "--input", *inputs, "--output", parted, "--part", "1/4")
    # A part run again (a requeued array task) is left as it is.
    out, _ = loom("prepare", *flags, "--input", *inputs, "--output", parted, "--part", "1/4")
    assert "already" in out, out
    out, _ = loom("prepare", "--merge", parted)
    assert "merged 4 parts" in out, out

    # The documented guarantee: the same documents in the same order, the same
    # tokens, the same totals and tokenizer; shard boundaries may differ only
    # at the 3 part seams (Note [Preparing in parts]).
    assert read_documents(parted) == read_documents(whole)
    a, b = index_of(whole), index_of(parted)
    for key in ("format", "format_version", "vocab_size", "eos_id", "tokenizer_hash", "token_dtype", "num_tokens",
                "num_documents"):
        assert a[key] == b[key], key
    assert len(a["shards"]) <= len(b["shards"]) <= len(a["shards"]) + 3
    assert [s["file"] for s in b["shards"]] == [f"shard-{i:05d}.h5" for i in range(len(b["shards"]))]
    assert sorted(p.name for p in parted.iterdir()) == sorted(["index.json", *[s["file"] for s in b["shards"]]])
    # The merged dataset passes every check, on one rank and split over two.
    loom("inspect", parted, "--verify")
    proc = subprocess.run([*mpi_args(2), LOOM_BIN, "inspect", str(parted), "--verify"], capture_output=True,
                          text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"verified: all {len(b['shards'])} shards on 2 ranks" in proc.stdout, proc.stdout[-3000:]


def test_parts_from_other_options_are_refused_at_the_merge(data, tmp_path):
    chapters = (data["dataset"].parent / "corpus.txt").read_text().split("\n\n")[:20]
    inputs = []
    for i in range(2):
        path = tmp_path / f"input-{i}.txt"
        write_documents(path, chapters[i * 10:(i + 1) * 10])
        inputs.append(path)
    loom("prepare", "--tokenizer", data["tokenizer"], "--input", *inputs, "--output", tmp_path / "ds",
         "--part", "0/2", "--shard-tokens", 1000)
    loom("prepare", "--tokenizer", data["tokenizer"], "--input", *inputs, "--output", tmp_path / "ds",
         "--part", "1/2", "--shard-tokens", 2000)
    _, err = loom("prepare", "--merge", tmp_path / "ds", expect=2)
    assert "part-00001-of-00002" in err and "not prepared from the same inputs" in err, err
    # More parts than files is refused before any work.
    _, err = loom("prepare", "--tokenizer", data["tokenizer"], "--input", *inputs, "--output", tmp_path / "x",
                  "--part", "0/3", expect=2)
    assert "cannot be split into 3 parts" in err, err


def test_inspect_verify_on_2_ranks_names_a_damaged_shard_on_either_rank(many_shards, tmp_path):
    damaged = tmp_path / "ds"
    subprocess.run(["cp", "-r", str(many_shards), str(damaged)], check=True)
    for name in ("shard-00010.h5", "shard-00011.h5"):  # one on each rank
        with open(damaged / name, "r+b") as f:
            f.seek(-8, 2)
            last = f.read(8)
            f.seek(-8, 2)
            f.write(bytes(b ^ 0xFF for b in last))
    proc = subprocess.run([*mpi_args(2), LOOM_BIN, "inspect", str(damaged), "--verify"], capture_output=True,
                          text=True, timeout=300, env=mpi_env())
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "rank 0: error: " in proc.stderr and "rank 1: error: " in proc.stderr, proc.stderr[-3000:]
    assert "2 of " in proc.stderr and "shard-00010.h5, shard-00011.h5" in proc.stderr, proc.stderr[-3000:]
