"""Receiver limits: linear multi-member decoding, span/attribute limits with OTLP's answers, memory reservations."""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from typing import Any, Iterator

import grpc
import pytest
import requests
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from isoscope import otlpjson
from isoscope.host.memguard import MemoryExhausted, MemoryGuard
from isoscope.model import Backpressure, Stats, TraceBatch
from isoscope.receivers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver
from isoscope.receivers.otlp.limits import BoundedDecoder, RequestLimits, RequestOverLimit, held_estimate
from isoscope.receivers.otlp.validate import validate_request
from tests.otlp_backend import make_request

PB = "application/x-protobuf"
JSON = "application/json"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SMALL = RequestLimits(max_spans_per_request=100, max_attributes_per_span=5, max_events_per_span=2,
                      max_links_per_span=2, max_total_attributes_per_request=50)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []

    def consume(self, batch: TraceBatch) -> None:
        # The end of the line, like an exporter queue that has serialized the batch: the copy kept
        # for the assertions is not the daemon's memory to account for.
        batch.release_memory()
        self.batches.append(batch)

    def span_ids(self) -> list[int]:
        return [int.from_bytes(s.span_id, "big") for b in self.batches
                for rs in b.request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _with_attrs(req: ExportTraceServiceRequest, index: int, n: int) -> None:
    span = req.resource_spans[0].scope_spans[0].spans[index]
    for i in range(n):
        kv = span.attributes.add()
        kv.key, kv.value.int_value = f"a{i}", i


# -- decoding in linear time ---------------------------------------------------------


def test_gzip_members_decode_in_linear_time():
    member = gzip.compress(b"")

    def cost(n: int) -> tuple[float, int]:
        body = member * n
        best = float("inf")
        for _ in range(3):
            t0 = time.process_time()
            dec = BoundedDecoder("gzip", 20 << 20)
            for i in range(0, len(body), 65536):
                dec.feed(body[i:i + 65536])
            assert dec.finish() == b""
            best = min(best, time.process_time() - t0)
        return best, dec.members

    small, m_small = cost(10_000)
    big, m_big = cost(100_000)
    assert (m_small, m_big) == (10_000, 100_000)
    # 10x the members: linear is ~10x; the old decoder (a copy of the rest of
    # the body per member) was ~100x. 30x leaves room for a noisy machine.
    assert big / small < 30, (small, big)


def test_multi_member_and_padding_still_decode_exactly():
    parts = [b"alpha" * 1000, b"", b"beta", bytes(range(256)) * 300]
    body = b"".join(gzip.compress(p) for p in parts) + b"\x00" * 7
    for step in (1, 7, 300, len(body)):
        dec = BoundedDecoder("gzip", 1 << 20)
        for i in range(0, len(body), step):
            dec.feed(body[i:i + step])
        assert dec.finish() == b"".join(parts)
        assert dec.members == len(parts)


# -- limits on the request's shape -------------------------------------------------------


def test_span_over_a_per_span_limit_is_dropped_with_partial_success():
    req = make_request([1, 2, 3])
    _with_attrs(req, 1, 6)
    ev = req.resource_spans[0].scope_spans[0].spans[2]
    for _ in range(3):
        ev.events.add().name = "e"
    result = validate_request(req, SMALL)
    assert result.rejected == 2 and result.accepted_spans == 1
    assert "more than 5 attributes" in result.message and "more than 2 events" in result.message
    assert [s.span_id[-1] for s in req.resource_spans[0].scope_spans[0].spans] == [1]


def test_request_over_a_per_request_limit_is_refused_whole():
    with pytest.raises(RequestOverLimit) as exc:
        validate_request(make_request(range(1, 102)), SMALL)
    assert exc.value.limit == "max_spans_per_request"
    req = make_request(range(1, 12))
    for i in range(11):
        _with_attrs(req, i, 5)  # 55 span attributes + 1 resource attribute > 50
    with pytest.raises(RequestOverLimit) as exc:
        validate_request(req, SMALL)
    assert exc.value.limit == "max_total_attributes_per_request"
    # At the limits exactly, nothing is refused.
    req = make_request(range(1, 10))
    for i in range(9):
        _with_attrs(req, i, 5)
    assert validate_request(req, SMALL).rejected == 0


# -- the receivers' answers ------------------------------------------------------------


@pytest.fixture
def http_env():
    rec, stats = Recorder(), Stats()
    r = OtlpHttpReceiver(rec, stats, "127.0.0.1:0", limits=SMALL, memory=MemoryGuard(None), resolve_peers=False)
    r.start()
    yield rec, stats, f"http://127.0.0.1:{r.port}/v1/traces", r
    r.shutdown(1.0)


@pytest.fixture
def grpc_env():
    rec, stats = Recorder(), Stats()
    with grpc_export(rec, stats, MemoryGuard(None), limits=SMALL) as call:
        yield rec, stats, call


@contextlib.contextmanager
def grpc_export(consumer: Any, stats: Stats, guard: MemoryGuard, **kwargs: Any) -> Iterator[Any]:
    """A real gRPC receiver in front of ``consumer``; yields a raw Export call."""
    r = OtlpGrpcReceiver(consumer, stats, "127.0.0.1:0", memory=guard, resolve_peers=False, **kwargs)
    r.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{r.port}")
    try:
        yield ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
    finally:
        ch.close()
        r.shutdown(1.0)


@pytest.mark.parametrize("media", [PB, JSON])
def test_http_partial_success_for_span_limits(http_env, media):
    rec, _, url, _ = http_env
    req = make_request([1, 2])
    _with_attrs(req, 0, 6)
    body = otlpjson.encode_request(req).encode() if media == JSON else req.SerializeToString()
    r = requests.post(url, data=body, headers={"Content-Type": media}, timeout=10)
    assert r.status_code == 200
    if media == JSON:
        ps = json.loads(r.content)["partialSuccess"]
        assert int(ps["rejectedSpans"]) == 1 and "attributes" in ps["errorMessage"]
    else:
        ps = ExportTraceServiceResponse.FromString(r.content).partial_success
        assert ps.rejected_spans == 1 and "attributes" in ps.error_message
    assert rec.span_ids() == [2]


@pytest.mark.parametrize("media", [PB, JSON])
def test_http_400_for_request_limits(http_env, media):
    rec, stats, url, _ = http_env
    req = make_request(range(1, 102))
    body = otlpjson.encode_request(req).encode() if media == JSON else req.SerializeToString()
    r = requests.post(url, data=body, headers={"Content-Type": media}, timeout=10)
    assert r.status_code == 400
    if media == PB:
        st = status_pb2.Status.FromString(r.content)
    else:
        st = status_pb2.Status(**{k: v for k, v in json.loads(r.content).items() if k in ("code", "message")})
    assert st.code == code_pb2.INVALID_ARGUMENT and "max_spans_per_request" in st.message
    assert rec.batches == []
    assert stats.counter("requests_rejected_total", ("http", "limit")) == 1


def test_grpc_answers_for_span_and_request_limits(grpc_env):
    rec, _, call = grpc_env
    req = make_request([1, 2])
    _with_attrs(req, 1, 6)
    resp = ExportTraceServiceResponse.FromString(call(req.SerializeToString(), timeout=10))
    assert resp.partial_success.rejected_spans == 1
    assert rec.span_ids() == [1]
    with pytest.raises(grpc.RpcError) as exc:
        call(make_request(range(1, 102)).SerializeToString(), timeout=10)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_spans_per_request" in exc.value.details()


def test_http_429_with_retry_after_when_the_inflight_budget_is_taken():
    rec, stats = Recorder(), Stats()
    guard = MemoryGuard(None, max_inflight_bytes=1 << 20)
    r = OtlpHttpReceiver(rec, stats, "127.0.0.1:0", memory=guard, resolve_peers=False)
    r.start()
    try:
        url = f"http://127.0.0.1:{r.port}/v1/traces"
        body = make_request([1]).SerializeToString()
        held = guard.reserve(1 << 20)  # another request holds the whole budget
        resp = requests.post(url, data=body, headers={"Content-Type": PB}, timeout=10)
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
        assert status_pb2.Status.FromString(resp.content).code == code_pb2.RESOURCE_EXHAUSTED
        held.release()
        resp = requests.post(url, data=body, headers={"Content-Type": PB}, timeout=10)
        assert resp.status_code == 200
        assert guard.reserved_bytes == 0  # released when the request was done
        assert rec.span_ids() == [1]
    finally:
        r.shutdown(1.0)


def test_grpc_resource_exhausted_with_retry_info_when_the_inflight_budget_is_taken():
    rec = Recorder()
    guard = MemoryGuard(None, max_inflight_bytes=1 << 20)
    with grpc_export(rec, Stats(), guard) as call:
        held = guard.reserve(1 << 20)
        with pytest.raises(grpc.RpcError) as exc:
            call(make_request([1]).SerializeToString(), timeout=10)
        assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert any(k == "google.rpc.retryinfo-bin" for k, _ in exc.value.trailing_metadata())
        held.release()
        call(make_request([1]).SerializeToString(), timeout=10)
        assert rec.span_ids() == [1] and guard.reserved_bytes == 0


def test_grpc_batch_carries_its_share_of_the_reservation_and_a_refused_one_returns_it():
    class Holder:
        """A consumer that keeps the batch (as the join's hold queue does), or refuses it."""

        def __init__(self) -> None:
            self.batches: list[TraceBatch] = []
            self.refuse = False

        def consume(self, batch: TraceBatch) -> None:
            if self.refuse:
                raise Backpressure("full", retry_after_s=1.0)
            self.batches.append(batch)

    holder = Holder()
    guard = MemoryGuard(None, max_inflight_bytes=64 << 20)
    with grpc_export(holder, Stats(), guard) as call:
        raw = make_request([1, 2, 3]).SerializeToString()
        call(raw, timeout=10)
        assert guard.reserved_bytes == held_estimate(len(raw)) > 0  # held with the batch
        holder.batches[0].release_memory()
        assert guard.reserved_bytes == 0
        holder.refuse = True
        with pytest.raises(grpc.RpcError) as exc:
            call(raw, timeout=10)
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE
        assert guard.reserved_bytes == 0  # no batch kept it


# -- the memory guard's reservations ----------------------------------------------------


def test_reservations_share_a_cap_and_a_lone_one_is_clipped_not_refused():
    g = MemoryGuard(None, max_inflight_bytes=100)
    big = g.reserve(500, share=0.75)  # alone: clipped to its share of the cap
    assert big.nbytes == 75
    small = g.reserve(20)  # small requests still fit beside it
    with pytest.raises(MemoryExhausted):
        g.reserve(10, share=0.75)  # a second large one does not
    with pytest.raises(MemoryExhausted):
        g.reserve(10)  # nor anything past the whole cap
    big.release()
    small.release()
    assert g.reserved_bytes == 0
    with g.reserve(60) as r:
        r.grow(30)
        with pytest.raises(MemoryExhausted):
            g.reserve(20)
    assert g.reserved_bytes == 0


def test_reservation_refused_near_the_memory_high_water_mark():
    from isoscope.host.memguard import resident_anon_bytes
    rss = resident_anon_bytes()
    g = MemoryGuard(int((rss + (64 << 20)) / 0.8), max_inflight_bytes=1 << 30)
    g.reserve(16 << 20).release()
    with pytest.raises(MemoryExhausted) as exc:
        g.reserve(256 << 20)
    assert exc.value.retry_after_s > 0


# -- streamed OTLP/JSON -------------------------------------------------------------------


def test_streamed_json_is_exactly_the_whole_request_encoding():
    req = make_request(range(1, 40))
    req.resource_spans.add()
    rs = req.resource_spans.add()
    rs.schema_url = "s"
    rs.resource.SetInParent()
    ss = rs.scope_spans.add()
    ss.schema_url = "é\u2028\x00"
    sp = ss.spans.add()
    sp.trace_id, sp.span_id = b"\x03" * 16, b"\x04" * 8
    link = sp.links.add()
    link.trace_id, link.span_id = b"\x05" * 16, b"\x06" * 8
    whole = json.dumps(otlpjson.request_to_dict(req), separators=(",", ":"), ensure_ascii=False)
    streamed = list(otlpjson.iter_request_json(req))
    assert "".join(streamed) == whole == otlpjson.encode_request(req)
    assert max(len(p) for p in streamed) < len(whole) / 10  # pieces, not one copy
    assert otlpjson.decode_request(whole) == req
