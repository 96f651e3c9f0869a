"""A random sweep of model shapes and parallel layouts against the single rank.

Not a pytest file (no test_ prefix): a script to run by hand for as long as
there is time, on shapes, seeds and layouts the suite never uses. Each draw:

- a tiny model of a random family (llama, mistral, qwen2, qwen3, olmo2, phi3,
  smollm3, mixtral, qwen2_moe, qwen3_moe; gemma, gemma2 and gemma3_text from a
  Hub folder transformers writes) with random hidden size, heads, kv
  heads (GQA ratios 1, 2, 3, MQA), head_dim, a vocabulary tp does not divide,
  odd intermediate sizes, tied or untied, 2-6 layers, and family extras
  (biases, windows, experts, shared experts, dense layers, no-rope layers);
- random data: seq_len, micro-batch, gradient accumulation, document masking,
  clipping, a dataset of random documents written by loom_dataset_tool (or a
  blend of two), validation;
- the single-rank run, then a few random layouts on 2-4 ranks (dp, tp, pp with
  afab, 1f1b or interleaved, cp, ep, sequence parallelism, ZeRO 1-3,
  recomputation), each of which must log the single rank's losses within
  1e-5 relative and gradient norms within 1e-4 relative (the suite's
  tolerances), or be refused with exit code 2 and a one-line message;
- for some draws: the single rank's Hub export loaded in transformers gives
  loom's logits (within 1e-4), a layout's export is the single rank's, and a
  layout's step-2 checkpoint resumed on another layout logs the single
  rank's later steps.

A crash (exit code other than 0 and 2), a hang (past --timeout), a mismatch or
a refusal without a key in its message is a finding: printed, and kept with
its config under WORK/findings.jsonl. Every run's config stays in WORK, so a
finding reruns by hand with the command it prints.

    source build/env.sh
    $LOOM_PYTHON tests/sweep/layout_sweep.py --work /tmp/sweep --draws 20 --seed 1
    $LOOM_PYTHON tests/sweep/layout_sweep.py --work /tmp/sweep --draws 5 --arch qwen2_moe --seed 7
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
from conftest import LOOM_BIN  # noqa: E402
from hub_families import DATASET_TOOL  # noqa: E402
from train_cli import mpi_prefix  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_draws import (ARCHS, GEMMA, MOE, SINGLE, draw_data, draw_layout, draw_model, label,  # noqa: E402
                         make_gemma, predicted_refusal, ranks_of)

LOSS_TOL = 1e-5
NORM_TOL = 1e-4
EXPORT_TOL = 1e-4  # the logits of a layout's export against the single rank's, relative to the largest
LOGITS_TOL = 1e-4


# --------------------------------------------------------------------------
# Files and runs
# --------------------------------------------------------------------------

def write_dataset(rng, folder, vocab, tokens_needed):
    lines, total = [], 0
    while total < tokens_needed:
        n = rng.randint(3, 60)
        lines.append(" ".join(str(rng.randrange(1, vocab)) for _ in range(n - 1)) + " 0")
        total += n
    subprocess.run([DATASET_TOOL, "write", str(folder), "--vocab-size", str(vocab), "--eos", "0"],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)


def yaml_value(value):
    return json.dumps(value)  # JSON is YAML: lists, maps, strings, numbers, booleans


def write_config(path, name, out_dir, dataset, model, data, lay, checkpoint):
    model_keys = dict(model, max_seq_len=max(64, data["seq_len"]))
    sections = {
        "run": {"name": name, "output_dir": str(out_dir), "seed": data["seed"], "device": "cpu"},
        "model": {**model_keys, "recompute": lay["recompute"]},
        "parallel": {k: lay[k] for k in ("dp", "cp", "tp", "pp", "ep", "zero_stage", "sequence_parallel",
                                          "pp_schedule", "virtual_stages")},
        # A blend of two datasets for some draws: each step's samples drawn by weight, the same on any layout.
        "data": {"train": [str(dataset)] if not data["blend"] else [{"path": str(dataset), "weight": 2.0},
                                                                    {"path": str(dataset) + "-b", "weight": 1.0}],
                 "seq_len": data["seq_len"], "document_mask": data["document_mask"],
                 "valid": str(dataset), "valid_interval": 2, "valid_batches": data["valid_batches"]},
        "batch": {"micro_batch_size": data["micro_batch_size"], "global_batch_size": data["global_batch_size"]},
        # eps 1e-6 as the suite's layout tests: Adam divides by sqrt(v) + eps, so
        # entries that cancel to ~1e-8 would magnify fp32 rounding into lr-sized steps.
        "optimizer": {"lr": data["lr"], "eps": 1e-6, "clip_grad_norm": data["clip"]},
        "schedule": {"train_steps": data["steps"], "warmup_steps": 1},
        "checkpoint": checkpoint,
        "logging": {"interval": 1},
        "launch": {"ranks": ranks_of(lay)},
    }
    text = ""
    for section, keys in sections.items():
        text += f"{section}:\n" + "".join(f"  {k}: {yaml_value(v)}\n" for k, v in keys.items())
    path.write_text(text)


def run(args, timeout):
    """Runs ARGS in its own process group; returns (outcome, rc, stdout, stderr, seconds).
    outcome: ok, refused (exit 2), crash (any other exit) or hang (killed after timeout)."""
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return "hang", None, out, err, time.monotonic() - start
    outcome = {0: "ok", 2: "refused"}.get(proc.returncode, "crash")
    return outcome, proc.returncode, out, err, time.monotonic() - start


def train(config, ranks, timeout):
    command = [*mpi_prefix(ranks), LOOM_BIN, "train", str(config)]
    return command, run(command, timeout)


def steps_of(run_dir):
    """{step: (loss, grad_norm, router_load_max_over_mean, router_aux_loss, router_balance_loss)} of a run's
    training records (the router's None for a dense model, the balance loss without output_router_logits)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: (r["loss"], r.get("grad_norm"), r.get("router_load_max_over_mean"), r.get("router_aux_loss"),
                        r.get("router_balance_loss"))
            for r in rows if "loss" in r and "valid_loss" not in r}


