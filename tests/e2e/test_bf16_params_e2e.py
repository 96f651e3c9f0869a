"""precision.params bf16 on several ranks (issue #27): bf16 weights and
gradients on each rank, fp32 masters and moments in AdamW, gradients summed
over micro-batches in fp32 (precision.grad_accum) and averaged over dp in
fp32 or bf16 (parallel.reduce_dtype).

pp 2 does the single rank's bf16 arithmetic: a pipeline stage computes the
same bf16 ops and passes the same bf16 hidden states. dp 2 does too, but
for the order of one sum: a replica sums its half of the step's
micro-batches in fp32 and the all-reduce adds the two halves, where the
single rank adds the micro-batches one by one; exact where those sums are
(on the Intel machines of earlier sessions), 1.2e-5 apart by step 6 on an
AMD EPYC, so dp 2 is held to 5e-5. Tensor parallelism
rounds each rank's partial sums to bf16 before they are added, so tp runs are
held to bf16's own tolerance, not fp32's.
"""
import pytest
from safetensors import safe_open

from test_tensor_parallel_e2e import mpi_loom
from test_train_e2e import data, loom, losses_by_step, train_args  # noqa: F401 (data: fixture)
from test_zero_e2e import resume_copy  # the step-5 checkpoint as the resumed run's latest

STEPS = 10


def bf16_args(data, out, name, **extra):
    return train_args(data, out, name, STEPS, 5,
                      **{"precision.params": "bf16", "precision.compute": "bf16", "model.num_heads": 8,
                         "model.num_kv_heads": 4, "optimizer.eps": 1e-6, **extra})


@pytest.fixture(scope="module")
def single_rank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16-reference")
    loom(*bf16_args(data, out, "one"))
    return out / "one"


@pytest.mark.parametrize("ranks,sets,tolerance", [
    (2, {}, 5e-5),
    (2, {"parallel.pp": 2}, 1e-5),
    (4, {"parallel.tp": 2}, 2e-2),
    (2, {"precision.grad_accum": "bf16", "parallel.reduce_dtype": "bf16"}, 2e-2),
], ids=["dp2", "pp2", "dp2-tp2", "dp2-bf16-accum-and-reduce"])
def test_bf16_parameters_on_several_ranks_follow_the_single_rank_run(data, tmp_path, single_rank, ranks, sets,
                                                                      tolerance):
    mpi_loom(ranks, bf16_args(data, tmp_path, "run", **sets))
    got, want = losses_by_step(tmp_path / "run", STEPS), losses_by_step(single_rank, STEPS)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= tolerance * abs(want[step]), (step, got[step], want[step])
    assert got[STEPS] < got[1] - 0.15, got  # it learns
    # The checkpoint holds the fp32 masters under the parameters' names.
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{STEPS:07d}"
    dtypes = set()
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "np") as tensors:
            for name in tensors.keys():
                if not name.startswith("optimizer.") and name.startswith(("model.", "lm_head")):
                    dtypes.add(str(tensors.get_slice(name).get_dtype()))
                assert not name.startswith("optimizer.master."), name
    assert dtypes == {"F32"}, dtypes


def test_tied_embeddings_over_a_pipeline_sum_both_copies_fp32_gradients(data, tmp_path):
    # The first and the last stage each hold a copy of the tied weight, and
    # their gradients are summed after the step's backwards. With bf16
    # parameters those gradients are no longer in the copies' .grad but in
    # their fp32 masters'; summing the (emptied) .grad instead left each
    # copy with its own half, 3e-4 off the single rank by step 2.
    tied = {"model.tie_embeddings": "true"}
    loom(*bf16_args(data, tmp_path, "one", **tied))
    mpi_loom(2, bf16_args(data, tmp_path, "pp2", **{"parallel.pp": 2, **tied}))
    got, want = losses_by_step(tmp_path / "pp2", STEPS), losses_by_step(tmp_path / "one", STEPS)
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 5e-5 * abs(want[step]), (step, got[step], want[step])


