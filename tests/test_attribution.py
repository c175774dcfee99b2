"""The join and the enrichment written onto spans (docs/architecture.md §4 output contract)."""

from __future__ import annotations

from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from isoscope.join.attribution import Attributor, thread_breakdown
from isoscope.pipeline.enrich import add_attributes, child_spans, contract_attributes, isoscope_scope
from isoscope.model import Breakdown, IsolationStack, RunSegment, Stall, Workload
from isoscope.join.timeline import Timeline

MS = 1_000_000


def st(comp: str, a: float, b: float, tid: int = 5, **details) -> Stall:
    return Stall(comp, int(a * MS), int(b * MS), tid, 5, 9, 1, details)


def attrs(span: Span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        which = v.WhichOneof("value")
        out[kv.key] = ([x.string_value for x in v.array_value.values] if which == "array_value"
                       else getattr(v, which))
    return out


def test_components_are_clipped_to_the_window() -> None:
    bd = thread_breakdown([st("runqueue", 0, 10), st("cpu_throttle", 15, 40)], 5 * MS, 25 * MS)
    assert bd.component_ns == {"runqueue": 5 * MS, "cpu_throttle": 10 * MS}
    assert bd.duration_ns == 20 * MS
    assert bd.overhead_ratio() == 0.75
    assert bd.dominant() == "cpu_throttle"


def test_kernel_baseline_excludes_time_a_layer_explains() -> None:
    # A 10 ms blocking futex wait whose last 3 ms were a run-queue wait, and a 4 ms reclaim inside it.
    bd = thread_breakdown([st("syscall", 0, 10), st("memory_reclaim", 2, 6), st("runqueue", 7, 10)], 0, 20 * MS)
    assert bd.component_ns["syscall"] == 3 * MS
    assert bd.layer_ns() == {"L-0": 0, "L-1": 0, "L-2": 0, "L-3": 7 * MS, "L-4": 0, "kernel": 3 * MS}
    assert bd.overhead_ns() == 7 * MS  # the kernel baseline is not an overhead


def test_a_syscall_that_waited_on_a_virtio_request_is_virtio_time() -> None:
    # A 10 ms O_DIRECT read: 6 ms on the device, the rest setting up and completing the
    # request, except the last 2 ms spent waiting for a CPU after the wake-up.
    bd = thread_breakdown([st("syscall", 0, 10), st("virtio_io", 2, 8), st("runqueue", 8, 10),
                           st("syscall", 12, 15)], 0, 20 * MS)
    assert bd.component_ns == {"virtio_io": 8 * MS, "runqueue": 2 * MS, "syscall": 3 * MS}


class _Steal:
    """A tenth of every on-CPU nanosecond stolen."""

    def overlay(self, segments, start, end):
        return sum(min(s.end_mono_ns, end) - max(s.start_mono_ns, start) for s in segments) // 10

    def node_steal_ns(self, start, end):
        return (end - start) / 10


class _NoSteal(_Steal):
    """A host that stole nothing: the per-thread overlay must not even be asked."""

    def overlay(self, segments, start, end):
        raise AssertionError("on-CPU segments read although no CPU lost time")

    def node_steal_ns(self, start, end):
        return 0.0


def test_no_steal_on_the_node_means_no_steal_and_no_segment_reads() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_run(RunSegment(5, 5, 9, 0, 3 * MS, 8 * MS))
    bd = Attributor(tl, _NoSteal()).breakdown(Workload("thread", tid=5, pid=5), 0, 10 * MS,
                                              drained_until=20 * MS)
    assert "steal" not in bd.component_ns


def test_attributor_scopes_and_steal_and_coverage() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_stall(Stall("runqueue", 1 * MS, 3 * MS, 5, 5, 9))
    tl.add_stall(Stall("runqueue", 1 * MS, 9 * MS, 6, 5, 9))
    tl.add_run(RunSegment(5, 5, 9, 0, 3 * MS, 8 * MS))
    att = Attributor(tl, _Steal())
    thread = att.breakdown(Workload("thread", tid=5, pid=5), 0, 10 * MS, drained_until=20 * MS)
    assert thread.component_ns == {"runqueue": 2 * MS, "steal": MS // 2}
    assert thread.coverage == 1.0
    # process scope: the most held-back thread of the process (6). Neither thread was seen on a CPU
    # at an edge, so a thread not seen at all is as plausible (half sure), and the kernel data is
    # drained for half the window: 0.25.
    proc = att.breakdown(Workload("process", pid=5), 0, 10 * MS, drained_until=5 * MS)
    assert proc.component_ns == {"runqueue": 8 * MS}
    assert proc.coverage == 0.25
    cont = att.breakdown(Workload("container", cgroup_id=9), 0, 10 * MS, drained_until=20 * MS)
    assert cont.component_ns["runqueue"] == 8 * MS
    nothing = att.breakdown(Workload("thread", tid=99, pid=99), 0, 10 * MS, drained_until=20 * MS)
    assert nothing.component_ns == {} and nothing.overhead_ratio() == 0.0


def _workload() -> Workload:
    return Workload("thread", tid=5, pid=5, cgroup_path="/kubepods/x",
                    stack=IsolationStack(layers=["L-1", "L-3"], runtime="containerd", hypervisor="kvm"))


def test_contract_attributes_and_blame_threshold() -> None:
    bd = Breakdown({"cpu_throttle": 6 * MS, "runqueue": 1 * MS, "syscall": 2 * MS}, coverage=0.9,
                   duration_ns=10 * MS)
    a = {kv.key: kv for kv in contract_attributes(bd, _workload(), blame_threshold=0.2)}
    span = Span(name="GET /")
    span.attributes.extend(a.values())
    got = attrs(span)
    assert got["isolation.stack"] == ["L-1", "L-3"]
    assert got["isolation.runtime"] == "containerd" and got["isolation.hypervisor"] == "kvm"
    assert got["isolation.scope"] == "thread"
    assert got["isolation.l3.ns"] == 7 * MS and got["isolation.l0.ns"] == 0 and got["isolation.l4.ns"] == 0
    assert got["isolation.l3.cpu_throttle.ns"] == 6 * MS and got["isolation.l3.runqueue.ns"] == MS
    assert got["isolation.kernel.ns"] == 2 * MS
    assert abs(got["isolation.overhead.ratio"] - 0.7) < 1e-9
    assert got["isolation.blame"] == "l3.cpu_throttle"
    assert got["isolation.coverage"] == 0.9
    low = {kv.key for kv in contract_attributes(bd, _workload(), blame_threshold=0.8)}
    assert "isolation.blame" not in low


def test_existing_attributes_are_never_overwritten() -> None:
    span = Span(name="x")
    kv = span.attributes.add()
    kv.key = "isolation.blame"
    kv.value.string_value = "app-decided"
    bd = Breakdown({"runqueue": 9 * MS}, coverage=1.0, duration_ns=10 * MS)
    added = add_attributes(span, contract_attributes(bd, _workload(), 0.2))
    got = attrs(span)
    assert got["isolation.blame"] == "app-decided"
    assert [k.key for k in span.attributes].count("isolation.blame") == 1
    assert added == len(contract_attributes(bd, _workload(), 0.2)) - 1


def test_child_spans_shape_and_merging() -> None:
    parent = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="GET /")
    stalls = [st("runqueue", i * 2, i * 2 + 1.5, cpu=1) for i in range(20)] + [st("syscall", 50, 60),
                                                                                 st("runqueue", 70, 70.5)]
    bd = Breakdown(stalls=stalls, duration_ns=100 * MS)
    ids = iter(range(1, 1000))
    kids = child_spans(parent, bd, _workload(), lambda m: m + 1_000_000_000, min_stall_ns=MS, max_children=16,
                       window=(0, 100 * MS), id_source=lambda n: next(ids).to_bytes(n, "big"),
                       cgroup_path="/kubepods/x")
    assert 0 < len(kids) <= 16
    for k in kids:
        assert k.trace_id == parent.trace_id and k.parent_span_id == parent.span_id
        assert k.kind == Span.SPAN_KIND_INTERNAL
        assert k.name == "isolation L-3 runqueue"
        a = attrs(k)
        assert a["isolation.layer"] == "L-3" and a["isolation.component"] == "runqueue"
        assert a["isolation.cgroup.path"] == "/kubepods/x"
        assert k.start_time_unix_nano >= 1_000_000_000 and k.end_time_unix_nano > k.start_time_unix_nano
    merged = [k for k in kids if "isolation.merged_count" in attrs(k)]
    assert len(merged) == 1 and attrs(merged[0])["isolation.merged_count"] == 20 - 15
    # the 0.5 ms stall is under min_stall: no child; the syscall baseline never gets one
    assert all(attrs(k)["isolation.stall.ns"] >= MS for k in kids)
    assert len({k.span_id for k in kids}) == len(kids)


def test_touching_stalls_of_one_thread_become_one_child() -> None:
    """Touching stalls merge into one child; sampled ``sandbox`` stalls up to 10 ms apart do too."""
    parent = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="GET /")
    queued = [st("runqueue", 0, 1), st("runqueue", 1.02, 2), st("runqueue", 3, 4)]  # 20 µs, then 1 ms apart
    samples = [st("sandbox", i, i + 1) for i in (10, 11, 13, 17)] + [st("sandbox", 40, 41)]
    other_thread = [st("sandbox", 11, 12, tid=6)]
    bd = Breakdown(stalls=queued + samples + other_thread, duration_ns=50 * MS)
    kids = child_spans(parent, bd, _workload(), lambda m: m, min_stall_ns=MS, max_children=16, window=(0, 50 * MS))
    got = sorted((k.start_time_unix_nano, k.name.rsplit(" ", 1)[-1], attrs(k)["thread.id"],
                  attrs(k).get("isolation.merged_count", 1), attrs(k).get("isolation.merged.ns")) for k in kids)
    assert got == [(0, "runqueue", 5, 2, 2 * MS - int(0.02 * MS)), (3 * MS, "runqueue", 5, 1, None),
                   (10 * MS, "sandbox", 5, 4, 4 * MS), (11 * MS, "sandbox", 6, 1, None),
                   (40 * MS, "sandbox", 5, 1, None)]


