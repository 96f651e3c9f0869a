"""End-to-end tests of `loom train` checkpoints: crash safety, exact resume,
and that training on the bundled corpus learns something.

LOOM_BIN names the loom binary (default build/loom). Uses a model much smaller
than configs/tiny.yaml so that the whole file runs in well under a minute on
two cores.
"""
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
from conftest import LOOM_BIN  # noqa: E402  (interop helpers: the binary's path)

CONFIG = REPO / "configs" / "tiny.yaml"


# --------------------------------------------------------------------------
# Running loom (the binary may be replaced by a concurrent rebuild: retry)
# --------------------------------------------------------------------------

def _popen(args, **kw):
    # One thread: on 2 shared cores torch's default thread pool oversubscribes
    # (10x slower when another process is busy); results are identical.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    kw.setdefault("env", env)
    for attempt in range(30):
        try:
            return subprocess.Popen([LOOM_BIN, *map(str, args)], **kw)
        except OSError as e:
            if e.errno in (errno.ETXTBSY, errno.ENOENT, errno.EACCES) and attempt < 29:
                time.sleep(1.0)
                continue
            raise


def loom(*args, expect=0, timeout=300):
    """Runs `loom ARGS...`, asserts the exit code, returns (stdout, stderr)."""
    proc = _popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, (
        f"loom {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {out[-4000:]}\nstderr: {err[-4000:]}")
    return out, err


# --------------------------------------------------------------------------
# Data: the KJV corpus, a 512-token tokenizer and a prepared dataset
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e-data")
    # Not named tokenizer.json: the run must still carry it into checkpoints and hf/.
    corpus, tok, ds = d / "corpus.txt", d / "kjv-tokenizer.json", d / "ds"
    subprocess.run(["bash", str(REPO / "data" / "corpus" / "make_kjv.sh"), str(corpus)],
                   check=True, capture_output=True)
    loom("tokenizer", "train", "--input", corpus, "--vocab-size", 512, "--output", tok)
    loom("prepare", "--tokenizer", tok, "--input", corpus, "--output", ds)
    return {"tokenizer": tok, "dataset": ds}


def train_args(data, output_dir, name, steps, interval, **extra):
    sets = {
        "run.output_dir": output_dir,
        "run.name": name,
        "data.train": f"[{data['dataset']}]",
        "data.tokenizer": data["tokenizer"],
        "model.vocab_size": 512,
        "model.hidden_size": 64,
        "model.intermediate_size": 128,
        "model.num_layers": 2,
        "data.seq_len": 64,
        "model.max_seq_len": 64,
        "batch.global_batch_size": 8,
        "schedule.train_steps": steps,
        "schedule.warmup_steps": 2,
        "checkpoint.interval": interval,
        "checkpoint.resume": "auto",
        # The tests compare exported weights with fp32 references.
        "checkpoint.export_dtype": "float32",
        "logging.interval": 1,
    }
    sets.update(extra)
    args = ["train", CONFIG]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def read_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def losses_by_step(run_dir, steps):
    rows = [r for r in read_metrics(run_dir) if "valid_loss" not in r]  # the training steps' records
    got = [r["step"] for r in rows]
    assert got == list(range(1, steps + 1)), f"{run_dir}/metrics.jsonl steps are {got}"
    return {r["step"]: r["loss"] for r in rows}


# --------------------------------------------------------------------------
# Killing a run at chosen moments
# --------------------------------------------------------------------------

def _ckpt_entries(ckpt_dir):
    try:
        return os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []


