"""Run-queue neighbours: the record's decoding, the span and child-span attributes, the metric.

The kernel side (who actually ran) is tested against schedstat in tests/kernel/test_neighbors.py;
here records are built in the binary layout of bpf/include/isoscope.h and go through the real
decoder, timeline, pipeline and exporter.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from isoscope.config import AttributionConfig
from isoscope.join.attribution import Attributor
from isoscope.join.neighbors import CgroupNamer, NeighborTally, window_neighbors
from isoscope.join.timeline import Timeline
from isoscope.kernel.clock import MonoWallClock
from isoscope.metrics.kernel import KernelMetrics
from isoscope.metrics.prometheus import RUNQ_NEIGHBOR, PrometheusExporter
from isoscope.model import NEIGHBORS_DETAIL, RunqueueNeighbors, Stall, Stats, TraceBatch, Workload
from isoscope.pipeline.enrich import format_ms
from isoscope.pipeline.processor import EnrichPipeline
from isoscope.probes.decode import DecodeError, decode_record
from isoscope.probes.layout import EV_RUNQ, NeighborKey, RunqRecord, _C

MS = 1_000_000
BASE = 10_000 * MS
SVC, WEB, BATCH, SYSD, GONE = 9, 21, 22, 23, 24
PODS = {SVC: ("shop", "cart-5c4b", "cart"), WEB: ("shop", "web-7d9f", "web"), BATCH: ("jobs", "batch-x", "run")}
PATHS = {SYSD: "/system.slice/cron.service"}


def runq_record(start: int, end: int, tid: int = 5, *, self_ns: int = 0, kernel_ns: int = 0, other_ns: int = 0,
                unseen_ns: int = 0, top: tuple[tuple[int, int], ...] = ()) -> bytes:
    r = RunqRecord()
    r.stall.kind = EV_RUNQ
    r.stall.component = _C["ISO_C_RUNQUEUE"]
    r.stall.start_ns, r.stall.end_ns = start, end
    r.stall.cgroup_id, r.stall.pid, r.stall.tid, r.stall.cpu = SVC, 5, tid, 1
    r.stall.detail, r.stall.detail2 = _C["ISO_SCHED_M_NONE"], end - start
    r.self_ns, r.kernel_ns, r.other_ns, r.unseen_ns = self_ns, kernel_ns, other_ns, unseen_ns
    for i, (cg, ns) in enumerate(top):
        r.top[i].cgroup_id, r.top[i].ns = cg, ns
    return bytes(r)


def test_record_decodes_into_the_runqueue_stall() -> None:
    raw = runq_record(BASE, BASE + 10 * MS, self_ns=2 * MS, kernel_ns=MS, other_ns=MS // 2, unseen_ns=MS // 2,
                      top=((WEB, 4 * MS), (BATCH, 2 * MS)))
    assert len(raw) == _C["ISO_RUNQ_SIZE"]
    s = decode_record(raw)
    assert isinstance(s, Stall)
    assert (s.component, s.start_mono_ns, s.end_mono_ns, s.tid, s.cgroup_id, s.cpu) == (
        "runqueue", BASE, BASE + 10 * MS, 5, SVC, 1)
    assert s.details["sched.throttle_method"] == "none"
    nb = s.details[NEIGHBORS_DETAIL]
    assert nb == RunqueueNeighbors(2 * MS, MS, MS // 2, MS // 2, ((WEB, 4 * MS), (BATCH, 2 * MS)))
    assert nb.total_ns == s.duration_ns
    with pytest.raises(DecodeError):
        decode_record(raw[:60])


def test_tally_names_the_top_workloads_and_folds_the_rest() -> None:
    stalls = [
        Stall("runqueue", 0, 10 * MS, 5, 5, SVC, 1, {NEIGHBORS_DETAIL: RunqueueNeighbors(
            self_ns=MS, kernel_ns=MS, top=((WEB, 5 * MS), (BATCH, 2 * MS), (SYSD, MS)))}),
        # Half of this one is inside [0, 20 ms]: it counts for half.
        Stall("runqueue", 15 * MS, 25 * MS, 5, 5, SVC, 1, {NEIGHBORS_DETAIL: RunqueueNeighbors(
            other_ns=2 * MS, top=((GONE, 6 * MS), (WEB, 2 * MS)))}),
        Stall("runqueue", 30 * MS, 40 * MS, 5, 5, SVC, 1),  # an unwatched wait: no split
    ]
    tally = window_neighbors(stalls, 0, 20 * MS)
    namer = CgroupNamer(lambda cg: PODS.get(cg, ("", "", "")), PATHS.get)
    named = tally.named(namer, top=2)
    # web 5+1, gone 3, batch 2, cron 1: the top two by name, the rest with the kernel's "other".
    assert named == [("shop/web-7d9f/web", 6 * MS), ("other", 4 * MS), ("cgroup:24", 3 * MS),
                     ("kernel", MS), ("self", MS)]
    assert sum(ns for _, ns in named) == 15 * MS
    assert not NeighborTally()


def test_throttling_says_own_quota_and_neighbours_name_who_ran() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    # Two waits of thread 5 inside the 40 ms span; one throttled stretch.
    tl.add_stall(decode_record(runq_record(BASE + 2 * MS, BASE + 12 * MS, self_ns=2 * MS, kernel_ns=MS // 2,
                                           other_ns=MS // 2, top=((WEB, 6 * MS), (SYSD, MS)))))
    tl.add_stall(decode_record(runq_record(BASE + 20 * MS, BASE + 24 * MS, top=((BATCH, 3 * MS), (WEB, MS)))))
    tl.add_stall(Stall("cpu_throttle", BASE + 30 * MS, BASE + 35 * MS, 5, 5, SVC, 1))

    class Resolver:
        v2_root = None

        def resolve(self, ident, tid, peer_pid):
            return Workload("thread", tid=tid, pid=5, cgroup_id=SVC)

        def cgroup_labels(self, cg):
            return PODS.get(cg) or ("", "", PATHS.get(cg, "").rsplit("/", 1)[-1])

    cfg = SimpleNamespace(**{**AttributionConfig().model_dump(), "child_spans": "all"})
    got = {}
    for may_conflict in (False, True):  # the wire path and the KeyValue path write the same
        pipe = EnrichPipeline(resolver=Resolver(), attributor=Attributor(tl), clock=MonoWallClock(),
                              drained_until=lambda: 10**15, cfg=cfg, stats=Stats(), output=lambda b: None)
        pipe.neighbor_name = CgroupNamer(pipe.resolver.cgroup_labels, PATHS.get)
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id = bytes(15) + b"\x01", bytes(7) + b"\x01"
        span.start_time_unix_nano = pipe.clock.to_unix(BASE)
        span.end_time_unix_nano = pipe.clock.to_unix(BASE + 40 * MS)
        kv = span.attributes.add()
        kv.key, kv.value.int_value = "thread.id", 5
        assert pipe.enrich(TraceBatch(req, "grpc", 1), 10**15, may_conflict) == 1
        a = attrs(span)
        assert a["isolation.l3.runqueue.ns"] == 14 * MS
        assert a["isolation.l3.runqueue.neighbors"] == [
            "shop/web-7d9f/web=7.00ms", "jobs/batch-x/run=3.00ms", "self=2.00ms",
            "/system.slice/cron.service=1.00ms", "kernel=0.500ms", "other=0.500ms"]
        assert a["isolation.l3.runqueue.neighbors.ns"] == [7 * MS, 3 * MS, 2 * MS, MS, MS // 2, MS // 2]
        assert a["isolation.l3.runqueue.neighbor"] == "shop/web-7d9f/web"
        assert a["isolation.l3.cpu_throttle.cause"] == "own_quota"
        kids = {k.name + str(k.start_time_unix_nano): attrs(k) for k in req.resource_spans[0].scope_spans[1].spans}
        runq = [k for n, k in kids.items() if n.startswith("isolation L-3 runqueue")]
        assert sorted(k["isolation.l3.runqueue.neighbors"][0] for k in runq) == [
            "jobs/batch-x/run=3.00ms", "shop/web-7d9f/web=6.00ms"]
        thr = [k for n, k in kids.items() if n.startswith("isolation L-3 cpu_throttle")]
        assert [k["isolation.l3.cpu_throttle.cause"] for k in thr] == ["own_quota"]
        assert all("isolation.l3.runqueue.neighbors" not in k for k in thr)
        got[may_conflict] = a
    assert got[False] == got[True]


def test_only_own_threads_is_said_as_self() -> None:
    tl = Timeline()
    tl.set_probe_up("sched", True, at_mono_ns=0)
    tl.add_stall(decode_record(runq_record(BASE + 2 * MS, BASE + 8 * MS, self_ns=6 * MS)))
    pipe = EnrichPipeline(resolver=SimpleNamespace(resolve=lambda i, t, p: Workload("thread", tid=t, pid=5)),
                          attributor=Attributor(tl), clock=MonoWallClock(), drained_until=lambda: 10**15,
                          cfg=AttributionConfig(), stats=Stats(), output=lambda b: None)
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add()
    span.start_time_unix_nano = pipe.clock.to_unix(BASE)
    span.end_time_unix_nano = pipe.clock.to_unix(BASE + 10 * MS)
    kv = span.attributes.add()
    kv.key, kv.value.int_value = "thread.id", 5
    pipe.enrich(TraceBatch(req, "grpc", 1), 10**15)
    a = attrs(span)
    assert a["isolation.l3.runqueue.neighbors"] == ["self=6.00ms"]
    assert "isolation.l3.runqueue.neighbor" not in a  # no other workload took part
    assert "isolation.l3.cpu_throttle.cause" not in a


def test_format_ms() -> None:
    assert [format_ms(n) for n in (123_456_789, 12_345_678, 1_234_567, 123_456)] == [
        "123ms", "12.3ms", "1.23ms", "0.123ms"]


class _Map(list):
    def items(self) -> list:
        return list(self)


def _bpf(totals: dict[tuple[int, int], int]) -> dict[bytes, _Map]:
    """The sched probe's ``runq_neighbors`` map as bcc hands it over (ctypes keys and values)."""
    m = _Map()
    for (victim, neighbor), ns in totals.items():
        k = NeighborKey()
        k.victim_id, k.neighbor_id = victim, neighbor
        m.append((k, ctypes.c_uint64(ns)))
    return {b"runq_neighbors": m}


