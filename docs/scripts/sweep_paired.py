"""Paired differences of test accuracy between arms of a compare sweep, seed by seed.

    python docs/scripts/sweep_paired.py docs/results/compare_sweep.json

Every arm's run with seed s uses the same training set and the same
initialisation seed, so arm A minus arm B per seed removes the part of the
spread that the seed itself causes. Prints a markdown table.
"""
import itertools
import json
import statistics
import sys

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = json.load(f)
    accuracy = {arm: [r["test"]["accuracy"] for r in a["runs"]] for arm, a in result["arms"].items()}
    print("| A - B | mean | sd | min | max | seeds where A > B |")
    print("|---|---:|---:|---:|---:|---:|")
    for a, b in itertools.combinations(accuracy, 2):
        diff = [x - y for x, y in zip(accuracy[a], accuracy[b])]
        wins = sum(d > 0 for d in diff)
        print(f"| {a} - {b} | {statistics.fmean(diff):+.3f} | {statistics.stdev(diff):.3f} | "
              f"{min(diff):+.3f} | {max(diff):+.3f} | {wins} of {len(diff)} |")
