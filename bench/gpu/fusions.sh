#!/usr/bin/env bash
# The 1B step (configs/llama3-1b.yaml, sequence 4096, micro-batch 2, global
# batch 8, bf16 over fp32 weights, one GPU) with every combination of the
# three fusion.* switches (docs/configuration.md): the eight in one order,
# then in the reverse order while the budget lasts, so that a drift of the
# machine over the session falls on all of them alike. Prints one line per
# run: tok/s (MFU) of steps 3 to 10 and their mean.
#
# Here:  make build && bash bench/gpu/pack.sh
# There: the device tool, carrying bench/gpu/carry: bash bench/gpu/fusions.sh
#        (session.sh runs it as its part 4 with the time it has left).
# Options: --budget SECONDS (default 330): no run starts that could end past
# it (each has 75 s). To try the script on a machine without a GPU (with the
# carried files, under env -i):
#   --device cpu --config configs/tiny.yaml --seq 128 --vocab 2048
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
budget=330 per_run=75 device=cuda config=configs/llama3-1b.yaml seq=4096 vocab=128256
while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) budget="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --vocab) vocab="$2"; shift 2 ;;
    *) echo "fusions.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
source "$here/carry_libs.sh"
out="${OUT:-/tmp/loom-session}/fusions"
work=/tmp/lb
mkdir -p "$out" "$work/data"
cd "$root"

python="$(command -v python3)"
# Only loom's processes get these paths (as in run.sh): the carried
# libstdc++ must not shadow the one this machine's Python may need.
loom_env=(env "LD_LIBRARY_PATH=$(carry_libs "$python" "$here/carry")")

# Uniform random tokens, enough for 10 steps of 8 x 4097 (made once; 1.6 MB).
data="$work/data/random-$vocab-fusions"
if [[ ! -f "$data/index.json" ]]; then
  "$python" -c '
import random, sys
rng = random.Random(7)
vocab = int(sys.argv[1])
for _ in range(400):
    print(" ".join(str(rng.randrange(1, vocab)) for _ in range(1000)))' "$vocab" |
    "${loom_env[@]}" "$here/carry/loom_dataset_tool" write "$data" --vocab-size "$vocab" --eos 0 > "$out/data.log" 2>&1 ||
    { echo "fusions.sh: could not write the dataset (see $out/data.log)"; exit 1; }
fi

flag() { [[ "$1" == 1 ]] && echo true || echo false; }
run() {  # index, combination (wgrad_accumulation, clip_in_adamw, add_rmsnorm as 0/1)
  local c="$2" name="$1-w${2:0:1}c${2:1:1}a${2:2:1}"
  timeout "$per_run" "${loom_env[@]}" "$here/carry/loom" train "$config" \
    --set run.output_dir="$work/runs" --set run.name="$name" --set run.device="$device" --set precision.compute=bf16 \
    --set data.seq_len="$seq" --set batch.micro_batch_size=2 --set batch.global_batch_size=8 \
    --set "data.train=[$data]" --set 'data.valid=""' --set 'data.tokenizer=""' \
    --set checkpoint.enabled=false --set checkpoint.export_hf_at_end=false --set logging.interval=1 \
    --set launch.ranks=1 --set parallel.dp=1 --set schedule.train_steps=10 --set schedule.warmup_steps=1 \
    --set fusion.wgrad_accumulation="$(flag "${c:0:1}")" --set fusion.clip_in_adamw="$(flag "${c:1:1}")" \
    --set fusion.add_rmsnorm="$(flag "${c:2:1}")" \
    > "$out/$name.log" 2>&1
  local rc=$?
  [[ $rc == 0 ]] || tail -n 5 "$out/$name.log"
  echo "$name: exit $rc, steps 3-10 tok/s (MFU): $(
    "$python" "$here/step_rates.py" --mean "$work/runs/$name/metrics.jsonl" 2>&1)" | tee -a "$out/summary.txt"
}

: > "$out/summary.txt"
# The eight combinations (wgrad_accumulation, clip_in_adamw, add_rmsnorm as
# 0/1), then the same in reverse order while the budget lasts.
combos=(000 100 010 001 110 101 011 111)
order=("${combos[@]}")
for (( i = ${#combos[@]} - 1; i >= 0; i-- )); do order+=("${combos[$i]}"); done
for i in "${!order[@]}"; do
  if (( SECONDS + per_run > budget )); then
    echo "fusions.sh: budget of ${budget} s spent, stopped before run $((i + 1)) of ${#order[@]}" | tee -a "$out/summary.txt"
    break
  fi
  run "$i" "${order[$i]}"
done
echo "fusions: ${SECONDS} s" | tee -a "$out/summary.txt"
