"""End-to-end tests of `loom launch`: the mpirun command it builds and runs
(NCCL_*, UCX_*, CUDA_* forwarded from the environment, the binding of GPU
runs), preemption (SIGTERM to `loom launch`, launch.max_wall_time, the job's
end time in LOOM_JOB_END_TIME) with exit code 75 and an exact resume, launch
errors (exit 2, one message), the preflight, the sbatch script of a 4-node x
8-GPU config, and a real one-node Slurm cluster on localhost
(tests/e2e/slurm_cluster.py): a job sent `scancel --signal=USR1`
checkpoints, exits 75, requeues itself and finishes with the same weights as
an uninterrupted run, bit for bit; and a job whose rank is SIGKILLed is
requeued by --max-restarts, resumes from its checkpoint and finishes with the
same weights too.
"""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurmCluster, why_unavailable
from test_train_e2e import CONFIG, LOOM_BIN, REPO, data, read_metrics, train_args  # noqa: F401 (data: fixture)

EXIT_REQUEUE = 75
STEPS = 60


def launch_args(data, output_dir, name, ranks, tp, steps=STEPS, **extra):
    """`loom launch` arguments for the tiny test model on `ranks` ranks (tp x dp)."""
    args = train_args(data, output_dir, name, steps, 0,
                      **{"model.num_heads": 8, "model.num_kv_heads": 4, "launch.ranks": ranks,
                         "parallel.dp": "auto", "parallel.tp": tp, "launch.env.OMP_NUM_THREADS": 1,
                         "launch.mpirun_args": "[]", **extra})
    return ["launch", *args[1:]]


def env_without(*programs):
    """The environment with a PATH whose folders hold none of `programs` (only the loom binary's own)."""
    keep = [d for d in os.environ.get("PATH", "").split(":")
            if d and not any(Path(d, p).exists() for p in programs)]
    return dict(os.environ, PATH=":".join(keep))


def run_loom(args, expect=0, timeout=300, env=None):
    proc = subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))
    assert proc.returncode == expect, (
        f"loom {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
    return proc.stdout, proc.stderr


def weights(run_dir):
    return (run_dir / "hf" / "model.safetensors").read_bytes()


def wait_for_steps(run_dir, steps, proc=None, timeout=180):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before step {steps}:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"{metrics} did not reach {steps} steps in {timeout} s")


