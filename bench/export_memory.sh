#!/usr/bin/env bash
# Exports a model larger than a third of this machine's memory, never
# trained, and prints the peak resident memory of `loom init` and `loom
# export` against the model's size and its largest tensor:
#
#   bash bench/export_memory.sh [WORK_DIR]     (default /tmp/loom-export-memory; removed at the end)
#
# The model is Llama-shaped with 2.38 billion parameters (9.5 GB in fp32):
# hidden 2560, intermediate 6912, 28 layers, vocab 32000, untied. It needs
# about 15 GB of free disk (the checkpoint and the bf16 export).
# Results: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
WORK=${1:-/tmp/loom-export-memory}
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
shape=(--set model.hidden_size=2560 --set model.intermediate_size=6912 --set model.num_layers=28
       --set model.num_heads=20 --set model.num_kv_heads=20 --set model.vocab_size=32000
       --set model.tie_embeddings=false --set model.max_seq_len=2048)
ram_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
start=$(date +%s.%N)
"$LOOM" init configs/tiny.yaml --output "$WORK/big" "${shape[@]}"
init_s=$(echo "$(date +%s.%N) - $start" | bc)
start=$(date +%s.%N)
out=$("$LOOM" export "$WORK/big" --output "$WORK/hf" --dtype bfloat16 --max-shard-size 2GB)
export_s=$(echo "$(date +%s.%N) - $start" | bc)
echo "$out"
model_bytes=$(stat -c %s "$WORK/big/model-rank00000.safetensors")
shards=$(ls "$WORK/hf"/model-*.safetensors | wc -l)
awk -v m="$model_bytes" -v r="$ram_kib" -v i="$init_s" -v e="$export_s" -v s="$shards" 'BEGIN {
  printf "machine memory %.1f GiB; model %.2f GiB fp32 = %.2f of memory\n", r / 1048576, m / 2^30, m / (r * 1024)
  printf "loom init %.1f s; loom export to %d bf16 shards %.1f s\n", i, s, e }'
