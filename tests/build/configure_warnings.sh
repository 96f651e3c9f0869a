#!/usr/bin/env bash
# A fresh configure of the checkout prints no CMake warning (each CUDA
# library comes from one place, torch's config finds what it looks for).
# Usage: configure_warnings.sh SOURCE_DIR PYTHON
set -euo pipefail
src=$1
python=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DLOOM_PYTHON="$python" \
  > "$work/out.txt" 2>&1 || { cat "$work/out.txt"; echo "configure failed"; exit 1; }
if grep -q -i "warning" "$work/out.txt"; then
  grep -i -A12 "warning" "$work/out.txt"
  echo "FAILED: a fresh configure printed warnings (above)"
  exit 1
fi
echo "a fresh configure printed no warning ($(wc -l < "$work/out.txt") lines)"
