"""The sched probe against the kernel's own accounting, with real workloads in real cgroups.

Oracles: ``/proc/<tid>/schedstat`` (on-CPU ns, run_delay ns) read over the
same interval as the probe's per-thread counters.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import pytest

from isoscope.probes.watch import WatchSet
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sched import (SchedProbe, TEST_CPU, busy_procs, load_sched_probe, measure,
                                         schedstat, unique_name)

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.kernel

WINDOW_S = 2.0


@pytest.fixture(scope="module")
def sched_probe(kernel_env: Any) -> Iterator[SchedProbe]:
    yield from load_sched_probe(kernel_env)


def test_btf_offsets_checked_by_the_kernel(sched_probe: SchedProbe) -> None:
    """The pid/tgid offsets from BTF agree with the kernel's helpers on every exit seen."""
    import subprocess
    for _ in range(3):
        subprocess.run(["true"], check=True)
    time.sleep(0.1)
    ok, bad = (int(v.value) for v in sched_probe.bpf["btf_check"].values())
    assert ok >= 3
    assert bad == 0


def test_contention_matches_run_delay_and_is_runqueue(sched_probe: SchedProbe) -> None:
    """Three busy loops on one CPU without quota: waits = run_delay, ≥95 % runqueue, stalls sum up."""
    cg = make_cgroup(unique_name("contention"), v1_controllers=("cpu",))
    cgid = cg.id
    try:
        procs = busy_procs(cg, 3, secs=WINDOW_S + 2.0)
        tids = [p.pid for p in procs]
        watch = WatchSet(sched_probe.manager.loaded_modules)
        for t in tids:
            watch.add_tgid(t)
        time.sleep(0.5)  # past interpreter start-up; every worker has probe state
        hist0, tot0 = sched_probe.hist_count(cgid), sched_probe.cgroup(cgid)
        w = measure(sched_probe, tids, WINDOW_S)
        hist1, tot1 = sched_probe.hist_count(cgid), sched_probe.cgroup(cgid)
        time.sleep(0.2)
        sched_probe.drain()
        for t in tids:
            watch.remove_tgid(t)
    finally:
        cg.remove()

    total_runq = total_thr = 0
    for t in tids:
        runq, thr = w.probe[t]
        total_runq += runq
        total_thr += thr
        logger.info("tid %d: probe runq %.1f ms thr %.1f ms, run_delay %.1f ms", t, runq / 1e6, thr / 1e6,
                    w.run_delay[t] / 1e6)
        # Three loops sharing a CPU wait roughly 2/3 of the time: a real, large oracle.
        assert w.run_delay[t] > 0.3 * WINDOW_S * 1e9
        assert abs((runq + thr) - w.run_delay[t]) <= 0.05 * w.run_delay[t]
    assert total_runq >= 0.95 * (total_runq + total_thr)

    # Per-cgroup aggregates: histogram counts every wait that the totals count.
    d_waits = tot1[2] - tot0[2]
    assert d_waits > 0
    assert abs((hist1 - hist0) - d_waits) <= max(2, 0.01 * d_waits)
    assert tot1[0] - tot0[0] >= 0.9 * total_runq  # the cgroup holds (at least) these threads' waits

    # Watched threads' stall records add up to their counters (CFS slices are ms, far above 100 µs).
    stalls = sched_probe.stalls(set(tids), w.start_ns, w.end_ns)
    assert stalls, "no stall records for watched threads"
    for t in tids:
        mine = [s for s in stalls if s.tid == t]
        assert all(s.component in ("runqueue", "cpu_throttle") for s in mine)
        assert all(s.pid == t and s.cgroup_id == cgid and s.cpu == TEST_CPU for s in mine)
        got = sum(s.duration_ns for s in mine)
        want = sum(w.probe[t])
        assert abs(got - want) <= 0.05 * want, (t, got, want)


def test_run_segments_match_on_cpu_time(sched_probe: SchedProbe) -> None:
    """On-CPU segments of a watched thread sum to its schedstat on-CPU time."""
    cg = make_cgroup(unique_name("runseg"), v1_controllers=("cpu",))
    cgid = cg.id
    try:
        procs = busy_procs(cg, 2, secs=3.0)
        tids = [p.pid for p in procs]
        watch = WatchSet(sched_probe.manager.loaded_modules)
        watch.add_cgroup(cgid)
        time.sleep(0.3)
        sched_probe.drain()
        t0 = time.monotonic_ns()
        on0 = {t: schedstat(t)[0] for t in tids}
        time.sleep(1.5)
        on1 = {t: schedstat(t)[0] for t in tids}
        t1 = time.monotonic_ns()
        time.sleep(0.1)
        sched_probe.drain()
        watch.remove_cgroup(cgid)
    finally:
        cg.remove()
    for t in tids:
        segs = [s for s in sched_probe.runs({t}) if s.end_mono_ns > t0 and s.start_mono_ns < t1]
        assert segs
        assert all(s.cpu == TEST_CPU and s.cgroup_id == cgid for s in segs)
        got = sum(min(s.end_mono_ns, t1) - max(s.start_mono_ns, t0) for s in segs)
        want = on1[t] - on0[t]
        assert want > 0.2e9
        assert abs(got - want) <= 0.05 * want, (t, got, want)


def test_exited_threads_leave_no_state(sched_probe: SchedProbe) -> None:
    """Per-task entries are deleted at exit."""
    cg = make_cgroup(unique_name("exit"), v1_controllers=("cpu",))
    try:
        procs = busy_procs(cg, 2, secs=0.3)
        tids = [p.pid for p in procs]
        time.sleep(0.1)
        assert all(sched_probe.entry(t) is not None for t in tids)
        for p in procs:
            p.wait(timeout=5)
    finally:
        cg.remove()
    time.sleep(0.05)
    assert not any(sched_probe.entry(t) is not None for t in tids)
