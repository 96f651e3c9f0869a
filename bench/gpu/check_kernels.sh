#!/usr/bin/env bash
# The GPU checks of loom's fused kernels and of the step profiler, for a lent
# GPU machine (docs/performance.md, "Profiling a run" and tuning version 3):
#   1. tests/unit/test_fused_kernels.cpp: fused SwiGLU, rotary,
#      cross-entropy and residual add + RMSNorm against the unfused ops,
#      forward and backward, fp32/bf16/fp16, and the model on the GPU against
#      the CPU; then, when carried, tests/unit/test_compute_weights.cpp (the
#      cached casts and the weight-gradient GEMM into fp32 on the GPU);
#   2. configs/tiny.yaml on cuda in bf16 with profile.start_step 5,
#      profile.steps 2: the Chrome trace must hold GPU kernels, among them
#      loom's (so training took the fused paths, the loss included), and
#      summary.txt rank them;
#   3. the same with every fusion.* switch on: the add + RMSNorm kernels
#      must be in the trace too.
#
# Here (the build machine):
#   make build && bash bench/gpu/pack.sh     (which strips the two tests in)
# There (the device tool, carrying bench/gpu/carry):
#   bash bench/gpu/check_kernels.sh --out "$OUT"
# OUT gets test_fused_kernels.txt (and test_compute_weights.txt), for each
# profiled run (profiled, profiled-fusions) NAME.log, NAME/summary.txt and
# NAME/trace.json.gz, and check.txt; the exit code is 0 when all passed.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
carry="$here/carry"
source "$here/carry_libs.sh"
out=/tmp/loom-check-kernels
work=/tmp/loom-check-kernels-work
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "usage: check_kernels.sh [--out DIR] [--work DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" "$work"
python="${LOOM_BENCH_PYTHON:-$(command -v python3)}"

# torch, the CUDA runtime and NCCL from this machine's torch wheel; loom's
# other libraries from the carried folder (as bench/gpu/run.sh does). Only
# loom's processes get them.
libs="$(carry_libs "$python" "$carry")"
loom_env=(env "LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" OMP_NUM_THREADS=4)
failed=0

# Runs the carried gtest binary $1 (its output in $out/$1.txt and .xml): a
# failure, or a test skipped for want of a GPU, fails the check.
gtest_check() {
  local name="$1"
  "${loom_env[@]}" "$carry/$name" --gtest_output="xml:$out/$name.xml" > "$out/$name.txt" 2>&1
  local rc=$?
  tail -n 12 "$out/$name.txt" | tee -a "$out/check.txt"
  if [[ $rc -ne 0 ]] || grep -q "SKIPPED \]" "$out/$name.txt"; then
    echo "FAIL: $name exited $rc or skipped tests (no GPU seen?)" | tee -a "$out/check.txt"
    failed=1
  fi
}

echo "== 1. test_fused_kernels" | tee "$out/check.txt"
gtest_check test_fused_kernels
if [[ -x "$carry/test_compute_weights" ]]; then
  echo "== 1b. test_compute_weights" | tee -a "$out/check.txt"
  gtest_check test_compute_weights
fi

echo "== 2. profiled tiny run on cuda, bf16" | tee -a "$out/check.txt"
data="$work/data/tiny-random"
if [[ ! -f "$data/index.json" ]]; then
  rm -rf "$data"
  "$python" -c '
import random
rng = random.Random(1234)
for _ in range(200):
    print(" ".join(str(rng.randrange(1, 2048)) for _ in range(1000)))
' | "${loom_env[@]}" "$carry/loom_dataset_tool" write "$data" --vocab-size 2048 --eos 0
fi
# A profiled tiny run named $1 with the --set overrides after it; the trace
# must hold GPU kernels and each of the kernel names in NEEDED (a space-
# separated list), and summary.txt rank them.
profiled_run() {
  local name="$1"; shift
  rm -rf "$work/runs/$name"
  "${loom_env[@]}" "$carry/loom" train "$root/configs/tiny.yaml" \
    --set run.output_dir="$work/runs" --set run.name="$name" --set run.device=cuda \
    --set precision.compute=bf16 --set "data.train=[$data]" --set 'data.tokenizer=""' --set 'data.valid=""' \
    --set schedule.train_steps=8 --set schedule.warmup_steps=2 --set logging.interval=1 \
    --set checkpoint.enabled=false --set checkpoint.export_hf_at_end=false \
    --set launch.ranks=1 --set parallel.dp=1 \
    --set profile.start_step=5 --set profile.steps=2 "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log" | tee -a "$out/check.txt"
  if [[ $rc -ne 0 ]]; then
    echo "FAIL: loom train ($name) exited $rc" | tee -a "$out/check.txt"
    failed=1
    return
  fi
  mkdir -p "$out/$name"
  cp "$work/runs/$name/profile/summary.txt" "$out/$name/"
  gzip -c "$work/runs/$name/profile/trace.json" > "$out/$name/trace.json.gz"
  NEEDED="$NEEDED" "$python" - "$work/runs/$name/profile" <<'EOF' 2>&1 | tee -a "$out/check.txt"
import json, os, sys
from pathlib import Path
profile = Path(sys.argv[1])
trace = json.loads((profile / "trace.json").read_text())
kernels = {e["name"] for e in trace["traceEvents"] if e.get("cat") == "kernel"}
ours = {k for k in kernels if "loom::kernels" in k or "swiglu" in k or "rotary_kernel" in k or "cross_entropy_" in k
        or "add_rms_norm_" in k}
summary = (profile / "summary.txt").read_text()
print(f"{len(kernels)} kernel names in the trace; loom's: {sorted(ours)}")
problems = []
if not kernels:
    problems.append("no GPU kernel in the trace")
for needed in os.environ["NEEDED"].split():
    if not any(needed in k for k in ours):
        problems.append(f"no {needed} kernel: training did not take the fused path")
if "GPU time" not in summary.splitlines()[0]:
    problems.append("summary.txt does not rank GPU time")
print("FAIL: " + "; ".join(problems) if problems else "profile: ok")
sys.exit(1 if problems else 0)
EOF
  [[ ${PIPESTATUS[0]} -ne 0 ]] && failed=1
}

NEEDED="swiglu_forward swiglu_backward rotary_kernel cross_entropy_forward_kernel cross_entropy_backward_kernel" \
  profiled_run profiled
echo "== 3. the same with every fusion.* switch on" | tee -a "$out/check.txt"
NEEDED="swiglu_forward rotary_kernel cross_entropy_forward_kernel add_rms_norm_forward_kernel add_rms_norm_backward_kernel" \
  profiled_run profiled-fusions --set fusion.wgrad_accumulation=true --set fusion.clip_in_adamw=true \
  --set fusion.add_rmsnorm=true

echo "== $([[ $failed -eq 0 ]] && echo "all passed" || echo "FAILED")" | tee -a "$out/check.txt"
exit $failed