def valid_losses_of(run_dir):
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r}


def compare_valid(got, want, steps):
    """The worst relative validation-loss difference over the steps both logged, or why they cannot compare."""
    if sorted(s for s in got if s in steps) != sorted(s for s in want if s in steps):
        return None, f"validated at steps {sorted(got)}, the single rank at {sorted(want)}"
    common = [s for s in want if s in steps]
    return max((abs(got[s] - want[s]) / abs(want[s]) for s in common), default=0.0), None


def compare(got, want, steps):
    """The worst relative loss and gradient-norm differences over `steps`, or a reason they cannot be compared
    (steps missing, router metrics that differ by more than 1e-6: they are ratios of counts)."""
    missing = [s for s in steps if s not in got]
    if missing:
        return None, None, f"steps {missing} not logged (logged: {sorted(got)})"
    loss = max(abs(got[s][0] - want[s][0]) / abs(want[s][0]) for s in steps)
    norm = max(abs(got[s][1] - want[s][1]) / max(abs(want[s][1]), 1e-30) for s in steps)
    for s in steps:
        for i, name in ((2, "router_load_max_over_mean"), (3, "router_aux_loss"), (4, "router_balance_loss")):
            if (got[s][i] is None) != (want[s][i] is None) or (
                    want[s][i] is not None and abs(got[s][i] - want[s][i]) > 1e-6 * max(1.0, abs(want[s][i]))):
                return loss, norm, f"step {s} {name} {got[s][i]} != single rank {want[s][i]}"
    return loss, norm, None


def first_step_exact(got, want, steps):
    """The first compared step, before any update could magnify rounding, agrees to 1e-6 in the loss, 1e-5 in the
    gradient norm and 1e-6 in the router metrics."""
    s = steps[0]
    if s not in got:
        return False
    router = all((got[s][i] is None) == (want[s][i] is None)
                 and (want[s][i] is None or abs(got[s][i] - want[s][i]) <= 1e-6) for i in (2, 3))
    return (router and abs(got[s][0] - want[s][0]) <= 1e-6 * abs(want[s][0])
            and abs(got[s][1] - want[s][1]) <= 1e-5 * abs(want[s][1]))


def verdict(loss, norm, problem, got, want, steps):
    """ok; drift: the first step exact and later ones within 10x the tolerances, the gap growing only after
    updates (Adam's lr * g / (|g| + eps) turns fp32 rounding of gradients near 0 into weight differences of up
    to ~lr: a larger optimizer.eps shrinks such a gap, it does not close a bug's); else mismatch."""
    if problem is None and loss <= LOSS_TOL and norm <= NORM_TOL:
        return "ok"
    if (loss is not None and first_step_exact(got, want, steps) and loss <= 10 * LOSS_TOL and norm <= 10 * NORM_TOL
            and not (problem or "").startswith(("steps", "validated"))):
        return "drift"
    return "mismatch"


