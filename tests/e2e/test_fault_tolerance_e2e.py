"""Fault tolerance end to end (docs/reliability.md): the hang watchdog ends a
job whose rank stopped participating (SIGSTOP) within parallel.comm_timeout
+ 30 s, naming the stuck operation; `loom launch --max-restarts` brings a
4-rank run through three SIGKILLs of random ranks at random steps (seeded,
printed) to final weights bit-identical to an uninterrupted run, and does not
restart a job that failed on bad input.
"""
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest

from test_launch_e2e import launch_args, run_loom, weights
from test_train_e2e import LOOM_BIN, data  # noqa: F401 (data: fixture)


def rank_pids(root_pid):
    """{world rank: pid} of the `loom train` ranks descended from root_pid."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    ranks, stack = {}, [root_pid]
    while stack:
        for pid in children.get(stack.pop(), []):
            stack.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            except OSError:
                continue
            if b"train" in argv[1:2] and b"OMPI_COMM_WORLD_RANK" in env:
                ranks[int(env[b"OMPI_COMM_WORLD_RANK"])] = pid
    return ranks


class Job:
    """`loom ARGS` in the background, its stdout and stderr collected line by line."""

    def __init__(self, args):
        self.proc = subprocess.Popen([LOOM_BIN, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self):
        return "\n".join(self.lines)

    def wait_for_line(self, pattern, start=0, timeout=120):
        """The index and match of the first line at or after `start` matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(start, len(self.lines)):
                m = regex.search(self.lines[i])
                if m:
                    return i, m
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                pytest.fail(f"the job ended (exit {self.proc.returncode}) before a line matching {pattern!r}:\n"
                            f"{self.output()[-4000:]}")
            time.sleep(0.01)
        pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n{self.output()[-4000:]}")

    def finish(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._reader.join(timeout=5)
        return self.proc.returncode


# --------------------------------------------------------------------------
# Hang watchdog
# --------------------------------------------------------------------------

def test_a_sigstopped_pipeline_rank_ends_the_job_within_the_timeout_naming_the_stuck_operation(data, tmp_path):
    comm_timeout = 4
    # pp 2: the stages exchange activations and gradients by send/recv, so the
    # rank left waiting is in a point-to-point operation or the step's loss
    # all-reduce. The first-step timeout is long: a message saying 4 s shows
    # that the steady value took over after step 1.
    job = Job(launch_args(data, tmp_path, "hang", 2, 1, steps=100000,
                          **{"parallel.pp": 2, "parallel.comm_timeout": comm_timeout,
                             "parallel.comm_timeout_first_step": 120}))
    stopped = None
    try:
        job.wait_for_line(r"^step 3/")
        stopped = rank_pids(job.proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        code = job.finish(timeout=comm_timeout + 60)
        elapsed = time.monotonic() - start
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = job.output()
    print(out[-3000:])
    print(f"the job ended {elapsed:.1f} s after world rank 1 was stopped (exit {code})")
    assert code != 0, out[-3000:]
    assert elapsed < comm_timeout + 30, f"{elapsed:.1f} s (limit {comm_timeout} + 30 s)"
    # A pipeline message waits on its link's group, "pp 0>1" or "pp 1>0".
    stuck = re.search(r"loom: rank 0 \(group '(pp|pp [01]>[01]|world)' rank 0 of 2, world ranks \[0 1\]\): "
                      r"(send|recv|all_reduce|barrier) #\d+ .*did not complete within 4 s; waiting for "
                      r"(world ranks \[1\]|group rank 1 \(world rank 1\))", out)
    assert stuck, out[-3000:]


def test_an_exception_on_one_rank_of_four_ends_the_job_within_30_s_with_its_message_first(data, tmp_path):
    # Note [planted faults]: world rank 3 (the last stage of the second
    # replica, dp 2 x pp 2) throws at step 3 after its backward, as a CUDA
    # out-of-memory would; its peers wait in collectives it never joins. The
    # timeouts are long, so only the failing rank's own abort can end the job
    # in time, and its message must come before any other rank's.
    job = Job(launch_args(data, tmp_path, "planted", 4, 1, steps=1000,
                          **{"parallel.pp": 2, "parallel.comm_timeout": 120,
                             "parallel.comm_timeout_first_step": 120, "launch.env.LOOM_TEST_FAULT": "3:3"}))
    job.wait_for_line(r"^step 2/")
    start = time.monotonic()
    code = job.finish(timeout=90)
    elapsed = time.monotonic() - start
    out = job.output()
    print(out[-3000:])
    print(f"the job ended {elapsed:.1f} s after step 2 was logged (exit {code})")
    assert code not in (0, 75), out[-3000:]
    assert elapsed < 30, f"{elapsed:.1f} s (limit 30 s)"
    first = next((line for line in job.lines if line.startswith("loom: ")), None)
    assert first == "loom: train: rank 3: internal error: planted fault (LOOM_TEST_FAULT) on world rank 3 at step 3", \
        out[-3000:]
    assert not re.search(r"did not complete within", out), "a peer's timeout fired: " + out[-3000:]


# --------------------------------------------------------------------------
# Supervised restarts
# --------------------------------------------------------------------------

CHAOS_STEPS = 16


def test_chaos_three_sigkills_of_random_ranks_restart_and_end_bit_identical_to_an_uninterrupted_run(data, tmp_path):
    seed = int(os.environ.get("LOOM_CHAOS_SEED", "10"))
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(3, CHAOS_STEPS - 3), 3))
    victims = [rng.randrange(4) for _ in kills]
    print(f"chaos seed {seed}: SIGKILL world rank {victims} at steps {kills} (LOOM_CHAOS_SEED sets the seed)")
    # dp 2 x tp 2, a checkpoint every 2 steps: each restart redoes at most a step or two.
    extra = {"checkpoint.interval": 2, "checkpoint.keep_last": 2}
    run_loom(launch_args(data, tmp_path, "ref", 4, 2, steps=CHAOS_STEPS, **extra))
    job = Job([*launch_args(data, tmp_path, "chaos", 4, 2, steps=CHAOS_STEPS, **extra), "--max-restarts", 3])
    attempt_start = 0
    try:
        for n, (step, victim) in enumerate(zip(kills, victims), start=1):
            i = attempt_start
            while True:  # the first step line of this attempt at or past `step`
                i, m = job.wait_for_line(rf"^step (\d+)/{CHAOS_STEPS} \|", start=i)
                seen = int(m.group(1))
                if seen >= step:
                    break
                i += 1
            assert seen < CHAOS_STEPS, f"the run finished before kill {n}"
            os.kill(rank_pids(job.proc.pid)[victim], signal.SIGKILL)
            print(f"kill {n}: SIGKILL world rank {victim} after step {seen} was logged (planned: step {step})")
            attempt_start, _ = job.wait_for_line(rf"loom launch: restart {n} of 3 after exit \d+", start=i)
        code = job.finish(timeout=300)
    finally:
        if job.proc.poll() is None:
            os.killpg(job.proc.pid, signal.SIGKILL)
    out = job.output()
    assert code == 0, out[-4000:]
    restarts = [line for line in out.splitlines() if line.startswith("loom launch: restart")]
    print("\n".join(restarts))
    assert len(restarts) == 3, out[-4000:]
    log = (tmp_path / "chaos" / "logs" / "restarts.jsonl").read_text().splitlines()
    assert len(log) == 3 and all('"cause": "exit ' in line for line in log), log
    assert weights(tmp_path / "chaos") == weights(tmp_path / "ref"), \
        "the restarted run's exported weights differ from the uninterrupted run's"


def test_max_restarts_does_not_restart_a_job_that_failed_on_bad_input(data, tmp_path):
    missing = tmp_path / "nowhere"
    _, err = run_loom([*launch_args(data, tmp_path, "bad", 2, 1, **{"data.train": f"[{missing}]"}),
                       "--max-restarts", 3], expect=2)
    assert "loom launch: restart" not in err, err
    assert not (tmp_path / "bad" / "logs" / "restarts.jsonl").exists()
