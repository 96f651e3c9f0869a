"""`loom plot RUN_DIR...` from outside: the SVG it writes is parsed by Python's
own XML parser and rendered by a real SVG renderer, `rsvg-convert` (Debian's
librsvg2-bin, installed by launch/setup.sh), to a PNG whose pixels are checked
by colour; bad input exits with code 2 naming the file (and line).

The series colours are those of plot/metrics_plot.h and plot/compare_plot.h;
the figure has the loss panel in its upper half and the throughput panel in
its lower half. The renderer anti-aliases, so edges blend a curve's colour
into the background; the pixels inside a 2-pixel stroke keep its exact
colour, and those are what the checks count. The PNG is read with Pillow
(in the venv as a dependency of tensorboard) into numpy.
"""
import json
import math
import shutil
import subprocess
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from conftest import run_loom

WIDTH, HEIGHT = 1000, 800  # plot::kFigureWidth, plot::kFigureHeight
TRAIN_LOSS = (31, 119, 180)
VALID_LOSS = (255, 127, 14)
THROUGHPUT = (44, 160, 44)
SKIPPED_STEP = (214, 39, 40)
RUN_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]  # plot::kRunColours, the first three
SVG = "{http://www.w3.org/2000/svg}"


def read_svg(path):
    """The root of the SVG document at `path`; ElementTree refuses XML that is not well-formed."""
    root = ElementTree.parse(path).getroot()
    assert root.tag == SVG + "svg"
    assert (root.get("width"), root.get("height")) == (str(WIDTH), str(HEIGHT))
    return root


def render(svg_path, tmp_path):
    """`svg_path` rendered by rsvg-convert: an array of rows x columns x (r, g, b)."""
    rsvg = shutil.which("rsvg-convert")
    assert rsvg, "rsvg-convert not found: install Debian's librsvg2-bin (launch/setup.sh does)"
    png = tmp_path / (svg_path.stem + "-rendered.png")
    subprocess.run([rsvg, "--format=png", "--output", str(png), str(svg_path)], check=True, timeout=60)
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))


def rows_with(pixels, colour, begin, end):
    """Rows in [begin, end) holding at least one pixel of exactly `colour`."""
    return int((pixels[begin:end] == np.array(colour, dtype=np.uint8)).all(axis=2).any(axis=1).sum())


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def training_records(steps=60, scale=1.0):
    records = []
    for step in range(10, 10 * steps + 1, 10):
        records.append({"step": step, "loss": scale * (3 + 5 * math.exp(-step / 150)), "lr": 1e-3,
                        "grad_norm": 1.2, "tokens_per_s": scale * (5000 + 300 * math.sin(step / 40)), "mfu": 0.1,
                        "tokens": step * 2048, "step_time_s": 0.4, "peak_flops": 1e11,
                        "a_key_from_the_future": {"x": 1}})
        if step % 100 == 0:
            records.append({"step": step, "valid_loss": scale * (3.2 + 5 * math.exp(-step / 150))})
    records.append({"step": 605, "skipped": True, "loss": "nan", "grad_norm": "inf", "skipped_steps": 1,
                    "samples": [1, 2]})
    return records


def test_plot_draws_loss_above_and_throughput_below(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    write_metrics(run_dir, training_records())
    proc = run_loom("plot", run_dir)
    svg = run_dir / "metrics.svg"
    assert str(svg) in proc.stdout
    root = read_svg(svg)
    assert "loss: tiny" in "".join(root.itertext())
    pixels = render(svg, tmp_path)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    middle = HEIGHT // 2
    # A curve spans many rows; the legend's sample line alone spans 3.
    assert rows_with(pixels, TRAIN_LOSS, 0, middle) > 50
    assert rows_with(pixels, VALID_LOSS, 0, middle) > 20
    assert rows_with(pixels, SKIPPED_STEP, 0, middle) > 5
    assert rows_with(pixels, THROUGHPUT, middle, HEIGHT) > 50
    assert rows_with(pixels, TRAIN_LOSS, middle, HEIGHT) == 0
    assert rows_with(pixels, VALID_LOSS, middle, HEIGHT) == 0
    assert rows_with(pixels, THROUGHPUT, 0, middle) == 0


def test_plot_writes_to_out(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, training_records(5))
    out = tmp_path / "elsewhere.svg"
    run_loom("plot", run_dir, "--out", out)
    read_svg(out)
    assert rows_with(render(out, tmp_path), TRAIN_LOSS, 0, HEIGHT // 2) > 0
    assert not (run_dir / "metrics.svg").exists()


def test_plot_one_point_and_constant_values(tmp_path):
    one = tmp_path / "one"
    write_metrics(one, [{"step": 1, "loss": 5.0, "tokens_per_s": 100.0}])
    run_loom("plot", one)
    pixels = render(one / "metrics.svg", tmp_path)
    assert rows_with(pixels, TRAIN_LOSS, 0, HEIGHT // 2) > 0
    assert rows_with(pixels, THROUGHPUT, HEIGHT // 2, HEIGHT) > 0

    flat = tmp_path / "flat"
    write_metrics(flat, [{"step": s, "loss": 2.0, "tokens_per_s": 0.0} for s in range(1, 20)])
    run_loom("plot", flat)
    pixels = render(flat / "metrics.svg", tmp_path)
    assert rows_with(pixels, TRAIN_LOSS, 0, HEIGHT // 2) > 0
    assert rows_with(pixels, THROUGHPUT, HEIGHT // 2, HEIGHT) > 0


def test_several_runs_are_overlaid_one_colour_per_run(tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs / "lr-high", training_records())
    write_metrics(runs / "lr-low", training_records(scale=1.3))
    proc = run_loom("plot", runs / "lr-high", runs / "lr-low")
    svg = runs / "compare.svg"
    assert f"wrote {svg} (2 runs: lr-high, lr-low)" in proc.stdout
    text = "".join(read_svg(svg).itertext())
    assert "lr-high" in text and "lr-low valid" in text
    pixels = render(svg, tmp_path)
    middle = HEIGHT // 2
    for colour in RUN_COLOURS[:2]:
        assert rows_with(pixels, colour, 0, middle) > 50, colour
        assert rows_with(pixels, colour, middle, HEIGHT) > 50, colour
    assert rows_with(pixels, RUN_COLOURS[2], 0, HEIGHT) == 0, "no third run"


def test_run_name_with_markup_characters_stays_text(tmp_path):
    run_dir = tmp_path / 'a<b & "c"'
    write_metrics(run_dir, training_records(5))
    run_loom("plot", run_dir)
    svg = run_dir / "metrics.svg"
    assert 'loss: a<b & "c"' in "".join(read_svg(svg).itertext())
    assert rows_with(render(svg, tmp_path), TRAIN_LOSS, 0, HEIGHT // 2) > 0


def test_bad_line_is_refused_naming_file_and_line(tmp_path):
    run_dir = tmp_path / "bad"
    write_metrics(run_dir, [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, "this is not json"])
    proc = run_loom("plot", run_dir, expect=2)
    assert f"{run_dir / 'metrics.jsonl'}:3" in proc.stderr
    assert not (run_dir / "metrics.svg").exists()


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
