"""End-to-end tests of `loom train` with context parallelism (parallel.cp) under mpirun.

A small GQA model (8 query heads over 4 kv heads) trains for four steps at seq
256 on one rank and on cp 2, cp 4, cp 2 x tp 2, dp 2 x cp 2 and cp 2 x pp 2
(1f1b over the two micro-batches of each replica's step): the losses
must match the single-rank run within 1e-5 relative, the validation losses
too, and the exported Hub folder within 1e-6. A cp 2 checkpoint resumes on
one rank and on tp 2 and finishes like the cp 2 run. Mistral's sliding
window under cp 2 matches one rank. ZeRO-1 on cp 2 and ZeRO-3 on dp 2 x cp 2
match one rank too, and the ZeRO-3 checkpoint finishes on one rank. A layout cp does not
take yet is refused with exit code 2 before any work. Two ctest entries
(e2e_context_parallel and _grid) share the file, each near 30 s on 2 cores.
"""
import shutil
import time

import pytest

from test_tensor_parallel_e2e import WEIGHT_TOL, assert_same_hub_folder, mpi_loom
from test_train_e2e import loom, losses_by_step, read_metrics, train_args  # noqa: F401
from test_train_e2e import data  # noqa: F401 (fixture)

STEPS = 4
SEQ = 256


def cp_args(data, output_dir, name, **extra):
    # eps 1e-6 rather than 1e-8: see tp_args in test_tensor_parallel_e2e.py.
    return train_args(data, output_dir, name, STEPS, extra.pop("interval", 2),
                      **{"model.num_heads": 8, "model.num_kv_heads": 4, "data.seq_len": SEQ,
                         "model.max_seq_len": SEQ, "optimizer.eps": 1e-6, "data.valid": data["dataset"],
                         "data.valid_interval": 2, "data.valid_batches": 2, **extra})


@pytest.fixture(scope="module")
def single_rank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-reference")
    loom(*cp_args(data, out, "cp1"))
    return out / "cp1"


@pytest.fixture(scope="module")
def cp2_run(data, tmp_path_factory):
    """One cp 2 run, shared by the layout test and the resume tests (ctest's time budget)."""
    out = tmp_path_factory.mktemp("cp2")
    stdout, _ = mpi_loom(2, cp_args(data, out, "cp2", **{"parallel.cp": 2}))
    return out / "cp2", stdout


ZERO3_DP2_CP2 = {"parallel.cp": 2, "parallel.zero_stage": 3}


@pytest.fixture(scope="module")
def zero3_dp2_cp2_run(data, tmp_path_factory):
    """dp 2 x cp 2 with ZeRO-3 (the parameters sharded over all four ranks), shared by the layout test and the
    resume test."""
    out = tmp_path_factory.mktemp("zero3-dp2-cp2")
    stdout, _ = mpi_loom(4, cp_args(data, out, "run", **ZERO3_DP2_CP2))
    return out / "run", stdout


