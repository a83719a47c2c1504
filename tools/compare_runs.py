"""Compare runs from their log.jsonl: loss step by step, and throughput. For DDP checks: the same
global batch on 1, 2 and 4 GPUs should give the same loss curve (up to bf16 noise) and N times the
tokens/s.

    python tools/compare_runs.py out-ddp1:1 out-ddp2:2 out-ddp4:4      # out_dir:number of GPUs

Prints each logged step's training loss per run and its difference from the first run, then per
run: the largest such difference, the median tokens/s (steps after --skip, which leaves out
compilation) and tokens/s per GPU, and its scaling efficiency against the first run per GPU.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def load(run):
    path, _, gpus = run.partition(":")
    log = Path(path) / "log.jsonl"
    if not log.is_file():
        sys.exit(f"error: {log} not found: give out_dir:gpus of finished train.py runs")
    if gpus and not (gpus.isdigit() and int(gpus) >= 1):
        sys.exit(f"error: {run!r}: the number of GPUs after ':' must be a whole number >= 1")
    records = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return path, int(gpus or 1), {r["iter"]: r for r in records if "loss" in r}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="out_dir or out_dir:gpus")
    p.add_argument("--skip", type=int, default=10, help="steps left out of the tokens/s median")
    args = p.parse_args()
    runs = [load(r) for r in args.runs]
    steps = sorted(set.intersection(*(set(steps) for _, _, steps in runs)))
    print("step " + " ".join(f"{path:>16}" for path, _, _ in runs))
    for it in steps:
        first = runs[0][2][it]["loss"]
        print(f"{it:4} " + " ".join(f"{s[it]['loss']:.4f} ({s[it]['loss'] - first:+.4f})".rjust(16) for _, _, s in runs))
    base = None
    for path, gpus, s in runs:
        diff = max((abs(s[it]["loss"] - runs[0][2][it]["loss"]) for it in steps), default=float("nan"))
        speeds = [r["tokens_per_s"] for it, r in s.items() if it >= args.skip]
        tps = statistics.median(speeds) if speeds else float("nan")
        base = base or tps / gpus
        print(f"{path}: {gpus} GPU(s), max |loss - first run's| {diff:.4f}, {tps:,.0f} tokens/s, "
              f"{tps / gpus:,.0f} per GPU, scaling efficiency {tps / gpus / base:.1%}")


if __name__ == "__main__":
    main()
