"""Asynchronous checkpoint saves (`checkpoint.async: true`).

A background thread writes each checkpoint while training goes on, so the
run must not change: the same losses as the synchronous run and checkpoint
folders whose files are byte for byte the synchronous run's, on one rank
(where the snapshot is a copy of tensors that training keeps updating) and
on dp 2 with ZeRO-1 and tp 2 (where rank 0 writes gathered tensors). A run
killed while the background thread is writing leaves `latest` naming a whole
checkpoint and resumes to the same losses.
"""
import pytest

from test_train_e2e import check_after_kill, loom, losses_by_step, run_and_kill, train_args
from test_train_e2e import data  # noqa: F401 (fixture)
from test_tensor_parallel_e2e import mpi_loom

STEPS = 12
INTERVAL = 3
CHECKPOINTS = ["step-0000006", "step-0000009", "step-0000012"]  # keep_last 3


def args_for(data, out, name, asynchronous, **extra):
    return train_args(data, out, name, STEPS, INTERVAL,
                      **{"checkpoint.keep_last": 3, "checkpoint.async": str(asynchronous).lower(),
                         "model.num_heads": 8, "model.num_kv_heads": 4, **extra})


def assert_same_checkpoints(run, reference):
    for name in CHECKPOINTS:
        got, want = run / "checkpoints" / name, reference / "checkpoints" / name
        files = sorted(p.name for p in want.iterdir() if p.is_file())
        assert sorted(p.name for p in got.iterdir() if p.is_file()) == files, name
        for file in files:
            if file == "config.yaml":  # names checkpoint.async and run.name
                continue
            assert (got / file).read_bytes() == (want / file).read_bytes(), f"{name}/{file}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest"] + CHECKPOINTS
    assert (run / "checkpoints" / "latest").read_text().strip() == CHECKPOINTS[-1]


def run_pair(data, tmp_path, np_, **layout):
    """The synchronous and the asynchronous run of one layout; returns their folders and the async log."""
    runs, log = {}, ""
    for asynchronous in (False, True):
        # Same run.name: manifests and trainer states name nothing else that differs.
        out = tmp_path / ("async" if asynchronous else "sync")
        args = args_for(data, out, "run", asynchronous, **layout)
        stdout = mpi_loom(np_, args)[0] if np_ > 1 else loom(*args)[0]
        if asynchronous:
            log = stdout
        runs[asynchronous] = out / "run"
    return runs[False], runs[True], log


def test_async_saves_write_the_synchronous_checkpoints_on_one_rank(data, tmp_path):
    sync, run, log = run_pair(data, tmp_path, 1)
    assert losses_by_step(run, STEPS) == losses_by_step(sync, STEPS)
    assert_same_checkpoints(run, sync)
    saves = [line for line in log.splitlines() if line.startswith("checkpoint:") and "loop stalled" in line]
    assert len(saves) == STEPS // INTERVAL and all("writing in the background" in line for line in saves), log
    assert "written in the background in" in log, log


@pytest.mark.parametrize("layout", [{"parallel.dp": 2, "parallel.zero_stage": 1}, {"parallel.tp": 2}],
                         ids=["dp2-zero1", "tp2"])
def test_async_saves_write_the_synchronous_checkpoints_on_two_ranks(data, tmp_path, layout):
    sync, run, log = run_pair(data, tmp_path, 2, **layout)
    assert losses_by_step(run, STEPS) == losses_by_step(sync, STEPS)
    assert_same_checkpoints(run, sync)
    assert "writing in the background" in log, log


def test_a_kill_during_a_background_write_loses_nothing(data, tmp_path):
    reference = tmp_path / "reference"
    loom(*args_for(data, reference, "run", False))
    out = tmp_path / "killed"
    args = args_for(data, out, "run", True)
    ckpt_dir = out / "run" / "checkpoints"
    killed, what = run_and_kill(args, ckpt_dir, "tmp")
    if killed:
        check_after_kill(ckpt_dir, what)
    loom(*args)
    assert losses_by_step(out / "run", STEPS) == losses_by_step(reference / "run", STEPS)
    assert (out / "run" / "hf" / "model.safetensors").read_bytes() == \
        (reference / "run" / "hf" / "model.safetensors").read_bytes()