def assert_losses_match(run, reference, first=1):
    got, want = losses_by_step(run, STEPS), losses_by_step(reference, STEPS)
    for step in range(first, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("ranks,sets,grid", [
    (2, {"parallel.cp": 2}, "dp 1 x cp 2 x pp 1 x tp 1"),
    (4, {"parallel.cp": 4}, "dp 1 x cp 4 x pp 1 x tp 1"),
    (4, {"parallel.cp": 2, "parallel.tp": 2}, "dp 1 x cp 2 x pp 1 x tp 2"),
    (4, {"parallel.cp": 2}, "dp 2 x cp 2 x pp 1 x tp 1"),  # dp auto: 4 / cp
    (4, {"parallel.cp": 2, "parallel.pp": 2}, "dp 1 x cp 2 x pp 2 x tp 1"),
    (2, {"parallel.cp": 2, "parallel.zero_stage": 1}, "dp 1 x cp 2 x pp 1 x tp 1"),
    (4, ZERO3_DP2_CP2, "dp 2 x cp 2 x pp 1 x tp 1"),
], ids=["alone-cp2", "alone-cp4", "grid-cp2-tp2", "grid-dp2-cp2", "grid-cp2-pp2", "zero1-cp2", "zero3-dp2-cp2"])
def test_context_parallel_run_reproduces_the_single_rank_run(data, tmp_path, single_rank, cp2_run, ranks, sets,
                                                             grid, request):
    if ranks == 2 and sets == {"parallel.cp": 2}:
        run, out = cp2_run
    elif sets == ZERO3_DP2_CP2:
        run, out = request.getfixturevalue("zero3_dp2_cp2_run")
    else:
        out, _ = mpi_loom(ranks, cp_args(data, tmp_path, "run", **sets))
        run = tmp_path / "run"
    assert grid in out, out  # the grid is printed at start-up
    assert_losses_match(run, single_rank)
    valid = {r["step"]: r["valid_loss"] for r in read_metrics(run) if "valid_loss" in r}
    ref_valid = {r["step"]: r["valid_loss"] for r in read_metrics(single_rank) if "valid_loss" in r}
    assert sorted(valid) == sorted(ref_valid) == [2, 4], (valid, ref_valid)
    for step in valid:
        assert abs(valid[step] - ref_valid[step]) <= 1e-5 * ref_valid[step], (step, valid[step], ref_valid[step])
    assert_same_hub_folder(run / "hf", single_rank / "hf", WEIGHT_TOL)


def test_window_cp2_reproduces_the_single_rank_run(data, tmp_path):
    """Mistral's sliding window of 40 tokens on every layer: shorter than a cp 2 chunk of 64, so the ring
    masks the window's edge and skips the pairs of chunks behind it. (Soft-capping needs a gemma Hub
    folder to start from: test_context_parallel's model and ring cases hold it to one rank.)"""
    mistral = {"model.architecture": "mistral", "model.sliding_window": 40}
    loom(*cp_args(data, tmp_path, "one", **mistral))
    mpi_loom(2, cp_args(data, tmp_path, "cp2", **{"parallel.cp": 2, **mistral}))
    assert_losses_match(tmp_path / "cp2", tmp_path / "one")
    assert_same_hub_folder(tmp_path / "cp2" / "hf", tmp_path / "one" / "hf", WEIGHT_TOL)


@pytest.mark.parametrize("ranks,sets", [(1, {}), (2, {"parallel.tp": 2})], ids=["on-cp1", "on-tp2"])
def test_a_cp2_checkpoint_resumes_in_another_layout(data, tmp_path, cp2_run, ranks, sets):
    """cp 2 writes its step-2 checkpoint (cp rank 0 of the replica writes); one rank and tp 2 finish from it."""
    written, _ = cp2_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(written / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000002")
    (run / "checkpoints" / "latest").write_text("step-0000002\n")
    shutil.copy(written / "metrics.jsonl", run / "metrics.jsonl")
    if ranks == 1:
        out, _ = loom(*cp_args(data, tmp_path, "run", **sets))
    else:
        out, _ = mpi_loom(ranks, cp_args(data, tmp_path, "run", **sets))
    assert "resumed from" in out, out
    assert_losses_match(run, written, first=3)
    assert_same_hub_folder(run / "hf", written / "hf", WEIGHT_TOL)


def test_a_zero3_dp2_cp2_checkpoint_finishes_on_one_rank(data, tmp_path, zero3_dp2_cp2_run):
    """Each of the four ranks writes its ZeRO-3 piece of the parameters and AdamW state (the cp ranks' too, Note
    [who writes a piece]); one rank without ZeRO reads them whole and finishes like the run."""
    written, _ = zero3_dp2_cp2_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(written / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000002")
    (run / "checkpoints" / "latest").write_text("step-0000002\n")
    shutil.copy(written / "metrics.jsonl", run / "metrics.jsonl")
    out, _ = loom(*cp_args(data, tmp_path, "run"))
    assert "resumed from" in out, out
    assert_losses_match(run, written, first=3)
    assert_same_hub_folder(run / "hf", written / "hf", WEIGHT_TOL)


def test_a_layout_cp_does_not_take_is_refused_before_any_work(data, tmp_path):
    """A sequence 2 cp does not divide, under mpirun (the other refusals: test_config's cp_* cases)."""
    args = cp_args(data, tmp_path, "bad", **{"parallel.cp": 2, "data.seq_len": 254})
    expected = "the sequence length (254) is not divisible by 2 * parallel.cp (4)"
    start = time.monotonic()
    _, err = mpi_loom(2, args, expect=2, timeout=120)
    assert expected in err, err
    assert not (tmp_path / "bad").exists(), "a refused run must not create its run folder"
    assert time.monotonic() - start < 60
