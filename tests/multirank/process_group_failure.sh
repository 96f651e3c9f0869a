#!/usr/bin/env bash
# Runs process_group_failure MODE on 2 ranks (4 for unwinds) and checks that the job ends
# non-zero within 30 s with a message that names the failing rank and the
# operation. `timeout 60` guarantees this script itself never hangs.
#   process_group_failure.sh MPIEXEC DRIVER MODE
set -u
mpiexec=$1 driver=$2 mode=$3
log=$(mktemp)
trap 'rm -f "$log"' EXIT

start_ns=$(date +%s%N)
ranks=2
[ "$mode" = unwinds ] && ranks=4
OMP_NUM_THREADS=1 timeout 60 "$mpiexec" --allow-run-as-root --oversubscribe -np "$ranks" "$driver" "$mode" >"$log" 2>&1
rc=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
cat "$log"
echo "--- mode $mode: exit code $rc after ${elapsed_ms} ms"

fail() { echo "FAIL ($mode): $*"; exit 1; }
[ "$rc" -ne 0 ] || fail "the job exited 0"
[ "$rc" -ne 124 ] || fail "the job hung until timeout 60 killed it"
[ "$elapsed_ms" -lt 30000 ] || fail "the job took ${elapsed_ms} ms to end (limit 30 s)"
expect() { grep -qF -- "$1" "$log" || fail "no '$1' in the output"; }
case "$mode" in
  absent)
    expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): all_reduce #1"
    expect "did not complete within 2 s; waiting for world ranks [1] (the other members of group 'world')" ;;
  absent_recv)
    expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): recv #1 of float32 [12] on cpu from group rank 1 (world rank 1) tag 5"
    expect "did not complete within 2 s; waiting for group rank 1 (world rank 1), which must issue the matching send" ;;
  throws)
    expect "loom: rank 1 (group 'world' rank 1 of 2, world ranks [0 1]): all_reduce #1"
    expect "not contiguous" ;;
  killed)
    expect "rank 1" ;;
  short)
    expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): recv #1 of float32 [12] on cpu from group rank 1"
    expect "the sender's tensor is float32 [3]" ;;
  long)
    expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): recv #1 of float32 [12] on cpu from group rank 1"
    expect "the sender's tensor is float32 [24]" ;;
  shape)
    expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): recv #1 of float32 [4, 3] on cpu from group rank 1 (world rank 1) tag 7"
    expect "the sender's tensor is float32 [3, 4]" ;;
  dtype)
    expect "recv #1 of float32 [12] on cpu from group rank 1 (world rank 1) tag 7"
    expect "the sender's tensor is int32 [12]" ;;
  unwinds)
    # The failing rank's own message, and before any other rank's.
    expect "loom: planted: rank 2 ran out of memory with a recv in flight"
    first=$(grep -m1 '^loom: ' "$log")
    [ "$first" = "loom: planted: rank 2 ran out of memory with a recv in flight" ] ||
      fail "the first message is not the failing rank's: $first" ;;
esac
echo "PASS ($mode)"