def test_isoscope_scope_is_added_once_per_resource() -> None:
    rs = ResourceSpans()
    cache: dict = {}
    a = isoscope_scope(rs, cache)
    b = isoscope_scope(rs, cache)
    assert a is b and len(rs.scope_spans) == 1 and rs.scope_spans[0].scope.name == "isoscope"


# -- process / container scope: which thread served the span ------------------------------


def _run(tid: int, a: float, b: float, pid: int = 5, cg: int = 9) -> RunSegment:
    return RunSegment(tid, pid, cg, 0, int(a * MS), int(b * MS))


def _sc(tid: int, a: float, b: float, cls: str = "lock", pid: int = 5, cg: int = 9) -> Stall:
    return Stall("syscall", int(a * MS), int(b * MS), tid, pid, cg, -1, {"syscall.class": cls})


def _pool_timeline() -> Timeline:
    """A pool of workers over [100, 200] ms: 11 serves a downstream-blocked request, 12 a CPU-bound one.

    Worker 12 is throttled most of the window and waits for the GIL (a futex) whenever 11 runs;
    13 is idle in a futex; 10 (the accept loop) sits in epoll_wait.
    """
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    # 11: woken at 99.8, on a CPU 99.8..101, blocked in recv 101..198.5 (its wake-up waited 0.4 ms), runs to 200.5
    tl.add_run(_run(11, 99.8, 101))
    tl.add_stall(_sc(11, 101, 198.5, "net"))
    tl.add_stall(Stall("runqueue", int(198.1 * MS), int(198.5 * MS), 11, 5, 9))
    tl.add_run(_run(11, 198.5, 200.5))
    # 12: GIL waits around both of 11's edges, otherwise runs 1 ms per 10 ms period and is throttled the rest
    tl.add_stall(_sc(12, 99.5, 101.2))
    tl.add_stall(_sc(12, 198.3, 200.7))
    for p in range(100, 200, 10):
        if p in (100, 190):
            continue
        tl.add_run(_run(12, p + 1.5, p + 2.5))
        tl.add_stall(Stall("cpu_throttle", int((p + 2.5) * MS), int((p + 11.5) * MS), 12, 5, 9))
    tl.add_stall(_sc(13, 50, 250))
    tl.add_run(_run(10, 99.0, 99.6))
    tl.add_stall(_sc(10, 99.6, 230, "net"))
    return tl