def refusal_message(err):
    """loom's line of a refused run's stderr (mpirun's own notices come before or after it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("loom")), lines[0] if lines else "")


def clear_refusal(err):
    """A refusal names a key (section.key) or a file in one line, with no stack trace."""
    message = refusal_message(err)
    keyed = any(f"{section}." in message for section in ("model", "parallel", "data", "batch", "optimizer",
                                                         "schedule", "checkpoint", "launch"))
    return keyed and "terminate called" not in err and "Exception raised from" not in err


# --------------------------------------------------------------------------
# Checks beyond the losses
# --------------------------------------------------------------------------

def load_hub(folder, model):
    """The Hub folder in transformers, fp32. Mixtures of experts run their eager experts: transformers' default
    grouped matmul refuses expert widths whose rows are not a multiple of 16 bytes (an odd width in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM
    extra = {"experts_implementation": "eager"} if model["architecture"] in MOE else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()


def hub_logits_match(run_dir, model, seq_len, vocab, work):
    """The run's Hub export in transformers gives loom's logits of its last checkpoint; returns the max difference."""
    import torch
    from hub_families import hf_logits, loom_logits
    hf = load_hub(run_dir / "hf", model)
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(5))
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    loom = loom_logits(checkpoints[-1], ids, work / "logits.safetensors")
    return (loom - hf_logits(hf, ids)).abs().max().item()


def export_difference(run_dir, reference_dir, model, seq_len, vocab):
    """How far the run's Hub export is from the single rank's: (logits, weights, problem). The logits of both in
    transformers on the same ids are what must agree: a weight whose gradient is near 0 (a rare token's embedding
    row) takes Adam steps of lr * g / (|g| + eps) that fp32 rounding of g moves by up to ~lr, and which change
    the logits by about nothing."""
    import torch
    from safetensors.torch import load_file
    from hub_families import hf_logits
    got, want = load_file(str(run_dir / "hf" / "model.safetensors")), load_file(
        str(reference_dir / "hf" / "model.safetensors"))
    if sorted(got) != sorted(want) or any(got[k].shape != want[k].shape for k in want):
        return float("inf"), float("inf"), f"tensors differ: {sorted(set(got) ^ set(want))}"
    weights = max((got[k] - want[k]).abs().max().item() for k in want)
    ids = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(6))
    models = [load_hub(d / "hf", model) for d in (run_dir, reference_dir)]
    got_logits, want_logits = hf_logits(models[0], ids), hf_logits(models[1], ids)
    return (got_logits - want_logits).abs().max().item() / want_logits.abs().max().item(), weights, None


# --------------------------------------------------------------------------
# A draw
# --------------------------------------------------------------------------

