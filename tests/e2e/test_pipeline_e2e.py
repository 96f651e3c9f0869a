"""End-to-end tests of `loom train` with pipeline parallelism under mpirun.

An 8-layer model trains for ten steps on one rank and on pp = 2 and 4 ranks
with each schedule (afab, 1f1b, interleaved with two chunks per rank), on
tp 2 x pp 2 (also with model.recompute selective against the reference's
none), and in the full grid (dp 2 x pp 2, dp 2 x tp 2 x pp 2 on eight
ranks, with and without ZeRO-1): the losses, validation losses and gradient
norms must match the single-rank run within 1e-5 relative (1e-4 for the
norms), the exported Hub folder and the checkpoint within 2e-6. An
eight-rank run resumed from its checkpoint is bit-identical; a checkpoint
moves between a pipeline layout and one rank; bad pipeline layouts are
refused with exit code 2 before any work.
"""
import shutil
import time

import pytest

from test_train_e2e import loom, losses_by_step, read_metrics, train_args  # noqa: F401
from test_train_e2e import data  # noqa: F401 (fixture)
from test_tensor_parallel_e2e import assert_same_hub_folder, mpi_loom, run_folder_entries, visible_gpus

STEPS = 10
LAYERS = 8
# The exported weights' distance from the single-rank run's. tp x pp sums in
# other orders (tp's all-reduces, sequence parallelism's reduce-scatters), and
# ten AdamW steps carry that rounding to the weights: with the tied tp 2 x pp 2
# sp layout the largest difference measured 0.45e-6 to 1.1e-6 over run.seed
# 1, 2, 3 and 1234 (pp alone: about 1e-7), so 1e-6 held for some seeds only.
WEIGHT_TOL = 2e-6


def pp_args(data, output_dir, name, tied, **extra):
    # Eight layers so that pp 4 x 2 chunks still has one per model stage; one
    # sequence per micro-batch so that a step has eight micro-batches (four
    # per replica under dp 2), enough for every schedule. eps 1e-6 as in the
    # tensor-parallel tests: other summation orders must not be magnified.
    return train_args(data, output_dir, name, STEPS, extra.pop("interval", 0),
                      **{"model.num_layers": LAYERS, "model.num_heads": 8, "model.num_kv_heads": 4,
                         "model.tie_embeddings": str(tied).lower(), "batch.micro_batch_size": 1,
                         "optimizer.eps": 1e-6, "data.valid": data["dataset"], "data.valid_interval": 5,
                         "data.valid_batches": 4, **extra})


def layout(pp, schedule="1f1b", tp=1, virtual=1, sp=False, zero=0):
    return {"parallel.pp": pp, "parallel.pp_schedule": schedule, "parallel.virtual_stages": virtual,
            "parallel.tp": tp, "parallel.sequence_parallel": str(sp).lower(), "parallel.zero_stage": zero}


@pytest.fixture(scope="module")
def single_rank(data, tmp_path_factory):
    """The one-rank reference runs of the 8-layer model, untied and tied."""
    out = tmp_path_factory.mktemp("pp-reference")
    runs = {}
    for tied in (False, True):
        name = f"pp1-{'tied' if tied else 'untied'}"
        loom(*pp_args(data, out, name, tied, interval=5))
        runs[tied] = out / name
    return runs


