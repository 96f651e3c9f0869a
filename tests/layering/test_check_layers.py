"""check_layers.py (ctest: layering) on the real tree and on copies with planted includes.

The copies hold the layer folders only; each test plants lines at the end of
a file and checks what the checker reports, with file, line and include.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHECKER = HERE / "check_layers.py"
sys.path.insert(0, str(HERE))
from check_layers import LAYERS  # noqa: E402

FOLDERS = [folder for row in LAYERS for folder in row]


def check(root=None):
    args = [sys.executable, str(CHECKER)] + ([str(root)] if root else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout + result.stderr


def includes_checked(output):
    match = re.search(r"(\d+) files, (\d+) includes checked", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


@pytest.fixture
def tree(tmp_path):
    """A copy of the layer folders (and nothing else) of this checkout."""
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, tmp_path / folder)
    return tmp_path


def plant(root, relative, *lines):
    """Appends lines to root/relative; returns the line number of the first."""
    path = root / relative
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    first = text.count("\n") + 1
    path.write_text(text + "".join(line + "\n" for line in lines))
    return first


def test_the_real_tree_keeps_its_layers():
    rc, out = check()
    assert rc == 0, out
    files, checked = includes_checked(out)
    assert files > 100 and checked > 100, out


def test_the_copied_tree_passes_as_it_is(tree):
    rc, out = check(tree)
    assert rc == 0, out
    assert includes_checked(out) == includes_checked(check()[1])


def test_an_upward_and_a_sibling_include_are_named_with_file_and_line(tree):
    upward = plant(tree, "util/file_io.cpp", '#include "trainer/training.h"')
    sibling = plant(tree, "data/loader.cpp", '#include "checkpoints/safetensors.h"')
    kernels = plant(tree, "model/kernels/fused_ops.cpp", '#  include "parallel/process_group.h"')
    plot_to_plan = plant(tree, "plot/chart.cpp", '#include "plan/planner.h"')
    rc, out = check(tree)
    assert rc == 1, out
    lines = out.splitlines()
    assert f'util/file_io.cpp:{upward}: includes "trainer/training.h": util may not include trainer (allowed: util)' in lines
    assert (f'data/loader.cpp:{sibling}: includes "checkpoints/safetensors.h": data may not include checkpoints '
            "(allowed: util, config, model, optim, parallel, data)") in lines
    assert any(line.startswith(f"model/kernels/fused_ops.cpp:{kernels}: ") and "model may not include parallel" in line
               for line in lines), out
    assert any(line.startswith(f"plot/chart.cpp:{plot_to_plan}: ") and "plot may not include plan" in line
               for line in lines), out
    assert len(lines) == 4, out


def test_includes_in_comments_raw_strings_and_of_system_headers_do_not_count(tree):
    plant(tree, "util/file_io.cpp",
          '// #include "trainer/training.h"',
          '/* #include "launch/cli.h" */',
          "/*",
          '#include "plan/planner.h"',
          "*/",
          "#include <torch/types.h>",
          '#include "loom_build_info.h"',
          "static const char* kText = R\"x(",
          '#include "launch/commands.h"',
          ')x";',
          "static const int kMany = 1'000'000;")
    rc, out = check(tree)
    assert rc == 0, out
    assert includes_checked(out) == includes_checked(check()[1])


def test_a_comment_marker_inside_a_string_hides_no_include(tree):
    line = plant(tree, "util/file_io.cpp",
                 'static const char* kGlob = "/*"; char kQuote = \'"\';',
                 '#include "trainer/training.h"',
                 '// and "*/" here closes nothing')
    rc, out = check(tree)
    assert rc == 1, out
    assert out.startswith(f'util/file_io.cpp:{line + 1}: includes "trainer/training.h"'), out


def test_a_root_without_the_layer_folders_is_refused(tmp_path):
    rc, out = check(tmp_path)
    assert rc == 2 and "not a loom checkout" in out, out
