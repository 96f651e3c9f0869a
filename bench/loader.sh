#!/usr/bin/env bash
# Loader throughput vs. training consumption vs. a sequential read, on the
# bundled corpus (see bench/bench_loader.cpp). Usage: bench/loader.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source build/env.sh
DATA=runs/data
if [ ! -f "$DATA/tiny/index.json" ]; then
  data/corpus/make_kjv.sh "$DATA/kjv.txt"
  [ -f "$DATA/tokenizer.json" ] || loom tokenizer train --input "$DATA/kjv.txt" --vocab-size 2048 --output "$DATA/tokenizer.json"
  loom prepare --tokenizer "$DATA/tokenizer.json" --input "$DATA/kjv.txt" --output "$DATA/tiny"
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
build/bench_loader "$DATA/tiny" configs/tiny.yaml configs/smollm2-135m.yaml
