#!/usr/bin/env bash
# The layouts `loom plan` puts first for the model sizes of nanotron's
# published H100 benchmark (sequence 4096, global batch 256 x 4096 = 1M
# tokens, bf16) on 1 and 8 nodes of 8 H100s, with the specification profile
# configs/machines/h100-node.yaml. docs/plan.md sets them beside the
# published figures.
#
#   bash bench/plan_nanotron.sh [build/loom]
set -euo pipefail
LOOM=${1:-build/loom}
cd "$(dirname "$0")/.."
COMMON=(--gpus-per-node 8 --gpu-memory 80 --machine h100-node --top 1 --json
        --set data.seq_len=4096 --set batch.global_batch_size=256 --set precision.compute=bf16)
# Stand-ins for 1.34B, 3.57B and 8.86B: loom's bundled Llama 3.2 1B and
# Llama 3.1 8B shapes, and Llama 3.2 3B's shape on the 1B config.
declare -A MODELS=(
  ["1B (llama3-1b.yaml)"]="configs/llama3-1b.yaml"
  ["3B (Llama 3.2 3B shape)"]="configs/llama3-1b.yaml --set model.hidden_size=3072 --set model.num_layers=28 --set model.num_heads=24 --set model.head_dim=128"
  ["8B (llama3-8b.yaml)"]="configs/llama3-8b.yaml"
)
printf '| model | nodes | loom plan first | memory GiB | step s | MFU |\n|---|---|---|---|---|---|\n'
for name in "1B (llama3-1b.yaml)" "3B (Llama 3.2 3B shape)" "8B (llama3-8b.yaml)"; do
  for nodes in 1 8; do
    # shellcheck disable=SC2086
    "$LOOM" plan ${MODELS[$name]} --gpus $((nodes * 8)) "${COMMON[@]}" |
      "${LOOM_PYTHON:-python3}" -c "
import json, sys
best = json.load(sys.stdin)['best'][0]
print(f\"| $name | $nodes | {best['describe']} | {best['peak_bytes'] / 2**30:.1f} | {best['step_s']:.2f} | {100 * best['mfu']:.1f}% |\")"
  done
done
