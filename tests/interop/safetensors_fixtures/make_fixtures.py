"""Regenerates the safetensors files that tests/unit/test_safetensors.cpp reads.

They are written by the reference Python package so that loom's reader is
checked against its real output (tensor order, header padding, metadata).
Run with the loom venv:  $LOOM_PYTHON make_fixtures.py
"""
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

tensors = {
    "weight.f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) * 0.5,
    "weight.bf16": torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16),
    "weight.f16": torch.tensor([1.0, -0.5], dtype=torch.float16),
    "ids.i64": torch.tensor([1, -2, 1 << 40], dtype=torch.int64),
    "mask.bool": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4, dtype=torch.float32),
    "scalar": torch.tensor(7.25, dtype=torch.float32),
}
save_file(tensors, os.path.join(HERE, "python_written.safetensors"),
          metadata={"format": "pt", "note": "written by safetensors.torch"})
