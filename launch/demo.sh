#!/usr/bin/env bash
# `make demo`: what loom does today, end to end, on this machine.
#
# What it does, all for real on this machine:
# - data: the bundled corpus (the King James Bible, from Debian's packages)
#   becomes a byte-level BPE tokenizer and a tokenized HDF5 dataset, the input
#   of configs/tiny.yaml (runs/data/);
# - training: configs/tiny.yaml trains on two MPI ranks with tensor
#   parallelism (tp 2, sequence parallel; the same run as on one rank),
#   checkpoints, and exports a Hub folder to runs/tiny/hf/, which loom and
#   transformers both sample from;
# - models: a small Llama model created by Hugging Face transformers is
#   imported into a loom checkpoint, sampled from (greedy, compared token for
#   token with transformers), and exported back to a Hub folder that
#   transformers loads, with the same logits.
set -euo pipefail
cd "$(dirname "$0")/.."
source build/env.sh
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
RUN=runs/demo
rm -rf "$RUN"
mkdir -p "$RUN"

step() { printf '\n== %s\n' "$*"; }

DATA=runs/data
step "bundled corpus -> $DATA/kjv.txt"
data/corpus/make_kjv.sh "$DATA/kjv.txt"
ls -l "$DATA/kjv.txt"

step "loom tokenizer train (vocab 2048, as configs/tiny.yaml expects) -> $DATA/tokenizer.json"
loom tokenizer train --input "$DATA/kjv.txt" --vocab-size 2048 --output "$DATA/tokenizer.json"

step "loom prepare -> $DATA/tiny"
rm -rf "$DATA/tiny"
loom prepare --tokenizer "$DATA/tokenizer.json" --input "$DATA/kjv.txt" --output "$DATA/tiny"

step "loom inspect $DATA/tiny --verify"
loom inspect "$DATA/tiny" --verify --tokenizer "$DATA/tokenizer.json" | head -8

step "mpirun -np 2 loom train configs/tiny.yaml --set parallel.tp=2 (a few minutes on 2 cores)"
rm -rf runs/tiny
mpirun_args=(--oversubscribe -np 2)
if [ "$(id -u)" = 0 ]; then mpirun_args=(--allow-run-as-root "${mpirun_args[@]}"); fi
OMP_NUM_THREADS=1 mpirun "${mpirun_args[@]}" loom train configs/tiny.yaml \
  --set parallel.tp=2 --set parallel.sequence_parallel=true
tail -n 2 runs/tiny/metrics.jsonl

step "loom generate runs/tiny/hf --prompt 'And God said'"
loom generate runs/tiny/hf --prompt "And God said" --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 1

step "transformers loads runs/tiny/hf and generates"
"$LOOM_PYTHON" - runs/tiny/hf <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tokenizer = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1] + "/tokenizer.json")
ids = tokenizer("And God said", return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, do_sample=False, max_new_tokens=30)
print(type(model).__name__, "greedy:", tokenizer.decode(out[0]))
PY

step "transformers creates a small Llama model -> $RUN/source"
"$LOOM_PYTHON" - "$RUN/source" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, initializer_range=0.1)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
print("saved", sys.argv[1])
PY

step "loom import $RUN/source --output $RUN/checkpoint"
loom import "$RUN/source" --output "$RUN/checkpoint"

step "loom inspect $RUN/checkpoint"
loom inspect "$RUN/checkpoint" | head -12

step "loom generate (greedy, 16 tokens) vs transformers"
PROMPT=1,17,42,7
loom generate "$RUN/checkpoint" --prompt-ids $PROMPT --greedy --max-new-tokens 16 | tee "$RUN/loom_ids.txt"
"$LOOM_PYTHON" - "$RUN/source" "$PROMPT" "$RUN/loom_ids.txt" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
prompt = torch.tensor([[int(t) for t in sys.argv[2].split(",")]])
with torch.no_grad():
    out = model.generate(prompt, do_sample=False, max_new_tokens=16, min_new_tokens=16)
ids = out[0, prompt.shape[1]:].tolist()
print(",".join(map(str, ids)), "(transformers)")
loom = [int(t) for t in open(sys.argv[3]).read().strip().split(",")]
assert loom == ids, "loom and transformers disagree"
print("same tokens")
PY

step "loom export $RUN/checkpoint --output $RUN/hf --dtype bfloat16"
loom export "$RUN/checkpoint" --output "$RUN/hf" --dtype bfloat16 --name loom-demo
ls -l "$RUN/hf"

step "transformers loads the export"
"$LOOM_PYTHON" - "$RUN/source" "$RUN/hf" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
source = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
export = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
ids = torch.randint(0, source.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    diff = (source(ids).logits - export(ids).logits.float()).abs().max().item()
print(f"{type(export).__name__} in {next(export.parameters()).dtype}: max |logit difference| vs source = {diff:.4f} (bf16 rounding)")
PY
printf '\ndemo done: outputs in %s\n' "$RUN"