def assert_stopped_with_checkpoint(run_dir):
    """`latest` names the last logged step's checkpoint, and nothing was exported."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    last = read_metrics(run_dir)[-1]["step"]
    assert latest == f"step-{last:07d}", (latest, last)
    assert last < STEPS, f"the run reached its last step ({last}) before it was stopped"
    assert not (run_dir / "hf").exists(), "a stopped run must not export"


@pytest.fixture(scope="module")
def reference_tp2(data, tmp_path_factory):
    """An uninterrupted 2-rank (tp 2) run by `loom launch`."""
    out = tmp_path_factory.mktemp("launch-ref")
    stdout, _ = run_loom(launch_args(data, out, "ref", 2, 2))
    assert "preflight: 2 ranks ok" in stdout, stdout[-2000:]
    return out / "ref"


# --------------------------------------------------------------------------
# The mpirun command
# --------------------------------------------------------------------------

def test_dry_run_prints_the_mpirun_command_with_flags_only_where_needed(data, tmp_path):
    cores = os.cpu_count()
    for ranks in (1, 4):
        out, _ = run_loom([*launch_args(data, tmp_path, "dry", ranks, 1), "--dry-run"])
        comments = [l for l in out.splitlines() if l.startswith("#")]
        command = [l for l in out.splitlines() if not l.startswith("#")]
        assert len(command) == 1, out
        argv = command[0].split()
        assert argv[0] == "mpirun" and argv[argv.index("-np") + 1] == str(ranks), out
        assert argv[argv.index(LOOM_BIN if os.path.isabs(LOOM_BIN) else os.path.abspath(LOOM_BIN)) + 1:][:2] == \
            ["train", str(CONFIG)], out
        assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0), out
        assert ("--oversubscribe" in argv) == (ranks > cores), out
        assert any("--oversubscribe: " in c for c in comments) == (ranks > cores), out
        assert "OMP_NUM_THREADS=1" in argv, out  # launch.env, passed with -x
    assert not (tmp_path / "dry").exists(), "a dry run must not start anything"


def test_dry_run_forwards_nccl_ucx_and_cuda_variables_of_the_environment_sorted_and_launch_env_wins(data, tmp_path):
    # Only the variables this test sets (the build machine has CUDA_HOME, a GPU machine CUDA_VISIBLE_DEVICES).
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "UCX_", "CUDA_", "LOOM_JOB_END"))}
    env = dict(clean, NCCL_SOCKET_IFNAME="eth7", NCCL_IB_HCA="mlx5_0", UCX_TLS="rc,sm",
               CUDA_DEVICE_ORDER="PCI_BUS_ID", NCCL_DEBUG="WARN", OMPI_MCA_btl="^openib")
    out, _ = run_loom([*launch_args(data, tmp_path, "dry", 2, 2, **{"launch.env.NCCL_DEBUG": "INFO"}), "--dry-run"],
                      env=env)
    argv = [l for l in out.splitlines() if not l.startswith("#")][0].split()
    forwarded = [argv[i + 1] for i, a in enumerate(argv) if a == "-x" and "=" not in argv[i + 1]]
    # Each present variable by name (Open MPI's -x NAME forwards its value), in name order.
    assert forwarded == ["CUDA_DEVICE_ORDER", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "UCX_TLS"], out
    assert "NCCL_DEBUG=INFO" in argv and "NCCL_DEBUG" not in forwarded, out  # launch.env wins
    assert not any(a.startswith("OMPI_") for a in argv), out  # mpirun's own settings stay with mpirun
    assert any(c.startswith("# -x CUDA_DEVICE_ORDER, NCCL_IB_HCA, NCCL_SOCKET_IFNAME, UCX_TLS: from this environment")
               for c in out.splitlines()), out
    # Not set: nothing forwarded.
    out, _ = run_loom([*launch_args(data, tmp_path, "dry", 2, 2), "--dry-run"], env=clean)
    argv = [l for l in out.splitlines() if not l.startswith("#")][0].split()
    assert [a for i, a in enumerate(argv) if i > 0 and argv[i - 1] == "-x"] == ["OMP_NUM_THREADS=1"], out


def test_dry_run_of_a_gpu_run_binds_to_none_and_a_one_thread_cpu_run_keeps_open_mpis_binding(data, tmp_path):
    for sets, bound in (({"run.device": "cuda"}, True), ({"run.device": "auto", "launch.gpus_per_node": 2}, True),
                        ({"run.device": "cpu"}, False), ({"run.device": "cuda", "launch.mpirun_args": "[--bind-to, numa]"},
                                                         False)):
        out, _ = run_loom([*launch_args(data, tmp_path, "dry", 2, 2, **sets), "--dry-run"])
        # mpirun's own arguments, before `loom train` (whose --set arguments may say --bind-to too).
        command = [l for l in out.splitlines() if not l.startswith("#")][0].split(" train ")[0]
        assert ("--bind-to none" in command) == bound, (sets, out)
        assert any(c.startswith("# --bind-to none: a GPU run") for c in out.splitlines()) == bound, (sets, out)
        if "launch.mpirun_args" in sets:
            assert command.count("--bind-to") == 1 and "--bind-to numa" in command, out


def test_launch_errors_exit_2_with_one_message(data, tmp_path):
    # No mpirun on PATH.
    _, err = run_loom(launch_args(data, tmp_path, "e", 2, 2), expect=2, env=env_without("mpirun"))
    assert err.strip().count("\n") == 0 and "mpirun not found on PATH" in err, err
    # More ranks than the layout allows: tp 2 does not divide 3 ranks.
    _, err = run_loom(launch_args(data, tmp_path, "e", 3, 2), expect=2)
    assert err.strip().count("\n") == 0 and "launch.ranks" in err or "world size" in err, err
    # No Slurm client.
    _, err = run_loom([*launch_args(data, tmp_path, "e", 2, 2), "--slurm"], expect=2,
                      env=env_without("sbatch"))
    assert err.strip().count("\n") == 0 and "sbatch not found on PATH" in err, err
    assert not (tmp_path / "e" / "checkpoints").exists()


def test_check_names_the_rank_and_host_of_a_missing_dataset(data, tmp_path):
    out, _ = run_loom([*launch_args(data, tmp_path, "ok", 2, 2), "--check"])
    assert "preflight: 2 ranks ok" in out, out
    assert not (tmp_path / "ok" / "checkpoints").exists(), "--check must not train"
    missing = tmp_path / "nowhere"
    _, err = run_loom([*launch_args(data, tmp_path, "bad", 2, 2, **{"data.train": f"[{missing}]"}), "--check"],
                      expect=2)
    host = os.uname().nodename.split(".")[0]
    for rank in (0, 1):
        assert re.search(rf"preflight: rank {rank} on {re.escape(host)}[^:]*: data.train\[0\] \({missing}\)", err), err
    assert "preflight failed on 2 of 2 ranks" in err, err


def test_check_counts_the_kept_checkpoints_one_in_flight_and_the_export(data, tmp_path):
    # An 80B shape: keep_last 2, one checkpoint being written and an fp32
    # export are 3 x (12 N + 8) + 4 N bytes, the sum loom plan's code gives.
    h, i, layers, vocab = 8192, 28672, 80, 131072
    n = layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * vocab * h + h
    checkpoint = 12 * n + 8
    needed = 3 * checkpoint + 4 * n
    if shutil.disk_usage(tmp_path).free >= needed:
        pytest.skip("this disk has room for an 80B run's checkpoints")
    args = train_args(data, tmp_path, "big", 30, 5, **{  # six saves
        "model.hidden_size": h, "model.intermediate_size": i, "model.num_layers": layers, "model.num_heads": 64,
        "model.num_kv_heads": 64, "model.vocab_size": vocab, "checkpoint.keep_last": 2,
        "checkpoint.export_dtype": "float32"})
    _, err = run_loom([*args, "--check"], expect=2)
    gib = 2 ** 30
    assert f"the run's checkpoints need {needed / gib:.2f} GiB ({checkpoint / gib:.2f} GiB each" in err, err
    assert "checkpoint.keep_last 2 kept and one being written, and the Hub export at float32" in err, err


# --------------------------------------------------------------------------
# Preemption under mpirun
# --------------------------------------------------------------------------

def test_sigterm_to_loom_launch_checkpoints_exits_75_and_a_second_launch_resumes_bit_identical(
        data, tmp_path, reference_tp2):
    args = launch_args(data, tmp_path, "pre", 2, 2)
    run_dir = tmp_path / "pre"
    proc = subprocess.Popen([LOOM_BIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(run_dir, 3, proc)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    assert "stopped by signal 10" in output and "run the same command to resume" in output, output[-3000:]
    assert_stopped_with_checkpoint(run_dir)
    out, _ = run_loom(args)
    assert weights(run_dir) == weights(reference_tp2), "the resumed run's weights differ from the uninterrupted run's"


def test_max_wall_time_stops_like_a_signal_and_the_run_resumes_bit_identical(data, tmp_path, reference_tp2):
    run_dir = tmp_path / "wall"
    # The budget runs out within the first steps of 60 (0.03 to 0.05 s each
    # here; it starts before the model is built, and a stop requested
    # before the first step still finishes that step and checkpoints it).
    # A budget of 1 s was sometimes longer than the whole run.
    out, _ = run_loom(launch_args(data, tmp_path, "wall", 2, 2, **{"launch.max_wall_time": 0.3}), expect=EXIT_REQUEUE)
    assert "launch.max_wall_time (0.3 s) reached" in out and "stopped at launch.max_wall_time" in out, out[-3000:]
    assert_stopped_with_checkpoint(run_dir)
    run_loom(launch_args(data, tmp_path, "wall", 2, 2))
    assert weights(run_dir) == weights(reference_tp2), "the resumed run's weights differ from the uninterrupted run's"


def test_a_run_whose_job_ends_soon_checkpoints_and_exits_75_before_the_end_time(data, tmp_path):
    # Far more steps than fit: only the end time can stop the run. 2 ranks,
    # so the stop is agreed over the world as a signal's is.
    run_dir = tmp_path / "ending"
    # Start-up takes 3 to 10 s on the 2-core build machine while others build;
    # the margin covers the stop's save and mpirun's exit under that load.
    seconds_away, margin = 20.0, 5.0
    end_time = time.time() + seconds_away
    env = dict(os.environ, LOOM_JOB_END_TIME=f"{end_time:.3f}")
    out, _ = run_loom(launch_args(data, tmp_path, "ending", 2, 2, steps=100000,
                                  **{"launch.job_end_margin": margin}), expect=EXIT_REQUEUE, env=env, timeout=120)
    ended = time.time()
    assert ended < end_time, f"the run ended {ended - end_time:.1f} s after the job's end time\n{out[-3000:]}"
    assert "(LOOM_JOB_END_TIME): the run checkpoints and stops" in out, out[-3000:]
    assert re.search(r"stop before the job's end \(LOOM_JOB_END_TIME\) after step \d+: [\d.]+ s left", out), out[-3000:]
    assert "stopped before the job's end time after step" in out, out[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    last = read_metrics(run_dir)[-1]["step"]
    assert latest == f"step-{last:07d}" and last >= 1, (latest, last)
    # Not stopped far too early either: the margin plus a few seconds for the last step and save.
    assert end_time - ended < margin + 5, f"stopped {end_time - ended:.1f} s before the end\n{out[-3000:]}"


# --------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------

EXPECTED_8B_SCRIPT = """\
#!/bin/bash
# Written by `loom launch --slurm` for {config}.
# Submit it again with: sbatch {run}/slurm/job.sbatch
#SBATCH --job-name=llama3-8b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task={cpus}
#SBATCH --gpus-per-node=8
#SBATCH --time=48:00:00
#SBATCH --partition=gpu
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={run}/slurm/job-%j.out
#SBATCH --error={run}/slurm/job-%j.err
#SBATCH --exclusive
#
# --cpus-per-task={cpus}: the submitting host's {cores} cores / 8 ranks per node (launch.slurm.cpus_per_task sets it); Slurm's default is one CPU per rank.
# Stopping: the ranks read the job's end time (LOOM_JOB_END_TIME, below) and checkpoint and stop
# while one more step and a save still fit (launch.job_end_margin). SIGUSR1 (sent to this shell 300 s
# before the time limit, launch.slurm.signal_lead) is the backstop: it is passed on to the ranks once;
# `scancel --signal=USR1 JOB` and SIGTERM (preemption) reach the ranks directly. The ranks finish
# the step, write a checkpoint and exit 75; the job then requeues itself and the next run resumes
# from checkpoints/latest.

