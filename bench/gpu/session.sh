#!/usr/bin/env bash
# Everything one GPU loan checks, in one device call (docs/performance.md):
#   1. bench/gpu/check_kernels.sh: the fused kernels against the unfused ops,
#      and a profiled tiny run that must take the fused path;
#   2. bench/gpu/run.sh: CUDA correctness, then loom's speed against
#      transformers eager (both models) and torch.compile (1B);
#   3. one profiled 1B step (step 4 of 5), its summary in prof1b_summary.txt;
#   4. time left over: the 1B step with each combination of the fusion.*
#      switches (bench/gpu/fusions.sh).
#
# Here:  make build && bash bench/gpu/pack.sh
# There: the device tool, carrying bench/gpu/carry, timeout_s 600:
#        bash bench/gpu/session.sh [bench_gpu.py options, e.g. --no-compile]
# Results land in $OUT (or /tmp/loom-session); summary.txt says each part's
# exit code.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/carry_libs.sh"
root="$(cd "$here/../.." && pwd)"
out="${OUT:-/tmp/loom-session}"
work=/tmp/lb
mkdir -p "$out"
cd "$root"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/summary.txt" 2>&1

timeout 150 bash bench/gpu/check_kernels.sh --out "$out/kernels" > "$out/kernels.log" 2>&1
echo "check_kernels: exit $?" >> "$out/summary.txt"

timeout 330 bash bench/gpu/run.sh --out "$out" --work "$work" --timeout 200 --compile-models 1b "$@" \
  > "$out/bench.log" 2>&1
echo "bench: exit $?" >> "$out/summary.txt"

python="$(command -v python3)"
libs="$(carry_libs "$python" "$here/carry")"
timeout 80 env LD_LIBRARY_PATH="$libs" "$here/carry/loom" train configs/llama3-1b.yaml \
  --set run.output_dir="$work/runs" --set run.name=prof1b --set run.device=cuda --set precision.compute=bf16 \
  --set data.seq_len=4096 --set batch.micro_batch_size=2 --set batch.global_batch_size=8 \
  --set "data.train=[$work/data/random-128256]" --set 'data.valid=""' --set 'data.tokenizer=""' \
  --set checkpoint.enabled=false --set checkpoint.export_hf_at_end=false --set logging.interval=1 \
  --set launch.ranks=1 --set parallel.dp=1 --set schedule.train_steps=5 --set schedule.warmup_steps=1 \
  --set profile.start_step=4 --set profile.steps=1 > "$out/prof1b.log" 2>&1
echo "profile 1B: exit $?" >> "$out/summary.txt"
cp "$work/runs/prof1b/profile/summary.txt" "$out/prof1b_summary.txt" 2>/dev/null

# 4. If the loan has time left: the 1B step with each combination of the
#    fusion.* switches (bench/gpu/fusions.sh, which a second call can also
#    run alone with its full budget).
if (( SECONDS < 440 )); then bash "$here/fusions.sh" --budget $((560 - SECONDS)) > "$out/fusions.log" 2>&1; fi
cat "$out/fusions/summary.txt" >> "$out/summary.txt" 2>/dev/null
echo "session: ${SECONDS} s" >> "$out/summary.txt"

cat "$out/summary.txt"
tail -n 4 "$out/kernels/check.txt" 2>/dev/null
tail -n 12 "$out/bench.log"
cut -c1-160 "$out/prof1b_summary.txt" 2>/dev/null | head -n 32
