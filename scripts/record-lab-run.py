#!/usr/bin/env python3
"""Keeps a lab run as a replay recording: lab/recordings/<run>.tar.gz (the
server's event store: its segments and index with the pods, without the
incidents; docs/storage.md) and lab/recordings/<run>.json (the scenario, its
known answer and when the fault began), <run> being the run directory's name
(<scenario>-<date>-<time>). Older recordings are <run>.sqlite.gz, a store of
the row-per-event layout, which the server converts when it opens one.

    scripts/record-lab-run.py lab-runs/oom-kill-20261127-163302 [...]

The replay tests (Tests/TapioServerTests/RecordedRunTests.swift) and
`tapio-server calibrate` read them."""
import datetime, json, os, re, shutil, sqlite3, sys, tarfile, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "lab", "recordings")


def fault_ns(run_dir, day):
    """Wall time of the first FAULT line of report.txt (the lab prints UTC)."""
    for line in open(os.path.join(run_dir, "report.txt")):
        m = re.match(r"\s*(\d\d):(\d\d):(\d\d)\.(\d\d\d)\s+\+\s*[\d.]+s\s+FAULT", line)
        if m:
            h, mi, s, ms = map(int, m.groups())
            t = datetime.datetime(day.year, day.month, day.day, h, mi, s, ms * 1000, tzinfo=datetime.timezone.utc)
            return int(t.timestamp()) * 1_000_000_000 + ms * 1_000_000
    return None


def record(run_dir):
    report = json.load(open(os.path.join(run_dir, "report.json")))
    scenario = report["scenario"]
    name = os.path.basename(os.path.normpath(run_dir))
    stamp = re.search(r"(\d{8})-(\d{6})$", os.path.basename(os.path.normpath(run_dir)))
    day = datetime.datetime.strptime(stamp.group(1), "%Y%m%d")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(run_dir, "data")
        db = os.path.join(tmp, "events.sqlite")
        # The index with its WAL folded in (a copy of the main file alone
        # could miss the last commits).
        src = sqlite3.connect(os.path.join(data, "events.sqlite"))
        dst = sqlite3.connect(db)
        src.backup(dst)
        src.close()
        dst.executescript("DELETE FROM incidents; VACUUM;")
        dst.close()
        with tarfile.open(os.path.join(OUT, name + ".tar.gz"), "w:gz", compresslevel=9) as tar:
            tar.add(db, arcname="events.sqlite")
            tar.add(os.path.join(data, "segments"), arcname="segments")
    meta = {
        "scenario": scenario,
        "expected": report["expected"],
        "fault_ns": fault_ns(run_dir, day),
        "run": os.path.basename(os.path.normpath(run_dir)),
        "live": {"reported": report["reported"][:3], "ac1": report["ac1"], "ac3": report["ac3"]},
    }
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name}: {os.path.getsize(os.path.join(OUT, name + '.tar.gz'))} bytes, fault at {meta['fault_ns']}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for d in sys.argv[1:]:
        record(d)
