"""Sharded checkpoints survive the death of any one rank (issue: sharded state).

A tp 2 x pp 2 run on 4 ranks checkpoints every step; one rank (not the
writer, and in one round the writer) is SIGKILLed at the points of a sharded
save: while the ranks write their pieces into the temporary folder, right
after the writer renamed it into place, right after `latest` moved, and at
random moments. After each kill `latest` must name a whole, loadable
checkpoint that never goes back; the run then resumes on another layout
(dp 2 x pp 2) and finishes. Also: the files of a sharded save hold one copy
of the parameters and the optimizer state, and each rank writes about its
share; and a rank that does not see the run folder rank 0 writes is refused
at start.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from test_train_e2e import _ckpt_entries, check_after_kill, loom, reach_kill_point, train_args
from test_train_e2e import data  # noqa: F401 (fixture)
from test_train_e2e import LOOM_BIN
from test_tensor_parallel_e2e import mpi_args, mpi_env, mpi_loom

STEPS = 40
LAYOUT = {"parallel.tp": 2, "parallel.pp": 2, "model.num_layers": 4, "model.num_heads": 8, "model.num_kv_heads": 4,
          "batch.micro_batch_size": 1, "launch.ranks": 4}


def run_and_kill_rank(args, ckpt_dir, mode, victim, delay=0.0):
    """Starts the 4-rank run and SIGKILLs world rank `victim` at `mode`
    ('tmp', 'rename', 'latest' or 'delay', as in test_train_e2e)."""
    tag = str(time.monotonic_ns())
    env = {**mpi_env(), "LOOM_TEST_TAG": tag}
    log_path = ckpt_dir.parent.parent / f"train-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*mpi_args(4), "-x", "LOOM_TEST_TAG", LOOM_BIN, *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT, env=env)

    def victim_pid():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env_of = dict(i.split(b"=", 1) for i in f.read().split(b"\0") if b"=" in i)
            except OSError:
                continue
            if env_of.get(b"LOOM_TEST_TAG") == tag.encode() and env_of.get(b"OMPI_COMM_WORLD_RANK") == str(victim).encode():
                return int(entry)
        return None

    try:
        missed = reach_kill_point(proc, ckpt_dir, mode, delay, first_timeout=120)
        pid = None if missed else victim_pid()
        if pid is None:
            rc = proc.wait()
            assert rc == 0, f"exited {rc} ({missed or 'no victim'}):\n{log_path.read_text()[-2000:]}"
            return False, missed or "finished"
        os.kill(pid, signal.SIGKILL)
        # mpirun ends the whole job when a rank dies: no rank hangs.
        rc = proc.wait(timeout=120)
        assert rc != 0, "mpirun exited 0 after a rank was killed"
        return True, f"{mode} rank {victim} delay={delay:.3f}; left {sorted(_ckpt_entries(ckpt_dir))}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killing_any_rank_mid_save_keeps_latest_loadable_and_resume_finishes(data, tmp_path):
    run_dir = tmp_path / "runs" / "k"
    ckpt_dir = run_dir / "checkpoints"
    args = train_args(data, tmp_path / "runs", "k", STEPS, 1, **LAYOUT)
    rng = random.Random(20261206)
    plan = [("tmp", 1), ("latest", 3), ("delay", 2), ("tmp", 0), ("rename", 1), ("delay", 3)]
    kills, log, last_step = 0, [], 0
    for mode, victim in plan:
        delay = rng.uniform(0.0, 0.5) if mode == "delay" else 0.0
        killed, what = run_and_kill_rank(args, ckpt_dir, mode, victim, delay)
        log.append(what)
        if not killed:
            break
        kills += 1
        step = check_after_kill(ckpt_dir, what)
        assert step >= last_step, f"latest went back from step {last_step} to {step} ({what})"
        last_step = step
    assert kills >= 4, f"only {kills} kills landed: {log}"
    # Resume on another layout, over whatever the kills left behind.
    resumed = {**LAYOUT, "parallel.tp": 1, "parallel.dp": 2}
    mpi_loom(4, train_args(data, tmp_path / "runs", "k", STEPS, 1, **resumed))
    assert (ckpt_dir / "latest").read_text().strip() == f"step-{STEPS:07d}"
    check_after_kill(ckpt_dir, "after the final resume")
    assert not [e for e in _ckpt_entries(ckpt_dir) if ".tmp-" in e], sorted(_ckpt_entries(ckpt_dir))


def test_a_sharded_save_holds_one_copy_and_each_rank_writes_its_share(data, tmp_path):
    # dp 2 x tp 2 with ZeRO-1: parameters replicated over dp, optimizer state cut over dp.
    layout = {**LAYOUT, "parallel.pp": 1, "parallel.dp": 2, "parallel.zero_stage": 1}
    mpi_loom(4, train_args(data, tmp_path, "z", 2, 2, **layout))
    ckpt = tmp_path / "z" / "checkpoints" / "step-0000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    params = sum(4 * _numel(t["shape"]) for n, t in manifest["tensors"].items() if not n.startswith("optimizer."))
    state = sum(4 * _numel(t["shape"]) for n, t in manifest["tensors"].items() if n.startswith("optimizer."))
    assert state >= 2 * params  # exp_avg and exp_avg_sq
    stored = {name: entry["bytes"] for name, entry in manifest["files"].items() if entry["kind"] != "trainer_state"}
    total = sum(stored.values())
    assert total <= 1.10 * (params + state), (total, params + state, stored)
    per_rank = {}
    for name, size in stored.items():
        rank = int(name.split("-rank")[1].split(".")[0])
        per_rank[rank] = per_rank.get(rank, 0) + size
    assert sorted(per_rank) == [0, 1, 2, 3], per_rank
    share = (params + state) / 4
    assert max(per_rank.values()) <= 2 * share, (per_rank, share)
    # And it loads whole: every tensor read back, every chunk checked.
    out, _ = loom("inspect", ckpt, "--verify")
    assert "every piece's checksums match" in out


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_a_rank_that_does_not_see_the_run_folder_is_refused_before_any_work(data, tmp_path):
    # Rank 1 runs in a mount namespace of its own with an empty tmpfs over
    # run.output_dir: a node whose disk is not the one rank 0 writes to.
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not allowed here")
    out = tmp_path / "runs"
    out.mkdir()
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text('#!/bin/sh\n'
                       'if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then\n'
                       f'  exec unshare -m sh -c \'mount -t tmpfs tmpfs {out} && exec "$@"\' rank1 "$@"\n'
                       'fi\n'
                       'exec "$@"\n')
    wrapper.chmod(0o755)
    args = train_args(data, out, "local", 4, 2, **{"parallel.tp": 2, "model.num_heads": 8, "model.num_kv_heads": 4})
    proc = subprocess.run([*mpi_args(2), str(wrapper), LOOM_BIN, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=mpi_env())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 1" in proc.stderr and "one shared run.output_dir" in proc.stderr, proc.stderr[-2000:]
    assert not (out / "local" / "checkpoints").exists()


def test_the_export_of_a_sharded_checkpoint_is_the_gathered_export_and_loads_in_transformers(data, tmp_path):
    # The same 3 steps on tp 2 x pp 2, once saving a sharded checkpoint (the
    # end-of-run export streams it) and once without checkpoints (the export
    # gathers the model to rank 0, as every export did before sharding).
    layout = {**LAYOUT, "checkpoint.export_dtype": "float32"}
    mpi_loom(4, train_args(data, tmp_path, "sharded", 3, 3, **layout))
    mpi_loom(4, train_args(data, tmp_path, "gathered", 3, 3, **layout, **{"checkpoint.enabled": "false"}))
    loom("export", tmp_path / "sharded" / "checkpoints" / "step-0000003", "--output", tmp_path / "exported",
         "--dtype", "float32")
    gathered = (tmp_path / "gathered" / "hf" / "model.safetensors").read_bytes()
    assert (tmp_path / "sharded" / "hf" / "model.safetensors").read_bytes() == gathered
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == gathered

    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 17, 42, 99, 7, 300, 2, 5]])
    logits = {}
    for name in ("exported", "gathered/hf"):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / name), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.equal(logits["exported"], logits["gathered/hf"])


def resume_past_a_damaged_newest_checkpoint(data, tmp_path, sets, damaged):
    """Trains 12 steps on 2 ranks (checkpoints at steps 5, 10 and 12), copies
    the run, flips a byte inside the last piece of the step-12 checkpoint's
    file `damaged` (a glob; the last match) and trains the copy again. It must
    pass over step 12, resume from step 10 and export what the undamaged run
    exported. Returns the second run's output, the damaged file and the copy."""
    sets = {**sets, "checkpoint.keep_last": 3}
    original = tmp_path / "original"
    mpi_loom(2, train_args(data, tmp_path, "original", 12, 5, **sets))
    run = tmp_path / "damaged" / "original"
    run.parent.mkdir()
    shutil.copytree(original, run)
    shutil.rmtree(run / "hf")
    path = sorted((run / "checkpoints" / "step-0000012").glob(damaged))[-1]
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 100] ^= 0x10  # inside the last piece's data
    path.write_bytes(bytes(raw))
    out, _ = mpi_loom(2, train_args(data, tmp_path / "damaged", "original", 12, 5, **sets))
    assert "resumed from " + str(run / "checkpoints" / "step-0000010") in out, out
    assert (run / "hf" / "model.safetensors").read_bytes() == (original / "hf" / "model.safetensors").read_bytes()
    return out, path, run


def test_a_damaged_piece_found_by_one_rank_makes_every_rank_pass_over_the_checkpoint(data, tmp_path):
    # tp 2: the flipped byte is in rank 1's file, in a piece that only the
    # rank reading that slice meets; all ranks must agree to resume from the
    # older checkpoint, and end as the undamaged run does.
    out, _, run = resume_past_a_damaged_newest_checkpoint(
        data, tmp_path, {"parallel.tp": 2, "model.num_heads": 8, "model.num_kv_heads": 4},
        "model-rank00001.safetensors")
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step-0000012/model-rank00001.safetensors" in warning[0], out
    assert "CRC32C" in warning[0], warning
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000012"
