"""Child spans written as wire bytes parse to exactly the protobuf objects of ``child_spans``.

The pipeline appends child spans as serialized ``ScopeSpans.spans`` fields (one
``MergeFromString`` per resource); :func:`child_spans` is the readable object form. For varied
stalls, details, windows, merges and neighbour splits, both must give the same spans: same
parsed messages and the same bytes as ``SerializeToString``.
"""

from __future__ import annotations

import itertools
import math
from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from isoscope.model import COMPONENT_LAYER, NEIGHBORS_DETAIL, Breakdown, RunqueueNeighbors, Stall, Workload
from isoscope.pipeline.enrich import (_varint, cgroup_path_wire, child_spans, child_spans_wire,
                                      neighbor_attributes, neighbor_attributes_wire, wire_attributes)

MS = 1_000_000
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_names = {101: "shop/web-7d9f/web", 102: "/system.slice/cron.service", 103: "self", 104: ""}


def _name_of(cg: int) -> str:
    return _names.get(cg, "") or f"cgroup:{cg}"


_detail_value = st.one_of(
    st.text(max_size=12), st.integers(-2**63, 2**63 - 1), st.booleans(),
    st.floats(allow_nan=False, width=64), st.none(), st.lists(st.integers(), max_size=2),
    st.builds(RunqueueNeighbors, st.integers(0, 10 * MS), st.integers(0, 10 * MS), st.integers(0, MS),
              st.integers(0, MS), st.lists(st.tuples(st.sampled_from([101, 102, 103, 104, 105]),
                                                     st.integers(1, 5 * MS)), max_size=3).map(tuple)))
_details = st.one_of(
    st.just({}), st.just(MappingProxyType({"sched.throttle_method": "task_flag"})),
    st.tuples(st.dictionaries(st.sampled_from(["syscall.class", "syscall.nr", "kvm.exit_reason", "block.dev",
                                               "ratio", NEIGHBORS_DETAIL, "ünï.cödé"]), _detail_value, max_size=4),
              st.one_of(st.none(), st.integers(0, 2**40)))  # merged.ns: an int, as merging writes it
    .map(lambda dm: dm[0] if dm[1] is None else {**dm[0], "merged.ns": dm[1]}))


@st.composite
def _stall(draw) -> Stall:
    comp = draw(st.sampled_from(sorted(COMPONENT_LAYER)))
    start = draw(st.integers(0, 200 * MS))
    dur = draw(st.integers(0, 30 * MS))
    return Stall(comp, start, start + dur, draw(st.sampled_from([5, 6, 2**31 - 1])), 5,
                 draw(st.integers(0, 2**40)), draw(st.integers(-1, 63)), draw(_details))


def _object_bytes(kids: list[Span]) -> bytes:
    return b"".join(b"\x12" + _varint(k.ByteSize()) + k.SerializeToString() for k in kids)


