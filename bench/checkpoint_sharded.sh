#!/usr/bin/env bash
# Save and resume of a ~300M-parameter Llama on 4 CPU ranks (tp 2 x pp 2):
# the sharded checkpoints of this build against the whole-tensor checkpoints
# of an older loom (every tensor gathered to rank 0, which writes alone; every
# rank reading the whole checkpoint on resume), in the same script:
#
#   bash bench/checkpoint_sharded.sh OLD_LOOM [ROUNDS] [LAYERS]
#
# OLD_LOOM: e.g. a build of d152044, or - for this build alone. LAYERS
# (default 18) sets the size: 18 layers is 298M parameters, 6 layers 143M.
#
# Each round trains one step and saves (the log's "loop stalled" time is the
# save), then resumes from that checkpoint with nothing left to train (the
# wall time of that run: start-up, preflight, model build, the load). The
# model: hidden 1024, intermediate 2816, 16 heads, vocab 32000, untied; 18
# layers is 298M parameters (3.3 GiB a checkpoint with AdamW's moments).
# Results: docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source build/env.sh
OLD=${1:?usage: bench/checkpoint_sharded.sh OLD_LOOM|- [ROUNDS] [LAYERS]}
ROUNDS=${2:-3}
LAYERS=${3:-18}
NEW=${LOOM_BIN:-build/loom}
DATA=runs/data
if [ ! -f "$DATA/tiny/index.json" ]; then
  data/corpus/make_kjv.sh "$DATA/kjv.txt"
  [ -f "$DATA/tokenizer.json" ] || loom tokenizer train --input "$DATA/kjv.txt" --vocab-size 2048 --output "$DATA/tokenizer.json"
  loom prepare --tokenizer "$DATA/tokenizer.json" --input "$DATA/kjv.txt" --output "$DATA/tiny"
fi
WORK=$(mktemp -d /tmp/loom-ckpt-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
shape=(--set model.hidden_size=1024 --set model.intermediate_size=2816 --set model.num_layers=$LAYERS
       --set model.num_heads=16 --set model.num_kv_heads=16 --set model.vocab_size=32000
       --set model.tie_embeddings=false --set data.seq_len=32 --set model.max_seq_len=32
       --set batch.micro_batch_size=1 --set batch.global_batch_size=4 --set schedule.warmup_steps=0
       --set data.train="[$DATA/tiny]" --set data.tokenizer="$DATA/tokenizer.json"
       --set parallel.tp=2 --set parallel.pp=2 --set checkpoint.interval=1 --set checkpoint.export_hf_at_end=false
       --set run.output_dir="$WORK")
mpi=(mpirun --oversubscribe -np 4)
[ "$(id -u)" = 0 ] && mpi=(mpirun --allow-run-as-root --oversubscribe -np 4)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F); $LAYERS layers"
export OMP_NUM_THREADS=1
builds=(old new)
[ "$OLD" = - ] && builds=(new)
printf "%-6s %5s %10s %10s %12s\n" build round "save s" "resume s" "ckpt MiB"
for round in $(seq 1 "$ROUNDS"); do
  for build in "${builds[@]}"; do
    bin=$NEW; [ "$build" = old ] && bin=$OLD
    name="$build-$round"
    log=$("${mpi[@]}" "$bin" train configs/tiny.yaml "${shape[@]}" --set run.name="$name" --set schedule.train_steps=1 2>&1)
    save=$(echo "$log" | sed -n 's/.*checkpoint: .*(loop stalled \([0-9.]*\) s).*/\1/p' | tail -1)
    bytes=$(du -sb "$WORK/$name/checkpoints/step-0000001" | cut -f1)
    start=$(date +%s.%N)
    "${mpi[@]}" "$bin" train configs/tiny.yaml "${shape[@]}" --set run.name="$name" --set schedule.train_steps=1 > /dev/null 2>&1
    resume=$(echo "$(date +%s.%N) - $start" | bc)
    printf "%-6s %5d %10s %10.2f %12.0f\n" "$build" "$round" "$save" "$resume" "$(echo "$bytes / 1048576" | bc)"
    rm -rf "${WORK:?}/$name"
  done
done
