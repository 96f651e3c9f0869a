"""A checkpoint resumes on another layout (issue: distributed checkpoints).

Four layouts each train 15 steps and checkpoint at step 10: tp 2 x pp 2,
dp 2 x tp 2 with ZeRO-1, dp 4 and pp 4. Each step-10 checkpoint then resumes
on four other layouts (one rank, tp 4, dp 2 x pp 2, dp 2 x tp 2 x pp 2), and
every resumed run's steps 11-15 must give the losses of the uninterrupted run
on the original layout within 1e-5 relative. The global batch is the same
everywhere (8 sequences), so a step reads the same samples on any layout.
"""
import shutil

import pytest

from test_train_e2e import loom, losses_by_step, train_args  # noqa: F401
from test_train_e2e import data  # noqa: F401 (fixture)
from test_tensor_parallel_e2e import mpi_loom

STEPS = 15
SAVED = 10


def layout(dp=1, tp=1, pp=1, zero=0, schedule="1f1b"):
    return {"parallel.dp": dp, "parallel.tp": tp, "parallel.pp": pp, "parallel.zero_stage": zero,
            "parallel.pp_schedule": schedule}


SOURCES = {
    "tp2-pp2": layout(tp=2, pp=2),
    "dp2-tp2-zero1": layout(dp=2, tp=2, zero=1),
    "dp4": layout(dp=4),
    "pp4": layout(pp=4, schedule="afab"),
}
TARGETS = {
    "single": layout(),
    "tp4": layout(tp=4),
    "dp2-pp2": layout(dp=2, pp=2),
    "dp2-tp2-pp2": layout(dp=2, tp=2, pp=2, schedule="interleaved"),
}


def ranks(parallel):
    return parallel["parallel.dp"] * parallel["parallel.tp"] * parallel["parallel.pp"]


def args(data, output_dir, name, parallel):
    # Four layers (pp 4 has one each; interleaved pp 2 x 2 chunks too), eight
    # query and four key-value heads (tp 4 splits both), one sequence per
    # micro-batch so that a step has eight micro-batches (enough for every
    # schedule at dp 2). eps 1e-6 as in the other parallel tests.
    extra = {**parallel, "launch.ranks": ranks(parallel)}
    if parallel["parallel.pp_schedule"] == "interleaved":
        extra["parallel.virtual_stages"] = 2
    return train_args(data, output_dir, name, STEPS, SAVED,
                      **{"model.num_layers": 4, "model.num_heads": 8, "model.num_kv_heads": 4,
                         "model.tie_embeddings": "true", "batch.micro_batch_size": 1, "optimizer.eps": 1e-6,
                         "checkpoint.export_hf_at_end": "false", **extra})


def run(data, output_dir, name, parallel):
    if ranks(parallel) == 1:
        return loom(*args(data, output_dir, name, parallel))
    return mpi_loom(ranks(parallel), args(data, output_dir, name, parallel))


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """Each source layout's uninterrupted 15 steps, with its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("resharding-sources")
    for name, parallel in SOURCES.items():
        run(data, out, name, parallel)
    return out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_a_checkpoint_resumes_on_another_layout(data, tmp_path, saved, source, target):
    original = saved / source
    resumed = tmp_path / "resumed"
    step_folder = f"step-{SAVED:07d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(original / "checkpoints" / step_folder, resumed / "checkpoints" / step_folder)
    (resumed / "checkpoints" / "latest").write_text(step_folder + "\n")
    shutil.copy(original / "metrics.jsonl", resumed / "metrics.jsonl")  # the resumed run cuts it at step 10
    out = run(data, tmp_path, "resumed", TARGETS[target])
    assert f"resumed from {resumed / 'checkpoints' / step_folder}" in "".join(out), out
    got, want = losses_by_step(resumed, STEPS), losses_by_step(original, STEPS)
    for step in range(SAVED + 1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (source, target, step, got[step], want[step])
