#!/usr/bin/env bash
# Packs what bench/gpu/run.sh needs on a GPU machine that has Python and torch
# but not loom's other libraries, into bench/gpu/carry/ (ignored by git):
#   loom, loom_dataset_tool          stripped, from build/
#   libloom_cuda.so                  loom's CUDA part, beside loom (stripped)
#   test_fused_kernels,              the GPU tests bench/gpu/check_kernels.sh
#   test_compute_weights             runs (stripped, where built)
#   lib.tar.xz                       their shared libraries, except torch's,
#                                    the NVIDIA wheels' and glibc's own
#                                    (lib/, compressed)
#   pylib.tar.xz                     transformers and the packages it imports,
#                                    unpacked there only if it lacks them
# Then, with the device tool: carry bench/gpu/carry and run
#   bench/gpu/run.sh --out "$OUT"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/bench/gpu/carry"
venv="${LOOM_VENV:-$HOME/.cache/loom/venv}"
rm -rf "$carry"
mkdir -p "$carry/lib"
strip -o "$carry/loom" "$root/build/loom"
strip -o "$carry/loom_dataset_tool" "$root/build/tests/loom_dataset_tool"
strip -o "$carry/libloom_cuda.so" "$root/build/libloom_cuda.so"
# The GPU tests check_kernels.sh runs, where they are built.
tests=()
for test in test_fused_kernels test_compute_weights; do
  if [[ -x "$root/build/tests/$test" ]]; then
    strip -o "$carry/$test" "$root/build/tests/$test"
    tests+=("$carry/$test")
  fi
done
ldd "$root/build/loom" "$root/build/tests/loom_dataset_tool" "$root/build/libloom_cuda.so" ${tests[@]+"${tests[@]}"} | awk '/=> \// {print $3}' | sort -u |
  while read -r lib; do
    case "$lib" in
      */torch/lib/* | */nvidia/* | */libc.so* | */libm.so* | */libdl.so* | */libpthread.so* | */librt.so* | \
        */ld-linux* | */libgcc_s.so* | */libresolv.so* | */libutil.so*) ;;
      *) cp -L "$lib" "$carry/lib/" ;;
    esac
  done
# As files lib/ is ~58 MB (ICU's data alone 31 MB) and the device tool
# carries 64 MiB in all: compressed, unpacked on the GPU machine by the
# scripts' carry_libs (carry_libs.sh).
tar -C "$carry" -cJf "$carry/lib.tar.xz" lib
rm -rf "$carry/lib"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tar --exclude=__pycache__ -C "$site" -cJf "$carry/pylib.tar.xz" \
  transformers huggingface_hub safetensors tokenizers tqdm filelock packaging yaml regex hf_xet typer
du -sh "$carry" "$carry"/* | sed 's|'"$root"'/||'