cd {cwd} || exit 2
export OMP_NUM_THREADS={cpus}
export NCCL_DEBUG=WARN
echo "loom: job $SLURM_JOB_ID, start ${{SLURM_RESTART_COUNT:-0}}, nodes $SLURM_JOB_NODELIST"
# The job's end time in Unix seconds, read once per start (a requeued job has a new one).
end_time=${{SLURM_JOB_END_TIME:-}}
if [ -z "$end_time" ]; then
  end=$(SLURM_TIME_FORMAT=standard squeue -h -o %e -j "$SLURM_JOB_ID" 2>/dev/null)
  case "$end" in [0-9]*) end_time=$(date -d "$end" +%s 2>/dev/null) ;; esac
fi
export LOOM_JOB_END_TIME=$end_time
echo "loom: the job ends at ${{end_time:-an unknown time (no end-time stop; the signal only)}}"

ranks_pid=
signals=0
on_usr1() {{ signals=$((signals + 1)); echo "loom: SIGUSR1: the ranks checkpoint and stop"; [ -n "$ranks_pid" ] && kill -USR1 "$ranks_pid"; }}
trap on_usr1 USR1
# Slurm signals the ranks itself on SIGTERM: only keep waiting for their exit code.
trap 'signals=$((signals + 1)); echo "loom: SIGTERM"' TERM