def _wait_for(proc, cond, timeout=60.0):
    """Polls cond() as fast as possible until it holds; False when proc ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
    raise AssertionError("timed out waiting for the training run")


def reach_kill_point(proc, ckpt_dir, mode, delay=0.0, first_timeout=60.0):
    """Waits until the run `proc` is at the kill point `mode` picks (see
    run_and_kill). Returns None there, or why it was missed (the run ended first)."""
    # Let the run get past start-up (and a resume) so that it is writing checkpoints.
    latest = ckpt_dir / "latest"

    def read_latest():
        try:
            return latest.read_text()
        except (FileNotFoundError, IsADirectoryError):
            return None

    before = read_latest()
    if not _wait_for(proc, lambda: read_latest() not in (None, before), timeout=first_timeout):
        return "exited before writing a checkpoint"
    if mode == "tmp":
        # A new temporary folder: leftovers of earlier kills do not count.
        stale = {e for e in _ckpt_entries(ckpt_dir) if ".tmp-" in e}
        ok = _wait_for(proc, lambda: any(".tmp-" in e and e not in stale for e in _ckpt_entries(ckpt_dir)))
    elif mode == "rename":
        seen = {e for e in _ckpt_entries(ckpt_dir) if e.startswith("step-") and ".tmp-" not in e}
        ok = _wait_for(proc, lambda: any(e.startswith("step-") and ".tmp-" not in e and e not in seen
                                         for e in _ckpt_entries(ckpt_dir)))
    elif mode == "latest":
        cur = read_latest()
        ok = _wait_for(proc, lambda: read_latest() not in (None, cur))
    else:
        time.sleep(delay)
        ok = proc.poll() is None
    return None if ok else f"finished before the kill point ({mode})"


def run_and_kill(args, ckpt_dir, mode, delay=0.0):
    """Starts `loom train`, SIGKILLs it at the moment `mode` picks.

    modes: 'tmp'     as soon as a *.tmp-* checkpoint folder appears (mid-write)
           'rename'  as soon as a new step-* folder appears (before/while latest is replaced)
           'latest'  as soon as `latest` changes (while old folders are deleted)
           'delay'   `delay` seconds after the first checkpoint exists
    Returns (killed, description): killed is False when the run finished first.
    """
    log_path = ckpt_dir.parent.parent / f"train-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = _popen(args, stdout=log, stderr=subprocess.STDOUT)

    def ended(why):
        # The run exited by itself: that must be a successful finish.
        rc = proc.wait()
        out = log_path.read_text()
        assert rc == 0, (f"loom {' '.join(map(str, args))} exited {rc} ({why})\n"
                         f"checkpoints: {sorted(_ckpt_entries(ckpt_dir))}\noutput tail:\n{out[-1500:]}")
        return False, why

    try:
        missed = reach_kill_point(proc, ckpt_dir, mode, delay)
        if missed:
            return ended(missed)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True, f"{mode} delay={delay:.3f}; left {sorted(_ckpt_entries(ckpt_dir))}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_after_kill(ckpt_dir, what):
    latest = ckpt_dir / "latest"
    assert latest.is_file(), f"after kill ({what}): {latest} is missing"
    name = latest.read_text().strip()
    assert name and "/" not in name and ".tmp-" not in name, f"after kill ({what}): latest names {name!r}"
    target = ckpt_dir / name
    assert target.is_dir(), f"after kill ({what}): latest names {name!r}, which does not exist"
    assert (target / "manifest.json").is_file(), (
        f"after kill ({what}): latest names {name!r}, which has no manifest.json: {os.listdir(target)}")
    out, _ = loom("inspect", target)
    manifest = json.loads((target / "manifest.json").read_text())
    assert name == f"step-{manifest['step']:07d}", f"after kill ({what}): {name} holds step {manifest['step']}"
    return manifest["step"]


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

STEPS = 80


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted run: checkpoint every step, like the killed runs."""
    out = tmp_path_factory.mktemp("e2e-ref")
    loom(*train_args(data, out, "ref", STEPS, 1))
    return out / "ref"


def test_kill_during_checkpoint_keeps_latest_valid_and_resume_finishes(data, tmp_path):
    run_dir = tmp_path / "runs" / "k"
    ckpt_dir = run_dir / "checkpoints"
    args = train_args(data, tmp_path / "runs", "k", STEPS, 1)
    rng = random.Random(20261126)
    # The 'rename' kill comes late so that the other kill points are checked
    # first; it is the one that leaves step-N complete but unnamed by latest.
    delays = [("delay", rng.uniform(0.0, 0.25)) for _ in range(3)]
    plan = ["tmp", "latest", delays[0], "tmp", delays[1], "latest", "rename", delays[2], "tmp"]
    kills, log = 0, []
    last_step = 0
    for item in plan:
        mode, delay = (item if isinstance(item, tuple) else (item, 0.0))
        try:
            killed, what = run_and_kill(args, ckpt_dir, mode, delay)
            log.append(what)
            if not killed:
                break
            kills += 1
            step = check_after_kill(ckpt_dir, what)
        except AssertionError as e:
            raise AssertionError(f"kills so far (mode; folders left):\n  " + "\n  ".join(log)
                                 + f"\nthen ({mode}, delay {delay:.3f}): {e}") from None
        assert step >= last_step, f"latest went back from step {last_step} to {step} ({what})"
        last_step = step
    assert kills >= 5, f"only {kills} kills landed: {log}"
    print("kills:", *log, sep="\n  ")
    # Resume to the end, over whatever temporary folders the kills left behind.
    loom(*args)
    assert (ckpt_dir / "latest").read_text().strip() == f"step-{STEPS:07d}"
    check_after_kill(ckpt_dir, "after the final resume")
    losses_by_step(run_dir, STEPS)
    assert (run_dir / "hf" / "model.safetensors").is_file()


