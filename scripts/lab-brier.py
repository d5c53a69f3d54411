#!/usr/bin/env python3
"""Calibration of the engine's top-1 confidence over recorded lab runs.

For every run report (lab-runs/*/report.json, or the directories given), the
top-1 reported cause's confidence c and whether it is an expected cause y
(healthy runs: no report is correct; a report on a healthy run counts as a
wrong top-1) give the Brier score mean((c - y)^2) and a reliability table.

    scripts/lab-brier.py [RUN_DIR ...]
"""
import glob
import json
import os
import sys

dirs = sys.argv[1:] or sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "lab-runs", "*")))
samples = []
for d in dirs:
    path = os.path.join(d, "report.json")
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    reported = r.get("reported") or []
    expected = {(e["entity"], e["kind"]) for e in r.get("expected") or []}
    if not reported:
        continue  # no top-1, no confidence to score
    top = reported[0]
    samples.append((r["scenario"], float(top["confidence"]), 1.0 if (top["entity"], top["kind"]) in expected else 0.0))

if not samples:
    sys.exit("no run reports with a reported cause")
brier = sum((c - y) ** 2 for _, c, y in samples) / len(samples)
print(f"runs with a top-1: {len(samples)}   Brier score of top-1 confidence: {brier:.3f}")
print("confidence bin   runs   mean confidence   share correct")
for lo in (0.0, 0.5, 0.7, 0.8, 0.9):
    hi = {0.0: 0.5, 0.5: 0.7, 0.7: 0.8, 0.8: 0.9, 0.9: 1.01}[lo]
    b = [(c, y) for _, c, y in samples if lo <= c < hi]
    if b:
        print(f"[{lo:.1f}, {min(hi, 1.0):.1f})      {len(b):>4}   {sum(c for c, _ in b) / len(b):>15.2f}   {sum(y for _, y in b) / len(b):>13.2f}")
