"""End-to-end tests of `loom train` with tensor and data parallelism under mpirun.

The same small GQA model (8 query heads over 4 kv heads) trains for ten steps
on one rank and on tp = 2 and 4 ranks, with sequence parallelism off and on,
tied and untied, and on dp = 2 and 4 replicas and dp 2 x tp 2: the losses
must match the single-rank run within 1e-5 relative and the exported Hub
folder within 1e-6. A dp x tp run resumed from its checkpoint is bit-identical. Also: a checkpoint written
by one layout resumes in another, bad layouts are refused with exit code 2
before any work, and a rank killed mid-step ends the whole job in time.
"""
import functools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_train_e2e import LOOM_BIN, data, loom, losses_by_step, read_metrics, train_args  # noqa: F401 (data: fixture)


def run_folder_entries(run_dir):
    """The names in a run folder, its TensorBoard event files (named by time,
    host and process: events.out.tfevents.T.HOST.PID) as one name each."""
    return sorted("events.out.tfevents" if "tfevents" in p.name else p.name for p in run_dir.iterdir())


STEPS = 10
# Exports of a layout against the single rank's: tp sums partial products in
# another order, and ten AdamW steps carry that fp32 rounding to the weights
# (largest difference 1.08e-6 for tp 2 on an AMD EPYC; test_pipeline_e2e's
# WEIGHT_TOL measures the same for pp).
WEIGHT_TOL = 2e-6
MPIRUN = shutil.which("mpirun") or "mpirun"


def mpi_args(np_):
    args = [MPIRUN, "--oversubscribe", "-np", str(np_)]
    if os.geteuid() == 0:
        args.insert(1, "--allow-run-as-root")
    return args