@SETTINGS
@given(stalls=st.lists(_stall(), max_size=40), lo=st.integers(0, 100 * MS), length=st.integers(0, 200 * MS),
       max_children=st.integers(0, 20), min_stall=st.sampled_from([0, MS // 2, MS, 5 * MS]),
       offset=st.integers(0, 2**62), cgroup_path=st.sampled_from(["", "/kubepods/pod-x/ctr", "/ünïcode"]),
       named=st.booleans(), trace_id=st.sampled_from([b"", b"\x01" * 16]),
       parent_id=st.sampled_from([b"", b"\x02" * 8]))
def test_wire_children_parse_to_the_object_children(stalls, lo, length, max_children, min_stall, offset,
                                                    cgroup_path, named, trace_id, parent_id) -> None:
    parent = Span(trace_id=trace_id, span_id=parent_id, name="GET /")
    bd = Breakdown(stalls=list(stalls), duration_ns=length)
    wl = Workload("thread", tid=5, pid=5, cgroup_path=cgroup_path)
    window = (lo, lo + length)
    ids_a, ids_b = itertools.count(1), itertools.count(1)
    name_of = _name_of if named else None
    kids = child_spans(parent, bd, wl, lambda m: m + offset, min_stall_ns=min_stall, max_children=max_children,
                       window=window, id_source=lambda n: next(ids_a).to_bytes(n, "big"),
                       cgroup_path=wl.cgroup_path, neighbor_name=name_of)
    wire, count = child_spans_wire(parent, bd, lambda m: m + offset, min_stall_ns=min_stall,
                                   max_children=max_children, window=window,
                                   id_source=lambda n: next(ids_b).to_bytes(n, "big"),
                                   cgroup_path_attr=cgroup_path_wire(wl.cgroup_path), neighbor_name=name_of)
    assert count == len(kids)
    assert list(ScopeSpans.FromString(wire).spans) == kids
    assert wire == _object_bytes(kids)
    # The plain-offset shortcut writes the same bytes as the conversion function.
    ids_c = itertools.count(1)
    fast, _ = child_spans_wire(parent, bd, None, min_stall_ns=min_stall, max_children=max_children,
                               window=window, id_source=lambda n: next(ids_c).to_bytes(n, "big"),
                               cgroup_path_attr=cgroup_path_wire(wl.cgroup_path), neighbor_name=name_of,
                               offset_ns=offset)
    assert fast == wire
    # So does the batch's neighbour cache, cold and then warm.
    cache: dict = {}
    for _ in range(2):
        ids_d = itertools.count(1)
        cached, _ = child_spans_wire(parent, bd, None, min_stall_ns=min_stall, max_children=max_children,
                                     window=window, id_source=lambda n: next(ids_d).to_bytes(n, "big"),
                                     cgroup_path_attr=cgroup_path_wire(wl.cgroup_path), neighbor_name=name_of,
                                     offset_ns=offset, neighbor_cache=cache)
        assert cached == wire


def test_wire_children_table() -> None:
    """Hand-picked cases: every component, float/str/int details, clipping, merging, neighbours."""
    nb = RunqueueNeighbors(2 * MS, MS // 3, 0, 7, ((101, 3 * MS), (105, MS)))
    cases = [
        [Stall("runqueue", 0, 4 * MS, 5, 5, 9, 1, {"sched.throttle_method": "none", NEIGHBORS_DETAIL: nb})],
        [Stall("cpu_throttle", 10 * MS, 90 * MS, 5, 5, 9, 0, MappingProxyType({"sched.throttle_method": "idle"}))],
        [Stall("vm_exit", 1 * MS, 3 * MS, 5, 5, 9, -1, {"kvm.exit_reason": "HLT", "kvm.exit_code": 12,
                                                       "share": 0.25, "flag": True})],
        [Stall("runqueue", i * 2 * MS, i * 2 * MS + 1_500_000, 5, 5, 9, 1, {NEIGHBORS_DETAIL: nb})
         for i in range(30)] + [Stall("memory_reclaim", 70 * MS, 75 * MS, 5, 5, 9, -1,
                                      {"reclaim.kind": "memcg", "reclaim.pages": 2**40})],
        [Stall(c, 5 * MS, 12 * MS, 6, 5, 9, 3, {}) for c in sorted(COMPONENT_LAYER)],
        [Stall("sandbox", i * MS, i * MS + MS, 5, 5, 9, -1, {}) for i in (10, 11, 13, 17)],
    ]
    for stalls in cases:
        parent = Span(trace_id=b"\x0f" * 16, span_id=b"\x0e" * 8, name="x")
        bd = Breakdown(stalls=stalls, duration_ns=100 * MS)
        for max_children in (1, 4, 16):
            ia, ib = itertools.count(7), itertools.count(7)
            kids = child_spans(parent, bd, Workload("thread", tid=5, pid=5), lambda m: m + 10**18,
                               min_stall_ns=MS, max_children=max_children, window=(2 * MS, 80 * MS),
                               id_source=lambda n: next(ia).to_bytes(n, "big"), cgroup_path="/a/b",
                               neighbor_name=_name_of)
            wire, count = child_spans_wire(parent, bd, lambda m: m + 10**18, min_stall_ns=MS,
                                           max_children=max_children, window=(2 * MS, 80 * MS),
                                           id_source=lambda n: next(ib).to_bytes(n, "big"),
                                           cgroup_path_attr=cgroup_path_wire("/a/b"), neighbor_name=_name_of)
            assert kids and count == len(kids)
            assert list(ScopeSpans.FromString(wire).spans) == kids
            assert wire == _object_bytes(kids)
    got = {kv.key: kv.value for kv in ScopeSpans.FromString(wire).spans[0].attributes}
    assert got["isolation.component"].string_value == "sandbox" and got["isolation.cgroup.path"].string_value == "/a/b"


@given(entries=st.lists(st.tuples(st.sampled_from(["self", "kernel", "other", "shop/web/web", "cgroup:7", "ü"]),
                                  st.integers(1, 2**50)), max_size=6))
def test_neighbor_attributes_wire(entries) -> None:
    a, b = Span(name="x"), Span(name="x")
    a.MergeFromString(wire_attributes(neighbor_attributes(entries)))
    b.MergeFromString(neighbor_attributes_wire(entries))
    assert list(a.attributes) == list(b.attributes)
    assert neighbor_attributes_wire(entries) == wire_attributes(neighbor_attributes(entries))


def test_children_merged_into_a_scope_in_one_call() -> None:
    """Appending the wire form to a ScopeSpans that already holds spans adds them after those."""
    parent = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="GET /")
    bd = Breakdown(stalls=[Stall("runqueue", 0, 3 * MS, 5, 5, 9, 0, {}),
                           Stall("cpu_throttle", 4 * MS, 9 * MS, 5, 5, 9, 0, {})], duration_ns=10 * MS)
    ss = ScopeSpans()
    ss.scope.name = "isoscope"
    ss.spans.add(name="existing")
    wire, n = child_spans_wire(parent, bd, lambda m: m, min_stall_ns=MS, max_children=16, window=(0, 10 * MS))
    ss.MergeFromString(wire)
    assert n == 2 and [s.name for s in ss.spans] == ["existing", "isolation L-3 runqueue",
                                                     "isolation L-3 cpu_throttle"]
    assert ss.scope.name == "isoscope"
    assert not math.isnan(ss.spans[1].start_time_unix_nano)


def test_span_ids_come_in_blocks_and_never_repeat() -> None:
    from isoscope.pipeline.enrich import SpanIds

    ids = SpanIds()
    got = [ids(8) for _ in range(3 * SpanIds.BLOCK // 8 + 5)]
    assert all(len(i) == 8 for i in got)
    assert len(set(got)) == len(got)
    assert len(ids(SpanIds.BLOCK + 3)) == SpanIds.BLOCK + 3