def _labels(cg: int) -> tuple[str, str, str]:
    return PODS.get(cg) or ("", "", PATHS.get(cg, "").rsplit("/", 1)[-1])


def test_metric_who_delays_whom_from_the_kernel_totals() -> None:
    prom = PrometheusExporter(Stats())
    totals = {(SVC, WEB): 30 * MS, (SVC, SVC): 10 * MS, (SVC, 1): 2 * MS, (SVC, 0): MS, (SVC, SYSD): 4 * MS}
    km = KernelMetrics(lambda name: _bpf(totals) if name == "sched" else None, prom, _labels)
    km.collect()
    totals[(SVC, WEB)] = 50 * MS  # cumulative: the next pass adds the increase
    km.collect()
    got = prom.counter_values(RUNQ_NEIGHBOR.name)
    cart = PODS[SVC]
    assert got == {
        cart + PODS[WEB]: pytest.approx(0.05),
        cart + ("", "", "self"): pytest.approx(0.01),
        cart + ("", "", "kernel"): pytest.approx(0.002),
        cart + ("other", "other", "other"): pytest.approx(0.001),
        cart + ("", "", "cron.service"): pytest.approx(0.004),
    }
    text = prom.render(openmetrics=False)[0].decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "isoscope_runqueue_neighbor_seconds"]
    assert family.type == "counter"
    scraped = {tuple(s.labels[n] for n in RUNQ_NEIGHBOR.labels): s.value for s in family.samples}
    assert scraped == pytest.approx(got)
    # A pair goes when either side goes away.
    assert prom.forget_workload(*PODS[WEB]) == 1
    assert cart + PODS[WEB] not in prom.counter_values(RUNQ_NEIGHBOR.name)


def test_metric_cardinality_cap_folds_pairs_into_other() -> None:
    prom = PrometheusExporter(Stats(), max_label_values=8)
    for i in range(50):
        prom.add_runqueue_neighbor_ns(("ns", f"victim-{i}", "c"), ("ns", f"hog-{i}", "c"), MS)
    assert prom.series_count(RUNQ_NEIGHBOR.name) <= 8
    got = prom.counter_values(RUNQ_NEIGHBOR.name)
    assert got[("other",) * 6] > 0
    assert sum(got.values()) == pytest.approx(50 * MS / 1e9)


def attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        which = v.WhichOneof("value")
        if which == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        elif which is not None:  # (an empty array, e.g. isolation.stack of an unknown stack, has none)
            out[kv.key] = getattr(v, which)
    return out
