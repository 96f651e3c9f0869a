"""loom's GPU check: correctness on CUDA first, then speed against PyTorch.

Run through bench/gpu/run.sh (which sets up library paths on the GPU machine).
In order, each stage printing its result as it ends:

  1. fp32 on CUDA vs the CPU: the tiny config's first 5 losses agree within 1e-4.
  2. bf16 vs fp32 on CUDA: the tiny config on a learnable dataset, losses
     within 2% after 20 steps (--cpu: 2 of its layers, a batch of 4).
  3. Speed: a SmolLM2-360M-shaped and a 1B Llama-3-shaped config in bf16
     (sequence 2048 / 4096), loom's tokens/s, TFLOP/s and MFU, then the same
     model and batch in transformers + PyTorch eager and with torch.compile
     (bench/torch_baseline.py), and the ratios.

--cpu runs the same stages on the CPU with small shapes (the "CUDA" runs are
CPU runs with another thread count), so CI keeps the script itself working.
Writes results.json and results.md into --out. Exit status 1 when a
correctness check fails, 0 otherwise (a missing baseline is reported, not
fatal).
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="no GPU: small shapes on the CPU")
    parser.add_argument("--loom", default=os.environ.get("LOOM_BIN", str(ROOT / "build" / "loom")))
    parser.add_argument("--dataset-tool", default=os.environ.get("LOOM_DATASET_TOOL",
                                                                 str(ROOT / "build" / "tests" / "loom_dataset_tool")))
    parser.add_argument("--work", default="/tmp/loom-bench-gpu", help="scratch folder (datasets, runs)")
    parser.add_argument("--out", default=None, help="where results.json/results.md go (default: --work)")
    parser.add_argument("--stages", default="fp32,bf16,speed", help="comma-separated subset of fp32,bf16,speed")
    parser.add_argument("--models", default="1b,360m",
                        help="speed stage: comma-separated subset of 1b,360m (GPU shapes) and tiny,135m (CPU comparisons)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--compile-models", default=None,
                        help="comma-separated models that get the torch.compile baseline (default: all)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds allowed to each training process")
    return parser.parse_args()


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.out = Path(args.out or args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = "cpu" if args.cpu else "cuda"
        self.results = {"mode": "cpu" if args.cpu else "cuda", "checks": {}, "speed": [], "started": time.ctime()}
        self.failed = False
        # Which loom this is (its commit), in the log and in results.json.
        version = subprocess.run([args.loom, "version"], env=self.loom_env(), capture_output=True, text=True)
        self.results["loom_version"] = (version.stdout.splitlines() or ["?"])[0]
        self.log(f"{args.loom}: {self.results['loom_version']}")

    # --- helpers -------------------------------------------------------------
    def loom_env(self, extra=None):
        """The environment of loom's own processes (run.sh's library paths)."""
        env = dict(os.environ, **(extra or {}))
        if os.environ.get("LOOM_LD_LIBRARY_PATH"):
            env["LD_LIBRARY_PATH"] = os.environ["LOOM_LD_LIBRARY_PATH"]
        return env

    def log(self, *parts):
        print("[bench]", *parts, flush=True)

    def save(self):
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.out / "results.md").write_text(self.table() + "\n")

    def dataset(self, name, vocab, tokens, learnable):
        """A loom dataset of `tokens` ids below `vocab`, written by loom_dataset_tool.
        learnable: each next id is a fixed function of the current one 90% of the
        time, so the loss can fall; otherwise uniform noise."""
        folder = self.work / "data" / name
        if (folder / "index.json").exists():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        rng = random.Random(1234)
        lines = []
        remaining = tokens
        while remaining > 0:
            length = min(remaining, 1000)
            # The learnable stream uses 63 of the ids, so even its unigram
            # statistics take the loss well below ln(vocab) within 20 steps.
            alphabet = 64 if learnable else vocab
            current = rng.randrange(1, alphabet)
            doc = []
            for _ in range(length):
                doc.append(current)
                follows = learnable and rng.random() < 0.9
                current = (current * 5 + 3) % (alphabet - 1) + 1 if follows else rng.randrange(1, alphabet)
            lines.append(" ".join(map(str, doc)))
            remaining -= length
        subprocess.run([self.args.dataset_tool, "write", str(folder), "--vocab-size", str(vocab), "--eos", "0"],
                       input="\n".join(lines) + "\n", text=True, check=True, capture_output=True, env=self.loom_env())
        return folder

    @staticmethod
    def config_value(config, section, key):
        """A top-level `section: {key: value}` scalar of a loom YAML config (no PyYAML needed)."""
        current = None
        for line in (ROOT / config).read_text().splitlines():
            if line and not line.startswith((" ", "#")):
                current = line.split(":")[0].strip()
            elif current == section and line.strip().startswith(key + ":"):
                return line.split(":", 1)[1].split("#")[0].strip()
        raise KeyError(f"{config}: {section}.{key}")

    def loom_train(self, name, config, overrides, env=None):
        """Runs `loom train`; returns the metrics records (loss records only)."""
        run_dir = self.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [self.args.loom, "train", str(ROOT / config),
                   "--set", f"run.output_dir={self.work / 'runs'}", "--set", f"run.name={name}",
                   "--set", "checkpoint.enabled=false", "--set", "checkpoint.export_hf_at_end=false",
                   "--set", "data.valid=\"\"", "--set", "data.tokenizer=\"\"", "--set", "logging.interval=1",
                   "--set", "launch.ranks=1", "--set", "parallel.dp=1", "--set", "parallel.zero_stage=0"]
        for key, value in overrides.items():
            command += ["--set", f"{key}={value}"]
        full_env = self.loom_env(env)
        start = time.time()
        process = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=self.args.timeout)
        tail = (process.stdout + process.stderr)[-3000:]
        if process.returncode != 0:
            raise RuntimeError(f"loom train {name} failed (exit {process.returncode}):\n{tail}")
        self.log(f"{name}: loom train took {time.time() - start:.0f} s; last lines:\n" + "\n".join(tail.splitlines()[-4:]))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r and not r.get("skipped")]

    # --- stages --------------------------------------------------------------
    def check_fp32(self):
        data = self.dataset("tiny-random", 2048, 200_000, learnable=False)
        common = {"data.train": f"[{data}]", "schedule.train_steps": 5, "schedule.warmup_steps": 2,
                  "precision.compute": "fp32"}
        cpu = self.loom_train("fp32-cpu", "configs/tiny.yaml", dict(common, **{"run.device": "cpu"}),
                              env={"OMP_NUM_THREADS": "2"})
        other = self.loom_train("fp32-" + self.device, "configs/tiny.yaml", dict(common, **{"run.device": self.device}),
                                env={"OMP_NUM_THREADS": "1"})
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cpu, other)]
        ok = len(cpu) == len(other) == 5 and max(diffs) <= 1e-4
        self.results["checks"]["fp32_vs_cpu"] = {
            "ok": ok, "cpu_losses": [r["loss"] for r in cpu], "device_losses": [r["loss"] for r in other],
            "max_abs_diff": max(diffs), "tolerance": 1e-4}
        self.log(f"check 1 fp32 {self.device} vs cpu: max |loss diff| {max(diffs):.2e} -> {'ok' if ok else 'FAILED'}")
        self.failed |= not ok

    def check_bf16(self):
        data = self.dataset("tiny-learnable", 2048, 400_000, learnable=True)
        common = {"data.train": f"[{data}]", "schedule.train_steps": 20, "schedule.warmup_steps": 2,
                  "run.device": self.device}
        if self.args.cpu:
            # A CPU without native bf16 multiplies in bf16 ~20x slower than in
            # fp32: the full tiny config took 147 s here, 2 layers and a
            # quarter of the batch take a tenth of that.
            common.update({"model.num_layers": 2, "batch.global_batch_size": 4})
        fp32 = self.loom_train("fp32-20", "configs/tiny.yaml", dict(common, **{"precision.compute": "fp32"}))
        bf16 = self.loom_train("bf16-20", "configs/tiny.yaml", dict(common, **{"precision.compute": "bf16"}))
        a, b = fp32[-1]["loss"], bf16[-1]["loss"]
        relative = abs(a - b) / a
        ok = relative <= 0.02 and b < fp32[0]["loss"]
        self.results["checks"]["bf16_vs_fp32"] = {
            "ok": ok, "fp32_loss": a, "bf16_loss": b, "first_loss": fp32[0]["loss"], "relative_diff": relative,
            "tolerance": 0.02}
        self.log(f"check 2 bf16 vs fp32 after 20 steps: {b:.4f} vs {a:.4f} ({relative * 100:.2f}%) -> "
                 f"{'ok' if ok else 'FAILED'}")
        self.failed |= not ok

    def speed_models(self):
        """name -> (config, overrides, vocab, warmup steps, timed steps)."""
        models = {
            # CPU comparisons at the configs' own shapes (fp32).
            # 40 timed steps: ten (3 s) varied by a third from run to run on the
            # 2-core build machine.
            "tiny": ("configs/tiny.yaml", {}, 2048, 2, 40),
            "135m": ("configs/smollm2-135m.yaml", {"batch.micro_batch_size": 1, "batch.global_batch_size": 1},
                     49152, 1, 3),
            # GPU timings (bf16).
            "1b": ("configs/llama3-1b.yaml", {"data.seq_len": 4096, "batch.micro_batch_size": 2,
                                              "batch.global_batch_size": 8}, 128256, 2, 6),
            "360m": ("configs/smollm2-360m.yaml", {"data.seq_len": 2048, "batch.micro_batch_size": 8,
                                                   "batch.global_batch_size": 32}, 49152, 2, 6),
        }
        if self.args.cpu:
            # Small stand-ins for the GPU shapes so that --cpu finishes in a minute.
            shrink = {"model.num_layers": 2, "model.hidden_size": 128, "model.intermediate_size": 384,
                      "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 32, "model.vocab_size": 2048,
                      "data.seq_len": 128, "batch.micro_batch_size": 2, "batch.global_batch_size": 4,
                      "model.bos_token_id": -1, "model.eos_token_id": -1}
            for key in ("1b", "360m"):
                models[key] = (models[key][0], shrink, 2048, 2, 4)
        return models

    def speed(self, key):
        config, overrides, vocab, warmup, steps = self.speed_models()[key]
        # bf16 autocast on a GPU; fp32 (loom's CPU default) on the CPU.
        precision = "fp32" if self.device == "cpu" else "bf16"
        overrides = dict(overrides, **{"run.device": self.device, "precision.compute": precision,
                                       "schedule.train_steps": warmup + steps, "schedule.warmup_steps": 1})
        seq = int(overrides.get("data.seq_len") or self.config_value(config, "data", "seq_len"))
        global_batch = int(overrides.get("batch.global_batch_size") or self.config_value(config, "batch", "global_batch_size"))
        tokens = (warmup + steps + 1) * global_batch * (seq + 1) + seq
        data = self.dataset(f"random-{vocab}", vocab, tokens, learnable=False)
        records = self.loom_train(f"speed-{key}", config, dict(overrides, **{"data.train": f"[{data}]"}))
        timed = records[warmup:]
        seconds = sum(r["step_time_s"] for r in timed)
        tokens_per_step = timed[-1]["tokens"] // timed[-1]["step"]
        loom_tps = len(timed) * tokens_per_step / seconds
        peak = timed[-1]["peak_flops"]
        flops_per_token = timed[-1]["mfu"] * timed[-1]["peak_flops"] / timed[-1]["tokens_per_s"] if peak else 0
        row = {"model": key, "config": config, "overrides": overrides, "loom_tokens_per_s": loom_tps,
               "loom_tflops": loom_tps * flops_per_token / 1e12, "loom_mfu": loom_tps * flops_per_token / peak if peak else 0,
               "loom_mem_peak_gib": max(r.get("mem_peak_gib", 0) for r in timed), "peak_flops": peak,
               "flops_per_token": flops_per_token}
        self.results["speed"].append(row)
        self.save()
        self.log(f"speed {key}: loom {loom_tps:.0f} tok/s, {row['loom_tflops']:.1f} TFLOP/s, mfu {row['loom_mfu'] * 100:.1f}%")
        compile_models = self.args.compile_models.split(",") if self.args.compile_models is not None else [key]
        with_compile = not (self.args.no_compile or self.args.cpu) and key in compile_models
        variants = [("eager", [], {})] + ([("compile", ["--compile"], {})] if with_compile else [])
        if self.device == "cpu" and key in ("tiny", "135m"):
            # PyTorch again with the heap settings loom makes for itself
            # (util/host_memory.h), through glibc's environment variables: how
            # much of the ratio they account for.
            variants.append(("eager_kept_heap", [], {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}))
        for label, extra, extra_env in variants:
            command = [sys.executable, str(ROOT / "bench" / "torch_baseline.py"), "--config", str(ROOT / config),
                       "--device", self.device, "--steps", str(steps), "--warmup", str(warmup)] + extra
            for k, v in overrides.items():
                if k.startswith(("model.", "data.seq_len", "batch.", "precision.")):
                    command += ["--set", f"{k}={v}"]
            try:
                process = subprocess.run(command, capture_output=True, text=True, timeout=self.args.timeout,
                                         env=dict(os.environ, **extra_env))
            except subprocess.TimeoutExpired:
                row[f"{label}_error"] = "timed out"
                self.log(f"speed {key}: baseline {label} timed out")
                continue
            lines = [l for l in process.stdout.splitlines() if l.startswith("{")]
            record = json.loads(lines[-1]) if lines else {"error": (process.stdout + process.stderr)[-1500:]}
            if "error" in record or process.returncode != 0:
                row[f"{label}_error"] = record.get("error", "")[-1500:]
                self.log(f"speed {key}: baseline {label} failed: {row[f'{label}_error'][-400:]}")
                continue
            row[f"{label}_tokens_per_s"] = record["tokens_per_s"]
            row[f"{label}_mem_peak_gib"] = record.get("mem_peak_gib")
            row[f"{label}_warmup_s"] = record.get("warmup_s")
            row[f"loom_over_{label}"] = loom_tps / record["tokens_per_s"]
            self.log(f"speed {key}: {label} {record['tokens_per_s']:.0f} tok/s -> loom / {label} = "
                     f"{row[f'loom_over_{label}']:.2f}")
            self.save()

    def table(self):
        lines = [f"mode: {self.results['mode']}", "",
                 "| check | result | numbers |", "|---|---|---|"]
        for name, check in self.results["checks"].items():
            if "error" in check:
                detail = check["error"].splitlines()[0][:200]
            elif "max_abs_diff" in check:
                detail = f"max diff {check['max_abs_diff']:.2e}"
            else:
                detail = f"bf16 {check['bf16_loss']:.4f} vs fp32 {check['fp32_loss']:.4f}"
            lines.append(f"| {name} | {'ok' if check['ok'] else 'FAILED'} | {detail} |")
        # The third baseline is compile on a GPU, eager with loom's heap settings on the CPU.
        third = "compile" if self.results["mode"] == "cuda" else "eager_kept_heap"
        third_title = "compile" if third == "compile" else "eager, heap kept"
        lines += ["", "| model | loom tok/s | TFLOP/s | MFU | peak mem GiB | eager tok/s | loom/eager | "
                      f"{third_title} tok/s | loom/{third_title} |", "|---|---|---|---|---|---|---|---|---|"]
        for row in self.results["speed"]:
            def cell(key, fmt):
                return format(row[key], fmt) if row.get(key) is not None else "—"
            lines.append(f"| {row['model']} | {cell('loom_tokens_per_s', '.0f')} | {cell('loom_tflops', '.1f')} | "
                         f"{row['loom_mfu'] * 100:.1f}% | {cell('loom_mem_peak_gib', '.1f')} | "
                         f"{cell('eager_tokens_per_s', '.0f')} | {cell('loom_over_eager', '.2f')} | "
                         f"{cell(third + '_tokens_per_s', '.0f')} | {cell('loom_over_' + third, '.2f')} |")
        return "\n".join(lines)


def main():
    args = parse_args()
    bench = Bench(args)
    stages = args.stages.split(",")
    for stage, run in (("fp32", bench.check_fp32), ("bf16", bench.check_bf16)):
        if stage in stages:
            try:
                run()
            except Exception as error:  # report and go on to the timings
                bench.results["checks"][stage] = {"ok": False, "error": str(error)[-2000:]}
                bench.log(f"stage {stage} failed: {error}")
                bench.failed = True
            bench.save()
    if "speed" in stages:
        for key in args.models.split(","):
            try:
                bench.speed(key)
            except Exception as error:
                bench.results["speed"].append({"model": key, "error": str(error)[-2000:], "loom_mfu": 0})
                bench.log(f"speed {key} failed: {error}")
                bench.failed = True
            bench.save()
    bench.save()
    print(bench.table())
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
