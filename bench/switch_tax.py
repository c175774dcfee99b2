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
    sched_nb0     the sched probe alone (bpf/sched.bpf.c), neighbour accounting compiled out
                  (``ISO_SCHED_NEIGHBORS=0``), the pair unwatched
    sched_nb1     the same with neighbour accounting on (the default): the per-switch slice-ring write
    sched_nb0_w,  the same two with the pair in a watched cgroup (the ping-pong's waits are µs, below
    sched_nb1_w   the scan's threshold: a watched thread pays the ring write and the per-wait check)

The daemon is started for each round (and stopped after it). On a shared machine other load only ever
adds time, so each sample is the minimum of ``--repeat`` runs and a round's baseline is the lower of
``none`` at its start and at its end. The added cost of a row is its round trip minus the round's
baseline; the figure reported is the median over rounds. Run as root:

    .venv/bin/python bench/switch_tax.py [--rounds 5] [--iters 50000] [--repeat 3] [--markdown bench/results/switch_tax.md]

Acceptance (exit status 1 otherwise): daemon ≤ runqlat in the same run (aim: ½); neighbour accounting adds
at most 20 % to the sched probe's own added cost (sched_nb1 vs sched_nb0, and watched), in the same run.
``--sched-only`` runs only the bare and the four sched-probe rows.
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

ROWS = ("none", "floor", "runqlat", "syscount", "daemon", "watched", "sched_nb0", "sched_nb1", "sched_nb0_w",
        "sched_nb1_w")
NEIGHBOR_TAX_LIMIT = 1.20
"""Neighbour accounting may raise the sched probe's added cost by at most this factor."""
LABELS = {
    "none": "nothing",
    "floor": "empty raw tracepoints sched_switch + sched_wakeup (floor)",
    "runqlat": "`runqlat-bpfcc`",
    "syscount": "`syscount-bpfcc -L`",
    "daemon": "**whole isoscope daemon, default probes; unwatched pair**",
    "watched": "whole isoscope daemon; pair in a watched cgroup",
    "sched_nb0": "sched probe alone, neighbour accounting off; unwatched pair",
    "sched_nb1": "sched probe alone, neighbour accounting on; unwatched pair",
    "sched_nb0_w": "sched probe alone, neighbour accounting off; watched pair",
    "sched_nb1_w": "sched probe alone, neighbour accounting on; watched pair",
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


class SwitchableProbe:
    """A probe compiled and loaded once, its raw tracepoints attached only inside ``with``.

    Lets rounds alternate variants of one probe (compiled with different defines) without
    compiling each time; its maps (task state, watch set) stay loaded in between.
    """

    def __init__(self, spec: Any, defines: dict[str, int]) -> None:
        from probe_harness import AttachedProbe

        self.probe = AttachedProbe(spec, defines=defines).__enter__()
        self.tracepoints = list(self.probe.bpf.raw_tracepoint_fds)
        self._set(False)

    def _set(self, on: bool) -> None:
        for tp in self.tracepoints:
            if on:
                self.probe.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
            else:
                self.probe.bpf.detach_raw_tracepoint(tp=tp)

    def __enter__(self) -> "SwitchableProbe":
        self._set(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._set(False)

    def close(self) -> None:
        self.probe.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per sample; the sample is their minimum")
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--no-reference", action="store_true", help="skip runqlat and syscount")
    parser.add_argument("--sched-only", action="store_true",
                        help="only the bare run and the sched probe with and without neighbour accounting")
    parser.add_argument("--markdown", "--write", dest="markdown", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if os.geteuid() != 0:
        print("bench/switch_tax.py needs root (eBPF, cgroups)", file=sys.stderr)
        return 2
    prov = provenance(argv if argv is None else [__file__, *argv])

    from isoscope.host.cgroupfs import cgroup_v2_root
    from isoscope.probes.catalog import SCHED
    from isoscope.probes.watch import WatchSet

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
        sched_variants = {nb: SwitchableProbe(SCHED, {"ISO_SCHED_NEIGHBORS": nb}) for nb in (0, 1)}
        for variant in sched_variants.values():
            WatchSet(variant.probe.manager.loaded_modules).add_cgroup(watched_dir.stat().st_ino)
        try:
            for r in range(args.rounds):
                def measure(before_start: Callable[[int], None] | None = None) -> float:
                    # Interference from other load only ever adds time: keep the least of a few runs.
                    return min(round_trip_us(exe, args.iters, args.cpu, before_start) for _ in range(args.repeat))

                none_start = measure()
                if not args.sched_only:
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
                # Off, on, on, off (ABBA): a drift of the machine's load over the round favours
                # neither; each variant's sample is the lesser of its two.
                got: dict[str, list[float]] = {}
                for nb in (0, 1, 1, 0):
                    with sched_variants[nb]:
                        got.setdefault(f"sched_nb{nb}", []).append(measure())
                        got.setdefault(f"sched_nb{nb}_w", []).append(measure(
                            lambda pid: (watched_dir / "cgroup.procs").write_text(str(pid))))
                for key, samples in got.items():
                    results[key].append(min(samples))
                results["none"].append(min(none_start, measure()))
                print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in results.items() if v),
                      flush=True)
        finally:
            floor.close()
            for variant in sched_variants.values():
                variant.close()
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
    # Neighbour accounting's own share: the sched probe's added cost with it over without (medians).
    nb_ratio = {("unwatched" if not suffix else "watched"):
                added[f"sched_nb1{suffix}"] / max(1e-3, added[f"sched_nb0{suffix}"]) for suffix in ("", "_w")}
    nb_ok = all(v <= NEIGHBOR_TAX_LIMIT for v in nb_ratio.values())
    with open("/proc/loadavg", encoding="ascii") as f:
        load_after = " ".join(f.read().split()[:3])
    r = {"provenance": prov, "daemon_command": daemon_command(), "daemon_config": config, "rounds": rounds,
         "iters": args.iters, "repeat": args.repeat, "cpu": args.cpu,
         "load_average": {"start": load_before, "end": load_after}, "median_us": med, "added_us": added, "samples_us": results,
         "daemon_over_runqlat": ratio, "acceptance": "met" if ok else "NOT met",
         "neighbor_on_over_off": nb_ratio, "neighbor_acceptance": "met" if nb_ok else "NOT met"}
    print(json.dumps(r, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(render(r))
    return 0 if ok and nb_ok else 1


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
    nb = r.get("neighbor_on_over_off") or {}
    if nb:
        lines.append("")
        lines.append("Sched probe's added cost with / without neighbour accounting (median of per-round ratios): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in nb.items())
                     + f" (target ≤ {NEIGHBOR_TAX_LIMIT:.2f}): {r['neighbor_acceptance']}.")
    lines += ["", "Raw µs per round: " + "; ".join(
        f"{k}=" + ",".join(f"{x:.2f}" for x in v) for k, v in r["samples_us"].items() if v)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
