"""Property-based tests (hypothesis) of the decoders and of the join.

The receivers' decoders must answer every input with a result or their own
error type (never another exception, never unbounded output); the join must
keep its invariants for any timeline: no more stall time than the window, the
kernel baseline never counting time a layer explains, coverage within [0, 1],
queries returning exactly the overlapping stalls, and bounded memory.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from isoscope import otlpjson
from isoscope.join.attribution import thread_breakdown
from isoscope.model import COMPONENT_LAYER, KERNEL, Stall
from isoscope.receivers.otlp.limits import BodyTooLarge, BoundedDecoder, CorruptBody, UnsupportedEncoding, decode_body
from isoscope.join.timeline import Timeline
from tests.otlp_backend import make_request

logger = logging.getLogger(__name__)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Timelines are costlier to generate; fewer examples keep the suite within its time budget.
SETTINGS_TIMELINE = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYER_COMPONENTS = [c for c, layer in COMPONENT_LAYER.items() if layer != KERNEL]


# -- decoders ----------------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=4096), limit=st.integers(1, 5000), encoding=st.sampled_from(["gzip", "deflate"]),
       splits=st.lists(st.integers(0, 4096), max_size=6))
def test_bounded_decoder_matches_zlib_or_refuses(data, limit, encoding, splits):
    if encoding == "gzip":
        body = gzip.compress(data)
    else:
        body = zlib.compress(data)
    cuts = sorted({min(c, len(body)) for c in splits} | {0, len(body)})
    dec = BoundedDecoder(encoding, limit)
    try:
        for a, b in zip(cuts, cuts[1:]):
            dec.feed(body[a:b])
        out = dec.finish()
    except BodyTooLarge:
        assert len(data) > limit or len(body) > limit
        return
    assert out == data
    assert len(out) <= limit


@SETTINGS
@given(body=st.binary(max_size=2048), limit=st.integers(1, 1 << 20),
       encoding=st.sampled_from(["gzip", "deflate", "identity", "", "x-gzip"]))
def test_bounded_decoder_never_raises_anything_else(body, limit, encoding):
    try:
        out = decode_body(body, encoding, limit)
    except (BodyTooLarge, CorruptBody):
        return
    assert len(out) <= limit


@SETTINGS
@given(encoding=st.text(max_size=12))
def test_unknown_encodings_are_refused_by_name(encoding):
    assume(encoding.strip().lower() not in {"gzip", "deflate", "identity", "", "x-gzip"})
    with pytest.raises(UnsupportedEncoding):
        BoundedDecoder(encoding, 100)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "parentSpanId", "name",
                         "links", "attributes", "key", "value", "stringValue", "kvlistValue", "values",
                         "startTimeUnixNano", "kind", "x"]), children, max_size=5),
    max_leaves=30)


@SETTINGS
@given(doc=JSON_VALUES)
def test_json_decoder_answers_any_document_with_a_request_or_its_error(doc):
    try:
        req = otlpjson.decode_request(json.dumps(doc))
    except otlpjson.OtlpJsonError:
        return
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                assert len(span.trace_id) in (0, 16) and len(span.span_id) in (0, 8)


@SETTINGS
@given(data=st.binary(max_size=512))
def test_json_decoder_on_arbitrary_bytes(data):
    try:
        otlpjson.decode_request(data)
    except otlpjson.OtlpJsonError:
        pass


@SETTINGS
@given(ids=st.lists(st.integers(1, 2**64 - 1), min_size=1, max_size=20, unique=True),
       name=st.text(max_size=30), trace=st.binary(min_size=16, max_size=16))
def test_json_round_trip(ids, name, trace):
    req = make_request(ids, trace_id=trace)
    for span in req.resource_spans[0].scope_spans[0].spans:
        span.name = name
    assert otlpjson.decode_request(otlpjson.encode_request(req)) == req


# -- the join ----------------------------------------------------------------------


def _disjoint(draw, n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    points = sorted(draw(st.lists(st.integers(lo, hi), min_size=2 * n, max_size=2 * n, unique=True)))
    return [(points[2 * i], points[2 * i + 1]) for i in range(n)]


@st.composite
def thread_timelines(draw):
    """One thread's stalls as the kernel reports them: layer stalls never overlap each
    other (a thread is held back by one thing at a time), syscalls never overlap each
    other, but a layer stall may sit inside a syscall (a run-queue wait in a read)."""
    lo, hi = 0, 10_000
    layer_iv = _disjoint(draw, draw(st.integers(0, 6)), lo, hi)
    sys_iv = _disjoint(draw, draw(st.integers(0, 6)), lo, hi)
    stalls = [Stall(draw(st.sampled_from(LAYER_COMPONENTS)), a, b, 7, 7) for a, b in layer_iv]
    stalls += [Stall("syscall", a, b, 7, 7) for a, b in sys_iv]
    start = draw(st.integers(lo - 100, hi))
    end = draw(st.integers(start, hi + 100))
    return draw(st.permutations(stalls)), start, end


def _merged(ivs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ivs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _covered(point_lo: int, point_hi: int, ivs: list[tuple[int, int]]) -> int:
    return sum(max(0, min(b, point_hi) - max(a, point_lo)) for a, b in ivs)


@SETTINGS
@given(tl=thread_timelines())
def test_thread_breakdown_invariants(tl):
    stalls, start, end = tl
    bd = thread_breakdown(list(stalls), start, end)
    assert bd.duration_ns == end - start
    assert all(ns > 0 for ns in bd.component_ns.values())
    clipped = [(s.component, max(s.start_mono_ns, start), min(s.end_mono_ns, end)) for s in stalls]
    clipped = [(c, a, b) for c, a, b in clipped if b > a]
    layer_iv = [(a, b) for c, a, b in clipped if c != "syscall"]
    # A blocking syscall that waited on a virtio request counts as the device's time end to end.
    device = [(a, b) for c, a, b in clipped if c == "virtio_io"]
    for a, b in _merged([(a, b) for c, a, b in clipped if c == "syscall"]):
        if _covered(a, b, device):
            layer_iv.append((a, b))
    layer_iv = _merged(layer_iv)
    assert bd.overhead_ns() == _covered(start, end, layer_iv)
    assert bd.overhead_ns() <= bd.duration_ns
    assert 0.0 <= bd.overhead_ratio() <= 1.0
    # Kernel baseline: syscall time inside the window minus what layers explain.
    expected_kernel = 0
    for a, b in _merged([(a, b) for c, a, b in clipped if c == "syscall"]):
        expected_kernel += (b - a) - _covered(a, b, layer_iv)
    assert bd.component_ns.get("syscall", 0) == expected_kernel
    assert sum(bd.component_ns.values()) <= bd.duration_ns
    # Exactly the stalls overlapping the window are kept for child spans.
    assert sorted(map(_key, bd.stalls)) == sorted(
        _key(s) for s in stalls if min(s.end_mono_ns, end) > max(s.start_mono_ns, start))


def _key(s: Stall) -> tuple:
    """What identifies a stall for the join (the timeline stores per-thread identity once)."""
    return (s.component, s.start_mono_ns, s.end_mono_ns, s.tid, s.cpu)


@st.composite
def stall_sets(draw):
    n = draw(st.integers(0, 40))
    out = []
    for _ in range(n):
        a = draw(st.integers(0, 5000))
        out.append(Stall(draw(st.sampled_from(LAYER_COMPONENTS + ["syscall"])), a, a + draw(st.integers(0, 800)),
                         draw(st.integers(1, 4)), 100, cgroup_id=draw(st.sampled_from([0, 11, 12]))))
    return out


@SETTINGS_TIMELINE
@given(stalls=stall_sets(), start=st.integers(-100, 6000), length=st.integers(0, 3000))
def test_timeline_query_returns_exactly_the_overlapping_stalls(stalls, start, length):
    end = start + length
    tl = Timeline(ttl_s=3600, max_threads=100, max_per_thread=1000)
    for s in stalls:
        tl.add_stall(s)
    for tid in (1, 2, 3, 4):
        got = tl.query(start, end, tid=tid).get(tid, [])
        want = [s for s in stalls if s.tid == tid and s.end_mono_ns > start and s.start_mono_ns < end]
        assert sorted(map(_key, got)) == sorted(map(_key, want))
    by_pid = tl.query(start, end, pid=100)
    assert sum(len(v) for v in by_pid.values()) == sum(
        1 for s in stalls if s.end_mono_ns > start and s.start_mono_ns < end)


@SETTINGS
@given(n_threads=st.integers(1, 300), per_thread=st.integers(1, 50), max_threads=st.integers(1, 64),
       cap=st.integers(1, 16))
def test_timeline_memory_is_bounded(n_threads, per_thread, max_threads, cap):
    tl = Timeline(ttl_s=1.0, max_threads=max_threads, max_per_thread=cap)
    t = 0
    for tid in range(1, n_threads + 1):
        for _ in range(per_thread):
            t += 10
            tl.add_stall(Stall("runqueue", t, t + 5, tid, tid, cgroup_id=tid))
    threads, records = tl.size()
    assert threads <= max_threads
    assert records <= max_threads * cap
    # Past the TTL everything goes, including the per-pid and per-cgroup indexes.
    tl.evict(now_mono_ns=t + 5 + int(1e9) + 1)
    assert tl.size() == (0, 0)
    assert tl.threads_of(pid=1) == [] and tl.threads_of(cgroup_id=n_threads) == []


@SETTINGS
@given(ups=st.lists(st.integers(0, 1000), min_size=1, max_size=4),
       losses=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 500)), max_size=10),
       start=st.integers(0, 2000), length=st.integers(0, 2000), drained=st.integers(0, 4000))
def test_coverage_is_a_share(ups, losses, start, length, drained):
    tl = Timeline()
    for i, at in enumerate(ups):
        tl.set_probe_up(f"p{i}", True, at_mono_ns=at)
    for a, n in losses:
        tl.note_loss("p0", a, a + n)
    end = start + length
    cov = tl.coverage(start, end, drained)
    assert 0.0 <= cov <= 1.0
    if not losses and length and drained >= end and max(ups) <= start:
        assert cov == 1.0
    if any(a <= start and a + n >= end for a, n in losses):
        assert cov == 0.0


@SETTINGS_TIMELINE
@given(stalls=stall_sets(), start=st.integers(0, 5000), length=st.integers(1, 3000))
def test_breakdown_never_exceeds_the_window_for_any_timeline(stalls, start, length):
    """Even for stalls that overlap each other (two probes seeing the same wait, duplicated
    events after a ring-buffer replay) no thread can lose more time than the window."""
    end = start + length
    for tid in (1, 2, 3, 4):
        bd = thread_breakdown([s for s in stalls if s.tid == tid], start, end)
        assert bd.overhead_ns() <= bd.duration_ns
