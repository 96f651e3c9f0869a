#!/usr/bin/env bash
# Fills tests/gpu/carry (ignored by git) with what tests/gpu/staged_checks.sh
# needs on a GPU machine that has Python and torch but no MPI or HDF5: loom,
# loom_dataset_tool and test_nccl_process_group, stripped, and loom's CUDA
# part (lib/libloom_cuda.so, found there on LD_LIBRARY_PATH); their shared
# libraries but torch's, the NVIDIA wheels' and glibc's; and a relocatable
# Open MPI (tests/gpu/pack_mpi.sh). lib/ and ompi/ go into libs.tar.xz.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
carry="$root/tests/gpu/carry"
rm -rf "$carry"
mkdir -p "$carry/lib"
bins=("$root/build/loom" "$root/build/tests/loom_dataset_tool" "$root/build/tests/test_nccl_process_group")
for bin in "${bins[@]}"; do strip -o "$carry/$(basename "$bin")" "$bin"; done
strip -o "$carry/lib/libloom_cuda.so" "$root/build/libloom_cuda.so"
ldd "${bins[@]}" "$root/build/libloom_cuda.so" | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$lib" in
    */libloom_cuda.so | */torch/lib/* | */nvidia/* | */libc.so* | */libm.so* | */libdl.so* | */libpthread.so* | \
      */librt.so* | */ld-linux* | */libgcc_s.so* | */libresolv.so* | */libutil.so*) ;;
    *) cp -L "$lib" "$carry/lib/" ;;
  esac
done
bash "$root/tests/gpu/pack_mpi.sh" "$carry" > /dev/null
# lib/ and ompi/ are ~80 MB as files (ICU's data alone 31 MB) and the device
# tool carries 64 MiB: compressed (~22 MB), unpacked by staged_checks.sh.
tar -C "$carry" -cJf "$carry/libs.tar.xz" lib ompi
rm -rf "$carry/lib" "$carry/ompi"
du -sh "$carry"
