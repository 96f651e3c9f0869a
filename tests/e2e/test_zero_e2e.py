"""ZeRO-2 and ZeRO-3 (parallel.zero_stage 2 and 3) end to end under mpirun (issue #27).

A tiny 4-layer model trains 10 steps on one rank, on dp 4 and dp 2 x pp 2
with ZeRO-2, and on dp 4, dp 2 x tp 2, dp 2 x pp 2 and dp 2 x tp 2 x pp 2
with ZeRO-3: every step's loss must match the single-rank run's within 1e-5
relative (the gradient norm within 1e-4). Every run checkpoints at step 5;
resuming there on the same layout gives the same bits as not stopping
(dp 2 x pp 2 ZeRO-2, dp 2 x tp 2 ZeRO-3), and checkpoints move between
ZeRO and other layouts: ZeRO-2 and ZeRO-3 checkpoints resume on one rank
without ZeRO, the one-rank checkpoint resumes under ZeRO-3, each giving the
single-rank losses.
"""
import shutil

import pytest

from test_train_e2e import loom, losses_by_step, read_metrics, train_args  # noqa: F401
from test_train_e2e import data  # noqa: F401 (fixture)
from test_sharded_checkpoint_e2e import resume_past_a_damaged_newest_checkpoint
from test_tensor_parallel_e2e import mpi_loom

STEPS = 10
SAVED = 5


def layout(dp=1, tp=1, pp=1, zero=0):
    return {"parallel.dp": dp, "parallel.tp": tp, "parallel.pp": pp, "parallel.zero_stage": zero}


LAYOUTS = {
    "dp4-zero2": layout(dp=4, zero=2),
    "dp2-pp2-zero2": layout(dp=2, pp=2, zero=2),
    "dp4-zero3": layout(dp=4, zero=3),
    "dp2-tp2-zero3": layout(dp=2, tp=2, zero=3),
    "dp2-pp2-zero3": layout(dp=2, pp=2, zero=3),
    "dp2-tp2-pp2-zero3": layout(dp=2, tp=2, pp=2, zero=3),
}
RESUMED_IN_PLACE = ["dp2-pp2-zero2", "dp2-tp2-zero3"]


def ranks(parallel):
    return parallel["parallel.dp"] * parallel["parallel.tp"] * parallel["parallel.pp"]


def args(data, output_dir, name, parallel):
    # Four layers (pp 2 has two each), eight query and four key-value heads,
    # one sequence per micro-batch so that a step has several micro-batches
    # per replica (ZeRO-2 accumulates the first ones in .grad and reduces
    # while the last one's backward runs). eps 1e-6 as in the other parallel
    # tests: other summation orders must not be magnified.
    return train_args(data, output_dir, name, STEPS, SAVED,
                      **{"model.num_layers": 4, "model.num_heads": 8, "model.num_kv_heads": 4,
                         "model.tie_embeddings": "true", "batch.micro_batch_size": 1, "optimizer.eps": 1e-6,
                         "checkpoint.export_hf_at_end": "false", **parallel, "launch.ranks": ranks(parallel)})


def run(data, output_dir, name, parallel):
    if ranks(parallel) == 1:
        return loom(*args(data, output_dir, name, parallel))
    return mpi_loom(ranks(parallel), args(data, output_dir, name, parallel))


def assert_matches(run_dir, reference, first_step=1):
    got, want = losses_by_step(run_dir, STEPS), losses_by_step(reference, STEPS)
    for step in range(first_step, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(run_dir) if "grad_norm" in r}
    ref_norms = {r["step"]: r["grad_norm"] for r in read_metrics(reference) if "grad_norm" in r}
    for step in range(first_step, STEPS + 1):
        assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (step, norms[step], ref_norms[step])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The single-rank reference and each ZeRO layout's uninterrupted run, with their step-5 checkpoints."""
    out = tmp_path_factory.mktemp("zero")
    run(data, out, "single", layout())
    for name, parallel in LAYOUTS.items():
        run(data, out, name, parallel)
    return out


def resume_copy(original, resumed):
    step_folder = f"step-{SAVED:07d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(original / "checkpoints" / step_folder, resumed / "checkpoints" / step_folder)
    (resumed / "checkpoints" / "latest").write_text(step_folder + "\n")
    shutil.copy(original / "metrics.jsonl", resumed / "metrics.jsonl")  # the resumed run cuts it at step 5


@pytest.mark.parametrize("name", LAYOUTS)
def test_zero_run_reproduces_the_single_rank_losses(runs, name):
    assert_matches(runs / name, runs / "single")


@pytest.mark.parametrize("name", RESUMED_IN_PLACE)
def test_zero_run_resumed_from_its_checkpoint_is_bit_identical(data, tmp_path, runs, name):
    resume_copy(runs / name, tmp_path / "resumed")
    out, _ = run(data, tmp_path, "resumed", LAYOUTS[name])
    assert "resumed from" in out, out
    got, want = losses_by_step(tmp_path / "resumed", STEPS), losses_by_step(runs / name, STEPS)
    assert got == want, {s: (got[s], want[s]) for s in want if got[s] != want[s]}


@pytest.mark.parametrize("source,target", [
    ("dp4-zero2", layout()),
    ("dp4-zero3", layout()),
    ("single", layout(dp=2, tp=2, zero=3)),
], ids=["dp4-zero2-to-single", "dp4-zero3-to-single", "single-to-dp2-tp2-zero3"])
def test_zero_checkpoint_resumes_on_another_layout(data, tmp_path, runs, source, target):
    resume_copy(runs / source, tmp_path / "resumed")
    out, _ = run(data, tmp_path, "resumed", target)
    assert "resumed from" in out, out
    assert_matches(tmp_path / "resumed", runs / "single", first_step=SAVED + 1)


def test_a_zero3_resume_that_fails_after_sharding_falls_back_to_the_older_checkpoint(data, tmp_path):
    """The newest checkpoint's last piece (optimizer state, read after the
    parameters were sharded) is damaged: every rank passes over it, resumes
    from the older one on parameters it had already sharded once, and ends
    as the undamaged run does."""
    out, path, _ = resume_past_a_damaged_newest_checkpoint(
        data, tmp_path, {**layout(dp=2, zero=3), "model.num_heads": 8, "model.num_kv_heads": 4},
        "*rank00001.safetensors")
    assert "CRC32C" in out and path.name in out, out