def test_process_scope_picks_the_worker_on_a_cpu_at_both_edges_not_the_most_throttled() -> None:
    tl = _pool_timeline()
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(100 * MS, 200 * MS)], 10**12)
    assert tid == 11
    assert bd.component_ns == {"runqueue": int(0.4 * MS), "syscall": int(97.1 * MS)}
    assert bd.coverage == 1.0
    # The old rule would have taken worker 12, throttled for most of the window.
    assert tl.window_ns(100 * MS, 200 * MS, tid=12)[12]["cpu_throttle"] > 50 * MS


def test_process_scope_picks_the_cpu_bound_worker_for_its_own_request() -> None:
    tl = _pool_timeline()
    # 12's own request: it opened it on a CPU at 121.6 and ended it on a CPU at 181.8.
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(int(121.6 * MS), int(181.8 * MS))], 10**12)
    assert tid == 12 and bd.dominant() == "cpu_throttle" and bd.coverage == 1.0


def test_an_event_loop_counts_its_stalls_for_every_request_it_served() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    # Loop thread 20 serves overlapping requests; 21 (an exporter thread) sleeps in a futex.
    tl.add_run(_run(20, 0, 12))
    tl.add_stall(Stall("runqueue", 12 * MS, 20 * MS, 20, 5, 9))
    tl.add_run(_run(20, 20, 33))
    tl.add_stall(_sc(20, 33, 35, "net"))
    tl.add_run(_run(20, 35, 50))
    tl.add_stall(_sc(21, 0, 60))
    tl.add_run(_run(21, 60, 61))
    windows = [(5 * MS, 30 * MS), (10 * MS, 45 * MS), (25 * MS, 40 * MS)]
    got = Attributor(tl).join_many(Workload("process", pid=5), windows, 10**12)
    assert [t for _, t in got] == [20, 20, 20]
    assert [bd.component_ns.get("runqueue", 0) for bd, _ in got] == [8 * MS, 8 * MS, 0]
    assert all(bd.coverage == 1.0 for bd, _ in got)