{srun} &
ranks_pid=$!
# A trapped signal ends `wait` early: wait again until the ranks have ended.
while :; do
  seen=$signals
  wait "$ranks_pid"
  status=$?
  [ "$signals" -eq "$seen" ] && break
done
if [ "$status" -eq 75 ]; then
  echo "loom: stopped with a checkpoint (exit 75): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def test_slurm_dry_run_of_a_4_node_x_8_gpu_config_is_the_expected_script(tmp_path):
    config = REPO / "configs" / "llama3-8b.yaml"
    out, _ = run_loom(["launch", config, "--slurm", "--dry-run", "--set", f"run.output_dir={tmp_path}"])
    loom = os.path.abspath(LOOM_BIN)
    run = f"{tmp_path}/llama3-8b"
    cores = os.cpu_count()
    cpus = max(1, cores // 8)
    srun = (f"srun --mpi=pmix --kill-on-bad-exit=1 --nodes=4 --ntasks=32 --ntasks-per-node=8 "
            f"--cpus-per-task={cpus} {loom} train {config} --set run.output_dir={tmp_path}")
    expected = (f"# {run}/slurm/job.sbatch\n"
                + EXPECTED_8B_SCRIPT.format(config=config, run=run, cwd=os.getcwd(), srun=srun, cores=cores,
                                            cpus=cpus)
                + f"\n# rank line\n{srun}\n# submit\nsbatch --parsable {run}/slurm/job.sbatch\n")
    assert out == expected, out
    assert not Path(run).exists(), "a dry run writes nothing"


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def reference_dp2_tp2(data, tmp_path_factory):
    """An uninterrupted 4-rank run (dp 2 x tp 2) by mpirun, for the Slurm jobs to match."""
    out = tmp_path_factory.mktemp("launch-ref4")
    run_loom(launch_args(data, out, "ref4", 4, 2))
    return out / "ref4"


def slurm_rank_pids(job):
    """{Slurm task id: pid} of the `loom train` ranks of Slurm job `job` (slurmd starts them, not the test)."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                       if b"=" in kv)
        except OSError:
            continue
        if argv[1:2] == [b"train"] and env.get(b"SLURM_JOB_ID") == str(job).encode() and b"SLURM_PROCID" in env:
            ranks[int(env[b"SLURM_PROCID"])] = int(entry)
    return ranks


def wait_for_job_end(cluster, job, run_dir, timeout=240):
    """Waits until job `job` is COMPLETED, FAILED or CANCELLED; returns (state, its .out and .err text)."""
    deadline = time.monotonic() + timeout
    state = cluster.job_field(job, "JobState")
    while time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(0.5)
        state = cluster.job_field(job, "JobState")
    text = ""
    for suffix in ("out", "err"):
        log = run_dir / "slurm" / f"job-{job}.{suffix}"
        text += (log.read_text() if log.exists() else f"(no {log.name})") + "\n"
    return state, text


def test_slurm_dry_run_with_max_restarts_requeues_after_a_crash_at_most_n_times(data, tmp_path):
    out, _ = run_loom([*launch_args(data, tmp_path, "mr", 2, 2), "--slurm", "--dry-run", "--max-restarts", 3])
    restarts = f"{tmp_path}/mr/slurm/restarts"
    assert f'elif [ "$status" -ne 0 ] && [ "$status" -ne 2 ]; then\n  restarts=$(cat {restarts} 2>/dev/null || echo 0)\n' \
        '  if [ "$restarts" -lt 3 ]; then\n' in out, out
    assert f"echo $((restarts + 1)) > {restarts}\n" in out, out
    assert "--cpus-per-task=" in out and "export OMP_NUM_THREADS=1\n" in out, out  # launch.env's value wins
    out, _ = run_loom([*launch_args(data, tmp_path, "mr", 2, 2), "--slurm", "--dry-run"])
    assert "restarts" not in out, "without --max-restarts a crash ends the job"


def test_slurm_job_whose_rank_is_sigkilled_is_requeued_once_and_finishes_bit_identical(
        data, tmp_path, slurm_cluster, reference_dp2_tp2):
    # A checkpoint every 2 steps; rank 1 is SIGKILLed once one is written.
    args = [*launch_args(data, tmp_path, "crash", 4, 2, **{"checkpoint.interval": 2}), "--slurm", "--max-restarts", 2]
    out, _ = run_loom(args, env=slurm_cluster.env, timeout=60)
    job = out.strip().splitlines()[-1]
    assert job.isdigit(), out
    run_dir = tmp_path / "crash"
    try:
        wait_for_steps(run_dir, 3, timeout=180)
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoints" / "latest").exists():
            assert time.monotonic() < deadline, "no checkpoint 60 s after step 3"
            time.sleep(0.05)
        os.kill(slurm_rank_pids(job)[1], signal.SIGKILL)
        assert not (run_dir / "hf").exists(), "the job finished before the kill"
        state, text = wait_for_job_end(slurm_cluster, job, run_dir)
    finally:
        if slurm_cluster.job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", job], env=slurm_cluster.env, timeout=30)
    assert state == "COMPLETED", f"job {job} is {state}\n{text[-4000:]}"
    assert (run_dir / "slurm" / "restarts").read_text().strip() == "1", text[-3000:]
    assert slurm_cluster.job_field(job, "Restarts") == "1", text[-3000:]
    assert re.search(rf"the ranks crashed \(exit \d+\): restart 1 of 2, requeueing job {job}", text), text[-3000:]
    assert "start 1," in text, text[-3000:]
    # The batch script read the job's end time and the ranks got it.
    assert re.search(r"loom: the job ends at \d{10}", text), text[-3000:]
    assert "(LOOM_JOB_END_TIME): the run checkpoints and stops" in text, text[-3000:]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert weights(run_dir) == weights(reference_dp2_tp2), \
        "the requeued job's weights differ from the uninterrupted run's"


def test_slurm_job_sent_usr1_checkpoints_requeues_and_finishes_bit_identical(data, tmp_path, slurm_cluster,
                                                                            reference_dp2_tp2):
    args = [*launch_args(data, tmp_path, "job", 4, 2), "--slurm"]
    out, _ = run_loom(args, env=slurm_cluster.env, timeout=60)
    job = out.strip().splitlines()[-1]
    assert job.isdigit(), out
    run_dir = tmp_path / "job"
    log = run_dir / "slurm" / f"job-{job}.out"

    def state():
        return slurm_cluster.job_field(job, "JobState")

    try:
        wait_for_steps(run_dir, 3, timeout=180)
        subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster.env, check=True, timeout=30)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (state() == "COMPLETED" or state() in ("FAILED", "CANCELLED")):
            time.sleep(0.5)
        text = log.read_text() if log.exists() else "(no log)"
        err = (run_dir / "slurm" / f"job-{job}.err")
        text += "\n" + (err.read_text() if err.exists() else "")
        assert state() == "COMPLETED", f"job {job} is {state()}\n{text[-4000:]}"
    finally:
        if state() not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", job], env=slurm_cluster.env, timeout=30)
    assert slurm_cluster.job_field(job, "Restarts") == "1", text[-3000:]
    assert "stopped by signal 10" in text, text[-3000:]
    assert f"stopped with a checkpoint (exit {EXIT_REQUEUE}): requeueing job {job}" in text, text[-3000:]
    assert "start 1," in text, text[-3000:]  # the requeued run
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert weights(run_dir) == weights(reference_dp2_tp2), "the requeued job's weights differ from the uninterrupted run's"
