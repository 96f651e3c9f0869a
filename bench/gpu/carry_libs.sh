# Sourced by the GPU scripts (run.sh, session.sh, check_kernels.sh,
# fusions.sh), which give loom's processes, and only them, this library path:
#
#   carry_libs PYTHON CARRY
#
# prints PYTHON's torch and NVIDIA wheel library folders (torch, the CUDA
# runtime and NCCL of the GPU machine), then CARRY/lib (loom's other
# libraries, from pack.sh). pack.sh compresses lib/ (the device tool carries
# 64 MiB): the first call unpacks it.
carry_libs() {
  local python="$1" carry="$2" site dir libs
  if [[ ! -d "$carry/lib" && -f "$carry/lib.tar.xz" ]]; then tar -xJf "$carry/lib.tar.xz" -C "$carry" || return 1; fi
  site="$("$python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" || return 1
  libs="$site/torch/lib"
  for dir in "$site"/nvidia/*/lib "$site"/nvidia/*/*/lib; do
    if [[ -d "$dir" ]]; then libs="$libs:$dir"; fi
  done
  echo "$libs:$carry/lib"
}