def test_equally_plausible_threads_that_disagree_lower_the_coverage() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    # Two threads on a CPU at both edges (no GIL between them): 30 was throttled 6 ms, 31 not at all.
    for t in (30, 31):
        tl.add_run(_run(t, 0, 2))
        tl.add_run(_run(t, 9, 11))
    tl.add_stall(Stall("cpu_throttle", 2 * MS, 8 * MS, 30, 5, 9))
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(1 * MS, 10 * MS)], 10**12)
    assert tid == 30 and bd.component_ns == {"cpu_throttle": 6 * MS}
    assert bd.coverage == 0.5
    # When they agree, which one served the span does not matter: full coverage.
    tl.add_stall(Stall("cpu_throttle", 2 * MS, 8 * MS, 31, 5, 9))
    (bd, _), = Attributor(tl).join_many(Workload("process", pid=5), [(1 * MS, 10 * MS)], 10**12)
    assert bd.coverage == 1.0


def test_a_watched_thread_that_ran_only_after_an_edge_was_off_a_cpu_there() -> None:
    from isoscope.join.timeline import EDGE_NEAR, EDGE_OFF, EDGE_ON, EDGE_UNKNOWN

    tl = Timeline()
    tl.add_run(_run(40, 5, 8))
    tl.add_stall(_sc(41, 0, 20))
    tl.add_stall(Stall("runqueue", 3 * MS, 6 * MS, 42, 5, 9))
    ev, = tl.evidence_many([(int(4.99 * MS), 7 * MS)], pid=5)
    assert ev[40][1:] == (EDGE_NEAR, EDGE_ON)
    assert ev[41][1:] == (EDGE_OFF, EDGE_OFF)
    assert ev[42][1:] == (EDGE_OFF, EDGE_UNKNOWN)
    ev, = tl.evidence_many([(1 * MS, 9 * MS)], pid=5)
    assert ev[40][1:] == (EDGE_OFF, EDGE_UNKNOWN)


