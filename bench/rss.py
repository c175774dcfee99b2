#!/usr/bin/env python3
"""Daemon memory in steady state with many cgroups and threads tracked.

Starts `isoscope run` with every probe and `probes.watch_all` (so every thread
is followed in the kernel and in the timeline), creates N real cgroups (v2,
each with a sleeping process) and M threads that wake up periodically (so they
have run-queue waits and on-CPU segments), sends spans from each workload
process, and samples the daemon's RSS. Baseline in the same run: the same
daemon with no workload. Prints the figures; `--markdown FILE` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from isoscope_lab import daemon_for_lab  # noqa: E402
from probe_harness import provenance, provenance_lines  # noqa: E402  (this folder is on sys.path)
V2 = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified/cgroup.procs") or os.path.exists(
    "/sys/fs/cgroup/unified/cgroup.procs") else "/sys/fs/cgroup"

THREADS_CHILD = r"""
import os, sys, threading, time
n = int(sys.argv[1])
def worker():
    while True:
        time.sleep(0.5)
for _ in range(n):
    threading.Thread(target=worker, daemon=True).start()
print("ready", flush=True)
time.sleep(3600)
"""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def status(base: str) -> dict:
    # Generous: with every thread of a 20,000-thread node followed, the daemon is saturated and its
    # admin server answers late; the figures read here are counts, not latencies.
    return json.load(urllib.request.urlopen(base + "/debug/status", timeout=60))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cgroups", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=20000)
    ap.add_argument("--settle", type=float, default=30.0, help="seconds of steady state before sampling")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    origin = provenance()
    tmp = tempfile.mkdtemp(prefix="isoscope-rss-")
    # watch_all: every thread is followed in the kernel and in the timeline (the worst case).
    lab = daemon_for_lab(os.path.join(tmp, "traces.jsonl"), config={"probes": {"watch_all": True}},
                         inherit_env_overrides=True).start()
    daemon, base = lab.proc, lab.metrics_base
    procs: list[subprocess.Popen] = []
    cgdirs: list[str] = []
    try:
        time.sleep(3)
        idle = rss_kb(daemon.pid)
        # N cgroups, one sleeping process each
        for i in range(args.cgroups):
            d = os.path.join(V2, f"isoscope-bench-rss-{i}")
            os.makedirs(d, exist_ok=True)
            cgdirs.append(d)
            p = subprocess.Popen(["sleep", "3600"])
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(p.pid))
            procs.append(p)
        # M threads in processes of 1000 threads
        per = 1000
        for _ in range(max(1, args.threads // per)):
            p = subprocess.Popen([sys.executable, "-c", THREADS_CHILD, str(per)], stdout=subprocess.PIPE, text=True)
            procs.append(p)
            p.stdout.readline()
        t0 = time.time()
        peak = 0
        while time.time() - t0 < args.settle:
            peak = max(peak, rss_kb(daemon.pid))
            time.sleep(1)
        steady = rss_kb(daemon.pid)
        st = status(base)
        rows = {
            "cgroups created": args.cgroups,
            "threads waking every 0.5 s": args.threads,
            "daemon RSS idle (MB)": round(idle / 1024, 1),
            "daemon RSS steady (MB)": round(steady / 1024, 1),
            "daemon RSS peak (MB)": round(peak / 1024, 1),
            "timeline threads tracked": st["timeline"]["threads"],
            "timeline records held": st["timeline"]["records"],
            "ceiling (MB)": 200,
            "verdict": "PASS" if steady / 1024 <= 200 else "FAIL",
        }
        for k, v in rows.items():
            print(f"{k:32s} {v}")
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("## Daemon memory (bench/rss.py)\n\n" + "\n".join(provenance_lines(origin))
                        + "\n\n| figure | value |\n|---|---|\n")
                for k, v in rows.items():
                    f.write(f"| {k} | {v} |\n")
        return 0 if rows["verdict"] == "PASS" else 1
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        lab.stop()
        for d in cgdirs:
            try:
                os.rmdir(d)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
