#!/usr/bin/env bash
# Runs test_nccl_process_group --missing-peer on 2 ranks: rank 1 never joins
# the NCCL communicator, so rank 0 must end the job within 30 s (its deadline
# is 5 s, ncclCommAbort gets at most 5 more) with a message that names the
# join and world rank 1. Exits 77 (CTest: skipped) where rank 0 has no GPU.
# `timeout 90` guarantees this script itself never hangs.
#   nccl_missing_peer.sh MPIEXEC TEST_NCCL_PROCESS_GROUP
set -u
mpiexec=$1 driver=$2
log=$(mktemp)
trap 'rm -f "$log"' EXIT

start_ns=$(date +%s%N)
OMP_NUM_THREADS=1 timeout 90 "$mpiexec" --allow-run-as-root --oversubscribe -np 2 "$driver" --missing-peer >"$log" 2>&1
rc=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
cat "$log"
echo "--- exit code $rc after ${elapsed_ms} ms"

if grep -q "^SKIPPED" "$log" && [ "$rc" -eq 0 ]; then exit 77; fi
fail() { echo "FAIL: $*"; exit 1; }
[ "$rc" -ne 0 ] || fail "the job exited 0"
[ "$rc" -ne 124 ] || fail "the job hung until timeout 90 killed it"
[ "$elapsed_ms" -lt 30000 ] || fail "the job took ${elapsed_ms} ms to end (limit 30 s)"
expect() { grep -qF -- "$1" "$log" || fail "no '$1' in the output"; }
expect "loom: rank 0 (group 'world' rank 0 of 2, world ranks [0 1]): NCCL communicator on cuda:0 #"
expect "ncclCommInitRankConfig did not complete within 5 s; world ranks [1] (the other members of group 'world') never all joined"
expect "aborted the NCCL communicator of group 'world'"
echo "PASS"
