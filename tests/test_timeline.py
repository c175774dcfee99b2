"""The stall timeline: indexing, window queries, bounds, TTL eviction and coverage."""

from __future__ import annotations

from isoscope.model import RunSegment, Stall
from isoscope.join.timeline import Timeline

MS = 1_000_000


def stall(comp: str, a_ms: float, b_ms: float, tid: int = 10, pid: int = 10, cg: int = 77) -> Stall:
    return Stall(comp, int(a_ms * MS), int(b_ms * MS), tid, pid, cg)


def test_query_returns_exactly_the_overlapping_stalls_per_thread() -> None:
    tl = Timeline()
    tl.add_stall(stall("runqueue", 0, 5))
    tl.add_stall(stall("runqueue", 10, 12))
    tl.add_stall(stall("cpu_throttle", 11, 30))
    tl.add_stall(stall("runqueue", 40, 41))
    tl.add_stall(stall("runqueue", 11, 13, tid=11))
    hits = tl.query(int(9 * MS), int(20 * MS), tid=10)
    assert [(s.component, s.start_mono_ns // MS) for s in hits[10]] == [("runqueue", 10), ("cpu_throttle", 11)]
    # process scope: both threads of pid 10
    hits = tl.query(int(9 * MS), int(20 * MS), pid=10)
    assert set(hits) == {10, 11}
    # cgroup scope
    assert set(tl.query(0, int(100 * MS), cgroup_id=77)) == {10, 11}
    # edges: a stall ending exactly at the window start does not overlap
    assert tl.query(int(5 * MS), int(9 * MS), tid=10) == {}


def test_out_of_order_arrival_is_kept_sorted() -> None:
    tl = Timeline()
    for a in (50, 10, 30, 20, 40):
        tl.add_stall(stall("runqueue", a, a + 1))
    hits = tl.query(0, 100 * MS, tid=10)[10]
    assert [s.start_mono_ns // MS for s in hits] == [10, 20, 30, 40, 50]


def test_bounds_per_thread_and_threads() -> None:
    tl = Timeline(max_threads=3, max_per_thread=4)  # 4 stalls (and 2 on-CPU segments) per thread
    for i in range(10):
        tl.add_stall(stall("runqueue", i, i + 0.5))
    assert len(tl.query(0, 100 * MS, tid=10)[10]) == 4  # oldest dropped
    for tid in range(20, 26):
        tl.add_stall(stall("runqueue", 1, 2, tid=tid, pid=tid))
    threads, records = tl.size()
    assert threads == 3 and records <= 3 * 4
    assert tl.threads_evicted >= 3
    assert tl.query(0, 100 * MS, tid=10) == {}  # least recently updated thread went first


def test_ttl_eviction_drops_old_records_and_empty_threads() -> None:
    tl = Timeline(ttl_s=1.0)
    tl.add_stall(stall("runqueue", 0, 1))
    tl.add_stall(stall("runqueue", 1500, 1501, tid=11, pid=11))
    tl.add_run(RunSegment(11, 11, 77, 0, 1400 * MS, 1450 * MS))
    dropped = tl.evict(now_mono_ns=2000 * MS)
    assert dropped == 1
    assert tl.query(0, 3000 * MS, tid=10) == {}
    assert tl.threads_of(pid=10) == []
    assert len(tl.query(0, 3000 * MS, tid=11)[11]) == 1
    assert len(tl.runs(0, 3000 * MS, 11)) == 1


def test_coverage_needs_probes_up_drained_and_no_losses() -> None:
    tl = Timeline()
    assert tl.coverage(0, 10 * MS, 100 * MS) == 0.0  # no probe up: nothing known
    tl.set_probe_up("sched", True, at_mono_ns=2 * MS)
    assert tl.coverage(0, 10 * MS, 100 * MS) == 0.8  # up only from 2 ms
    assert tl.coverage(2 * MS, 12 * MS, 7 * MS) == 0.5  # drained only to 7 ms
    tl.note_loss("sched", 4 * MS, 5 * MS)
    tl.note_loss("syscalls", 4500_000, 6 * MS)  # overlapping losses are not double counted
    assert abs(tl.coverage(2 * MS, 12 * MS, 100 * MS) - 0.8) < 1e-9
    tl.set_probe_up("syscalls", False)
    assert tl.coverage(2 * MS, 12 * MS, 100 * MS) == 0.0  # a tracked probe is down
    assert tl.coverage(5 * MS, 5 * MS, 100 * MS) == 0.0  # empty window


def test_thread_moving_between_cgroups_is_reindexed() -> None:
    tl = Timeline()
    tl.add_stall(stall("runqueue", 0, 1, cg=1))
    tl.add_stall(stall("runqueue", 2, 3, cg=2))
    assert tl.threads_of(cgroup_id=1) == []
    assert tl.threads_of(cgroup_id=2) == [10]


def test_global_record_budget_drops_least_recent_threads() -> None:
    tl = Timeline(max_records=10, max_per_thread=100)
    for tid in range(1, 7):
        for i in range(4):
            tl.add_stall(stall("runqueue", i, i + 0.1, tid=tid, pid=tid))
        tl.add_run(RunSegment(tid, tid, 77, 0, 5 * MS, 6 * MS))
    threads, records = tl.size()
    assert records <= 10
    assert tl.query(0, 100 * MS, tid=6)  # the thread written last is kept
    assert tl.query(0, 100 * MS, tid=1) == {}
    # records are counted exactly through eviction
    tl.evict(now_mono_ns=200_000 * MS)
    assert tl.size() == (0, 0)


def test_records_dropped_for_space_lower_that_threads_coverage() -> None:
    tl = Timeline(max_per_thread=3)
    tl.set_probe_up("sched", True, at_mono_ns=0)
    for i in range(5):
        tl.add_stall(stall("runqueue", i * 10, i * 10 + 1))
    # stalls ending at 1 ms and 11 ms were dropped: [0, 11 ms] is no longer complete for this thread
    assert tl.coverage(0, 20 * MS, 100 * MS, tid=10) == 0.45
    assert tl.coverage(0, 20 * MS, 100 * MS, tid=99) == 1.0
    assert tl.coverage(0, 20 * MS, 100 * MS) == 1.0
    budget = Timeline(max_records=2)
    budget.set_probe_up("sched", True, at_mono_ns=0)
    budget.add_stall(stall("runqueue", 1, 2, tid=1, pid=1))
    budget.add_stall(stall("runqueue", 3, 4, tid=2, pid=2))
    budget.add_stall(stall("runqueue", 5, 6, tid=3, pid=3))  # thread 1 goes
    assert budget.query(0, 10 * MS, tid=1) == {}
    assert budget.coverage(0, 10 * MS, 100 * MS, tid=1) == 0.8  # nothing known before 2 ms


def test_query_limit_returns_the_latest_overlapping_stalls_only() -> None:
    tl = Timeline()
    for i in range(100):
        tl.add_stall(Stall("runqueue", i * 10, i * 10 + 5, 7, 7, 1))
    got = tl.query(0, 2**63, tid=7, limit=3)[7]
    assert [s.start_mono_ns for s in got] == [970, 980, 990]
    # The limit only ever shortens: a window holding fewer keeps them all, in order.
    assert [s.start_mono_ns for s in tl.query(94, 130, tid=7, limit=10)[7]] == [90, 100, 110, 120]