# ZeRO with bf16 parameters (Note [ZeRO with bf16 parameters] in
# parallel/zero.h): one sequence per micro-batch, so that each replica sums
# four micro-batches' gradients, and tied embeddings, whose copies a
# pipeline sums in ZeRO's fp32 sums. Each stage follows dp 2 without ZeRO
# (the same fp32 sums and reductions; only the gradient norm's summation
# order differs, which moves a clipped step by a rounding).
ZERO = {"model.tie_embeddings": "true", "batch.micro_batch_size": 1}


def zero_run(data, out, name, ranks, **sets):
    mpi_loom(ranks, bf16_args(data, out, name, **{**ZERO, **sets}))
    return out / name


@pytest.fixture(scope="module")
def zero_runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16-zero")
    for stage in range(4):
        zero_run(data, out, f"zero{stage}", 2, **{"parallel.zero_stage": stage})
    return out


def assert_follows(run, reference, first_step=1, tolerance=1e-5):
    got, want = losses_by_step(run, STEPS), losses_by_step(reference, STEPS)
    for step in range(first_step, STEPS + 1):
        assert abs(got[step] - want[step]) <= tolerance * abs(want[step]), (step, got[step], want[step])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_parameters_under_zero_follow_plain_data_parallelism(zero_runs, stage):
    assert_follows(zero_runs / f"zero{stage}", zero_runs / "zero0")
    got = losses_by_step(zero_runs / f"zero{stage}", STEPS)
    assert got[STEPS] < got[1] - 0.15, got


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_zero_checkpoints_hold_the_fp32_masters_in_every_ranks_pieces(zero_runs, stage):
    # The masters are sharded: each rank writes its pieces of them, as fp32
    # model tensors under the parameters' names, and no master entry.
    def model_tensors(run):
        ckpt = zero_runs / run / "checkpoints" / f"step-{STEPS:07d}"
        by_rank = []
        for rank in range(2):
            with safe_open(str(ckpt / f"model-rank{rank:05d}.safetensors"), "np") as tensors:
                by_rank.append(set(tensors.keys()))
                assert {str(tensors.get_slice(n).get_dtype()) for n in tensors.keys()} == {"F32"}
            with safe_open(str(ckpt / f"optimizer-rank{rank:05d}.safetensors"), "np") as tensors:
                assert not [n for n in tensors.keys() if n.startswith("optimizer.master.")]
        return by_rank

    mine, plain = model_tensors(f"zero{stage}"), model_tensors("zero0")
    assert mine[0] and mine[1], mine
    assert mine[0] | mine[1] == plain[0] | plain[1]


@pytest.mark.parametrize("source,stage", [(2, 2), (3, 0), (0, 3), (1, 2)],
                         ids=["zero2-in-place", "zero3-to-plain", "plain-to-zero3", "zero1-to-zero2"])
def test_bf16_zero_checkpoints_resume_on_any_stage(data, tmp_path, zero_runs, source, stage):
    resume_copy(zero_runs / f"zero{source}", tmp_path / "resumed")
    run = zero_run(data, tmp_path, "resumed", 2, **{"parallel.zero_stage": stage})
    if source == stage:  # the masters and moments come back exactly
        got, want = losses_by_step(run, STEPS), losses_by_step(zero_runs / f"zero{stage}", STEPS)
        assert got == want, {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    else:
        assert_follows(run, zero_runs / f"zero{stage}", first_step=6)


def test_bf16_zero3_over_a_pipeline_with_tied_embeddings(data, tmp_path, zero_runs):
    plain = zero_run(data, tmp_path, "plain", 4, **{"parallel.pp": 2})
    zero3 = zero_run(data, tmp_path, "zero3", 4, **{"parallel.pp": 2, "parallel.zero_stage": 3})
    assert_follows(zero3, plain)
    assert_follows(plain, zero_runs / "zero0", tolerance=5e-5)
