"""No rank holds more than its share of the model (issue: sharded state), and
ZeRO-2 and ZeRO-3 hold less than plain data parallelism, as predicted at
start-up (issue: memory at scale).

A ~134M-parameter model on 4 CPU ranks: a fresh run on tp 2 x pp 2 that
saves and exports at its end, its checkpoint resumed on dp 2 x pp 2 (and
exported again), and a run on tp 2 x pp 2 that starts from the bf16 Hub
export (model.init_from). Each rank's peak resident memory, measured from
outside (peak_memory.py: getrusage of the child), must stay below the bare
process (a 2M-parameter single-rank run, measured the same way) plus 1.5
times the rank's share: its parameters, their gradients and its AdamW state
(16 bytes a parameter in fp32, without ZeRO). Before sharding every rank drew
the whole model (512 MiB) before keeping its part, and the writer gathered
the model to export it: the export alone took rank 0 of the first run to
2575 MiB against a limit of 1306 MiB.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_e2e import LOOM_BIN, train_args
from test_train_e2e import data  # noqa: F401 (fixture)
from test_tensor_parallel_e2e import mpi_args, mpi_env

WRAPPER = Path(__file__).with_name("peak_memory.py")
MIB = 1 << 20

# 12 layers of hidden 768 (12 heads), intermediate 2048, vocabulary 32000
# (untied): 134M parameters. The tokenizer's 512 ids are a part of the vocabulary.
BIG = {"model.hidden_size": 768, "model.intermediate_size": 2048, "model.num_layers": 12, "model.num_heads": 12,
       "model.num_kv_heads": 12, "model.vocab_size": 32000, "model.tie_embeddings": "false",
       "batch.micro_batch_size": 1, "batch.global_batch_size": 4, "data.seq_len": 32, "model.max_seq_len": 32,
       "checkpoint.export_dtype": "bfloat16"}
# 2M parameters: the bare process.
BARE = {"model.hidden_size": 128, "model.intermediate_size": 384, "model.num_layers": 4, "model.num_heads": 4,
        "model.num_kv_heads": 4, "model.vocab_size": 4096, "batch.micro_batch_size": 1, "batch.global_batch_size": 4,
        "data.seq_len": 32, "model.max_seq_len": 32}


def parameters(hidden, intermediate, layers, vocab):
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


TOTAL = parameters(768, 2048, 12, 32000)


def measured(ranks, args, out):
    """Runs loom under the wrapper on `ranks` ranks; returns {rank: peak bytes}."""
    return measured_run(ranks, args, out)[0]


def measured_run(ranks, args, out):
    """measured(), and the run's standard output."""
    command = [*mpi_args(ranks), sys.executable, str(WRAPPER), str(out), "--", LOOM_BIN, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=mpi_env())
    assert proc.returncode == 0, f"{' '.join(command)}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    peaks = {}
    for path in Path(out).glob("rank-*.json"):
        record = json.loads(path.read_text())
        peaks[record["rank"]] = record["peak_bytes"]
    assert sorted(peaks) == list(range(ranks)), peaks
    return peaks, proc.stdout