def mpi_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def mpi_loom(np_, args, expect=0, timeout=600):
    """Runs `mpirun -np NP loom ARGS...`, asserts the exit code, returns (stdout, stderr)."""
    proc = subprocess.run([*mpi_args(np_), LOOM_BIN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=mpi_env())
    assert proc.returncode == expect, (
        f"mpirun -np {np_} loom {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
    return proc.stdout, proc.stderr


def tp_args(data, output_dir, name, tp, sp, tied, **extra):
    # eps 1e-6 rather than 1e-8: Adam divides by sqrt(v) + eps, so gradient
    # entries that cancel to ~1e-8 (where tp's other summation order changes
    # the rounding) would turn fp32 noise into lr-sized weight differences.
    return train_args(data, output_dir, name, STEPS, extra.pop("interval", 0),
                      **{"model.num_heads": 8, "model.num_kv_heads": 4, "model.tie_embeddings": str(tied).lower(),
                         "parallel.tp": tp, "parallel.sequence_parallel": str(sp).lower(),
                         "optimizer.eps": 1e-6, "data.valid": data["dataset"], "data.valid_interval": 5,
                         "data.valid_batches": 4, **extra})


@pytest.fixture(scope="module")
def single_rank(data, tmp_path_factory):
    """The tp = 1 reference runs, untied and tied, by `loom train` alone."""
    out = tmp_path_factory.mktemp("tp-reference")
    runs = {}
    for tied in (False, True):
        name = f"tp1-{'tied' if tied else 'untied'}"
        loom(*tp_args(data, out, name, 1, False, tied, interval=5))
        runs[tied] = out / name
    return runs


def assert_same_hub_folder(actual, expected, tol):
    a, b = load_file(str(actual / "model.safetensors")), load_file(str(expected / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)).max()
        assert diff <= tol, f"{actual}: {name} differs from the single-rank export by {diff}"
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (actual / f).read_bytes() == (expected / f).read_bytes(), f


@pytest.mark.parametrize("ranks,tp,sp,tied,zero", [
    (2, 2, False, False, 0), (2, 2, True, True, 0), (4, 4, True, False, 0), (4, 4, False, True, 0),
    (2, 1, False, False, 0), (4, 1, False, True, 0), (4, 2, True, False, 0),
    (2, 1, False, True, 1), (4, 1, False, False, 1), (4, 2, True, True, 1),
], ids=["tp2", "tp2-sp-tied", "tp4-sp", "tp4-tied", "dp2", "dp4-tied", "dp2-tp2-sp",
        "dp2-zero1-tied", "dp4-zero1", "dp2-tp2-sp-zero1-tied"])
def test_parallel_run_reproduces_the_single_rank_run(data, tmp_path, single_rank, ranks, tp, sp, tied, zero):
    """dp (parallel.dp auto = ranks / tp) x tp layouts, with and without ZeRO-1, at the same global batch."""
    out, _ = mpi_loom(ranks, tp_args(data, tmp_path, "run", tp, sp, tied, interval=5,
                                     **{"parallel.zero_stage": zero}))
    run, reference = tmp_path / "run", single_rank[tied]
    assert f"dp {ranks // tp} x pp 1 x tp {tp}" in out, out  # the grid is printed at start-up
    got, want = losses_by_step(run, STEPS), losses_by_step(reference, STEPS)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    # Validation reads the same samples on any layout (data.valid_batches counts over all replicas).
    valid = {r["step"]: r["valid_loss"] for r in read_metrics(run) if "valid_loss" in r}
    ref_valid = {r["step"]: r["valid_loss"] for r in read_metrics(reference) if "valid_loss" in r}
    assert sorted(valid) == sorted(ref_valid) == [5, 10], (valid, ref_valid)
    for step in valid:
        assert abs(valid[step] - ref_valid[step]) <= 1e-5 * ref_valid[step], (step, valid[step], ref_valid[step])
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r}
    ref_norms = {r["step"]: r["grad_norm"] for r in read_metrics(reference) if "grad_norm" in r}
    for step in range(1, STEPS + 1):
        assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (step, norms[step], ref_norms[step])
    assert_same_hub_folder(run / "hf", reference / "hf", WEIGHT_TOL)
    # Checkpoints are written whole, as one rank writes them: loom export of
    # the tensor-parallel checkpoint gives the same Hub folder.
    ckpt = run / "checkpoints" / "step-0000010"
    loom("export", ckpt, "--output", tmp_path / "exported")
    assert_same_hub_folder(tmp_path / "exported", reference / "hf", WEIGHT_TOL)
    # Only rank 0 wrote the run folder.
    assert run_folder_entries(run) == run_folder_entries(reference)


@functools.lru_cache(maxsize=None)
def visible_gpus():
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


@pytest.mark.parametrize("ranks,tp,zero", [(2, 1, 0), (2, 2, 0), (4, 2, 1)], ids=["dp2", "tp2", "dp2-tp2-zero1"])
def test_on_gpus_nccl_runs_reproduce_the_single_gpu_run(data, tmp_path, ranks, tp, zero):
    """One rank per GPU, dp and tp over NCCL (Note [host and device groups]): the losses of the single-GPU run
    within 1e-4 relative (NCCL sums in another order than one GPU), and the same grid printed. Needs as many
    GPUs as ranks; skipped elsewhere, as the NCCL process-group tests are."""
    if visible_gpus() < ranks:
        pytest.skip(f"needs {ranks} GPUs, {visible_gpus()} visible")
    loom(*tp_args(data, tmp_path, "one-gpu", 1, False, False, **{"run.device": "cuda"}))
    out, _ = mpi_loom(ranks, tp_args(data, tmp_path, "nccl", tp, tp > 1, False,
                                     **{"run.device": "cuda", "parallel.zero_stage": zero}))
    assert f"dp {ranks // tp} x pp 1 x tp {tp}" in out, out
    got, want = losses_by_step(tmp_path / "nccl", STEPS), losses_by_step(tmp_path / "one-gpu", STEPS)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-4 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("zero", [0, 1], ids=["zero0", "zero1"])
def test_a_dp_tp_run_resumed_from_its_checkpoint_is_bit_identical(data, tmp_path, zero):
    """dp 2 x tp 2: stop after step 5 (its checkpoint), resume on the same layout: the same bits as not stopping."""
    mpi_loom(4, tp_args(data, tmp_path, "full", 2, True, False, interval=5, **{"parallel.zero_stage": zero}))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000005", resumed / "checkpoints" / "step-0000005")
    (resumed / "checkpoints" / "latest").write_text("step-0000005\n")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    mpi_loom(4, tp_args(data, tmp_path, "resumed", 2, True, False, interval=5, **{"parallel.zero_stage": zero}))
    got, want = losses_by_step(resumed, STEPS), losses_by_step(full, STEPS)
    assert got == want, {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert (resumed / "hf" / "model.safetensors").read_bytes() == (full / "hf" / "model.safetensors").read_bytes()


def test_a_checkpoint_resumes_in_another_layout(data, tmp_path, single_rank):
    """tp = 2 resumes the single-rank run's step-5 checkpoint and finishes it like the single rank did."""
    reference = single_rank[False]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-0000005", run / "checkpoints" / "step-0000005")
    (run / "checkpoints" / "latest").write_text("step-0000005\n")
    shutil.copy(reference / "metrics.jsonl", run / "metrics.jsonl")
    out, _ = mpi_loom(2, tp_args(data, tmp_path, "run", 2, True, False, interval=5))
    assert "resumed from" in out, out
    got, want = losses_by_step(run, STEPS), losses_by_step(reference, STEPS)
    for step in range(6, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    assert_same_hub_folder(run / "hf", reference / "hf", WEIGHT_TOL)


@pytest.mark.parametrize("np_,sets,expected", [
    (2, {"parallel.tp": 3}, "model.num_heads (8)"),
    (2, {"parallel.tp": 2, "model.num_kv_heads": 1}, "model.num_kv_heads (1)"),
    (4, {"parallel.tp": 4, "model.intermediate_size": 126}, "model.intermediate_size (126)"),
    (3, {"parallel.tp": 2}, "world size 3 is not divisible by pp * tp = 2"),
    (2, {"parallel.tp": 2, "parallel.dp": 2}, "parallel.dp (2) * parallel."),
    (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true", "data.seq_len": 63, "model.max_seq_len": 64},
     "must be divisible by tp"),
    # A mixture of experts' experts are cut over tp as MLPs.
    (2, {"parallel.tp": 2, "model.architecture": "qwen3_moe", "model.num_experts": 2, "model.num_experts_per_tok": 1,
         "model.moe_intermediate_size": 19}, "model.moe_intermediate_size (19)"),
    (2, {"parallel.tp": 2, "model.architecture": "qwen2_moe", "model.num_experts": 2, "model.num_experts_per_tok": 1,
         "model.moe_intermediate_size": 16, "model.shared_expert_intermediate_size": 35},
     "model.shared_expert_intermediate_size (35)"),
], ids=["heads", "kv-heads", "intermediate", "world-not-product", "factors-exceed-world", "sp-seq-len",
        "expert-intermediate", "shared-expert-intermediate"])
def test_bad_layouts_are_refused_before_any_work(data, tmp_path, np_, sets, expected):
    args = train_args(data, tmp_path, "bad", STEPS, 0, **{"model.num_heads": 8, "model.num_kv_heads": 4, **sets})
    start = time.monotonic()
    _, err = mpi_loom(np_, args, expect=2, timeout=120)
    assert expected in err, err
    assert err.count(expected) == 1, f"the refusal should be printed once, by rank 0:\n{err}"
    assert not (tmp_path / "bad").exists(), "a refused run must not create its run folder"
    assert time.monotonic() - start < 60


def test_a_rank_killed_mid_step_ends_the_job_in_time(data, tmp_path):
    """SIGKILL one rank of a tp = 2 run while it trains: mpirun must exit non-zero within 30 s."""
    args = tp_args(data, tmp_path, "killed", 2, False, False, interval=3,
                   **{"schedule.train_steps": 400, "schedule.warmup_steps": 2})
    proc = subprocess.Popen([*mpi_args(2), LOOM_BIN, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=mpi_env())
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "loom"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    assert len(pids) == 2, f"expected 2 rank processes under mpirun, found {pids}"
    # Both ranks are in the middle of steps: the killed one dies between two
    # collectives of its step, the survivor waits in the next one.
    os.kill(pids[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("mpirun did not end within 60 s of a rank's SIGKILL")
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0, output
    assert "rank 1" in output, f"the job's end should name the killed rank:\n{output[-3000:]}"
    assert elapsed < 30, f"the job took {elapsed:.1f} s to end after the kill"
    # Nothing half-written: `latest` names a whole checkpoint.
    latest = (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip()
    ckpt = tmp_path / "killed" / "checkpoints" / latest
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        assert (ckpt / name).exists(), name


def test_sigterm_to_mpirun_stops_every_rank_at_one_step_with_a_checkpoint(data, tmp_path):
    """SIGTERM to mpirun reaches the ranks at different moments; they agree on one step and checkpoint it."""
    args = tp_args(data, tmp_path, "stopped", 2, True, False, interval=0,
                   **{"schedule.train_steps": 5000, "schedule.warmup_steps": 2})
    proc = subprocess.Popen([*mpi_args(2), LOOM_BIN, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=mpi_env())
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("mpirun did not end within 60 s of SIGTERM")
    assert "stopped by signal 15" in output, output[-3000:]
    checkpoints = tmp_path / "stopped" / "checkpoints"
    latest = (checkpoints / "latest").read_text().strip()
    last_step = read_metrics(tmp_path / "stopped")[-1]["step"]
    assert latest == f"step-{last_step:07d}", (latest, last_step)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", latest]
    manifest = json.loads((checkpoints / latest / "manifest.json").read_text())
    assert all((checkpoints / latest / name).exists() for name in manifest["files"])
