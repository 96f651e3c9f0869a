"""The test-only device backend mpi_staged (parallel/staged_process_group.h):
the model's device tensors go between ranks by copies through host memory
and MPI, so several ranks can share one GPU. Each multi-rank layout trained
through it ends with exactly the weights of the same run on the MPI groups
(the copies change no value), and every rank says where it ran.

Here (no GPU) the runs are on the CPU, which runs the backend's own code
with host tensors. With LOOM_TEST_DEVICE=cuda (the GPU machine:
tests/gpu/run_gpu_checks.sh) the staged runs put every rank on the one GPU;
their weights are then compared with the CPU run's within a tolerance, since
CUDA kernels round differently.
"""
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_launch_e2e import launch_args, run_loom
from test_train_e2e import data  # noqa: F401 (fixture)

DEVICE = os.environ.get("LOOM_TEST_DEVICE", "cpu")

LAYOUTS = {
    "dp2_zero1": (2, 1, {"parallel.zero_stage": 1}),
    "tp2_sp": (2, 2, {"parallel.sequence_parallel": "true"}),
    "pp2_1f1b": (2, 1, {"parallel.pp": 2}),
    "pp2_interleaved": (2, 1, {"parallel.pp": 2, "parallel.pp_schedule": "interleaved",
                               "parallel.virtual_stages": 2, "model.num_layers": 4}),
    "dp2_tp2_zero1": (4, 2, {"parallel.zero_stage": 1}),
    "tp2_pp2_sp_bf16": (4, 2, {"parallel.pp": 2, "parallel.sequence_parallel": "true",
                               "precision.compute": "bf16"}),
}


def train(data, tmp_path, name, ranks, tp, extra, backend, device):
    run_dir = tmp_path / name
    args = launch_args(data, tmp_path, name, ranks, tp, steps=3,
                       **{**extra, "parallel.device_backend": backend, "run.device": device})
    out, err = run_loom(args, timeout=600)
    return run_dir, out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_layout_through_the_staged_backend_trains_to_the_mpi_runs_weights(data, tmp_path, layout):
    ranks, tp, extra = LAYOUTS[layout]
    reference, _ = train(data, tmp_path, f"{layout}-mpi", ranks, tp, extra, "nccl", "cpu")
    staged, out = train(data, tmp_path, f"{layout}-staged", ranks, tp, extra, "mpi_staged", DEVICE)
    where = dict(re.findall(r"^train: world rank (\d+): (\S+) on \S+, device tensors through mpi_staged", out, re.M))
    assert sorted(map(int, where)) == list(range(ranks)), out[-3000:]
    expected = "cuda:0" if DEVICE == "cuda" else "cpu"
    assert set(where.values()) == {expected}, where
    a = load_file(str(reference / "hf" / "model.safetensors"))
    b = load_file(str(staged / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if DEVICE == "cpu":
            assert np.array_equal(a[key], b[key]), f"{layout}: {key} differs from the MPI run's"
        else:
            assert np.allclose(a[key], b[key], rtol=2e-2, atol=2e-3), f"{layout}: {key} far from the CPU run's"
