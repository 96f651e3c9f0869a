"""`loom plot RUN_DIR` from outside: the PNG it writes is read back with
Python's own zlib and struct (a reader independent of loom's encoder), and
bad input exits with code 2 naming the file (and line).

The series colours are those of plot/metrics_plot.h; the figure has the loss
panel in its upper half and the throughput panel in its lower half.
"""
import json
import math
import struct
import zlib

from conftest import run_loom

WIDTH, HEIGHT = 1000, 800  # plot::kFigureWidth, plot::kFigureHeight
TRAIN_LOSS = (31, 119, 180)
VALID_LOSS = (255, 127, 14)
THROUGHPUT = (44, 160, 44)
SKIPPED_STEP = (214, 39, 40)


def read_png_rgb(path):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit RGB PNG; checks
    the signature and every chunk's CRC-32."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, []
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"CRC of chunk {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour_type, interlace) == (8, 2, 0), "8-bit RGB, not interlaced"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * 3
    assert len(raw) == height * (stride + 1)
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        # The five PNG filters (spec section 9), so that the test does not
        # depend on which one the encoder picks.
        for i in range(stride):
            left = line[i - 3] if i >= 3 else 0
            up, up_left = previous[i], previous[i - 3] if i >= 3 else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
            else:
                assert kind == 0, f"unknown filter {kind} in row {y}"
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, 3)])
        previous = line
    return width, height, rows


def rows_with(rows, colour, begin, end):
    return sum(1 for y in range(begin, end) if colour in rows[y])


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def training_records(steps=60):
    records = []
    for step in range(10, 10 * steps + 1, 10):
        records.append({"step": step, "loss": 3 + 5 * math.exp(-step / 150), "lr": 1e-3, "grad_norm": 1.2,
                        "tokens_per_s": 5000 + 300 * math.sin(step / 40), "mfu": 0.1, "tokens": step * 2048,
                        "step_time_s": 0.4, "peak_flops": 1e11, "a_key_from_the_future": {"x": 1}})
        if step % 100 == 0:
            records.append({"step": step, "valid_loss": 3.2 + 5 * math.exp(-step / 150)})
    records.append({"step": 605, "skipped": True, "loss": "nan", "grad_norm": "inf", "skipped_steps": 1,
                    "samples": [1, 2]})
    return records


def test_plot_draws_loss_above_and_throughput_below(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    write_metrics(run_dir, training_records())
    proc = run_loom("plot", run_dir)
    png = run_dir / "metrics.png"
    assert str(png) in proc.stdout
    width, height, rows = read_png_rgb(png)
    assert (width, height) == (WIDTH, HEIGHT)
    middle = height // 2
    # A curve spans many rows; the legend's sample line alone spans 3.
    assert rows_with(rows, TRAIN_LOSS, 0, middle) > 50
    assert rows_with(rows, VALID_LOSS, 0, middle) > 20
    assert rows_with(rows, SKIPPED_STEP, 0, middle) > 5
    assert rows_with(rows, THROUGHPUT, middle, height) > 50
    assert rows_with(rows, TRAIN_LOSS, middle, height) == 0
    assert rows_with(rows, VALID_LOSS, middle, height) == 0
    assert rows_with(rows, THROUGHPUT, 0, middle) == 0


def test_plot_writes_to_out(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, training_records(5))
    out = tmp_path / "elsewhere.png"
    run_loom("plot", run_dir, "--out", out)
    assert read_png_rgb(out)[:2] == (WIDTH, HEIGHT)
    assert not (run_dir / "metrics.png").exists()


def test_plot_one_point_and_constant_values(tmp_path):
    one = tmp_path / "one"
    write_metrics(one, [{"step": 1, "loss": 5.0, "tokens_per_s": 100.0}])
    run_loom("plot", one)
    _, height, rows = read_png_rgb(one / "metrics.png")
    assert rows_with(rows, TRAIN_LOSS, 0, height // 2) > 0
    assert rows_with(rows, THROUGHPUT, height // 2, height) > 0

    flat = tmp_path / "flat"
    write_metrics(flat, [{"step": s, "loss": 2.0, "tokens_per_s": 0.0} for s in range(1, 20)])
    run_loom("plot", flat)


def test_bad_line_is_refused_naming_file_and_line(tmp_path):
    run_dir = tmp_path / "bad"
    write_metrics(run_dir, [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, "this is not json"])
    proc = run_loom("plot", run_dir, expect=2)
    assert f"{run_dir / 'metrics.jsonl'}:3" in proc.stderr
    assert not (run_dir / "metrics.png").exists()


def test_missing_folder_or_metrics_is_refused(tmp_path):
    proc = run_loom("plot", tmp_path / "absent", expect=2)
    assert str(tmp_path / "absent") in proc.stderr
    (tmp_path / "no-metrics").mkdir()
    proc = run_loom("plot", tmp_path / "no-metrics", expect=2)
    assert str(tmp_path / "no-metrics" / "metrics.jsonl") in proc.stderr


def test_metrics_without_finite_values_are_refused(tmp_path):
    empty = tmp_path / "empty"
    write_metrics(empty, [])
    assert "no metrics records" in run_loom("plot", empty, expect=2).stderr
    nan_only = tmp_path / "nan"
    write_metrics(nan_only, [{"step": 1, "skipped": True, "loss": "nan"}, {"step": 2, "loss": "inf"}])
    assert "nothing to plot" in run_loom("plot", nan_only, expect=2).stderr
