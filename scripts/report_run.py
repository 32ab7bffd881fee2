"""Print a markdown table of a finished run: held-out loss before/after, by step, time and throughput.

    python scripts/report_run.py --run runs/default [--command-seconds S]
"""

import argparse
import json
import math
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument("--command-seconds", type=float, help="wall time of the whole command, if measured")
    args = parser.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    steps = [m for m in metrics if "tokens_per_s" in m]
    before, after = summary["initial_eval_loss"], summary["final_eval_loss"]
    print("| measure | value |\n|---|---|")
    drop = 100 * (before - after) / before
    print(f"| held-out loss, before -> after | {before:.4f} -> {after:.4f} "
          f"(perplexity {math.exp(before):.1f} -> {math.exp(after):.1f}, {drop:.1f}% lower) |")
    print("| held-out loss by step | " + ", ".join(f"{s}: {v:.4f}" for s, v in evals) + " |")
    print(f"| training loop ({summary['steps']} steps, incl. the one-off compile and evaluations) | "
          f"{summary['train_seconds']:.0f} s |")
    print(f"| throughput, median step | {statistics.median(m['tokens_per_s'] for m in steps):.0f} tokens/s "
          f"({statistics.median(m['step_seconds'] for m in steps):.1f} s per step) |")
    if args.command_seconds:
        print(f"| whole command, wall time | {args.command_seconds:.0f} s |")


if __name__ == "__main__":
    main()
