"""End-to-end tests of config-driven experiments (docs/experiments.md):

- composition: a three-file `base:` chain with ${VAR} interpolation and
  --set on top, as `loom inspect` prints it with each key's origin; a cycle,
  a missing base and an undefined variable each exit 2 naming file and key;
- the run record (runs/<name>/run.json) of a finished, a failed, a stopped,
  a killed-and-resumed and a 2-rank run;
- `loom train runs/<name>/config.yaml` reproducing a run's losses bit for bit
  with the base files gone and the environment variable unset;
- TensorBoard event files read by the `tensorboard` package's own
  event_accumulator: every scalar equals its metrics.jsonl value (as float32),
  also after a run killed past its checkpoint was resumed.
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from test_train_e2e import CONFIG, LOOM_BIN, REPO, _popen, data, loom, read_metrics  # noqa: F401 (data: fixture)

EXIT_REQUEUE = 75


# --------------------------------------------------------------------------
# A composed experiment: configs/tiny.yaml <- small.yaml <- short.yaml <- exp/lr.yaml
# --------------------------------------------------------------------------

def write_chain(root, data):
    """Writes the chain under `root` and returns the experiment's path.

    bases/small.yaml   builds on the bundled tiny config (an absolute base), shrinks
                       the model and reads the dataset from ${LOOM_TEST_DATA}
    bases/short.yaml   builds on small.yaml (beside it): the schedule
    exp/lr.yaml        builds on ../bases/short.yaml: the run's name and lr
    """
    (root / "bases").mkdir(parents=True, exist_ok=True)
    (root / "exp").mkdir(parents=True, exist_ok=True)
    (root / "bases" / "small.yaml").write_text(
        f"base: {CONFIG}\n"
        "model:\n"
        "  vocab_size: 512\n"
        "  hidden_size: 64\n"
        "  intermediate_size: 128\n"
        "  num_layers: 2\n"
        "  max_seq_len: 64\n"
        "data:\n"
        "  train: ['${LOOM_TEST_DATA}/ds']\n"
        "  valid: ${LOOM_TEST_DATA}/ds\n"
        "  valid_interval: 4\n"
        "  valid_batches: 2\n"
        "  seq_len: 64\n"
        f"  tokenizer: {data['tokenizer']}\n"
        "batch:\n"
        "  global_batch_size: 8\n"
        "launch:\n"
        "  ranks: 1\n")
    (root / "bases" / "short.yaml").write_text(
        "base: small.yaml\n"
        "schedule:\n"
        "  train_steps: 12\n"
        "  warmup_steps: 2\n"
        "checkpoint:\n"
        "  interval: 4\n"
        "logging:\n"
        "  interval: 1\n")
    experiment = root / "exp" / "lr.yaml"
    experiment.write_text(
        "base: ../bases/short.yaml\n"      # line 1
        "run:\n"                           # 2
        "  name: ${LOOM_TEST_RUN:-lr}\n"   # 3
        "optimizer:\n"                     # 4
        "  lr: 0.002\n")                   # 5
    return experiment


def env_for(data, **extra):
    env = dict(os.environ, LOOM_TEST_DATA=str(Path(data["dataset"]).parent), OMP_NUM_THREADS="1")
    env.pop("LOOM_TEST_RUN", None)
    env.update(extra)
    return env


def run(args, env, expect=0, timeout=300):
    proc = subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == expect, (
        f"loom {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n"
        f"stdout: {proc.stdout[-4000:]}\nstderr: {proc.stderr[-4000:]}")
    return proc.stdout, proc.stderr


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def read_record(run_dir):
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def composed_run(data, tmp_path_factory):
    """The experiment trained on one rank: (experiment path, run folder, env)."""
    root = tmp_path_factory.mktemp("composed")
    experiment = write_chain(root, data)
    env = env_for(data, LOOM_TEST_RUN="first")
    run(["train", experiment, "--set", f"run.output_dir={root / 'runs'}"], env)
    return experiment, root / "runs" / "first", env


# --------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------

def test_inspect_resolves_the_chain_and_names_where_each_value_came_from(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    out, _ = run(["inspect", experiment, "--set", "optimizer.weight_decay=0.05"], env)
    small, short = tmp_path / "bases" / "small.yaml", tmp_path / "bases" / "short.yaml"
    assert f"# composed from: {CONFIG} -> {small} -> {short} -> {experiment} -> --set" in out, out
    lines = out.splitlines()

    def line_of(key, value):
        found = [l for l in lines if re.match(rf"^\s+{re.escape(key)}: {re.escape(value)}  # ", l)]
        assert len(found) == 1, f"{key}: {value} not printed once:\n{out}"
        return found[0].split("  # ", 1)[1]

    assert line_of("lr", "0.002") == f"{experiment}:5:3"                          # the experiment
    assert line_of("name", "lr") == f"{experiment}:3:3"                           # ${LOOM_TEST_RUN:-lr}
    assert line_of("train_steps", "12") == f"{short}:3:3"                         # the middle file
    assert line_of("hidden_size", "64") == f"{small}:4:3"                         # the first base
    assert line_of("valid", str(Path(data["dataset"]))) == f"{small}:10:3"        # ${LOOM_TEST_DATA}/ds
    assert line_of("num_heads", "8").startswith(f"{CONFIG}:")                     # configs/tiny.yaml
    assert line_of("weight_decay", "0.05") == "--set optimizer.weight_decay=0.05"
    assert line_of("recompute", "none") == "default"


def test_a_cycle_a_missing_base_and_an_undefined_variable_exit_2_naming_file_and_key(data, tmp_path):
    env = env_for(data)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("run:\n  seed: 1\nbase: a.yaml\n")
    (tmp_path / "missing.yaml").write_text("run:\n  name: x\nbase: nowhere/base.yaml\n")
    (tmp_path / "undefined.yaml").write_text(f"base: {CONFIG}\ndata:\n  valid: ${{LOOM_TEST_UNDEFINED}}/v\n")
    env.pop("LOOM_TEST_UNDEFINED", None)
    cases = {
        "a.yaml": f"{tmp_path / 'b.yaml'}:3:7: base: base files form a cycle: "
                  f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}",
        "missing.yaml": f"{tmp_path / 'missing.yaml'}:3:7: base: cannot read base config 'nowhere/base.yaml'",
        "undefined.yaml": f"{tmp_path / 'undefined.yaml'}:3:10: data.valid: undefined environment variable "
                          "LOOM_TEST_UNDEFINED",
    }
    for name, message in cases.items():
        for command in ("inspect", "train", "launch"):
            _, err = run([command, tmp_path / name], env, expect=2)
            assert message in err and err.strip().count("\n") == 0, f"loom {command} {name}:\n{err}"
    assert not (tmp_path / "runs").exists() and not Path("runs/x/run.json").exists()


# --------------------------------------------------------------------------
# The run record, and reproducing a run from its folder
# --------------------------------------------------------------------------

def test_run_folder_records_the_command_versions_hosts_layout_and_times(composed_run):
    experiment, run_dir, _ = composed_run
    record = read_record(run_dir)
    assert record["name"] == "first" and record["config"] == "config.yaml"
    assert record["status"] == "finished" and record["exit_code"] == 0 and record["final_step"] == 12, record
    assert record["command"][:3] == ["loom", "train", str(experiment)], record["command"]
    assert record["overrides"] == [f"run.output_dir={run_dir.parent}"]
    assert record["config_source"] == str(experiment)
    assert record["base_files"] == [str(CONFIG), str(experiment.parent.parent / "bases" / "small.yaml"),
                                    str(experiment.parent.parent / "bases" / "short.yaml")]
    assert record["hosts"] == [socket.gethostname()]
    assert record["layout"]["world"] == 1 and record["layout"]["dp"] == 1 and record["layout"]["device"] == "cpu"
    assert record["layout"]["cp"] == 1
    assert record["loom"]["version"] and re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", record["loom"]["git_commit"])
    version_out, _ = run(["version"], dict(os.environ))
    assert record["loom"]["git_commit"] in version_out.splitlines()[0], version_out
    import torch
    assert record["libraries"]["libtorch"] == torch.__version__.split("+")[0], record["libraries"]
    assert "mpi" in record["libraries"] and any(k.startswith("cuda") for k in record["libraries"])
    version_libraries = dict(l.split(" ", 1) for l in version_out.splitlines()[1:])
    if record["libraries"].get("cuda") == "not loaded":
        # A CPU run where no GPU can be used leaves loom's CUDA part unloaded
        # (docs/architecture.md, "CUDA and NCCL"); `loom version` loads it.
        cuda = {"cuda_runtime", "nccl", "cuda_devices"}
        assert cuda <= version_libraries.keys(), version_out
        version_libraries = {k: v for k, v in version_libraries.items() if k not in cuda} | {"cuda": "not loaded"}
    assert version_libraries == record["libraries"], (version_libraries, record["libraries"])
    start = time.strptime(record["start_time"], "%Y-%m-%dT%H:%M:%SZ")
    end = time.strptime(record["end_time"], "%Y-%m-%dT%H:%M:%SZ")
    assert start <= end
    assert len(record["attempts"]) == 1 and record["attempts"][0]["status"] == "finished"
    # The resolved config sits beside it.
    assert "base:" not in (run_dir / "config.yaml").read_text()


def test_training_from_the_run_folders_config_reproduces_the_losses_bit_for_bit(composed_run, tmp_path):
    experiment, run_dir, env = composed_run
    # Neither the base files nor the environment are needed any more.
    for base in (experiment.parent.parent / "bases").iterdir():
        base.rename(base.with_suffix(".gone"))
    try:
        env = dict(env)
        env.pop("LOOM_TEST_RUN")
        env.pop("LOOM_TEST_DATA")
        run(["train", run_dir / "config.yaml", "--set", f"run.output_dir={tmp_path}"], env)
    finally:
        for base in (experiment.parent.parent / "bases").iterdir():
            base.rename(base.with_suffix(".yaml"))
    again = tmp_path / "first"
    assert train_losses(again) == train_losses(run_dir) and len(train_losses(run_dir)) == 12
    assert [r["valid_loss"] for r in read_metrics(again) if "valid_loss" in r] == \
        [r["valid_loss"] for r in read_metrics(run_dir) if "valid_loss" in r]
    assert (again / "config.yaml").read_text().replace(str(tmp_path), "OUT") == \
        (run_dir / "config.yaml").read_text().replace(str(run_dir.parent), "OUT")
    assert read_record(again)["config_source"] == str(run_dir / "config.yaml")


def test_failed_and_stopped_runs_record_how_they_ended(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    out = tmp_path / "runs"
    # Bad input found by train() itself, after the record was started: exit 2.
    _, err = run(["train", experiment, "--set", f"run.output_dir={out}", "--set", "run.name=bad",
                  "--set", f"data.train=[{tmp_path / 'nowhere'}]"], env, expect=2)
    record = read_record(out / "bad")
    assert record["status"] == "failed" and record["exit_code"] == 2, record
    assert str(tmp_path / "nowhere") in record["error"] and record["end_time"], record
    # A graceful stop (launch.max_wall_time): exit 75, then a resume finishes.
    args = ["train", experiment, "--set", f"run.output_dir={out}", "--set", "run.name=stop",
            "--set", "schedule.train_steps=400", "--set", "checkpoint.interval=0", "--set", "launch.max_wall_time=1"]
    run(args, env, expect=EXIT_REQUEUE)
    record = read_record(out / "stop")
    assert record["status"] == "stopped" and record["exit_code"] == EXIT_REQUEUE, record
    assert 0 < record["final_step"] < 400, record


def test_two_rank_launch_records_every_ranks_host_the_layout_and_the_launch_command(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    args = ["launch", experiment, "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=dp2",
            "--set", "launch.ranks=2", "--set", "schedule.train_steps=4", "--set", "launch.mpirun_args=[]"]
    run(args, env)
    record = read_record(tmp_path / "runs" / "dp2")
    assert record["hosts"] == [socket.gethostname()] * 2, record["hosts"]
    assert record["layout"]["world"] == 2 and record["layout"]["dp"] == 2, record["layout"]
    assert record["launch_command"].startswith("loom launch ") and "run.name=dp2" in record["launch_command"]
    assert record["status"] == "finished" and record["final_step"] == 4, record
    assert_tensorboard_matches_metrics(tmp_path / "runs" / "dp2")


# --------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------

def tensorboard_scalars(run_dir):
    """{(tag, step): value} as TensorBoard's own reader sees the folder."""
    from tensorboard.backend.event_processing import event_accumulator
    files = [p for p in run_dir.iterdir() if "tfevents" in p.name]
    assert files, f"no event file in {run_dir}"
    acc = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} step {event.step} twice"
            scalars[(tag, event.step)] = event.value
    return scalars


