"""Prints the tokens/s and MFU of a run's steps from --from on, from its metrics.jsonl;
with --mean, also their mean (total tokens over total time)."""
import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("metrics")
parser.add_argument("--from", dest="first", type=int, default=3)
parser.add_argument("--mean", action="store_true")
args = parser.parse_args()
with open(args.metrics) as f:
    rows = [json.loads(line) for line in f]
rows = [r for r in rows if r.get("step", 0) >= args.first and "tokens_per_s" in r]
line = " ".join(f"{r['tokens_per_s']:.0f} ({100 * r['mfu']:.1f}%)" for r in rows) or "no steps"
if args.mean and rows:
    # Each row's tokens_per_s covers one step (logging.interval 1): the mean
    # rate is the steps' tokens over their summed times.
    seconds = sum(1.0 / r["tokens_per_s"] for r in rows)
    mean = len(rows) / seconds
    mfu = mean * rows[-1]["mfu"] / rows[-1]["tokens_per_s"]
    line += f"; mean {mean:.0f} ({100 * mfu:.2f}%)"
print(line)
