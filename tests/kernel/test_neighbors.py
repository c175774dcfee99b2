"""Who ran while a watched thread waited: the sched probe's neighbour split against the kernel's own accounting.

A pinned service process serves requests (a fixed amount of its own CPU time each) on one CPU
that it shares with busy loops. The oracle for each busy loop is its own on-CPU time
(``/proc/<pid>/schedstat``, first field) read by the service itself at the edges of every
request: the service is on the CPU at both reads, so whatever a busy loop ran in between ran
while the service waited. Everything is pinned to one CPU, so other load on the machine only
adds neighbours of its own; it cannot move a busy loop's time out of the service's waits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Iterator

import pytest

from isoscope.model import NEIGHBORS_DETAIL, RunqueueNeighbors, Stall
from isoscope.probes.watch import WatchSet
from tests.cgroup_helpers import Cgroup, make_cgroup
from tests.kernel.conftest_sched import SchedProbe, TEST_CPU, busy_procs, load_sched_probe, unique_name

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kernel

REQUESTS = 20
WORK_S = 0.02  # the service's own CPU time per request
GAP_S = 0.01   # idle between requests

SERVICE = r"""
import json, os, sys, time
hogs = [int(x) for x in sys.argv[1].split(",")]
n, work_ns, gap_s = int(sys.argv[2]), int(float(sys.argv[3]) * 1e9), float(sys.argv[4])
os.sched_setaffinity(0, {int(sys.argv[5])})
def on_cpu(pid):
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])
time.sleep(0.5)  # the probe decides "watched" at a switch-out: let it see this process first
out = []
for _ in range(n):
    c0 = [on_cpu(p) for p in hogs]
    t0 = time.monotonic_ns()
    s0 = time.thread_time_ns()
    while time.thread_time_ns() - s0 < work_ns:
        pass
    t1 = time.monotonic_ns()
    c1 = [on_cpu(p) for p in hogs]
    out.append([t0, t1, [b - a for a, b in zip(c0, c1)]])
    time.sleep(gap_s)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sched_probe(kernel_env: Any) -> Iterator[SchedProbe]:
    yield from load_sched_probe(kernel_env)


