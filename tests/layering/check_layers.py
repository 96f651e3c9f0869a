#!/usr/bin/env python3
"""Fails when an #include breaks loom's layers (docs/architecture.md).

Usage: check_layers.py [REPO_ROOT]    (default: two folders above this file)

Every .h/.hpp/.cpp/.cu/.cuh under a layer folder is read; each
`#include "X/..."` whose X is a layer folder is checked against LAYERS below.
A folder may include from itself and from every layer below its own, never
from a layer above it or from a sibling in its own layer. Sub-folders belong
to their top folder (model/kernels/ is model). Includes of anything else
(system headers, the generated "loom_build_info.h") and #includes inside
comments are not checked; tests/, bench/ and fuzz/ are not layers and are not
read.

Exit 0 with a one-line summary; 1 with one line per violation,
`FILE:LINE: includes "INC": LAYER may not include LAYER2 (allowed: ...)`;
2 when REPO_ROOT lacks a layer folder. Standard library only.
"""
import re
import sys
from pathlib import Path

# The architecture, bottom first: one row per layer, siblings on one row.
LAYERS = [
    ("util",),
    ("config",),
    ("model",),
    ("optim",),
    ("parallel",),
    ("data", "checkpoints"),
    ("trainer",),
    ("plan", "plot"),
    ("launch",),
]

SOURCE_SUFFIXES = {".h", ".hpp", ".cpp", ".cu", ".cuh"}

LAYER_OF = {folder: index for index, row in enumerate(LAYERS) for folder in row}
INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"(?P<path>[^"]+)"', re.MULTILINE)
# The identifiers that make the quote after them a raw string: R"d(...)d".
RAW_PREFIXES = {"R", "u8R", "uR", "UR", "LR"}


def allowed_for(folder):
    """The folders `folder` may include from, bottom first: itself and every layer below its own."""
    below = [f for row in LAYERS[: LAYER_OF[folder]] for f in row]
    return below + [folder]


def blank_comments(text):
    """text with every comment and raw-string body replaced by spaces, newlines kept.

    So a `#include` in a comment (or inside a raw string) is no longer at the
    start of a line, and line numbers stay right. Ordinary string and
    character literals are skipped over whole, so "//" in a string is not a
    comment; a ' between digits is a digit separator (10'000), not a literal.
    """
    out = list(text)
    n = len(text)

    def blank(start, end):
        for k in range(start, end):
            if out[k] != "\n":
                out[k] = " "

    i = 0
    while i < n:
        c = text[i]
        two = text[i : i + 2]
        if two == "//":
            end = i
            while end < n and text[end] != "\n":
                end += 2 if text[end] == "\\" and end + 1 < n else 1  # a \ at line end continues the comment
            blank(i, end)
            i = end
        elif two == "/*":
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            blank(i, end)
            i = end
        elif c == '"':
            word = re.search(r"[A-Za-z0-9_]*$", text[max(0, i - 40) : i]).group(0)
            open_paren = text.find("(", i)
            if word in RAW_PREFIXES and open_paren > 0:
                close = ")" + text[i + 1 : open_paren] + '"'
                end = text.find(close, open_paren)
                end = n if end < 0 else end + len(close)
                blank(i, end)
                i = end
            else:
                i = skip_literal(text, i, '"')
        elif c == "'":
            token = re.search(r"[A-Za-z0-9_'.]*$", text[max(0, i - 40) : i]).group(0)
            is_separator = token[:1].isdigit()  # 1'000 (a u8'x' or L'x' prefix is a letter)
            i = i + 1 if is_separator else skip_literal(text, i, "'")
        else:
            i += 1
    return "".join(out)


def skip_literal(text, start, quote):
    """The index after the literal that opens at text[start] (or the line's end if it never closes)."""
    i = start + 1
    while i < len(text) and text[i] not in (quote, "\n"):
        i += 2 if text[i] == "\\" else 1
    return i + 1


def source_files(root):
    for folder in LAYER_OF:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                yield folder, path


def main(argv):
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[2]).resolve()
    missing = [folder for folder in LAYER_OF if not (root / folder).is_dir()]
    if missing:
        print(f"check_layers: {root} is not a loom checkout: no folder {', '.join(missing)}", file=sys.stderr)
        return 2

    files = checked = 0
    violations = []
    for folder, path in source_files(root):
        files += 1
        text = blank_comments(path.read_text(encoding="utf-8", errors="replace"))
        for match in INCLUDE.finditer(text):
            include = match.group("path")
            target = include.split("/", 1)[0]
            if "/" not in include or target not in LAYER_OF:
                continue
            checked += 1
            allowed = allowed_for(folder)
            if target not in allowed:
                line = text.count("\n", 0, match.start()) + 1
                violations.append(f'{path.relative_to(root)}:{line}: includes "{include}": '
                                  f"{folder} may not include {target} (allowed: {', '.join(allowed)})")

    for violation in violations:
        print(violation)
    if violations:
        return 1
    order = " < ".join(", ".join(row) for row in LAYERS)
    print(f"layering: {files} files, {checked} includes checked, none breaks {order}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
