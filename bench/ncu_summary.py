#!/usr/bin/env python3
"""Where a decode step's GPU time goes: sums Nsight Compute's per-kernel gpu__time_duration over a window of
launches (ncu --csv --metrics gpu__time_duration.sum) by kernel name, as a table with shares.
Usage: ncu_summary.py NCU.csv [--steps N] [--sequence M]
  --steps N: decode steps inside the window (default: the sample_kernel launches)
  --sequence M: also list the window's first M launches in order, with grid sizes (one decode layer's kernels)"""
import argparse
import collections
import csv
import re


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=float, default=0)
    ap.add_argument("--sequence", type=int, default=0)
    a = ap.parse_args()
    lines = open(a.csv, errors="replace").read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    total = collections.Counter()
    count = collections.Counter()
    sequence = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = re.sub(r"\(.*", "", row["Kernel Name"]).split("<")[0].split("::")[-1] or row["Kernel Name"][:60]
        v = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        us = v * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(unit, 1e-3)
        total[name] += us
        count[name] += 1
        if len(sequence) < a.sequence:
            sequence.append((name, us, row.get("Grid Size", ""), row.get("Block Size", "")))
    all_us = sum(total.values())
    print(f"{'kernel':44s} {'launches':>8s} {'total us':>10s} {'share':>6s} {'us/launch':>9s}")
    for name, us in total.most_common():
        print(f"{name[:44]:44s} {count[name]:8d} {us:10.1f} {100 * us / all_us:5.1f}% {us / count[name]:9.2f}")
    print(f"{'all':44s} {sum(count.values()):8d} {all_us:10.1f}")
    for name, us, grid, block in sequence:
        print(f"  {name[:44]:44s} {us:9.2f} us  grid {grid} block {block}")
    # One sampling launch per decode step: without --steps, the window's steps are counted by it.
    steps = a.steps or count.get("sample_kernel", 0)
    if steps:
        print(f"per decode step ({steps:g} steps in the window): {all_us / steps:.1f} us of kernel time")
        for name, us in total.most_common(8):
            print(f"  {name[:42]:42s} {us / steps:9.1f} us/step")


if __name__ == "__main__":
    main()
