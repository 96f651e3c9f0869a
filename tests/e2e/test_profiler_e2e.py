"""End-to-end tests of profile.start_step / profile.steps (trainer/profiler.h).

`loom train` profiles steps 2-3 of a 4-step run: runs/<name>/profile/trace.json
is a Chrome trace holding the matmuls, summary.txt ranks ops by time, and the
same table is printed. Bad profile.* values are refused with exit code 2 and a
message naming the key. With a GPU (torch sees one) the same run on cuda in
bf16 must rank GPU kernels; without one that test is skipped.
"""
import json
import re

import pytest

from test_train_e2e import data, loom, train_args  # noqa: F401 (data: fixture)

MATMULS = {"aten::mm", "aten::addmm", "aten::linear", "aten::matmul"}
# "   1      12.345   10.2%      320       38.6  aten::mm"
ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+([0-9.]+)%\s+(\d+)\s+([0-9.]+)\s+(\S.*)$")


def profiled_run(data, tmp_path, name, **extra):
    args = train_args(data, tmp_path, name, 4, 0, **{
        "profile.start_step": 2, "profile.steps": 2,
        "checkpoint.enabled": "false", "checkpoint.export_hf_at_end": "false", **extra})
    out, _ = loom(*args)
    return out, tmp_path / name / "profile"


def summary_rows(text):
    return [ROW.match(line) for line in text.splitlines() if ROW.match(line)]


def test_profiled_steps_write_a_chrome_trace_and_a_summary_of_ops(data, tmp_path):
    out, profile = profiled_run(data, tmp_path, "prof")

    trace = json.loads((profile / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert names & MATMULS, f"no matmul in the trace's {len(names)} event names: {sorted(map(str, names))[:40]}"

    summary = (profile / "summary.txt").read_text()
    assert summary.startswith("profile: steps 2-3 on cpu"), summary[:200]
    assert "CPU self time" in summary.splitlines()[0]
    rows = summary_rows(summary)
    assert 5 <= len(rows) <= 30, summary
    totals = [float(r.group(2)) for r in rows]
    assert all(t > 0 for t in totals[:5]) and totals == sorted(totals, reverse=True), summary
    assert {r.group(6) for r in rows} & MATMULS, summary
    assert sum(float(r.group(3)) for r in rows) <= 100.5, "CPU self times on one thread exceed the window"

    # The printed table is the summary's first 15 rows.
    printed = out[out.index("profile: steps 2-3"):]
    assert len(summary_rows(printed)) == min(15, len(rows)), out[-3000:]
    assert str(profile / "trace.json") in printed


def test_profile_off_by_default_writes_nothing(data, tmp_path):
    loom(*train_args(data, tmp_path, "plain", 2, 0,
                     **{"checkpoint.enabled": "false", "checkpoint.export_hf_at_end": "false"}))
    assert not (tmp_path / "plain" / "profile").exists()


@pytest.mark.parametrize("sets, key", [
    ({"profile.steps": 0}, "profile.steps"),
    ({"profile.start_step": -1}, "profile.start_step"),
    ({"profile.start_step": "two"}, "profile.start_step"),
    ({"profile.start_step": 4, "profile.steps": 2}, "profile.start_step"),  # past schedule.train_steps 4
])
def test_bad_profile_values_are_refused(data, tmp_path, sets, key):
    _, err = loom(*train_args(data, tmp_path, "bad", 4, 0, **sets), expect=2)
    assert key in err, err
    assert not (tmp_path / "bad").exists()


def test_on_a_gpu_the_summary_ranks_kernels_by_device_time(data, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    out, profile = profiled_run(data, tmp_path, "prof-cuda", **{"run.device": "cuda", "precision.compute": "bf16"})
    trace = json.loads((profile / "trace.json").read_text())
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    assert kernels, "no GPU kernel in the trace"
    summary = (profile / "summary.txt").read_text()
    assert "GPU time" in summary.splitlines()[0], summary[:300]
    rows = summary_rows(summary)
    assert rows and float(rows[0].group(2)) > 0, summary
    # Device time of the kernels cannot exceed the window (one stream).
    assert sum(float(r.group(3)) for r in rows) <= 100.5, summary
