"""The join and the enrichment written onto spans (DESIGN §4 output contract)."""

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
    def overlay(self, segments, start, end):
        return sum(min(s.end_mono_ns, end) - max(s.start_mono_ns, start) for s in segments) // 10


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
    # process scope: the most held-back thread of the process
    proc = att.breakdown(Workload("process", pid=5), 0, 10 * MS, drained_until=5 * MS)
    assert proc.component_ns == {"runqueue": 8 * MS}
    assert proc.coverage == 0.5
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
        assert a["cgroup.path"] == "/kubepods/x"
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
                  attrs(k).get("isolation.merged_count", 1), attrs(k).get("merged.ns")) for k in kids)
    assert got == [(0, "runqueue", 5, 2, 2 * MS - int(0.02 * MS)), (3 * MS, "runqueue", 5, 1, None),
                   (10 * MS, "sandbox", 5, 4, 4 * MS), (11 * MS, "sandbox", 6, 1, None),
                   (40 * MS, "sandbox", 5, 1, None)]


def test_isoscope_scope_is_added_once_per_resource() -> None:
    rs = ResourceSpans()
    cache: dict = {}
    a = isoscope_scope(rs, cache)
    b = isoscope_scope(rs, cache)
    assert a is b and len(rs.scope_spans) == 1 and rs.scope_spans[0].scope.name == "isoscope"