def test_container_scope_looks_at_every_cgroup_of_the_workload() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    # A pod of two containers (cgroups 71, 72); its pod-level cgroup 70 holds no thread.
    tl.add_stall(_sc(50, 0, 100, pid=50, cg=71))
    tl.add_run(_run(60, 0, 2, pid=60, cg=72))
    tl.add_stall(Stall("cpu_throttle", 2 * MS, 9 * MS, 60, 60, 72))
    tl.add_run(_run(60, 9, 12, pid=60, cg=72))
    pod = Workload("container", cgroup_id=70, cgroup_ids=(71, 72))
    (bd, tid), = Attributor(tl).join_many(pod, [(1 * MS, 10 * MS)], 10**12)
    assert tid == 60 and bd.component_ns == {"cpu_throttle": 7 * MS} and bd.coverage == 1.0
    # The pod-level cgroup alone: no thread seen, so no data, never full coverage.
    (bd, tid), = Attributor(tl).join_many(Workload("container", cgroup_id=70), [(1 * MS, 10 * MS)], 10**12)
    assert tid == 0 and bd.component_ns == {} and bd.coverage == 0.0


def test_a_scope_whose_threads_were_not_seen_near_the_window_has_no_coverage() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_stall(Stall("runqueue", 1 * MS, 2 * MS, 5, 5, 9))
    att = Attributor(tl)
    (bd, tid), = att.join_many(Workload("process", pid=5), [(50 * MS, 60 * MS)], 10**12)
    assert tid == 0 and bd.coverage == 0.0
    (bd, tid), = att.join_many(Workload("process", pid=77), [(0, 10 * MS)], 10**12)
    assert tid == 0 and bd.coverage == 0.0 and bd.overhead_ratio() == 0.0


def test_a_thread_never_seen_on_a_cpu_at_an_edge_is_no_surer_than_one_not_seen_at_all() -> None:
    # An unwatched process (no on-CPU segments): its main thread waited 4 ms for a CPU during the
    # first request, which another thread served and was never recorded (nothing held it back).
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_stall(Stall("runqueue", 2 * MS, 6 * MS, 5, 5, 9))
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(1 * MS, 10 * MS)], 10**12)
    assert tid == 5 and bd.component_ns == {"runqueue": 4 * MS}
    assert bd.coverage == 0.5
    # What it saw agrees with an empty breakdown (well under the agreement tolerance): full coverage,
    # the answer is the same whichever thread served the span.
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_stall(Stall("runqueue", 2 * MS, 2 * MS + 50_000, 5, 5, 9))
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(1 * MS, 10 * MS)], 10**12)
    assert bd.component_ns == {"runqueue": 50_000} and bd.coverage == 1.0
    # Seen on a CPU at an edge: that is evidence of serving, and the unseen threads do not compete.
    tl.add_run(_run(5, 0.5, 1.5))
    tl.add_stall(Stall("runqueue", 3 * MS, 7 * MS, 5, 5, 9))
    (bd, tid), = Attributor(tl).join_many(Workload("process", pid=5), [(1 * MS, 10 * MS)], 10**12)
    assert tid == 5 and bd.coverage == 1.0
