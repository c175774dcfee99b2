"""Context-switch tax of the sched probe: pipe ping-pong round trip, µs added.

Two processes pinned to one CPU bounce a byte over two pipes: each round trip
is 2 wake-ups + 2 context switches + 4 syscalls. The round trip is measured
with nothing attached, with bpf/sched.bpf.c attached, and with the reference
tool ``runqlat-bpfcc`` attached, interleaved in the same run (the median of
several rounds per configuration), so the added costs are comparable even on
a shared machine.

Usage: ``.venv/bin/python bench/switch_tax.py [--rounds 5] [--iters 200000]`` (root).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_harness import AttachedProbe, build_c, import_bcc  # noqa: E402

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


def round_trip_us(exe: str, iters: int, cpu: int) -> float:
    out = subprocess.run([exe, str(iters), str(cpu)], check=True, capture_output=True, text=True, timeout=120)
    return float(out.stdout.strip())


def sched_probe() -> AttachedProbe:
    """bpf/sched.bpf.c loaded through the daemon's loader, drained like the daemon does."""
    from isoscope.kernel.btf import sched_defines
    from isoscope.probes.catalog import SCHED

    import_bcc()
    return AttachedProbe(SCHED, defines=sched_defines(), poll_interval_s=0.05)


class RunqlatAttached:
    """The reference tool ``runqlat-bpfcc`` running (attached) in the background."""

    def __enter__(self) -> "RunqlatAttached":
        tool = shutil.which("runqlat-bpfcc") or "/usr/sbin/runqlat-bpfcc"
        self.proc = subprocess.Popen([tool, "3600", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "Tracing" not in line:
            self.proc.kill()
            raise RuntimeError(f"runqlat-bpfcc did not attach: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=100_000)
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--markdown", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    results: dict[str, list[float]] = {"bare": [], "sched": [], "runqlat": []}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c(tmp, "pingpong", PINGPONG_C, "-O2")
        round_trip_us(exe, args.iters // 10, args.cpu)  # warm-up
        for _ in range(args.rounds):
            results["bare"].append(round_trip_us(exe, args.iters, args.cpu))
            with sched_probe():
                time.sleep(0.2)
                results["sched"].append(round_trip_us(exe, args.iters, args.cpu))
            with RunqlatAttached():
                time.sleep(0.2)
                results["runqlat"].append(round_trip_us(exe, args.iters, args.cpu))

    med = {k: statistics.median(v) for k, v in results.items()}
    added_sched = med["sched"] - med["bare"]
    added_runqlat = med["runqlat"] - med["bare"]
    lines = [
        "## switch_tax — pipe ping-pong round trip (2 wake-ups + 2 switches + 4 syscalls), one CPU",
        "",
        f"{args.rounds} interleaved rounds × {args.iters} round trips, median per configuration.",
        "",
        "| attached | round trip µs | added µs |",
        "|---|---|---|",
        f"| nothing | {med['bare']:.2f} | 0 |",
        f"| isoscope sched probe | {med['sched']:.2f} | {added_sched:.2f} |",
        f"| runqlat-bpfcc | {med['runqlat']:.2f} | {added_runqlat:.2f} |",
        "",
        f"sched probe / runqlat added-cost ratio: {added_sched / added_runqlat:.2f}" if added_runqlat > 0 else
        "runqlat added no measurable cost in this run",
        "",
        "raw (µs): " + "; ".join(f"{k}=" + ",".join(f"{x:.2f}" for x in v) for k, v in results.items()),
    ]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0 if added_sched <= max(added_runqlat, 0.0) + 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
