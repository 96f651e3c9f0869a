#!/usr/bin/env bash
# Builds loom's fuzz targets with clang (libFuzzer + ASan + UBSan) and runs
# each over a copy of its seed corpus for a fixed time. See docs/fuzzing.md.
#
#   fuzz/run.sh [--seconds S] [--build DIR] [--jobs N] [TARGET...]
#
# S: seconds per target (default 10). DIR: the clang build folder (default
# build-fuzz in the checkout); configured and built when needed, through
# ccache when installed. TARGETs: fuzz_config, fuzz_safetensors,
# fuzz_tokenizer, fuzz_dataset_index, fuzz_dataset_shard,
# fuzz_checkpoint_manifest, fuzz_hdf5_bytes (the default: all seven;
# fuzz_hdf5_bytes forks two probe processes per input, so it runs slowly,
# and the faults it meets inside libhdf5 happen in those children, which it
# must report as BadInput). The repository's corpus (fuzz/corpus/TARGET) is never written: each
# run starts from a fresh copy in DIR/corpus/TARGET, and a crashing input is
# saved as DIR/artifacts/TARGET-crash-<sha1> (likewise leak-, timeout-, oom-).
# Exits 0 when every target ran its time without a finding, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
seconds=10
build="$root/build-fuzz"
jobs=2
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "fuzz/run.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  targets=(fuzz_config fuzz_safetensors fuzz_tokenizer fuzz_dataset_index fuzz_dataset_shard fuzz_checkpoint_manifest
           fuzz_hdf5_bytes)
fi

cc=${LOOM_FUZZ_CC:-clang-14}
cxx=${LOOM_FUZZ_CXX:-clang++-14}
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz/run.sh: $cxx not found (launch/setup.sh installs clang-14)" >&2
  exit 1
fi
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$root}
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/loom/ccache}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
# Objects with debug info are otherwise cached per build folder (ccache
# hashes the working directory): without this, every fresh BUILD/fuzz of
# fuzz_smoke missed the cache.
export CCACHE_NOHASHDIR=1

start=$(date +%s)
if [ ! -f "$build/build.ninja" ]; then
  CC=$cc CXX=$cxx cmake -S "$here" -B "$build" -G Ninja >/dev/null
fi
# The build's output is kept out of the way, and shown when it fails: with
# set -e a failed build would otherwise end the script without a word.
if ! cmake --build "$build" -j "$jobs" --target "${targets[@]}" >"$build/build.log" 2>&1; then
  echo "fuzz/run.sh: the build failed ($build/build.log):" >&2
  grep -E "error|FAILED" "$build/build.log" | head -20 >&2 || tail -30 "$build/build.log" >&2
  exit 1
fi
echo "fuzz/run.sh: built ${#targets[@]} targets in $(( $(date +%s) - start )) s"

mkdir -p "$build/artifacts" "$build/logs"
failed=()
for target in "${targets[@]}"; do
  work="$build/corpus/$target"
  rm -rf "$work"
  mkdir -p "$work"
  cp "$here/corpus/$target"/* "$work/"
  # Its past findings are the unit tests' fault inputs.
  if [ "$target" = fuzz_hdf5_bytes ]; then cp "$root/tests/unit/hdf5_faults"/*.h5 "$work/"; fi
  log="$build/logs/$target.log"
  status=0
  # -timeout: one input taking longer is a hang, a finding. -rss_limit_mb:
  # likewise an input that makes a reader allocate without bound.
  rm -f "$build/artifacts/$target-"*
  timeout=20
  extra=()
  if [ "$target" = fuzz_hdf5_bytes ]; then
    # libhdf5 mallocs absurd sizes for some damaged files. That happens in
    # the probe children, whose address space is capped: libFuzzer's own
    # malloc limit would fire there first and save the input as if this
    # process had run out of memory.
    extra=(-malloc_limit_mb=2000000000)
  fi
  "$build/$target" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb=2048 "${extra[@]}" -print_final_stats=1 \
    -artifact_prefix="$build/artifacts/$target-" "$work" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  corpus=$(ls "$work" | wc -l)
  bytes=$(du -sb "$work" | cut -f1)
  if [ "$status" -eq 0 ]; then
    echo "fuzz/run.sh: $target: ${seconds} s, ${execs:-?} executions, corpus $corpus files ($bytes bytes), no finding"
  else
    echo "fuzz/run.sh: $target: FINDING (exit $status); log $log:" >&2
    grep -E "ERROR|SUMMARY|escaped|accepted|Test unit written|==[0-9]+==" "$log" | head -20 >&2 || tail -30 "$log" >&2
    failed+=("$target")
  fi
done
echo "fuzz/run.sh: done in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: findings in ${failed[*]} (inputs in $build/artifacts/)" >&2
  exit 1
fi