class Sweep:
    def __init__(self, work, timeout, max_ranks=4):
        self.work, self.timeout = work, timeout
        # Layouts on 2-4 ranks, and with --max-ranks 8 also on 6 and 8 (slow on 2 cores: oversubscribed).
        self.rank_choices = [2, 2, 3, 4, 4] + [r for r in (6, 8) if r <= max_ranks]
        self.findings = work / "findings.jsonl"
        self.results = work / "results.jsonl"
        self.counts = {}

    def record(self, kind, draw, **fields):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        entry = {"kind": kind, "draw": draw, **fields}
        with self.results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if kind not in ("ok", "drift", "refused", "refused-as-predicted", "export-ok", "resume-ok", "resume-drift",
                        "logits-ok"):
            with self.findings.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            print(f"  FINDING {kind}: {json.dumps(fields)[:1500]}", flush=True)

    def draw(self, index, rng, arch_choice, layouts_per_draw):
        # Mixtures of experts a third of the time: they have the most layout code of their own (ep, routers).
        arch = arch_choice or (rng.choice(sorted(MOE)) if rng.random() < 0.33 else rng.choice(ARCHS))
        model, data = draw_model(rng, arch), draw_data(rng)
        folder = self.work / f"draw-{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if arch in GEMMA:
            if model["hidden_size"] % model["num_heads"]:  # transformers' Gemma2Config refuses it
                model["hidden_size"] = model["num_heads"] * max(1, model["hidden_size"] // model["num_heads"])
            model = make_gemma(rng, model, folder / "hub")
        (folder / "draw.json").write_text(json.dumps({"model": model, "data": data}, indent=1))
        tokens = data["steps"] * data["global_batch_size"] * (data["seq_len"] + 1) * 2 + 2000
        write_dataset(rng, folder / "data", model["vocab_size"], tokens)
        if data["blend"]:
            write_dataset(rng, folder / "data-b", model["vocab_size"], tokens // 2 + 500)
        check_export = rng.random() < 0.35
        check_resume = rng.random() < 0.35
        checkpoint = {"interval": 2 if check_resume else 0, "keep_last": 5,
                      "export_hf_at_end": check_export, "export_dtype": "float32"}
        print(f"draw {index}: {arch} {json.dumps(model)} data {json.dumps(data)}", flush=True)

        config = folder / "single.yaml"
        write_config(config, "single", folder / "runs", folder / "data", model, data, SINGLE, checkpoint)
        command, (outcome, rc, out, err, secs) = train(config, 1, self.timeout)
        if outcome != "ok":
            clear = outcome == "refused" and clear_refusal(err)
            self.record("refused" if clear else f"single-{outcome}", index, layout="single", rc=rc,
                        command=" ".join(command), message=refusal_message(err), stderr=err[-2000:])
            return
        reference = folder / "runs" / "single"
        want = steps_of(reference)
        want_valid = valid_losses_of(reference)
        all_steps = list(range(1, data["steps"] + 1))
        if check_export:
            try:
                diff = hub_logits_match(reference, model, data["seq_len"], model["vocab_size"], folder)
                self.record("logits-ok" if diff < LOGITS_TOL else "logits-mismatch", index, layout="single",
                            diff=diff, config=str(config))
            except Exception as e:  # noqa: BLE001 (a sweep records any failure and goes on)
                self.record("export-error", index, layout="single", config=str(config), error=repr(e)[-2000:])

        resumable = None
        for j in range(layouts_per_draw):
            lay = draw_layout(rng, model, rng.choice(self.rank_choices))
            # Most draws keep to layouts loom should take; some are left to be refused.
            for _ in range(20):
                if predicted_refusal(model, data, lay) is None or rng.random() < 0.15:
                    break
                lay = draw_layout(rng, model, rng.choice(self.rank_choices))
            name = f"l{j}-{label(lay)}"
            config = folder / f"{name}.yaml"
            write_config(config, name, folder / "runs", folder / "data", model, data, lay, checkpoint)
            command, (outcome, rc, out, err, secs) = train(config, ranks_of(lay), self.timeout)
            predicted = predicted_refusal(model, data, lay)
            common = dict(layout=name, config=str(config), command=" ".join(command), seconds=round(secs, 1))
            print(f"  {name}: {outcome} in {secs:.0f}s" + (f" ({predicted})" if predicted else ""), flush=True)
            if outcome == "refused":
                message = refusal_message(err)
                if not clear_refusal(err):
                    self.record("unclear-refusal", index, message=message, stderr=err[-2000:], **common)
                elif predicted is None:
                    self.record("unpredicted-refusal", index, message=message, **common)
                else:
                    self.record("refused-as-predicted", index, message=message, **common)
                continue
            if outcome != "ok":
                self.record(outcome, index, rc=rc, predicted=predicted, stderr=err[-3000:], stdout=out[-1500:],
                            **common)
                continue
            got = steps_of(folder / "runs" / name)
            loss, norm, problem = compare(got, want, all_steps)
            if not problem and data["valid_batches"] % lay["dp"] == 0:
                valid, problem = compare_valid(valid_losses_of(folder / "runs" / name), want_valid, all_steps)
                if valid is not None and valid > LOSS_TOL:
                    problem = f"valid_loss differs by {valid:.3g} relative"
            kind = verdict(loss, norm, problem, got, want, all_steps)
            if kind != "ok":
                self.record(kind, index, loss_rel=loss, norm_rel=norm, problem=problem, predicted=predicted,
                            got=got, want=want, **common)
                continue
            self.record("ok", index, loss_rel=loss, norm_rel=norm, predicted=predicted, **common)
            if check_export:
                try:
                    logits, weights, problem = export_difference(folder / "runs" / name, reference, model,
                                                                 data["seq_len"], model["vocab_size"])
                    ok = problem is None and logits < EXPORT_TOL
                    self.record("export-ok" if ok else "export-mismatch", index, logits=logits, weights=weights,
                                problem=problem, **common)
                except Exception as e:  # noqa: BLE001
                    self.record("export-error", index, error=repr(e)[-2000:], **common)
            if check_resume and resumable is None and data["steps"] > 2:
                resumable = folder / "runs" / name / "checkpoints" / "step-0000002"
            elif check_resume and resumable is not None:
                pass
        if resumable is not None:
            self.resume(index, rng, folder, model, data, checkpoint, resumable, want)
            if rng.random() < 0.5:
                self.export_checkpoint(index, folder, model, data, resumable)

    def export_checkpoint(self, index, folder, model, data, source):
        """`loom export` of a layout's checkpoint loads in transformers with loom's logits of that checkpoint."""
        import torch
        from hub_families import hf_logits, loom_logits
        out = folder / f"export-{source.parent.parent.name}"
        command = [LOOM_BIN, "export", str(source), "--output", str(out)]
        outcome, rc, _, err, _ = run(command, self.timeout)
        common = dict(layout=f"export {source}", command=" ".join(command))
        if outcome != "ok":
            self.record(f"export-{outcome}", index, rc=rc, stderr=err[-2000:], **common)
            return
        try:
            ids = torch.randint(0, model["vocab_size"], (2, data["seq_len"]),
                                generator=torch.Generator().manual_seed(7))
            loom = loom_logits(source, ids, folder / "checkpoint-logits.safetensors")
            hf = hf_logits(load_hub(out, model), ids)
            diff = (loom - hf).abs().max().item()
            self.record("logits-ok" if diff < LOGITS_TOL else "logits-mismatch", index, diff=diff, **common)
        except Exception as e:  # noqa: BLE001
            self.record("export-error", index, error=repr(e)[-2000:], **common)

    def resume(self, index, rng, folder, model, data, checkpoint, source, want):
        """The source's step-2 checkpoint resumed on another layout (or one rank) logs the single rank's later steps."""
        for _ in range(30):
            lay = draw_layout(rng, model, rng.choice([1, 2, 3, 4])) if rng.random() < 0.8 else dict(SINGLE)
            if ranks_of(lay) == 1:
                lay = dict(SINGLE)
            if predicted_refusal(model, data, lay) is None:
                break
        name = f"resume-{label(lay)}"
        config = folder / f"{name}.yaml"
        write_config(config, name, folder / "runs", folder / "data", model, data, lay,
                     dict(checkpoint, resume=str(source), export_hf_at_end=False))
        command, (outcome, rc, out, err, secs) = train(config, ranks_of(lay), self.timeout)
        common = dict(layout=name, source=str(source), config=str(config), command=" ".join(command))
        print(f"  {name} from {source.parent.parent.name}: {outcome} in {secs:.0f}s", flush=True)
        if outcome == "refused" and clear_refusal(err):
            self.record("unpredicted-refusal", index, message=refusal_message(err), **common)
            return
        if outcome != "ok":
            self.record(f"resume-{outcome}", index, rc=rc, stderr=err[-3000:], **common)
            return
        got, steps = steps_of(folder / "runs" / name), list(range(3, data["steps"] + 1))
        loss, norm, problem = compare(got, want, steps)
        self.record("resume-" + verdict(loss, norm, problem, got, want, steps), index, loss_rel=loss, norm_rel=norm,
                    problem=problem, **common)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for datasets, configs, runs and findings")
    parser.add_argument("--draws", type=int, default=10, help="models drawn")
    parser.add_argument("--seed", type=int, default=1, help="seeds the draws: the same seed draws the same sweep")
    parser.add_argument("--arch", choices=ARCHS, help="draw only this family")
    parser.add_argument("--layouts", type=int, default=3, help="layouts tried per model")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a run counts as hung")
    parser.add_argument("--max-ranks", type=int, default=4, help="4, or 8 to draw layouts on 6 and 8 ranks too")
    parser.add_argument("--first", type=int, default=0, help="number of the first draw (to continue a sweep)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.work, args.timeout, args.max_ranks)
    for index in range(args.first, args.first + args.draws):
        sweep.draw(index, random.Random(args.seed * 100003 + index), args.arch, args.layouts)
    print("outcomes:", json.dumps(sweep.counts, sort_keys=True))
    return 1 if sweep.findings.exists() and sweep.findings.read_text().strip() else 0


if __name__ == "__main__":
    sys.exit(main())
