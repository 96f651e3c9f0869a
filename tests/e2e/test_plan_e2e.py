"""End-to-end tests of `loom plan` (docs/plan.md).

The bundled config planned on a node of eight H100s: a table, the config lines
of the best layout, JSON whose layouts are valid and sorted; bad flags, a
missing profile and a cluster too small are refused with exit code 2;
--calibrate writes a profile plan reads back. And the memory model against
loom's own count: a real two-rank run of two layouts (dp 2 with ZeRO-1, and
pp 2 with 1F1B) whose peak tensor bytes per rank must be within 10% of the
prediction.
"""
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from test_train_e2e import REPO, loom, read_metrics
from test_tensor_parallel_e2e import mpi_loom

TINY = REPO / "configs" / "tiny.yaml"
DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(REPO / "build" / "tests" / "loom_dataset_tool"))


def test_plan_prints_the_best_layouts_and_their_config_lines():
    out, _ = loom("plan", TINY, "--gpus", 8, "--gpus-per-node", 8, "--gpu-memory", 80, "--top", 5)
    assert "valid layouts" in out and "MFU" in out, out
    table = [line for line in out.splitlines() if line.strip()[:2] in {f"{i} " for i in range(1, 6)}]
    assert len(table) == 5, out
    for key in ("parallel.dp:", "parallel.tp:", "parallel.pp:", "parallel.zero_stage:", "batch.micro_batch_size:",
                "model.recompute:", "--set parallel.dp="):
        assert key in out, (key, out)


def test_plan_json_lists_valid_layouts_fastest_first():
    out, _ = loom("plan", TINY, "--gpus", 8, "--gpus-per-node", 4, "--gpu-memory", 80, "--json", "--top", 20)
    result = json.loads(out)
    best = result["best"]
    assert len(best) == 20 and result["layouts_valid"] >= 20
    assert result["machine"]["source"] == "specification"
    times = [b["step_s"] for b in best]
    assert times == sorted(times)
    for b in best:
        layout = b["layout"]
        assert layout["dp"] * layout["tp"] * layout["pp"] == 8
        assert layout["tp"] <= 4 and 8 % layout["tp"] == 0
        assert b["fits"] and 0 < b["mfu"] < 1
        assert b["peak_bytes"] == max(r["peak_bytes"] for r in b["ranks"])


@pytest.mark.parametrize("args,message", [
    (["--gpus", 2, "--gpu-memory", 80, "--bogus", 1], "unknown option '--bogus'"),
    (["--gpu-memory", 80], "--gpus N is required"),
    (["--gpus", 2, "--gpu-memory", 80, "--machine", "no-such-machine"], "no profile named 'no-such-machine'"),
    (["--gpus", 2, "--gpu-memory", 0.0001], "no layout of"),
    (["--gpus", 2, "--gpu-memory", 80, "--layout", "tp=2,pp=1,dp=1,mb=3"], "cannot train this config"),
    (["--gpus", 3, "--gpus-per-node", 2, "--gpu-memory", 80], "must be >= 1 and divide --gpus"),
])
def test_plan_refuses_bad_input_with_exit_code_2(args, message):
    _, err = loom("plan", TINY, *args, expect=2)
    assert message in err, err


def test_calibrate_writes_a_profile_that_plan_reads(tmp_path):
    profile = tmp_path / "cpu.yaml"
    loom("plan", "--calibrate", TINY, "--output", profile, "--ranks", 2, "--set", "model.num_layers=2")
    text = profile.read_text()
    assert "source: measured" in text and "matmul_flops" in text
    out, _ = loom("plan", TINY, "--gpus", 2, "--gpu-memory", 20, "--machine", profile, "--json", "--top", 3)
    assert json.loads(out)["machine"]["source"] == "measured"


