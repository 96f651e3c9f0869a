"""Every `loom` subcommand answers --help and -h with its usage, and does nothing else.

The subcommands are read from `loom --help`, whose list is built from the
same table the dispatcher runs commands from (launch/commands.cpp), so a new
subcommand is checked here without this file naming it.

LOOM_BIN names the loom binary (default build/loom).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
from conftest import LOOM_BIN  # noqa: E402  (interop helpers: the binary's path)


def run_loom(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def listed_commands():
    """The names in `loom --help`'s list: "train", "plan --calibrate", "tokenizer train"."""
    out = run_loom("--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("commands:") + 1
    names = []
    for line in lines[start:]:
        if not line.strip():
            break
        match = re.match(r"  (\S+(?: \S+)*?)  +\S", line)
        assert match, f"not a '  NAME  summary' line: {line!r}"
        names.append(match.group(1))
    return names


COMMANDS = listed_commands()


def test_the_list_holds_every_command_the_docs_name():
    # A floor, so that a list that parsed to nothing cannot pass the tests below.
    for name in ("launch", "train", "sweep", "runs", "plan", "plan --calibrate", "health", "plot", "inspect",
                 "tokenizer train", "prepare", "import", "init", "export", "generate", "forward", "version"):
        assert name in COMMANDS, (name, COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_prints_its_usage_and_does_nothing(name, flag, tmp_path):
    # Arguments that would fail if the command did any work: a config that
    # does not exist (no config is read), in an empty folder that stays empty
    # (no run folder, no dataset, no profile written).
    words = name.split()
    proc = run_loom(*words, tmp_path / "missing.yaml", flag, cwd=tmp_path)
    assert proc.returncode == 0, (name, proc.returncode, proc.stderr)
    assert proc.stderr == "", (name, proc.stderr)
    assert list(tmp_path.iterdir()) == [], (name, list(tmp_path.iterdir()))
    usage = proc.stdout
    assert usage.startswith(f"usage: loom {name}"), (name, usage)
    assert "\noptions:\n" in usage and "  --help" in usage, (name, usage)
    examples = usage.split("\nexample")[-1]
    assert "\nexample" in usage and f"loom {name}" in examples, (name, usage)


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_option_exits_2_naming_it_and_the_usage_describes_every_known_one(name):
    words = name.split()
    proc = run_loom(*words, "--no-such-option")
    assert proc.returncode == 2, (name, proc.returncode, proc.stdout, proc.stderr)
    assert "'--no-such-option'" in proc.stderr and proc.stdout == "", (name, proc.stderr)
    # The parser's list of options is the usage's: each one it knows has a
    # line of its own there.
    usage = run_loom(*words, "--help").stdout
    known = re.search(r"\(known: ([^)]*)\)", proc.stderr)
    for option in (known.group(1).split(", ") if known else []):
        assert re.search(rf"^  {re.escape(option)}\b", usage, re.MULTILINE), (name, option, usage)


@pytest.mark.parametrize("name", COMMANDS)
def test_loom_help_command_is_the_same_usage(name):
    assert run_loom("help", *name.split()).stdout == run_loom(*name.split(), "--help").stdout


def test_help_lists_commands_and_a_command_word_alone_is_its_usage():
    assert run_loom("help").stdout == run_loom("-h").stdout == run_loom("--help").stdout
    # `loom tokenizer --help`: train is its only command.
    tokenizer = run_loom("tokenizer", "--help")
    assert tokenizer.returncode == 0 and tokenizer.stdout.startswith("usage: loom tokenizer train"), tokenizer


def test_unknown_commands_and_help_topics_exit_2():
    proc = run_loom("frobnicate", "--help")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr, proc
    proc = run_loom("help", "frobnicate")
    assert proc.returncode == 2 and "'frobnicate'" in proc.stderr, proc
    proc = run_loom()
    assert proc.returncode == 2 and "no command given" in proc.stderr and "commands:" in proc.stderr, proc
