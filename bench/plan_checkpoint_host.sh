#!/usr/bin/env bash
# `loom plan`'s checkpoint write time and host memory against a measured
# run on this machine's CPU ranks (docs/plan.md, "Checkpoints and host
# memory"; results in docs/performance.md):
#
#   bash bench/plan_checkpoint_host.sh [RANKS] [LAYOUT]     (default 2 and dp=2,mb=2)
#
# The model: hidden 512, intermediate 1536, 8 layers, 8 heads, vocabulary
# 8192, untied (35.7M parameters, 428 MB a checkpoint), sequence 128, global
# batch 8. First the disk's write rate is measured (dd of 512 MiB with
# fsync into the run folder); then, at that rate (--disk-gbps):
#   - a synchronous run saves after each of 3 steps: the log's "loop
#     stalled" time of each save (the ranks write their pieces together,
#     then rank 0 commits) against plan's save_s (one node's bytes at the
#     rate);
#   - the same run with checkpoint.async: the most tensor bytes a rank held
#     (metrics.jsonl's mem_tensor_peak_bytes_per_rank, the training tensors
#     and the save buffers, all on the host here) against plan's
#     host_memory.peak_bytes; and the background write's time.
# Each line prints the ratio measured / predicted. No pass mark: a
# measurement, not a test.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS=${1:-2}
LAYOUT=${2:-dp=2,mb=2}
LOOM=${LOOM_BIN:-build/loom}
TOOL=${LOOM_DATASET_TOOL:-build/tests/loom_dataset_tool}
PYTHON=${LOOM_PYTHON:-python3}
WORK=$(mktemp -d /tmp/loom-plan-ckpt.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1
mpi=(mpirun --oversubscribe -np "$RANKS")
[ "$(id -u)" = 0 ] && mpi=(mpirun --allow-run-as-root --oversubscribe -np "$RANKS")

"$PYTHON" -c "
import random
rng = random.Random(5)
for _ in range(400):
    print(' '.join(str(rng.randrange(1, 8192)) for _ in range(rng.randint(100, 400))))" |
  "$TOOL" write "$WORK/data" --vocab-size 8192 --eos 0 > /dev/null

# The layout's keys as --set arguments.
layout_sets=()
IFS=, read -ra keys <<< "$LAYOUT"
for kv in "${keys[@]}"; do
  k=${kv%%=*} v=${kv#*=}
  case $k in
    dp) layout_sets+=(--set parallel.dp="$v") ;; tp) layout_sets+=(--set parallel.tp="$v") ;;
    pp) layout_sets+=(--set parallel.pp="$v") ;; zero) layout_sets+=(--set parallel.zero_stage="$v") ;;
    mb) layout_sets+=(--set batch.micro_batch_size="$v") ;; schedule) layout_sets+=(--set parallel.pp_schedule="$v") ;;
  esac
done
shape=(--set model.hidden_size=512 --set model.intermediate_size=1536 --set model.num_layers=8
       --set model.num_heads=8 --set model.num_kv_heads=8 --set model.vocab_size=8192
       --set model.tie_embeddings=false --set data.seq_len=128 --set model.max_seq_len=128
       --set batch.global_batch_size=8 --set data.train="[$WORK/data]" --set data.tokenizer=""
       --set schedule.train_steps=3 --set schedule.warmup_steps=0 --set logging.interval=1
       --set checkpoint.interval=1 --set checkpoint.keep_last=1 --set checkpoint.export_hf_at_end=false
       --set run.output_dir="$WORK/runs")

mkdir -p "$WORK/runs"
dd_out=$(dd if=/dev/zero of="$WORK/runs/probe" bs=1M count=512 conv=fsync 2>&1)
rm -f "$WORK/runs/probe"
gbps=$(echo "$dd_out" | "$PYTHON" -c "
import re, sys
text = sys.stdin.read()
m = re.search(r'(\d+) bytes .* copied, ([\d.]+) s', text)
print(f'{int(m.group(1)) / float(m.group(2)) / 1e9:.4f}')")
echo "machine: $(getconf _NPROCESSORS_ONLN) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u '+%F %H:%M') UTC," \
     "load $(cut -d' ' -f1-3 /proc/loadavg); disk (dd 512 MiB, fsync): $gbps GB/s; $RANKS ranks, layout $LAYOUT"

plan() {
  "$LOOM" plan configs/tiny.yaml --gpus "$RANKS" --gpu-memory 64 --layout "$LAYOUT" --disk-gbps "$gbps" --json \
    "${shape[@]}" "$@"
}
for mode in sync async; do
  name=$mode
  async=false; [ $mode = async ] && async=true
  log=$("${mpi[@]}" "$LOOM" train configs/tiny.yaml "${shape[@]}" "${layout_sets[@]}" --set run.name=$name \
          --set checkpoint.async=$async 2>&1)
  predicted=$(plan --set checkpoint.async=$async)
  "$PYTHON" - "$mode" "$WORK/runs/$name/metrics.jsonl" "$predicted" "$log" <<'EOF'
import json, re, sys
mode, metrics, predicted, log = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
MiB = 2 ** 20
rows = [json.loads(line) for line in open(metrics) if line.strip()]
peaks = [r.get("mem_tensor_peak_bytes_per_rank", [r.get("mem_tensor_peak_bytes")]) for r in rows
         if "mem_tensor_peak_bytes" in r]
measured_peak = max(max(p) for p in peaks)
ckpt, host = predicted["checkpoint"], predicted["host_memory"]
print(f"{mode}: checkpoint {ckpt['total_bytes'] / MiB:.1f} MiB, per rank (predicted) "
      + ", ".join(f"{b / MiB:.1f}" for b in ckpt["rank_bytes_by_world_rank"]) + " MiB")
print(f"{mode}: host peak per rank: measured {measured_peak / MiB:.1f} MiB, predicted {host['peak_bytes'] / MiB:.1f} MiB "
      f"({host['peak_phase']}; training {host['training_bytes'] / MiB:.1f}, async buffers {host['async_bytes'] / MiB:.1f}), "
      f"ratio {measured_peak / host['peak_bytes']:.3f}")
if mode == "sync":
    stalls = [float(s) for s in re.findall(r"loop stalled ([0-9.]+) s", log)]
    print(f"{mode}: save (loop stalled) s: " + ", ".join(f"{s:.3f}" for s in stalls)
          + f"; predicted {ckpt['save_s']:.3f} s; ratio of the median {sorted(stalls)[len(stalls) // 2] / ckpt['save_s']:.2f}")
else:
    writes = [float(s) for s in re.findall(r"written in the background in ([0-9.]+) s", log)]
    print(f"{mode}: background write s: " + ", ".join(f"{s:.3f}" for s in writes)
          + f"; predicted {ckpt['save_s']:.3f} s; ratio of the median "
          + (f"{sorted(writes)[len(writes) // 2] / ckpt['save_s']:.2f}" if writes else "-"))
EOF
done