def assert_reproduces(reference_run, run_dir, what):
    """run_dir logged the same loss at every step as reference_run and
    exported bit-identical tensors."""
    from safetensors.torch import load_file
    import torch

    want = losses_by_step(reference_run, STEPS)
    got = losses_by_step(run_dir, STEPS)
    diff = [(s, want[s], got[s]) for s in want if want[s] != got[s]]
    assert not diff, f"{len(diff)} steps differ after {what} (step, uninterrupted, resumed): {diff[:5]}"
    a = load_file(str(reference_run / "hf" / "model.safetensors"))
    b = load_file(str(run_dir / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"exported tensor {k} differs after {what}"


def test_resume_after_kills_reproduces_uninterrupted_run(data, tmp_path, reference_run):
    run_dir = tmp_path / "runs" / "r"
    ckpt_dir = run_dir / "checkpoints"
    args = train_args(data, tmp_path / "runs", "r", STEPS, 1)
    kills = 0
    for mode, delay in [("tmp", 0), ("delay", 0.15), ("tmp", 0), ("delay", 0.05)]:
        killed, what = run_and_kill(args, ckpt_dir, mode, delay)
        if killed:
            kills += 1
            check_after_kill(ckpt_dir, what)
    assert kills >= 2
    loom(*args)

    assert_reproduces(reference_run, run_dir, f"{kills} kills + resume")


def unigram_entropy_nats(dataset_dir):
    import h5py
    import numpy as np

    index = json.loads((dataset_dir / "index.json").read_text())
    counts = np.zeros(index["vocab_size"], dtype=np.int64)
    for shard in index["shards"]:
        with h5py.File(dataset_dir / shard["file"], "r") as f:
            counts += np.bincount(f["tokens"][:], minlength=index["vocab_size"])
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_training_learns_and_export_generates(data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    steps = 100
    loom(*train_args(data, tmp_path, "learn", steps, 0))
    run_dir = tmp_path / "learn"
    rows = read_metrics(run_dir)
    assert rows and rows[-1]["step"] == steps
    entropy = unigram_entropy_nats(data["dataset"])
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert math.isfinite(last)
    assert first > entropy, f"first loss {first} already below the unigram entropy {entropy}"
    assert last < entropy, f"last loss {last} after {steps} steps is not below the unigram entropy {entropy} nats"

    # The tokenizer travels with the export, whatever data.tokenizer's file was called.
    assert (run_dir / "hf" / "tokenizer.json").read_bytes() == Path(data["tokenizer"]).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf")).eval()
    assert model.config.vocab_size == 512
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                             pad_token_id=0)
    assert out.shape == (1, 12)
    assert torch.equal(out[0, :4], prompt[0])
    assert int(out.max()) < 512 and int(out.min()) >= 0


def test_resume_after_crash_between_rename_and_latest_update(data, tmp_path):
    """The state a kill leaves between renaming step-N into place and replacing
    `latest` (docs/training.md gives that order): step-N is complete, latest
    still names step-(N-1). Resume must continue from latest and finish."""
    run_dir = tmp_path / "c"
    ckpt_dir = run_dir / "checkpoints"
    loom(*train_args(data, tmp_path, "c", 4, 1, **{"checkpoint.keep_last": 3,
                                                    "checkpoint.export_hf_at_end": "false"}))
    assert (ckpt_dir / "step-0000004" / "manifest.json").is_file()
    (ckpt_dir / "latest").write_text("step-0000003")
    loom(*train_args(data, tmp_path, "c", 8, 1, **{"checkpoint.keep_last": 3}))
    assert (ckpt_dir / "latest").read_text().strip() == "step-0000008"
    losses_by_step(run_dir, 8)


def test_sigterm_mid_accumulation_finishes_the_step_and_resume_is_exact(data, tmp_path, reference_run):
    """SIGTERM while a step's micro-batches are being accumulated (4 per step
    here): loom finishes that step, checkpoints it, exits 75 (requeue me), and resuming
    reproduces the uninterrupted run bit for bit."""
    run_dir = tmp_path / "runs" / "s"
    # Checkpoints only at the end (interval 0): the stop must write its own.
    args = train_args(data, tmp_path / "runs", "s", STEPS, 0)
    rng = random.Random(7)
    mid_step_stops = 0
    for attempt in range(6):
        proc = _popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = run_dir / "metrics.jsonl"
        done_before = len(read_metrics(run_dir)) if metrics.exists() else 0

        def logged_another_step():
            return metrics.exists() and len(metrics.read_text().splitlines()) >= done_before + 2

        if not _wait_for(proc, logged_another_step):
            break  # finished before the signal could land
        # Into the next step's accumulation, which is most of a step's time.
        step_time = read_metrics(run_dir)[-1].get("step_time_s", 0.05)
        time.sleep(rng.uniform(0.1, 0.5) * step_time)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break  # the run ended first
        assert proc.returncode == 75, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        steps = [r["step"] for r in read_metrics(run_dir)]
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step-{steps[-1]:07d}", f"latest {latest}, last logged step {steps[-1]}"
        assert "stopped by signal 15" in out and "run the same command to resume" in out, out[-1500:]
        stop_lines = [l for l in out.splitlines() if l.startswith("stop requested (SIGTERM)")]
        assert len(stop_lines) == 1, out[-1500:]
        if " at micro-batch " in stop_lines[0]:  # else: after the step's last micro-batch
            micro, of = stop_lines[0].split("micro-batch ")[1].split(" ")[0].split("/")
            mid_step_stops += int(micro) < int(of)
        assert not (run_dir / "hf").exists(), "a stopped run must not export"
    assert mid_step_stops >= 1, "no SIGTERM landed in the middle of a step's accumulation"

    loom(*args)  # resume to the end
    assert_reproduces(reference_run, run_dir, "SIGTERM + resume")
