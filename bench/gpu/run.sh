#!/usr/bin/env bash
# loom's GPU check (bench/gpu/bench_gpu.py): correctness on CUDA, then speed
# against transformers eager and torch.compile on the same GPU.
#
#   bench/gpu/run.sh [--cpu] [bench_gpu.py options]      # here, or CI: --cpu
#   bench/gpu/run.sh --out "$OUT"                          # on the GPU machine
#
# On the GPU machine the binaries come from bench/gpu/carry/ (made here by
# bench/gpu/pack.sh): loom and loom_dataset_tool, the shared libraries they
# need other than torch's, and (if that machine lacks transformers) a tarball
# of the Python packages the baseline needs. torch's own libraries are taken
# from that machine's Python.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
carry="$here/carry"
source "$here/carry_libs.sh"

python="${LOOM_BENCH_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "${LOOM_VENV:-$HOME/.cache/loom/venv}/bin/python" ]]; then
    python="${LOOM_VENV:-$HOME/.cache/loom/venv}/bin/python"
  else
    python="$(command -v python3)"
  fi
fi

args=("$@")
cpu_mode=0
for arg in "$@"; do [[ "$arg" == --cpu ]] && cpu_mode=1; done
# --cpu runs here, on this checkout's build: a carried folder left over from
# packing for a GPU machine holds an older loom.
if [[ "$cpu_mode" == 0 && -d "$carry" && -x "$carry/loom" ]]; then
  # torch, the CUDA runtime and NCCL from this machine's torch wheel; the rest
  # from the carried folder.
  # Only loom's processes get these paths: the carried libstdc++ must not
  # shadow the newer one that this machine's Python packages may need.
  LOOM_LD_LIBRARY_PATH="$(carry_libs "$python" "$carry")"
  export LOOM_LD_LIBRARY_PATH="$LOOM_LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LOOM_BIN="$carry/loom" LOOM_DATASET_TOOL="$carry/loom_dataset_tool"
  if ! "$python" -c 'import transformers' 2>/dev/null && [[ -f "$carry/pylib.tar.xz" ]]; then
    mkdir -p /tmp/loom-pylib && tar -xJf "$carry/pylib.tar.xz" -C /tmp/loom-pylib
    export PYTHONPATH="/tmp/loom-pylib${PYTHONPATH:+:$PYTHONPATH}"
  fi
  LD_LIBRARY_PATH="$LOOM_LD_LIBRARY_PATH" "$LOOM_BIN" version || true
fi
exec "$python" "$here/bench_gpu.py" "${args[@]}"