def metrics_scalars(run_dir):
    """{(key, step): value} for every number of metrics.jsonl (not booleans or strings)."""
    expected = {}
    for record in read_metrics(run_dir):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert (key, record["step"]) not in expected
                expected[(key, record["step"])] = value
    return expected


def assert_tensorboard_matches_metrics(run_dir):
    got, expected = tensorboard_scalars(run_dir), metrics_scalars(run_dir)
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))
    for key, value in expected.items():
        # TensorBoard keeps float32: the metrics.jsonl double rounded once.
        assert got[key] == float(np.float32(value)), (key, value, got[key])
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_peak_gib", "valid_loss"):
        assert any(k[0] == tag for k in got), f"no {tag} scalar"


def test_tensorboard_reads_every_scalar_of_metrics_jsonl(composed_run):
    _, run_dir, _ = composed_run
    assert_tensorboard_matches_metrics(run_dir)
    name = next(p.name for p in run_dir.iterdir() if "tfevents" in p.name)
    assert re.fullmatch(rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}\.\d+", name), name


def test_tensorboard_drops_the_steps_a_resume_redoes_as_metrics_jsonl_does(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    run_dir = tmp_path / "runs" / "killed"
    args = [LOOM_BIN, "train", experiment, "--set", f"run.output_dir={tmp_path / 'runs'}",
            "--set", "run.name=killed", "--set", "schedule.train_steps=40"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Past the checkpoint of step 4 and some steps beyond it, then SIGKILL:
        # steps 5.. are in both files and will be redone.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and \
                    sum(1 for r in read_metrics_safe(run_dir) if "loss" in r) >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_before = max(step for (_, step) in tensorboard_scalars(run_dir))
    latest = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert steps_before > latest, (steps_before, latest)
    assert read_record(run_dir)["status"] == "running"  # nothing could write its end
    run(args[1:], env)
    assert_tensorboard_matches_metrics(run_dir)
    assert len([p for p in run_dir.iterdir() if "tfevents" in p.name]) == 2
    record = read_record(run_dir)
    assert [a["status"] for a in record["attempts"]] == ["running", "finished"], record["attempts"]


def read_metrics_safe(run_dir):
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


# --------------------------------------------------------------------------
# Sweeps, `loom runs`, `loom plot` of several runs
# --------------------------------------------------------------------------

SWEEP_MEMBERS = ["lr-lr0.002-tp1", "lr-lr0.002-tp2", "lr-lr0.0005-tp1", "lr-lr0.0005-tp2"]


def sweep_args(experiment, out, *extra):
    return ["sweep", experiment, "--grid", "optimizer.lr=0.002,0.0005", "--grid", "parallel.tp=1,2",
            "--set", f"run.output_dir={out}", "--set", "launch.ranks=2", "--set", "schedule.train_steps=4",
            "--set", "launch.mpirun_args=[]", *extra]


def assert_four_finished_runs_listed(out):
    """`loom runs` lists the sweep's four runs, finished, with metrics.jsonl's final losses and layouts."""
    listed, _ = run(["runs", out, "--json"], dict(os.environ))
    runs = {r["name"]: r for r in map(json.loads, listed.splitlines())}
    assert sorted(runs) == sorted(SWEEP_MEMBERS), listed
    for name, r in runs.items():
        losses = [loss for _, loss in train_losses(out / name)]
        assert r["status"] == "finished" and r["step"] == 4 and r["train_steps"] == 4, r
        assert r["final_loss"] == losses[-1] and r["best_loss"] == min(losses), (r, losses)
        assert r["lr"] == (0.002 if "0.002" in name else 0.0005), r
        assert r["layout"] == ("dp2 tp1 pp1" if name.endswith("tp1") else "dp1 tp2 pp1"), r
        assert r["tokens_per_s"] > 0
    table, _ = run(["runs", out], dict(os.environ))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "step"], table
    for name, r in runs.items():
        row = next(l for l in lines if l.startswith(name + " "))
        assert "finished" in row and f"{r['final_loss']:.4f}" in row, row


def test_sweep_runs_every_combination_with_mpirun_and_loom_runs_lists_them(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    out = tmp_path / "runs"
    dry, _ = run(sweep_args(experiment, out, "--dry-run"), env)
    assert [l.split()[-1] for l in dry.splitlines() if l.startswith("# ")] == SWEEP_MEMBERS, dry
    assert not out.exists(), "a dry run writes nothing"
    stdout, _ = run(sweep_args(experiment, out), env, timeout=600)
    for name in SWEEP_MEMBERS:
        assert f"  {name}: finished (exit 0)" in stdout, stdout[-3000:]
        record = read_record(out / name)
        assert record["launch_command"].startswith("loom launch ") and f"run.name={name}" in record["launch_command"]
    sweep = json.loads((out / "lr-sweep" / "sweep.json").read_text())
    assert [m["name"] for m in sweep["members"]] == SWEEP_MEMBERS
    assert all(m["exit_code"] == 0 for m in sweep["members"]), sweep
    assert_four_finished_runs_listed(out)
    # Several runs in one SVG, a legend entry per run.
    plotted, _ = run(["plot", *(out / name for name in SWEEP_MEMBERS), "--out", tmp_path / "lr.svg"],
                     dict(os.environ))
    figure = ElementTree.parse(tmp_path / "lr.svg").getroot()
    assert figure.tag == "{http://www.w3.org/2000/svg}svg"
    assert all(name in "".join(figure.itertext()) for name in SWEEP_MEMBERS)
    assert all(name in plotted for name in SWEEP_MEMBERS), plotted


def test_a_failed_sweep_member_does_not_stop_the_others_and_is_reported(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    env = env_for(data)
    out = tmp_path / "runs"
    good = Path(data["dataset"])
    stdout, err = run(["sweep", experiment, "--grid", f"data.train=[{tmp_path / 'nowhere'}],[{good}]",
                       "--set", f"run.output_dir={out}", "--set", "schedule.train_steps=2", "--set", "run.name=d"],
                      env, expect=1)
    lines = [l.strip() for l in stdout.splitlines() if l.startswith("  d-")]
    assert len(lines) == 2 and "failed (exit 2)" in lines[0] and "finished (exit 0)" in lines[1], stdout
    assert "1 of 2 runs failed" in err, err
    assert read_record(out / lines[1].split(":")[0])["status"] == "finished"


def test_a_grid_with_an_impossible_member_is_refused_before_anything_runs(data, tmp_path):
    experiment = write_chain(tmp_path, data)
    _, err = run(["sweep", experiment, "--grid", "parallel.tp=1,3", "--set", f"run.output_dir={tmp_path / 'runs'}"],
                 env_for(data), expect=2)
    assert "member 2 (lr-tp3)" in err and "parallel.tp" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    from slurm_cluster import LocalSlurmCluster, why_unavailable
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_sweep_as_a_slurm_job_array_runs_all_four(data, tmp_path, slurm_cluster):
    experiment = write_chain(tmp_path, data)
    env = dict(env_for(data), SLURM_CONF=slurm_cluster.env["SLURM_CONF"])
    out = tmp_path / "runs"
    stdout, _ = run(sweep_args(experiment, out, "--slurm"), env, timeout=60)
    job = stdout.strip().splitlines()[-1]
    assert job.isdigit(), stdout
    script = (out / "lr-sweep" / "job.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script, script
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline:
            records = [out / name / "run.json" for name in SWEEP_MEMBERS]
            if all(p.exists() and json.loads(p.read_text())["status"] != "running" for p in records):
                break
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=slurm_cluster.env, timeout=30)
    logs = "\n".join(p.read_text()[-1500:] for p in (out / "lr-sweep").glob("job-*"))
    for name in SWEEP_MEMBERS:
        record = read_record(out / name)
        assert record["status"] == "finished", f"{name}: {record['status']}\n{logs}"
        assert record["slurm_job_id"], record
    assert_four_finished_runs_listed(out)