@pytest.fixture(scope="module")
def random_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan-data") / "ds"
    rng = random.Random(3)
    lines = [" ".join(str(rng.randrange(1, 2048)) for _ in range(rng.randint(60, 300))) for _ in range(300)]
    subprocess.run([DATASET_TOOL, "write", str(folder), "--vocab-size", "2048", "--eos", "0"],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("layout,sets", [
    ("dp=2,mb=2,zero=1", {"parallel.dp": 2, "parallel.zero_stage": 1}),
    ("pp=2,schedule=1f1b,mb=2", {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}),
    # Context parallelism: each rank's half of every sequence and the ring's blocks and scores.
    ("cp=2,mb=2", {"parallel.cp": 2}),
    # A mixture of experts: every expert's parameters and state, the sparse layers' saved rows.
    ("dp=2,mb=2", {"parallel.dp": 2, "model.architecture": "mixtral", "model.num_experts": 4,
                   "model.num_experts_per_tok": 2}),
], ids=["dp2-zero1", "pp2-1f1b", "cp2", "dp2-mixtral"])
def test_predicted_peak_tensor_bytes_match_a_two_rank_run(random_dataset, tmp_path, layout, sets):
    sets = {"run.output_dir": tmp_path, "run.name": "run", "data.train": f"[{random_dataset}]", "data.tokenizer": "",
            "schedule.train_steps": 3, "schedule.warmup_steps": 1, "logging.interval": 1, "checkpoint.enabled": "false",
            "checkpoint.export_hf_at_end": "false", "batch.micro_batch_size": 2, **sets}
    set_args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    mpi_loom(2, ["train", TINY, *set_args])
    rows = [r for r in read_metrics(tmp_path / "run") if "mem_tensor_peak_bytes_per_rank" in r]
    assert len(rows) == 3, rows
    measured = [max(r["mem_tensor_peak_bytes_per_rank"][k] for r in rows) for k in range(2)]
    plan_sets = [a for k, v in sets.items() if k.startswith("model.") for a in ("--set", f"{k}={v}")]
    out, _ = loom("plan", TINY, "--gpus", 2, "--gpu-memory", 20, "--layout", layout, "--json", *plan_sets)
    predicted = json.loads(out)
    # pp: one prediction per pipeline rank (world rank = pp rank here); dp: the same on both.
    per_rank = [r["peak_bytes"] for r in predicted["ranks"]]
    if len(per_rank) == 1:
        per_rank = per_rank * 2
    for rank in range(2):
        error = per_rank[rank] / measured[rank] - 1
        assert abs(error) <= 0.10, (layout, rank, per_rank[rank], measured[rank], error)


def piece_bytes_per_rank(checkpoint: Path, world: int):
    """The bytes of the tensor pieces each rank's files hold, from the manifest (F32 4, I64 8 bytes an element)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    itemsize = {"F32": 4, "I64": 8, "BF16": 2}
    per_rank = [0] * world
    for tensor in manifest["tensors"].values():
        for piece in tensor["pieces"]:
            rank = int(piece["file"].split("-rank")[1].split(".")[0])
            flat = piece.get("flat")
            if flat is not None:
                elements = flat[1] - flat[0]
            else:
                elements = 1
                for start, stop in piece["box"]:
                    elements *= stop - start
            per_rank[rank] += elements * itemsize[tensor["dtype"]]
    return per_rank


@pytest.mark.parametrize("layout,sets", [
    ("dp=2,tp=2,mb=2,zero=1", {"parallel.dp": 2, "parallel.tp": 2, "parallel.zero_stage": 1}),
    ("dp=2,pp=2,schedule=1f1b,mb=2", {"parallel.dp": 2, "parallel.pp": 2, "parallel.pp_schedule": "1f1b",
                                      "model.tie_embeddings": "true"}),
    ("dp=2,tp=2,mb=2,zero=2", {"parallel.dp": 2, "parallel.tp": 2, "parallel.zero_stage": 2}),
    ("dp=4,mb=2,zero=3", {"parallel.dp": 4, "parallel.zero_stage": 3}),
    # Every expert, the shared expert and its gate, cut by tp as loom cuts them.
    ("dp=2,tp=2,mb=2", {"parallel.dp": 2, "parallel.tp": 2, "model.architecture": "qwen2_moe", "model.num_experts": 4,
                        "model.num_experts_per_tok": 2, "model.moe_intermediate_size": 64,
                        "model.shared_expert_intermediate_size": 96}),
    # Expert parallelism: an expert's pieces written by the dp ranks of its ep rank.
    ("dp=4,ep=2,mb=2", {"parallel.dp": 4, "parallel.ep": 2, "model.architecture": "mixtral", "model.num_experts": 4,
                        "model.num_experts_per_tok": 2}),
    # ZeRO under ep: the experts' state sharded over their edp pair (ZeRO-2's units), or whole where edp is one rank.
    ("dp=4,ep=2,mb=2,zero=2", {"parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 2,
                               "model.architecture": "mixtral", "model.num_experts": 4, "model.num_experts_per_tok": 2}),
    ("dp=2,tp=2,ep=2,mb=2,zero=1", {"parallel.dp": 2, "parallel.tp": 2, "parallel.ep": 2, "parallel.zero_stage": 1,
                                    "model.architecture": "mixtral", "model.num_experts": 4,
                                    "model.num_experts_per_tok": 2}),
], ids=["dp2-tp2-zero1", "dp2-pp2-tied", "dp2-tp2-zero2", "dp4-zero3", "dp2-tp2-qwen2-moe", "dp4-ep2-mixtral",
        "dp4-ep2-zero2-mixtral", "dp2-tp2-ep2-zero1-mixtral"])
def test_predicted_checkpoint_bytes_per_rank_equal_a_four_rank_runs_files(random_dataset, tmp_path, layout, sets):
    sets = {"run.output_dir": tmp_path, "run.name": "run", "data.train": f"[{random_dataset}]", "data.tokenizer": "",
            "schedule.train_steps": 1, "schedule.warmup_steps": 0, "checkpoint.export_hf_at_end": "false",
            "batch.micro_batch_size": 2, **sets}
    set_args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    mpi_loom(4, ["train", TINY, *set_args])
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000001"
    measured = piece_bytes_per_rank(checkpoint, 4)
    # The files hold those pieces and their headers: the pieces are what each file's data holds.
    for rank in range(4):
        sizes = sum((checkpoint / f"{kind}-rank{rank:05d}.safetensors").stat().st_size for kind in ("model", "optimizer")
                    if (checkpoint / f"{kind}-rank{rank:05d}.safetensors").exists())
        assert 0 < measured[rank] < sizes, (rank, measured, sizes)
    plan_sets = [a for k, v in sets.items() if k.startswith("model.") for a in ("--set", f"{k}={v}")]
    out, _ = loom("plan", TINY, "--gpus", 4, "--gpu-memory", 20, "--layout", layout, "--json", *plan_sets)
    predicted = json.loads(out)["checkpoint"]
    assert predicted["rank_bytes_by_world_rank"] == measured, (layout, predicted, measured)
    assert predicted["total_bytes"] == sum(measured)
