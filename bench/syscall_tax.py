"""Syscall tax: nanoseconds added to every syscall by the syscalls probe.

A tight ``getppid`` loop (an unwatched process, like almost every process on a
node) is timed with, in alternating rounds:

    none      nothing attached
    floor     empty RAW_TRACEPOINT_PROBEs on sys_enter + sys_exit
    isoscope  bpf/syscalls.bpf.c as the daemon loads it (plus bpf/sched.bpf.c when present)
    watched   the same, with the loop's own process watched (per-thread state + histograms)
    syscount  ``syscount-bpfcc -L``, the reference tool

Each round measures every configuration once; the added cost of a
configuration is its ns/call minus the same round's ``none``, and the figure
reported is the median over rounds. The loop is timed in its own thread CPU
time (user + system, which includes the BPF programs run on its syscalls), so
other load on the machine preempting it does not inflate the figures. Run as root:

    .venv/bin/python bench/syscall_tax.py [--rounds 5] [--calls 2000000] [--write bench/results/syscall_tax.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

FLOOR_SRC = r"""
RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }
RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
"""

LOOP = r"""
import os, sys, time
n = int(sys.argv[1])
if len(sys.argv) > 2:
    sys.stdin.readline()
f = os.getppid
t0 = time.thread_time_ns()
for _ in range(n):
    f()
t1 = time.thread_time_ns()
print((t1 - t0) / n)
"""

RAW_TPS = (b"sys_enter", b"sys_exit")


def run_loop(calls: int, before_start: Callable[[int], None] | None = None) -> float:
    """ns per getppid() in a fresh process (``before_start(pid)`` runs before the loop starts)."""
    args = [sys.executable, "-c", LOOP, str(calls)] + (["wait"] if before_start else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if before_start:
        before_start(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, _ = proc.communicate(timeout=120)
    return float(out.strip())


class Toggle:
    """Attach / detach every (raw) tracepoint program of one loaded bcc module."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.raw = list(bpf.raw_tracepoint_fds)
        self.tps = list(bpf.tracepoint_fds)
        self.attached = True

    def off(self) -> None:
        if self.attached:
            for tp in self.raw:
                self.bpf.detach_raw_tracepoint(tp=tp)
            for tp in self.tps:
                self.bpf.detach_tracepoint(tp=tp)
            self.attached = False

    def on(self) -> None:
        if not self.attached:
            for tp in self.raw:
                self.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            for tp in self.tps:
                self.bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
            self.attached = True


class Group:
    """Several toggles switched together."""

    def __init__(self, toggles: list[Toggle]) -> None:
        self.toggles = toggles

    def off(self) -> None:
        for t in self.toggles:
            t.off()

    def on(self) -> None:
        for t in self.toggles:
            t.on()


def start_syscount() -> subprocess.Popen[str]:
    proc = subprocess.Popen(["syscount-bpfcc", "-L", "-i", "3600"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "Tracing" in line:
            return proc
    proc.kill()
    raise RuntimeError("syscount-bpfcc did not start")


def stop_syscount(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2_000_000)
    ap.add_argument("--no-syscount", action="store_true")
    ap.add_argument("--write", type=Path, help="write the figures as markdown to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from isoscope.kernel.env import prepare
    env = prepare()
    try:
        import bcc  # noqa: F401
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")
    from bcc import BPF

    from isoscope.model import Stats
    from isoscope.probes import catalog
    from isoscope.probes.loader import ProbeManager
    from isoscope.probes.watch import WatchSet
    from isoscope.probes.syscall_classes import fill_class_map

    specs = [catalog.SYSCALLS]
    with_sched = (ROOT / "bpf" / catalog.SCHED.source).exists()
    if with_sched:
        specs.append(catalog.SCHED)
    pm = ProbeManager(specs, env.features, lambda ev: None, Stats())
    statuses = {s.name: s for s in pm.load()}
    if not statuses["syscalls"].attached:
        print(f"syscalls probe did not attach: {statuses['syscalls'].reason}")
        return 1
    sched_loaded = with_sched and statuses["sched"].attached
    iso_bpf = pm.bpf("syscalls")
    fill_class_map(iso_bpf["syscall_class"])
    watch = WatchSet(pm.loaded_modules)
    # The sched probe (when present) is attached only in the isoscope rows, with the syscalls probe.
    iso = Group([Toggle(m) for m in pm.loaded_modules()])
    floor = Toggle(BPF(text=FLOOR_SRC))
    iso.off()
    floor.off()

    samples: dict[str, list[float]] = {k: [] for k in ("none", "floor", "isoscope", "watched", "syscount")}
    try:
        for r in range(args.rounds):
            samples["none"].append(run_loop(args.calls))
            floor.on()
            samples["floor"].append(run_loop(args.calls))
            floor.off()
            iso.on()
            samples["isoscope"].append(run_loop(args.calls))
            watched_pid: list[int] = []
            samples["watched"].append(run_loop(args.calls, lambda pid: (watch.add_tgid(pid),
                                                                       watched_pid.append(pid))))
            watch.remove_tgid(watched_pid[0])
            iso.off()
            if not args.no_syscount:
                sc = start_syscount()
                try:
                    samples["syscount"].append(run_loop(args.calls))
                finally:
                    stop_syscount(sc)
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in samples.items() if v),
                  flush=True)
    finally:
        pm.shutdown()

    rounds = len(samples["none"])
    added = {k: statistics.median(samples[k][i] - samples["none"][i] for i in range(rounds))
             for k in samples if k != "none" and samples[k]}
    base = statistics.median(samples["none"])
    result = {"baseline_ns": base, "added_ns": added, "rounds": rounds, "calls": args.calls,
              "sched_probe_loaded": sched_loaded,
              "isoscope_over_floor": added["isoscope"] / added["floor"] if added["floor"] > 0 else None,
              "isoscope_over_syscount": (added["isoscope"] / added["syscount"]
                                         if added.get("syscount", 0) > 0 else None)}
    print(json.dumps(result, indent=2))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(render(result))
    return 0


def render(r: dict[str, Any]) -> str:
    a = r["added_ns"]
    lines = [
        "## Syscall tax (`bench/syscall_tax.py`)",
        "",
        f"Tight `getppid()` loop in an unwatched Python process, timed in thread CPU time, "
        f"{r['calls']:,} calls per sample, "
        f"{r['rounds']} alternating rounds, median of per-round differences to the same round's bare run. "
        f"Bare: {r['baseline_ns']:.0f} ns per call (Python loop + syscall). "
        f"sched probe attached with the syscalls probe in the isoscope rows: "
        f"{'yes' if r['sched_probe_loaded'] else 'no (bpf/sched.bpf.c absent or not attached)'}.",
        "",
        "| attached | added ns/syscall | × floor |",
        "|---|---:|---:|",
    ]
    for key, label in (("floor", "empty raw tracepoints sys_enter+sys_exit (floor)"),
                       ("isoscope", "isoscope syscalls probe, unwatched process"),
                       ("watched", "isoscope syscalls probe, process watched (stalls + histograms)"),
                       ("syscount", "`syscount-bpfcc -L`")):
        if key in a:
            ratio = a[key] / a["floor"] if a["floor"] > 0 else float("nan")
            lines.append(f"| {label} | {a[key]:.0f} | {ratio:.2f} |")
    if r.get("isoscope_over_syscount") is not None:
        lines += ["", f"isoscope (unwatched) / syscount: {r['isoscope_over_syscount']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
