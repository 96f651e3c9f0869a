"""Validates `loom plan`'s predictions against real runs on this machine.

Ten layouts of a small Llama model (configs/tiny.yaml, widened so that its
matmuls dominate a step) train for a few steps each on one or two CPU ranks,
one thread per rank. For each, the measured step time (median over the steps
after the first two) and the peak of tensor bytes per rank (metrics.jsonl's
mem_tensor_peak_bytes, loom's own allocation count; the largest over ranks)
are set beside `loom plan --layout ... --json`'s prediction for the same
layout on machine profiles written by `loom plan --calibrate` on this
machine at the start (one per rank count: with one rank and with two ranks
measuring at once). Prints each layout's errors, the largest, and the
Spearman rank correlation of predicted and measured step times; writes the
numbers to --out as JSON.

    $LOOM_PYTHON bench/plan_validation.py --loom build/loom \
        --dataset-tool build/tests/loom_dataset_tool --work /tmp/plan-validation [--repeats 3]

The machine is shared: the load average (uptime) is recorded before each run
and printed, so that a reader can tell a quiet measurement from a busy one.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The model: tiny.yaml's shape, twice as wide (hidden 256, intermediate 768).
MODEL = {
    "model.hidden_size": 256, "model.intermediate_size": 768, "model.num_layers": 8, "model.num_heads": 8,
    "model.num_kv_heads": 4, "model.vocab_size": 2048, "model.max_seq_len": 128, "data.seq_len": 128,
    "batch.global_batch_size": 16,
}

# (name, ranks, layout as `loom plan --layout` takes it)
LAYOUTS = [
    ("1 rank, mb 2", 1, "dp=1,mb=2"),
    ("1 rank, mb 8, recompute", 1, "dp=1,mb=8,recompute=1"),
    ("dp 2, mb 2", 2, "dp=2,mb=2"),
    ("dp 2, mb 4, ZeRO-1", 2, "dp=2,mb=4,zero=1"),
    ("tp 2, mb 2", 2, "tp=2,mb=2"),
    ("tp 2, mb 4, sp, recompute", 2, "tp=2,mb=4,sp=1,recompute=1"),
    ("pp 2 1f1b, mb 2", 2, "pp=2,schedule=1f1b,mb=2"),
    ("pp 2 afab, mb 1", 2, "pp=2,schedule=afab,mb=1"),
    ("pp 2 interleaved v2, mb 1", 2, "pp=2,schedule=interleaved,v=2,mb=1"),
    ("pp 2 1f1b, mb 4, recompute", 2, "pp=2,schedule=1f1b,mb=4,recompute=1"),
]

KEYS = {"dp": "parallel.dp", "tp": "parallel.tp", "pp": "parallel.pp", "schedule": "parallel.pp_schedule",
        "v": "parallel.virtual_stages", "zero": "parallel.zero_stage", "mb": "batch.micro_batch_size"}


def layout_sets(spec):
    sets = {"parallel.dp": 1, "parallel.tp": 1, "parallel.pp": 1, "parallel.pp_schedule": "1f1b",
            "parallel.virtual_stages": 1, "parallel.zero_stage": 0, "parallel.sequence_parallel": "false",
            "model.recompute": "none"}
    for item in spec.split(","):
        key, value = item.split("=")
        if key == "recompute":
            sets["model.recompute"] = "full" if value == "1" else "none"
        elif key == "sp":
            sets["parallel.sequence_parallel"] = "true" if value == "1" else "false"
        else:
            sets[KEYS[key]] = value
    return sets


def load():
    return os.getloadavg()[0]


def set_args(sets):
    out = []
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    return out


def write_dataset(tool, folder, tokens=400_000, vocab=2048):
    rng = random.Random(7)
    lines = []
    while tokens > 0:
        n = rng.randint(50, 400)
        lines.append(" ".join(str(rng.randrange(1, vocab)) for _ in range(n)))
        tokens -= n
    subprocess.run([tool, "write", str(folder), "--vocab-size", str(vocab), "--eos", "0"],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)


def mpi_prefix(ranks):
    if ranks == 1:
        return []
    prefix = ["mpirun", "-np", str(ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        prefix.insert(1, "--allow-run-as-root")
    return prefix


def run_layout(args, dataset, name, ranks, spec, steps, out_dir):
    sets = {**MODEL, **layout_sets(spec), "run.output_dir": out_dir, "run.name": name,
            "data.train": f"[{dataset}]", "data.tokenizer": "", "data.valid": "", "schedule.train_steps": steps,
            "schedule.warmup_steps": 1, "logging.interval": 1, "checkpoint.enabled": "false",
            "checkpoint.export_hf_at_end": "false", "launch.ranks": ranks}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
    proc = subprocess.run([*mpi_prefix(ranks), args.loom, "train", str(args.config), *set_args(sets)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"{name}: loom train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    times = [r["step_time_s"] for r in rows if r["step"] > 2]
    peak = max(r["mem_tensor_peak_bytes"] for r in rows)
    per_rank = [max(values) for values in zip(*[r.get("mem_tensor_peak_bytes_per_rank", [r["mem_tensor_peak_bytes"]])
                                                for r in rows])]
    return statistics.median(times), peak, per_rank


def predict(args, ranks, spec, profile):
    out = subprocess.run([args.loom, "plan", str(args.config), "--gpus", str(ranks), "--gpu-memory", "20",
                          "--machine", str(profile), "--layout", spec, "--json", *set_args(MODEL)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return result["step_s"], result["peak_bytes"], [r["peak_bytes"] for r in result["ranks"]]


def ranks_of(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for position, i in enumerate(order):
        ranks[i] = float(position)
    return ranks


def spearman(a, b):
    ra, rb = ranks_of(a), ranks_of(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loom", default=str(REPO / "build" / "loom"))
    parser.add_argument("--dataset-tool", default=str(REPO / "build" / "tests" / "loom_dataset_tool"))
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--work", default="/tmp/loom-plan-validation")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", help="use this machine profile instead of calibrating one")
    parser.add_argument("--only", help="comma-separated layout numbers (1-based) to run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "dataset"
    if not (dataset / "index.json").exists():
        write_dataset(args.dataset_tool, dataset)
    chosen = LAYOUTS if not args.only else [LAYOUTS[int(i) - 1] for i in args.only.split(",")]
    # A machine's rates depend on how many ranks share it (cores, caches and
    # the memory bus): one profile per rank count, each measured with that
    # many ranks busy at once, as `loom plan --calibrate --ranks N` does. The
    # machine is shared, so each round measures the profiles again and then
    # runs every layout once; predictions and measurements are each the
    # median over the rounds.
    rank_counts = sorted({r for _, r, _ in chosen})
    rounds = []
    for round_number in range(args.repeats):
        profiles = {}
        for ranks in rank_counts:
            profiles[ranks] = Path(args.profile) if args.profile else work / f"this-machine-{ranks}-{round_number}.yaml"
            if not args.profile:
                print(f"round {round_number + 1}: calibrating on {ranks} rank(s) (load {load():.2f}) ...", flush=True)
                subprocess.run([args.loom, "plan", "--calibrate", str(args.config), "--output", str(profiles[ranks]),
                                "--ranks", str(ranks), *set_args({**MODEL, "batch.micro_batch_size": 2})],
                               check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
        runs = []
        for name, ranks, spec in chosen:
            before = load()
            t, m, per_rank = run_layout(args, dataset, "run", ranks, spec, args.steps, str(work / "runs"))
            pred_t, pred_m, pred_ranks = predict(args, ranks, spec, profiles[ranks])
            runs.append({"t": t, "m": m, "per_rank": per_rank, "pred_t": pred_t, "pred_m": pred_m,
                         "pred_ranks": pred_ranks, "load": before})
            print(f"  round {round_number + 1} {name:32s} {t:.3f} s (predicted {pred_t:.3f}), load {before:.2f}",
                  flush=True)
        rounds.append({"profiles": {r: str(p) for r, p in profiles.items()}, "runs": runs})
    results = []
    for i, (name, ranks, spec) in enumerate(chosen):
        runs = [r["runs"][i] for r in rounds]
        row = {"name": name, "ranks": ranks, "layout": spec,
               "measured_step_s": statistics.median(r["t"] for r in runs),
               "measured_step_s_all": [r["t"] for r in runs],
               "predicted_step_s": statistics.median(r["pred_t"] for r in runs),
               "predicted_step_s_all": [r["pred_t"] for r in runs],
               "measured_peak_bytes": statistics.median(r["m"] for r in runs),
               "measured_peak_bytes_per_rank": runs[-1]["per_rank"],
               "predicted_peak_bytes": runs[-1]["pred_m"], "predicted_peak_bytes_per_pp_rank": runs[-1]["pred_ranks"],
               "load_before_runs": [r["load"] for r in runs]}
        row["time_error"] = row["predicted_step_s"] / row["measured_step_s"] - 1
        row["memory_error"] = row["predicted_peak_bytes"] / row["measured_peak_bytes"] - 1
        results.append(row)
        print(f"{name:32s} step {row['measured_step_s']:.3f} s, predicted {row['predicted_step_s']:.3f} "
              f"({100 * row['time_error']:+.1f}%) | peak {row['measured_peak_bytes'] / 2**20:8.2f} MiB, predicted "
              f"{row['predicted_peak_bytes'] / 2**20:8.2f} ({100 * row['memory_error']:+.1f}%) | load "
              f"{statistics.median(row['load_before_runs']):.2f}", flush=True)
    rho = spearman([r["predicted_step_s"] for r in results], [r["measured_step_s"] for r in results])
    worst_t = max(abs(r["time_error"]) for r in results)
    worst_m = max(abs(r["memory_error"]) for r in results)
    print(f"\nlargest step-time error {100 * worst_t:.1f}%, largest memory error {100 * worst_m:.1f}%, "
          f"Spearman {rho:.3f} over {len(results)} layouts, {args.repeats} rounds")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "spearman": rho, "max_time_error": worst_t,
                                              "max_memory_error": worst_m, "rounds": rounds,
                                              "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")


if __name__ == "__main__":
    main()
