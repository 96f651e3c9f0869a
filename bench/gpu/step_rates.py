"""Prints the tokens/s and MFU of a run's steps from --from on, from its metrics.jsonl."""
import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("metrics")
parser.add_argument("--from", dest="first", type=int, default=3)
args = parser.parse_args()
with open(args.metrics) as f:
    rows = [json.loads(line) for line in f]
rows = [r for r in rows if r.get("step", 0) >= args.first and "tokens_per_s" in r]
print(" ".join(f"{r['tokens_per_s']:.0f} ({100 * r['mfu']:.1f}%)" for r in rows) or "no steps")