def assert_matches_single_rank(run, reference, first_step=1):
    got, want = losses_by_step(run, STEPS), losses_by_step(reference, STEPS)
    for step in range(first_step, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    valid = {r["step"]: r["valid_loss"] for r in read_metrics(run) if "valid_loss" in r}
    ref_valid = {r["step"]: r["valid_loss"] for r in read_metrics(reference) if "valid_loss" in r}
    for step in (5, 10):
        if step >= first_step:
            assert abs(valid[step] - ref_valid[step]) <= 1e-5 * ref_valid[step], (step, valid[step], ref_valid[step])
    norms = {r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r}
    ref_norms = {r["step"]: r["grad_norm"] for r in read_metrics(reference) if "grad_norm" in r}
    for step in range(first_step, STEPS + 1):
        assert abs(norms[step] - ref_norms[step]) <= 1e-4 * ref_norms[step], (step, norms[step], ref_norms[step])
    assert_same_hub_folder(run / "hf", reference / "hf", WEIGHT_TOL)


@pytest.mark.parametrize("ranks,tied,parallel", [
    (2, False, layout(2, "afab")),
    (2, True, layout(2, "1f1b")),
    (2, False, layout(2, "interleaved", virtual=2)),
    (4, True, layout(4, "afab")),
    (4, False, layout(4, "1f1b")),
    (4, True, layout(4, "interleaved", virtual=2)),
    (4, True, layout(2, "1f1b", tp=2, sp=True)),
    (4, True, {**layout(2, "1f1b", tp=2, sp=True), "model.recompute": "selective"}),
    (4, False, layout(2, "interleaved", tp=2, virtual=2)),
    (4, True, layout(2, "1f1b", zero=0)),
    (4, False, layout(2, "afab", zero=1)),
    (8, True, layout(2, "1f1b", tp=2, sp=True, zero=0)),
    (8, False, layout(2, "interleaved", tp=2, virtual=2, zero=1)),
], ids=["pp2-afab", "pp2-1f1b-tied", "pp2-interleaved", "pp4-afab-tied", "pp4-1f1b", "pp4-interleaved-tied",
        "tp2-pp2-sp-tied", "tp2-pp2-sp-selective-tied", "tp2-pp2-interleaved", "dp2-pp2-tied", "dp2-pp2-afab-zero1", "dp2-tp2-pp2-sp-tied",
        "dp2-tp2-pp2-interleaved-zero1"])
def test_pipeline_run_reproduces_the_single_rank_run(data, tmp_path, single_rank, ranks, tied, parallel):
    out, _ = mpi_loom(ranks, pp_args(data, tmp_path, "run", tied, interval=5, **parallel))
    run = tmp_path / "run"
    dp = ranks // (parallel["parallel.pp"] * parallel["parallel.tp"])
    assert f"dp {dp} x pp {parallel['parallel.pp']} x tp {parallel['parallel.tp']}" in out, out
    assert_matches_single_rank(run, single_rank[tied])
    # The checkpoint holds the whole model, as one rank writes it.
    loom("export", run / "checkpoints" / "step-0000010", "--output", tmp_path / "exported")
    assert_same_hub_folder(tmp_path / "exported", single_rank[tied] / "hf", WEIGHT_TOL)
    assert run_folder_entries(run) == run_folder_entries(single_rank[tied])


@pytest.mark.parametrize("ranks,tied,parallel", [
    (2, True, layout(2)),
    (2, False, layout(2, "interleaved", virtual=2)),
    (4, False, layout(2, tp=2, sp=True)),
], ids=["pp2-1f1b-tied", "pp2-interleaved", "tp2-pp2-sp"])
def test_on_gpus_the_pipeline_over_nccl_reproduces_the_single_gpu_run(data, tmp_path, ranks, tied, parallel):
    """One rank per GPU; activations and gradients over the NCCL twins of the pipeline's links (Note [pipeline
    links]), the tied embedding's gradient over pp's: the losses of the single-GPU run within 1e-4 relative.
    Needs as many GPUs as ranks; skipped elsewhere."""
    if visible_gpus() < ranks:
        pytest.skip(f"needs {ranks} GPUs, {visible_gpus()} visible")
    loom(*pp_args(data, tmp_path, "one-gpu", tied, **{"run.device": "cuda"}))
    mpi_loom(ranks, pp_args(data, tmp_path, "nccl", tied, **{"run.device": "cuda", **parallel}))
    got, want = losses_by_step(tmp_path / "nccl", STEPS), losses_by_step(tmp_path / "one-gpu", STEPS)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-4 * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("zero", [0, 1], ids=["zero0", "zero1"])
def test_an_eight_rank_run_resumed_from_its_checkpoint_is_bit_identical(data, tmp_path, zero):
    """dp 2 x tp 2 x pp 2: stop after step 5's checkpoint, resume: the same bits as not stopping."""
    parallel = layout(2, "1f1b", tp=2, sp=True, zero=zero)
    mpi_loom(8, pp_args(data, tmp_path, "full", True, interval=5, **parallel))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000005", resumed / "checkpoints" / "step-0000005")
    (resumed / "checkpoints" / "latest").write_text("step-0000005\n")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    out, _ = mpi_loom(8, pp_args(data, tmp_path, "resumed", True, interval=5, **parallel))
    assert "resumed from" in out, out
    got, want = losses_by_step(resumed, STEPS), losses_by_step(full, STEPS)
    assert got == want, {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert (resumed / "hf" / "model.safetensors").read_bytes() == (full / "hf" / "model.safetensors").read_bytes()


def test_a_single_rank_checkpoint_resumes_on_a_pipeline(data, tmp_path, single_rank):
    """pp 2 (interleaved) resumes the one-rank run's step-5 checkpoint and finishes it as one rank did."""
    reference = single_rank[True]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-0000005", run / "checkpoints" / "step-0000005")
    (run / "checkpoints" / "latest").write_text("step-0000005\n")
    shutil.copy(reference / "metrics.jsonl", run / "metrics.jsonl")
    out, _ = mpi_loom(2, pp_args(data, tmp_path, "run", True, interval=5, **layout(2, "interleaved", virtual=2)))
    assert "resumed from" in out, out
    assert_matches_single_rank(run, reference, first_step=6)


@pytest.mark.parametrize("np_,sets,expected", [
    (2, {**layout(2), "model.num_layers": 1}, "parallel.pp (2) > model.num_layers (1)"),
    (4, {**layout(2, "interleaved", virtual=2), "parallel.tp": 2, "batch.global_batch_size": 3},
     "a multiple of pp"),
    (2, {**layout(2, "interleaved", virtual=2), "batch.global_batch_size": 3}, "a multiple of pp"),
    (2, {**layout(2, "interleaved", virtual=5)}, "parallel.virtual_stages (5) = 10 > model.num_layers (8)"),
    (2, {**layout(2, "zigzag")}, "pp_schedule"),
    (3, {**layout(2)}, "world size 3 is not divisible by pp * tp = 2"),
], ids=["fewer-layers-than-stages", "interleaved-m-tp", "interleaved-m", "too-many-chunks", "unknown-schedule",
        "world-not-product"])
def test_bad_pipeline_layouts_are_refused_before_any_work(data, tmp_path, np_, sets, expected):
    args = pp_args(data, tmp_path, "bad", False, **sets)
    start = time.monotonic()
    _, err = mpi_loom(np_, args, expect=2, timeout=120)
    assert expected in err, err
    assert err.count("error") == 1, f"the refusal should be printed once, by rank 0:\n{err}"
    assert not (tmp_path / "bad").exists(), "a refused run must not create its run folder"
    assert time.monotonic() - start < 60
