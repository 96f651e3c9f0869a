#!/usr/bin/env bash
# loom against PyTorch on this CPU: `loom train` and transformers'
# LlamaForCausalLM + torch.optim.AdamW (bench/torch_baseline.py) train the
# same config (fp32, same batch, same thread count) on random tokens; prints
# tokens/s, MFU (against loom's measured matmul peak) and the ratio.
#
#   bash bench/cpu_vs_torch.sh [--models tiny,135m] [--threads 2]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
threads=2
models=tiny,135m
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    *) echo "usage: $0 [--models tiny,135m] [--threads N]" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS="$threads"
exec bash "$root/bench/gpu/run.sh" --cpu --stages speed --models "$models" --work "${TMPDIR:-/tmp}/loom-bench-cpu" \
  --timeout 900
