#!/usr/bin/env bash
# The one-GPU checks of cluster readiness (issue 29, docs/parallelism.md):
#   1. the multi-rank layouts through the test backend mpi_staged, every rank
#      on the one GPU: each must print cuda:0 for every rank and end within
#      a tolerance of the same run on the CPU over MPI;
#   2. the NCCL unit tests on one rank (test_nccl_process_group);
#   3. a 2-rank NCCL start-up whose rank 1 never joins: rank 0 must end the
#      job at the deadline naming world rank 1 (nccl_missing_peer.sh).
# A table of results comes last; the exit code is the number of failures.
#
# Here:   cmake --build build -j2 --target loom loom_dataset_tool test_nccl_process_group
#         bash tests/gpu/pack_staged.sh            # fills tests/gpu/carry (ignored)
#         bash tests/gpu/staged_checks.sh --device cpu   # the same checks, on the CPU, as a GPU machine
#                                                         # would run them (use env -i to be sure)
# There:  the device tool, carrying tests/gpu/carry, timeout_s 420:
#         bash tests/gpu/staged_checks.sh
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
carry="$here/carry"
device=cuda
[ "${1:-}" = "--device" ] && device="$2"
out="${OUT:-/tmp/loom-staged}"
work=$(mktemp -d)
mkdir -p "$out"
cd "$root"

# The carried Open MPI (tests/gpu/pack_mpi.sh), loom's libraries, and
# torch's. pack_staged.sh compresses lib/ and ompi/ into libs.tar.xz (the
# device tool carries 64 MiB; they are ~80 MB as files): unpacked here.
libroot="$carry"
if [ -f "$carry/libs.tar.xz" ]; then
  libroot=$(mktemp -d)
  tar -xJf "$carry/libs.tar.xz" -C "$libroot"
fi
export OPAL_PREFIX="$libroot/ompi" PMIX_MCA_pcompress_base_silence_warning=1 OMP_NUM_THREADS=1
export PATH="$libroot/ompi/bin:$PATH"
python="$(command -v python3 || true)"
libs="$libroot/lib:$libroot/ompi/libs"
if [ -n "$python" ]; then
  site="$("$python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)"
  if [ -n "$site" ]; then
    libs="$libs:$site/torch/lib"
    for dir in "$site"/nvidia/*/lib "$site"/nvidia/*/*/lib; do [ -d "$dir" ] && libs="$libs:$dir"; done
  fi
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
loom="$carry/loom"
mpirun=(mpirun --allow-run-as-root --oversubscribe)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } > "$out/summary.txt"
echo "device: $device" >> "$out/summary.txt"

# A learnable dataset (64 documents of 200 ids below 512 that follow a
# pattern, EOS 0), so that the loss falls within a few steps and a layout
# that computed wrong gradients would show.
awk 'BEGIN { for (d = 0; d < 64; d++) { line = ""; for (i = 0; i < 199; i++) line = line (1 + (i * 7 + d) % 97) " "; print line "0" } }' |
  "$carry/loom_dataset_tool" write "$work/data" --vocab-size 512 --eos 0 >/dev/null

failures=0
result() {  # name, PASS|FAIL, detail
  printf '%-22s %-5s %s\n' "$1" "$2" "$3" >> "$out/results.txt"
  [ "$2" = PASS ] || failures=$((failures + 1))
}

train() {  # name ranks device backend [--set overrides...]
  local name=$1 ranks=$2 dev=$3 backend=$4; shift 4
  local sets=(--set run.output_dir="$work/runs" --set run.name="$name" --set run.device="$dev"
              --set parallel.device_backend="$backend" --set "data.train=[$work/data]" --set 'data.valid=""'
              --set 'data.tokenizer=""' --set model.vocab_size=512 --set model.hidden_size=64
              --set model.intermediate_size=128 --set model.num_layers=4 --set model.num_heads=8
              --set model.num_kv_heads=4 --set data.seq_len=64 --set model.max_seq_len=64
              --set batch.global_batch_size=8 --set schedule.train_steps=6 --set schedule.warmup_steps=1
              --set optimizer.lr=1e-2
              --set checkpoint.enabled=false --set checkpoint.export_hf_at_end=false --set logging.interval=1
              --set launch.ranks="$ranks" --set parallel.comm_timeout_first_step=120 "$@")
  timeout 90 "${mpirun[@]}" -np "$ranks" "$loom" train configs/tiny.yaml "${sets[@]}" > "$out/$name.log" 2>&1
}