@pytest.fixture(scope="module")
def bare(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bare")
    return measured(1, train_args(data, out, "bare", 2, 2, **BARE), out / "peaks")[0]


def check(peaks, bare, share, what):
    limit = bare + 1.5 * share
    report = ", ".join(f"rank {r}: {peaks[r] / MIB:.0f} MiB" for r in sorted(peaks))
    print(f"{what}: {report}; bare {bare / MIB:.0f} MiB, share {share / MIB:.0f} MiB, limit {limit / MIB:.0f} MiB")
    for rank, peak in peaks.items():
        assert peak <= limit, (f"{what}: rank {rank} peaked at {peak / MIB:.0f} MiB, over the bare process "
                               f"{bare / MIB:.0f} MiB + 1.5 x its share {share / MIB:.0f} MiB ({report})")


def test_no_rank_holds_more_than_its_share(data, tmp_path, bare):
    layout = {"parallel.tp": 2, "parallel.pp": 2, "launch.ranks": 4}
    # Fresh: in-place initialization, a sharded save at step 2, the export.
    fresh = measured(4, train_args(data, tmp_path, "big", 2, 2, **BIG, **layout), tmp_path / "fresh")
    check(fresh, bare, 16 * TOTAL / 4, "tp 2 x pp 2, fresh, save, export")
    assert (tmp_path / "big" / "hf" / "model.safetensors").is_file()

    # Resume on dp 2 x pp 2 (every rank holds a whole stage: half the model)
    # and export again. No step is trained: a dp step's gradient buckets and
    # all-reduce buffers are the training's memory, not the checkpoint's.
    hf = tmp_path / "big" / "hf" / "model.safetensors"
    first_export = hf.stat().st_mtime_ns
    resumed_layout = {"parallel.dp": 2, "parallel.pp": 2, "launch.ranks": 4}
    resumed = measured(4, train_args(data, tmp_path, "big", 2, 2, **BIG, **resumed_layout), tmp_path / "resumed")
    check(resumed, bare, 16 * TOTAL / 2, "dp 2 x pp 2, resume, export")
    assert hf.stat().st_mtime_ns != first_export, "the resumed run did not export"

    # model.init_from the bf16 Hub export.
    init_from = {**layout, "model.init_from": tmp_path / "big" / "hf", "checkpoint.export_hf_at_end": "false",
                 "schedule.warmup_steps": 0}
    started = measured(4, train_args(data, tmp_path, "from-hf", 1, 1, **BIG, **init_from), tmp_path / "init-from")
    check(started, bare, 16 * TOTAL / 4, "tp 2 x pp 2, model.init_from")


# The start-up log's forecast (launch/preflight.h, log_memory_forecast).
FORECAST = re.compile(r"^memory: pp rank (\d+) predicted to peak at .* \((\d+) bytes\) of tensors", re.M)
DP4 = {"parallel.dp": 4, "launch.ranks": 4, "checkpoint.enabled": "false", "checkpoint.export_hf_at_end": "false"}


def test_zero_2_and_3_hold_less_than_plain_data_parallelism_as_predicted(data, tmp_path):
    """dp 4, the 134M model, two steps at ZeRO 0, 2 and 3. Each rank's peak
    above the bare process (the 2M model on the same layout and heap policy:
    ZeRO-2/3 return freed blocks to the system, util/host_memory.h) must be
    at most 0.7x (ZeRO-2) and 0.45x (ZeRO-3) of the highest ZeRO-0 rank's,
    and within 15% of the bytes the start-up log predicted."""
    def run(zero, shape, name):
        args = train_args(data, tmp_path, name, 2, 2, **shape, **DP4, **{"parallel.zero_stage": zero})
        peaks, stdout = measured_run(4, args, tmp_path / f"{name}-peaks")
        predicted = {int(r): int(b) for r, b in FORECAST.findall(stdout)}
        assert list(predicted) == [0], stdout[-3000:]  # one pipeline rank
        return peaks, predicted[0]

    # The bare process keeps (ZeRO-0) or returns (ZeRO-2 and 3) freed blocks
    # as the big run does.
    bare_of = {0: run(0, BARE, "bare-kept")[0]}
    bare_of[2] = bare_of[3] = run(2, BARE, "bare-returned")[0]
    above, predicted = {}, {}
    for zero in (0, 2, 3):
        bare = bare_of[zero]
        peaks, predicted[zero] = run(zero, BIG, f"zero{zero}")
        above[zero] = {rank: peaks[rank] - bare[rank] for rank in peaks}
        report = ", ".join(f"rank {r}: {above[zero][r] / MIB:.0f} MiB" for r in sorted(above[zero]))
        print(f"ZeRO-{zero}: above the bare process {report}; predicted {predicted[zero] / MIB:.0f} MiB")
    plain = max(above[0].values())
    for zero, limit in ((2, 0.7), (3, 0.45)):
        for rank, bytes_ in above[zero].items():
            assert bytes_ <= limit * plain, (f"ZeRO-{zero} rank {rank}: {bytes_ / MIB:.0f} MiB above the bare "
                                             f"process, over {limit} x ZeRO-0's {plain / MIB:.0f} MiB")
    for zero in (0, 2, 3):
        for rank, bytes_ in above[zero].items():
            error = predicted[zero] / bytes_ - 1
            assert abs(error) <= 0.15, (f"ZeRO-{zero} rank {rank}: predicted {predicted[zero] / MIB:.0f} MiB, "
                                        f"measured {bytes_ / MIB:.0f} MiB above the bare process ({error:+.0%})")
