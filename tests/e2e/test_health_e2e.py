"""`loom health` (docs/launching.md, "A first multi-GPU run"): four real MPI
ranks measure their matmul rate, the world ring's sends and every group's
all-reduce in the config's layout; world rank 0 prints a row per rank and per
group and names what is slow against the median, with the exit code saying
whether anything was.
"""
import os
import re
import subprocess

from test_train_e2e import LOOM_BIN, REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def health(*extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([LOOM_BIN, "health", TINY, "--set", "launch.ranks=4", "--set", "parallel.tp=2", *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def test_health_measures_every_rank_and_group_of_the_layout():
    proc = health("--slow-below", "0.001")  # nothing on one machine is a thousand times slower
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "loom health: 4 ranks, world = dp 2 x cp 1 x pp 1 x tp 2, cpu, matmul in fp32" in out
    rows = re.findall(r"^(\d)\s+\S+\s+cpu\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], out
    assert all(float(matmul) > 0 and float(send) > 0 for _, matmul, send in rows), out
    groups = re.findall(r"^(world|tp|dp|pp)\s+(\[[0-9 ]+\])\s+all-reduce ([0-9.]+) GB/s", out, re.M)
    assert sorted((kind, ranks) for kind, ranks, _ in groups) == [
        ("dp", "[0 2]"), ("dp", "[1 3]"), ("tp", "[0 1]"), ("tp", "[2 3]"), ("world", "[0 1 2 3]")], out
    assert all(float(bw) > 0 for _, _, bw in groups), out
    assert "no rank or group below" in out and "slow rank:" not in out


def test_health_measures_the_cp_rings():
    """cp 2 x tp 2: the cp rings [0 2] [1 3] beside the tp groups; the dp group holds the cp ranks (Note [cp
    replicas]), here the same two."""
    proc = health("--set", "parallel.cp=2", "--slow-below", "0.001")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "loom health: 4 ranks, world = dp 1 x cp 2 x pp 1 x tp 2, cpu" in out, out
    groups = re.findall(r"^(world|tp|cp|dp|pp)\s+(\[[0-9 ]+\])\s+all-reduce ([0-9.]+) GB/s", out, re.M)
    assert [(kind, ranks) for kind, ranks, _ in groups] == [
        ("world", "[0 1 2 3]"), ("tp", "[0 1]"), ("tp", "[2 3]"), ("cp", "[0 2]"), ("cp", "[1 3]"),
        ("dp", "[0 2]"), ("dp", "[1 3]")], out


def test_health_names_the_ranks_below_the_median_and_exits_1():
    # At 1.0 of the median, the half of the ranks below it are slow: what a
    # real threshold does to one card that is.
    proc = health("--slow-below", "1")
    out = proc.stdout
    print(out[-3000:])
    assert proc.returncode == 1, proc.stderr[-3000:]
    slow = re.findall(r"^slow rank: world rank (\d) \(\S+\): (matmul|send)", out, re.M)
    assert len({rank for rank, _ in slow}) >= 1, out
    assert re.search(r"^loom health: [1-9]\d* slow rank\(s\), \d+ slow group\(s\)$", out, re.M), out


def test_health_refuses_a_threshold_outside_zero_to_one():
    proc = health("--slow-below", "1.5")
    assert proc.returncode == 2
    assert "--slow-below must be in (0, 1]" in proc.stderr