loss_at() {  # run, line (1 = the first step, $ = the last)
  sed -n "$2p" "$work/runs/$1/metrics.jsonl" 2>/dev/null | sed -n 's/.*"loss": *\([-0-9.e+]*\).*/\1/p'
}

check_layout() {  # name ranks tolerance [--set overrides...]
  local name=$1 ranks=$2 tolerance=$3; shift 3
  train "$name-cpu" "$ranks" cpu nccl "$@" || { result "$name" FAIL "the CPU run failed: $out/$name-cpu.log"; return; }
  train "$name-staged" "$ranks" "$device" mpi_staged "$@" ||
    { result "$name" FAIL "the staged run failed: $out/$name-staged.log"; return; }
  local want=cpu
  [ "$device" = cuda ] && want=cuda:0
  local placed
  placed=$(grep -c "^train: world rank [0-9]*: $want on .*through mpi_staged" "$out/$name-staged.log")
  [ "$placed" -eq "$ranks" ] || { result "$name" FAIL "$placed of $ranks ranks on $want"; return; }
  local a b
  a=$(loss_at "$name-cpu" '$') b=$(loss_at "$name-staged" '$')
  if awk -v a="$a" -v b="$b" -v t="$tolerance" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= t * (a < 0 ? -a : a)) }'; then
    result "$name" PASS "step 6 loss cpu $a, staged $b (step 1: $(loss_at "$name-cpu" 1); $ranks ranks on $want)"
  else
    result "$name" FAIL "step 6 loss cpu $a, staged $b (tolerance $tolerance relative)"
  fi
}

start=$(date +%s)
check_layout dp2_zero1 2 5e-3 --set parallel.zero_stage=1
check_layout tp2_sp 2 5e-3 --set parallel.tp=2 --set parallel.sequence_parallel=true
check_layout pp2_1f1b 2 5e-3 --set parallel.pp=2
check_layout pp2_interleaved 2 5e-3 --set parallel.pp=2 --set parallel.pp_schedule=interleaved \
  --set parallel.virtual_stages=2
check_layout dp2_tp2_zero1 4 5e-3 --set parallel.tp=2 --set parallel.zero_stage=1
# Expert parallelism: the token exchange and its counts, device rows staged through MPI.
check_layout dp2_ep2_mixtral 2 5e-3 --set model.architecture=mixtral --set model.num_experts=4 \
  --set model.num_experts_per_tok=2 --set parallel.dp=2 --set parallel.ep=2
check_layout tp2_pp2_sp_bf16 4 3e-2 --set parallel.tp=2 --set parallel.pp=2 --set parallel.sequence_parallel=true \
  --set precision.compute=bf16

if [ -x "$carry/test_nccl_process_group" ]; then
  timeout 120 "${mpirun[@]}" -np 1 "$carry/test_nccl_process_group" > "$out/nccl_np1.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    result nccl_np1 PASS "$(grep -c 'SKIPPED \]' "$out/nccl_np1.log") skipped; $(grep -m1 'PASSED' "$out/nccl_np1.log")"
  else
    result nccl_np1 FAIL "exit $rc: $out/nccl_np1.log"
  fi
  bash tests/multirank/nccl_missing_peer.sh mpirun "$carry/test_nccl_process_group" > "$out/nccl_missing_peer.log" 2>&1
  rc=$?
  case $rc in
    0) result nccl_missing_peer PASS "rank 0 ended the job naming world rank 1" ;;
    77) result nccl_missing_peer SKIP "no GPU" ;;
    *) result nccl_missing_peer FAIL "exit $rc: $out/nccl_missing_peer.log" ;;
  esac
fi
echo "seconds: $(( $(date +%s) - start ))" >> "$out/summary.txt"
cat "$out/summary.txt" "$out/results.txt"
rm -rf "$work"
exit "$failures"
