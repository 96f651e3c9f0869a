#!/usr/bin/env bash
# Packs a relocatable copy of this machine's Open MPI (mpirun, its plugins,
# help texts, PMIx and the libraries they load) into DEST/ompi, for a GPU
# machine that has no MPI: tests/gpu/staged_checks.sh starts its ranks with
# it (OPAL_PREFIX points Open MPI at the copy). Debian's layout is kept under
# the new prefix, as Open MPI computes its paths from it.
#   tests/gpu/pack_mpi.sh DEST
set -euo pipefail
dest="$1/ompi"
arch=x86_64-linux-gnu
rm -rf "$dest"
mkdir -p "$dest/bin" "$dest/lib/$arch" "$dest/share" "$dest/libs"
cp -L /usr/bin/orterun "$dest/bin/orterun"
ln -s orterun "$dest/bin/mpirun"
cp -a /usr/lib/$arch/openmpi "$dest/lib/$arch/"
rm -rf "$dest/lib/$arch/openmpi/include"
cp -a /usr/lib/$arch/pmix2 "$dest/lib/$arch/"
rm -rf "$dest/lib/$arch/pmix2/include" "$dest/lib/$arch/pmix2/lib/libpmix.a"
cp -a /usr/share/openmpi "$dest/share/"
[ -d /usr/share/pmix ] && cp -a /usr/share/pmix "$dest/share/"
# The libraries mpirun, libmpi and the plugins load, but not glibc's own,
# the dynamic loader, or what the CUDA and torch wheels bring.
{ ldd /usr/bin/orterun; find "$dest/lib" -name '*.so*' -type f -exec ldd {} + 2>/dev/null; } |
  awk '/=> \// {print $3}' | sort -u | while read -r lib; do
    case "$lib" in
      */libc.so* | */libm.so* | */libdl.so* | */libpthread.so* | */librt.so* | */ld-linux* | */libresolv.so* | \
        */libutil.so* | */libgcc_s.so* | */libstdc++.so* | */nvidia/* | */torch/lib/* | */libcuda.so*) ;;
      "$dest"/*) ;;
      *) cp -L "$lib" "$dest/libs/" ;;
    esac
  done
du -sh "$dest"
