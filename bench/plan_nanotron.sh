#!/usr/bin/env bash
# `loom plan` beside nanotron's published best layouts (docs/plan.md, "Beside
# nanotron's published H100 benchmark"): for every (model, nodes) cell of
# bench/nanotron_best.tsv, the layout loom plan puts first on that many nodes
# of 8 x 80 GiB H100s with the specification profile (configs/machines/
# h100-node.yaml), its predicted MFU and peak memory per GPU, beside
# nanotron's layout, MFU and memory; and loom's prediction for nanotron's own
# layout (1F1B for its pipelines, no sequence parallelism, no recomputation),
# with the ratio of the two predicted step times. The models are
# configs/nanotron/*.yaml (sequence 4096, global batch 256, bf16).
#
#   bash bench/plan_nanotron.sh [build/loom] [more loom plan flags, e.g. --machine FILE]
set -euo pipefail
LOOM=${1:-build/loom}
shift || true
cd "$(dirname "$0")/.."
PYTHON=${LOOM_PYTHON:-python3}
TABLE=bench/nanotron_best.tsv
echo "| model | nodes | loom plan first | loom MFU | loom GiB | nanotron layout | nanotron MFU | nanotron GB | loom on nanotron's layout: MFU, GiB | step ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|"
grep -v '^#' "$TABLE" | tail -n +2 | while IFS=$'\t' read -r model config nodes dp tp pp gas mbs zero mfu memory; do
  gpus=$((nodes * 8))
  common=(--gpus "$gpus" --gpus-per-node 8 --gpu-memory 80 --json "$@")
  best=$("$LOOM" plan "$config" "${common[@]}" --top 1 2>&1) || best="{\"error\": $("$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$best")}"
  # nanotron's layout in loom's model: ZeRO above 1 is not loom's (none in the table).
  theirs=$("$LOOM" plan "$config" "${common[@]}" \
             --layout "dp=$dp,tp=$tp,pp=$pp,schedule=1f1b,zero=$zero,mb=$mbs,recompute=0,sp=0" 2>&1) ||
    theirs="{\"error\": $("$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$theirs")}"
  "$PYTHON" - "$model" "$nodes" "$dp" "$tp" "$pp" "$gas" "$mbs" "$zero" "$mfu" "$memory" "$best" "$theirs" <<'EOF'
import json, sys
model, nodes, dp, tp, pp, gas, mbs, zero, mfu, memory, best, theirs = sys.argv[1:]
GiB = 2 ** 30
best, theirs = json.loads(best), json.loads(theirs)
def why(error):
    text = error.strip().splitlines()[-1]
    return text.split("error: ", 1)[-1].replace("|", "/")
if "error" in best:
    first = f"none: {why(best['error'])[:90]}"
    loom_mfu = loom_mem = "-"
else:
    b = best["best"][0]
    first = b["describe"]
    loom_mfu = f"{100 * b['mfu']:.1f}%"
    loom_mem = f"{b['peak_bytes'] / GiB:.1f}"
nano = f"{dp}x{tp}x{pp} GAS{gas} MBS{mbs} Z{zero}"
if "error" in theirs:
    on_theirs, ratio = why(theirs["error"]).split(": ")[-1][:80], "-"
else:
    fits = "" if theirs["fits"] else " (does not fit)"
    on_theirs = f"{100 * theirs['mfu']:.1f}%, {theirs['peak_bytes'] / GiB:.1f}{fits}"
    ratio = "-" if "error" in best else f"{theirs['step_s'] / best['best'][0]['step_s']:.2f}"
print(f"| {model} | {nodes} | {first} | {loom_mfu} | {loom_mem} | {nano} | {mfu}% | {memory} | {on_theirs} | {ratio} |")
EOF
done