def set_weight(cg: Cgroup, shares: int) -> None:
    """CPU weight of a cgroup: v1 ``cpu.shares`` where the cpu controller is v1, else v2 ``cpu.weight``."""
    if "cpu" in cg.v1_paths:
        with open(os.path.join(cg.v1_paths["cpu"], "cpu.shares"), "w", encoding="ascii") as fh:
            fh.write(str(shares))
        return
    cg._enable_v2_controller("cpu")
    with open(os.path.join(cg.v2_path, "cpu.weight"), "w", encoding="ascii") as fh:
        fh.write(str(max(1, shares * 100 // 1024)))


def serve(sched_probe: SchedProbe, svc: Cgroup, hog_pids: list[int]) -> tuple[list[Any], list[Stall], int]:
    """Run the service in ``svc`` (watched) against the busy loops; returns (windows, its runqueue stalls, pid)."""
    import subprocess
    watch = WatchSet(sched_probe.manager.loaded_modules)
    watch.add_cgroup(svc.id)
    try:
        proc = svc.spawn([sys.executable, "-c", SERVICE, ",".join(map(str, hog_pids)), str(REQUESTS),
                          str(WORK_S), str(GAP_S), str(TEST_CPU)], stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(proc.pid, {TEST_CPU})
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        time.sleep(0.2)
        sched_probe.drain()
    finally:
        watch.remove_cgroup(svc.id)
    windows = json.loads(out)
    lo, hi = windows[0][0], windows[-1][1]
    # Waits that crossed one by one carry the split; the thread's short waits cross summed, without one.
    stalls = [s for s in sched_probe.stalls({proc.pid}, lo, hi)
              if s.component == "runqueue" and "sched.summary" not in (s.details or {})]
    return windows, stalls, proc.pid


def in_windows(stalls: list[Stall], windows: list[Any]) -> list[Stall]:
    """The waits that ended inside a request: the service was on the CPU at both oracle reads."""
    return [s for s in stalls if any(t0 < s.end_mono_ns <= t1 for t0, t1, _ in windows)]


def nb(stall: Stall) -> RunqueueNeighbors:
    got = (stall.details or {}).get(NEIGHBORS_DETAIL)
    assert isinstance(got, RunqueueNeighbors), f"runqueue stall of a watched thread without neighbours: {stall}"
    return got


def test_neighbours_match_their_cpu_time(sched_probe: SchedProbe) -> None:
    """Two busy loops in cgroups of weights 2:1: each one's share of the service's waits is its on-CPU time."""
    svc = make_cgroup(unique_name("nb-svc"), v1_controllers=("cpu",))
    heavy = make_cgroup(unique_name("nb-heavy"), v1_controllers=("cpu",))
    light = make_cgroup(unique_name("nb-light"), v1_controllers=("cpu",))
    svc_id, heavy_id, light_id = svc.id, heavy.id, light.id
    try:
        set_weight(heavy, 2048)
        set_weight(light, 1024)
        hogs = busy_procs(heavy, 1, secs=60) + busy_procs(light, 1, secs=60)
        windows, stalls, pid = serve(sched_probe, svc, [p.pid for p in hogs])
        totals_map = {(int(k.victim_id), int(k.neighbor_id)): int(v.value)
                      for k, v in sched_probe.bpf[b"runq_neighbors"].items()}
    finally:
        for cg in (svc, heavy, light):
            cg.remove()

    waits = in_windows(stalls, windows)
    assert waits, "no run-queue waits of the service inside its requests"
    oracle = [sum(w[2][i] for w in windows) for i in range(2)]
    got = [0, 0]
    for s in waits:
        split = nb(s)
        assert s.cgroup_id == svc_id
        # The split covers the wait: nothing of a busy loop's slices falls outside the CPU's history.
        assert abs(split.total_ns - s.duration_ns) <= max(1000, 0.001 * s.duration_ns), (split, s.duration_ns)
        for cg, ns in split.top:
            if cg == heavy_id:
                got[0] += ns
            elif cg == light_id:
                got[1] += ns
    logger.info("heavy: probe %.1f ms, schedstat %.1f ms; light: probe %.1f ms, schedstat %.1f ms; "
                "waits %.1f ms in %d records", got[0] / 1e6, oracle[0] / 1e6, got[1] / 1e6, oracle[1] / 1e6,
                sum(s.duration_ns for s in waits) / 1e6, len(waits))
    for i, name in enumerate(("heavy", "light")):
        # Each request's own CPU time is 20 ms with two busy loops on the CPU: they ran for a
        # large share of every request, a real oracle.
        assert oracle[i] > 0.2 * REQUESTS * WORK_S * 1e9, (name, oracle[i])
        assert abs(got[i] - oracle[i]) <= 0.10 * oracle[i], (name, got[i], oracle[i])
    # The kernel totals behind the metric hold at least what the records inside the requests say.
    assert totals_map.get((svc_id, heavy_id), 0) >= 0.95 * got[0]
    assert totals_map.get((svc_id, light_id), 0) >= 0.95 * got[1]


def test_own_threads_are_self_not_neighbours(sched_probe: SchedProbe) -> None:
    """A service whose only competition is its own cgroup's threads: that wait is self."""
    svc = make_cgroup(unique_name("nb-self"), v1_controllers=("cpu",))
    svc_id = svc.id
    try:
        hogs = busy_procs(svc, 2, secs=60)
        windows, stalls, pid = serve(sched_probe, svc, [p.pid for p in hogs])
    finally:
        svc.remove()

    waits = in_windows(stalls, windows)
    assert waits
    oracle = sum(sum(w[2]) for w in windows)
    self_ns = 0
    for s in waits:
        split = nb(s)
        assert all(cg != svc_id for cg, _ in split.top), split
        self_ns += split.self_ns
    logger.info("self: probe %.1f ms, schedstat %.1f ms", self_ns / 1e6, oracle / 1e6)
    assert oracle > 0.5 * REQUESTS * WORK_S * 1e9
    assert abs(self_ns - oracle) <= 0.10 * oracle, (self_ns, oracle)
