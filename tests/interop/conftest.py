"""Shared helpers for interop tests: the real transformers / safetensors
packages are the external reference for what loom reads and writes.

LOOM_BIN names the loom binary (CTest sets it; `source build/env.sh` too).
"""
import os
import subprocess
from pathlib import Path

import pytest
import torch

LOOM_BIN = os.environ.get("LOOM_BIN", str(Path(__file__).resolve().parents[2] / "build" / "loom"))


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), incremental like loom's: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def record_shard_file(index, position, path):
    """Makes index.json's entry `position` agree with the shard file at `path` as it is now
    (its size and whole-file CRC-32C), as an index written for that file would."""
    data = Path(path).read_bytes()
    index["shards"][position]["bytes"] = len(data)
    index["shards"][position]["file_crc32c"] = f"{crc32c(data):08x}"


def run_loom(*args, expect=0):
    """Runs `loom ARGS...`; asserts the exit code and returns the completed process."""
    proc = subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, (
        f"loom {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def make_hf_model(kind, seed=0, **config):
    """A randomly initialised transformers model of `kind` ('llama', 'qwen2', 'mistral')."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[kind]
    # No bos/eos so that generate() never stops early and ids compare 1:1.
    config.setdefault("bos_token_id", None)
    config.setdefault("eos_token_id", None)
    config.setdefault("pad_token_id", None)
    torch.manual_seed(seed)
    model = model_class(config_class(**config)).eval()
    # Wider weights than the default 0.02 spread the logits, so greedy
    # decoding has clear winners and is not decided by rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
