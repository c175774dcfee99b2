"""Context-switch tax of the whole isoscope daemon: pipe ping-pong round trip, µs added.

Two processes pinned to one CPU bounce a byte over two pipes: each round trip is 2 wake-ups + 2 context
switches + 4 syscalls (read/write). Timed in each round, with:

    none          nothing attached by this run
    floor         empty RAW_TRACEPOINT_PROBEs on sched_switch + sched_wakeup
    runqlat       ``runqlat-bpfcc`` (the reference tool for scheduler hooks)
    syscount      ``syscount-bpfcc -L`` (what the 4 syscalls alone cost with the syscall reference)
    daemon        ``isoscope run`` with its default probes, the ping-pong pair unwatched
    watched       the same daemon, the pair in a cgroup the daemon watches (``probes.watch_cgroups``):
                  on-CPU segments for steal, syscall timing

The daemon is started for each round (and stopped after it). On a shared machine other load only ever
adds time, so each sample is the minimum of ``--repeat`` runs and a round's baseline is the lower of
``none`` at its start and at its end. The added cost of a row is its round trip minus the round's
baseline; the figure reported is the median over rounds. Run as root:

    .venv/bin/python bench/switch_tax.py [--rounds 5] [--iters 50000] [--repeat 3] [--markdown bench/results/switch_tax.md]

Acceptance (exit status 1 otherwise): daemon ≤ runqlat in the same run (aim: ½).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_harness import (EmptyPrograms, ReferenceTool, build_c, daemon_command, provenance,  # noqa: E402
                           provenance_lines, whole_daemon)

logger = logging.getLogger(__name__)

PINGPONG_C = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long n = atol(argv[1]); int cpu = atoi(argv[2]);
    if (argc > 3) { char b[8]; if (read(0, b, sizeof b) <= 0) return 3; }   /* wait for "go" */
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(cpu, &set); sched_setaffinity(0, sizeof(set), &set);
    int a[2], b[2]; char c = 0;
    if (pipe(a) || pipe(b)) return 1;
    pid_t pid = fork();
    if (pid == 0) { for (long i = 0; i < n; i++) { read(a[0], &c, 1); write(b[1], &c, 1); } _exit(0); }
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) { write(a[1], &c, 1); read(b[0], &c, 1); }
    clock_gettime(CLOCK_MONOTONIC, &t1); waitpid(pid, 0, 0);
    printf("%.4f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n / 1000.0);
    return 0;
}
"""

ROWS = ("none", "floor", "runqlat", "syscount", "daemon", "watched")
LABELS = {
    "none": "nothing",
    "floor": "empty raw tracepoints sched_switch + sched_wakeup (floor)",
    "runqlat": "`runqlat-bpfcc`",
    "syscount": "`syscount-bpfcc -L`",
    "daemon": "**whole isoscope daemon, default probes; unwatched pair**",
    "watched": "whole isoscope daemon; pair in a watched cgroup",
}
WATCH_PREFIX = f"/isoscope-bench-switch-tax-{os.getpid()}"


