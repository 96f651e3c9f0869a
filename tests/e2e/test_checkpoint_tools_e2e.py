"""`loom init`, `loom export` streaming with bounded memory, `loom inspect CHECKPOINT`.

`loom init` writes a 570 MiB (fp32) model a tensor at a time; `loom export`
turns it into sharded bf16 Hub files while its peak resident memory stays
below what the process needs for a tiny model plus the largest tensor plus a
fixed 64 MiB; transformers loads the result and every tensor is the
checkpoint's rounded to bf16 as torch rounds. `loom inspect` shows a
checkpoint's layout, files and checksums, and names a corrupt file.
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from test_train_e2e import CONFIG, loom, train_args
from test_train_e2e import data  # noqa: F401 (fixture)

BIG = {"model.hidden_size": 768, "model.intermediate_size": 2048, "model.num_layers": 16,
       "model.num_heads": 12, "model.num_kv_heads": 4, "model.vocab_size": 32000, "model.max_seq_len": 256}


def sets(values):
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def peak_mib(output):
    match = re.search(r"peak resident memory ([0-9.]+) MiB", output)
    assert match, output
    return float(match.group(1))


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tools")
    stdout, _ = loom("init", CONFIG, "--output", out / "big", *sets(BIG), "--set", "run.seed=77")
    assert "initialized" in stdout
    return out / "big"


def test_export_streams_with_memory_bounded_by_the_largest_tensor(big_checkpoint, tmp_path):
    # The process's own footprint (libtorch and all): export a tiny model.
    loom("init", CONFIG, "--output", tmp_path / "tiny")
    baseline = peak_mib(loom("export", tmp_path / "tiny", "--output", tmp_path / "tiny-hf")[0])

    stdout, _ = loom("export", big_checkpoint, "--output", tmp_path / "hf", "--dtype", "bfloat16",
                     "--max-shard-size", "100MB")
    largest = float(re.search(r"largest tensor ([0-9.]+) MiB", stdout).group(1))
    model_mib = sum(p.stat().st_size for p in big_checkpoint.glob("*.safetensors")) / 2**20
    assert model_mib > 500 and largest == pytest.approx(32000 * 768 * 4 / 2**20, rel=1e-3)
    peak = peak_mib(stdout)
    print(f"export of {model_mib:.0f} MiB: peak {peak:.1f} MiB, tiny baseline {baseline:.1f} MiB, "
          f"largest tensor {largest:.1f} MiB")
    assert peak < baseline + largest + 64, (peak, baseline, largest)

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "hf" / s).stat().st_size <= 100_000_000 + 2**20 for s in shards)
    source = load_file(str(big_checkpoint / "model-rank00000.safetensors"))
    exported = {}
    for shard in shards:
        exported.update(load_file(str(tmp_path / "hf" / shard)))
    assert sorted(exported) == sorted(source) and sorted(index["weight_map"]) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.to(torch.bfloat16)), name

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(model.model.embed_tokens.weight, source["model.embed_tokens.weight"].to(torch.bfloat16))


def test_inspect_shows_layout_and_checksums_and_names_a_corrupt_file(data, tmp_path):
    from test_tensor_parallel_e2e import mpi_loom
    mpi_loom(2, train_args(data, tmp_path, "tp2", 2, 2, **{"parallel.tp": 2, "model.num_heads": 8,
                                                           "model.num_kv_heads": 4}))
    ckpt = tmp_path / "tp2" / "checkpoints" / "step-0000002"
    stdout, _ = loom("inspect", ckpt)
    assert "loom checkpoint (step 2)" in stdout
    assert "saved by a run on: dp 1 x tp 2 x pp 1, 2 ranks" in stdout, stdout
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert re.search(rf"^{re.escape(name)}\s+{entry['kind']}\s+[0-9,]+\s+{entry['crc32c']}$", stdout, re.M), name
    assert "sizes and CRC32C verified" in stdout
    # Sharded: each rank wrote its own pieces, every tensor listed with them.
    assert "layout of the files: dp 1 x tp 2 x pp 1 (format version 2" in stdout, stdout
    assert {"model-rank00000.safetensors", "model-rank00001.safetensors"} <= set(manifest["files"])
    stdout, _ = loom("inspect", ckpt, "--verify")
    assert re.search(r"^verified: \d+ tensors \([0-9,]+ elements\) read back", stdout, re.M), stdout

    path = ckpt / "optimizer-rank00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    _, stderr = loom("inspect", ckpt, expect=2)
    assert "optimizer-rank00000.safetensors" in stderr and "CRC32C" in stderr, stderr