def round_trip_us(exe: str, iters: int, cpu: int, before_start: Callable[[int], None] | None = None) -> float:
    """µs per round trip in a fresh pair (``before_start(pid)`` runs before it forks and starts)."""
    args = [exe, str(iters), str(cpu)] + (["wait"] if before_start else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if before_start:
            before_start(proc.pid)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the ping-pong exited with {proc.returncode}")
    return float(out.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per sample; the sample is their minimum")
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--no-reference", action="store_true", help="skip runqlat and syscount")
    parser.add_argument("--markdown", "--write", dest="markdown", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if os.geteuid() != 0:
        print("bench/switch_tax.py needs root (eBPF, cgroups)", file=sys.stderr)
        return 2
    prov = provenance(argv if argv is None else [__file__, *argv])

    from isoscope.host.cgroupfs import cgroup_v2_root

    v2 = cgroup_v2_root()
    if v2 is None:
        print("no cgroup v2 hierarchy: the watched row needs one", file=sys.stderr)
        return 2
    watched_dir = Path(v2) / WATCH_PREFIX.lstrip("/")
    config = {"probes": {"watch_cgroups": [WATCH_PREFIX]}}
    results: dict[str, list[float]] = {k: [] for k in ROWS}
    with open("/proc/loadavg", encoding="ascii") as f:
        load_before = " ".join(f.read().split()[:3])
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c(tmp, "pingpong", PINGPONG_C, "-O2")
        round_trip_us(exe, args.iters // 10, args.cpu)  # warm-up
        floor = EmptyPrograms(["sched_switch", "sched_wakeup"])
        watched_dir.mkdir(exist_ok=True)  # before the daemon starts: it watches matching cgroups at start
        try:
            for r in range(args.rounds):
                def measure(before_start: Callable[[int], None] | None = None) -> float:
                    # Interference from other load only ever adds time: keep the least of a few runs.
                    return min(round_trip_us(exe, args.iters, args.cpu, before_start) for _ in range(args.repeat))

                none_start = measure()
                with floor:
                    results["floor"].append(measure())
                if not args.no_reference:
                    with ReferenceTool(["runqlat-bpfcc", "3600", "1"]):
                        results["runqlat"].append(measure())
                    with ReferenceTool(["syscount-bpfcc", "-L", "-i", "3600"]):
                        results["syscount"].append(measure())
                with whole_daemon(config):
                    results["daemon"].append(measure())
                    results["watched"].append(measure(
                        lambda pid: (watched_dir / "cgroup.procs").write_text(str(pid))))
                results["none"].append(min(none_start, measure()))
                print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in results.items() if v),
                      flush=True)
        finally:
            floor.close()
            try:
                watched_dir.rmdir()
            except OSError:
                logger.warning("could not remove %s", watched_dir)

    rounds = len(results["none"])
    added = {k: statistics.median(results[k][i] - results["none"][i] for i in range(rounds))
             for k in ROWS if results[k]}
    med = {k: statistics.median(v) for k, v in results.items() if v}
    ratio = added["daemon"] / added["runqlat"] if added.get("runqlat", 0) > 0 else None
    ok = ratio is None or ratio <= 1.0
    with open("/proc/loadavg", encoding="ascii") as f:
        load_after = " ".join(f.read().split()[:3])
    r = {"provenance": prov, "daemon_command": daemon_command(), "daemon_config": config, "rounds": rounds,
         "iters": args.iters, "repeat": args.repeat, "cpu": args.cpu,
         "load_average": {"start": load_before, "end": load_after}, "median_us": med, "added_us": added, "samples_us": results,
         "daemon_over_runqlat": ratio, "acceptance": "met" if ok else "NOT met"}
    print(json.dumps(r, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render(r))
    return 0 if ok else 1


def render(r: dict[str, Any]) -> str:
    lines = [
        "## Switch tax (`bench/switch_tax.py`): pipe ping-pong round trip (2 wake-ups + 2 switches + "
        "4 syscalls), one CPU",
        "",
        *provenance_lines(r["provenance"]),
        "",
        f"Daemon: `{r['daemon_command']}` with `{json.dumps(r['daemon_config'])}` (default probes), "
        "started for each round.",
        "",
        f"{r['rounds']} rounds × {r['iters']:,} round trips on CPU {r['cpu']}, each sample the least of "
        f"{r['repeat']} runs; added = median of per-round differences to the round's bare run (the lower of "
        f"its start and end). Load average (shared machine) {r['load_average']['start']} at start, "
        f"{r['load_average']['end']} at end.",
        "",
        "| attached | round trip µs (median) | added µs |",
        "|---|---:|---:|",
    ]
    for key in ROWS:
        if key in r["median_us"]:
            lines.append(f"| {LABELS[key]} | {r['median_us'][key]:.2f} | {r['added_us'][key]:.2f} |")
    lines.append("")
    if r["daemon_over_runqlat"] is not None:
        lines.append(f"Whole daemon / runqlat added-cost ratio: {r['daemon_over_runqlat']:.2f} "
                     f"(target ≤ 1, aim 0.5): {r['acceptance']}.")
    lines += ["", "Raw µs per round: " + "; ".join(
        f"{k}=" + ",".join(f"{x:.2f}" for x in v) for k, v in r["samples_us"].items() if v)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
