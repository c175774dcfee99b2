"""OTLP/HTTP receiver against real HTTP clients and the real OpenTelemetry SDK exporter."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import socket
import threading
import time

import psutil
import pytest
import requests
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from isoscope.model import Backpressure, Stats, TraceBatch, iter_spans
from isoscope.receivers.otlp import OtlpHttpReceiver

PB = "application/x-protobuf"
JS = "application/json"
TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"


class Recorder:
    """A consumer that keeps batches and can push back a given number of times."""

    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []
        self.pushback = 0
        self.retry_after_s = 1.0
        self.calls = 0
        self.lock = threading.Lock()

    def consume(self, batch: TraceBatch) -> None:
        with self.lock:
            self.calls += 1
            if self.pushback > 0:
                self.pushback -= 1
                raise Backpressure("queue full", retry_after_s=self.retry_after_s)
            self.batches.append(batch)

    def spans(self) -> list:
        return [s for b in self.batches for s in iter_spans(b.request)]


def _start(**kw):
    rec, stats = Recorder(), Stats()
    receiver = OtlpHttpReceiver(rec, stats, "127.0.0.1:0", **kw)
    addr = receiver.start()
    return receiver, rec, stats, f"http://{addr}"


@pytest.fixture()
def env():
    receiver, rec, stats, base = _start()
    yield receiver, rec, stats, base
    receiver.shutdown(1.0)


def _json_request(span: dict | None = None) -> dict:
    span = span if span is not None else {"traceId": TRACE, "spanId": SPAN, "name": "json-op", "kind": 2,
                                          "startTimeUnixNano": "1700000000000000000",
                                          "endTimeUnixNano": "1700000000100000000"}
    return {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{"scope": {"name": "s"}, "spans": [span]}]}]}


def _pb_request(n: int = 1) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(trace_id=bytes.fromhex(TRACE), span_id=bytes(7) + bytes([i + 1]), name=f"pb{i}")
    return req


def _status(resp: requests.Response) -> status_pb2.Status:
    st = status_pb2.Status()
    if resp.headers["Content-Type"].startswith(JS):
        json_format.Parse(resp.text, st)
    else:
        st.ParseFromString(resp.content)
    return st


def _finished_spans(*names: str) -> list:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "http-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for name in names:
        provider.get_tracer("t").start_span(name).end()
    return list(memory.get_finished_spans())


# -- real SDK exporter ---------------------------------------------------------

@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate])
def test_sdk_exporter_delivers_spans(env, compression):
    _, rec, stats, base = env
    exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", compression=compression, timeout=10)
    assert exporter.export(_finished_spans("a", "b")) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert sorted(s.name for s in rec.spans()) == ["a", "b"]
    b = rec.batches[0]
    assert b.protocol == "http" and b.span_count == 2
    assert b.peer_addr.startswith("127.0.0.1:")
    assert b.peer_pid == os.getpid()
    assert stats.counter("spans_received_total", ("http",)) == 2


def test_sdk_exporter_honours_retry_after(env):
    _, rec, stats, base = env
    rec.pushback, rec.retry_after_s = 1, 0.2  # rounded up to Retry-After: 1
    exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=10)
    t0 = time.monotonic()
    assert exporter.export(_finished_spans("retried")) == SpanExportResult.SUCCESS
    elapsed = time.monotonic() - t0
    exporter.shutdown()
    assert rec.calls == 2 and [s.name for s in rec.spans()] == ["retried"]
    assert 0.9 <= elapsed < 3.0, elapsed
    assert stats.counter("requests_rejected_total", ("http", "backpressure")) == 1


# -- encodings and content types -------------------------------------------------

def test_json_request_gets_json_response(env):
    _, rec, _, base = env
    r = requests.post(f"{base}/v1/traces", json=_json_request(), timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith(JS)
    resp = json_format.Parse(r.text, ExportTraceServiceResponse())
    assert not resp.HasField("partial_success")
    span = rec.spans()[0]
    assert span.trace_id.hex() == TRACE and span.span_id.hex() == SPAN and span.kind == 2
    assert span.end_time_unix_nano - span.start_time_unix_nano == 100_000_000


def test_uppercase_hex_ids_are_accepted(env):
    _, rec, _, base = env
    span = {"traceId": TRACE.upper(), "spanId": SPAN.upper(), "name": "upper"}
    r = requests.post(f"{base}/v1/traces", json=_json_request(span), timeout=10)
    assert r.status_code == 200
    assert rec.spans()[0].trace_id.hex() == TRACE


def test_protobuf_request_gets_protobuf_response(env):
    _, rec, _, base = env
    r = requests.post(f"{base}/v1/traces", data=_pb_request(3).SerializeToString(),
                      headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == PB
    ExportTraceServiceResponse.FromString(r.content)
    assert [s.name for s in rec.spans()] == ["pb0", "pb1", "pb2"]


def test_empty_body_is_success(env):
    _, rec, _, base = env
    for ctype in (PB, JS):
        body = b"{}" if ctype == JS else b""
        r = requests.post(f"{base}/v1/traces", data=body, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"] == ctype
    assert rec.calls == 0


def test_content_type_parameters_are_ignored(env):
    _, rec, _, base = env
    r = requests.post(f"{base}/v1/traces", data=json.dumps(_json_request()),
                      headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert r.status_code == 200 and len(rec.spans()) == 1


# -- bad data -------------------------------------------------------------------

@pytest.mark.parametrize("span,needle", [
    ({"traceId": TRACE[:-2], "spanId": SPAN}, "traceId: must be 16 bytes"),
    ({"traceId": TRACE, "spanId": SPAN + "00"}, "spanId: must be 8 bytes"),
    ({"traceId": "zz" * 16, "spanId": SPAN}, "is not hex"),
    ({"traceId": TRACE, "spanId": SPAN, "parentSpanId": 12}, "expected a hex string"),
    ({"traceId": TRACE, "spanId": SPAN, "startTimeUnixNano": "soon"}, "startTimeUnixNano"),
])
def test_bad_json_ids_are_400_with_json_status(env, span, needle):
    _, rec, stats, base = env
    r = requests.post(f"{base}/v1/traces", json=_json_request(span), timeout=10)
    assert r.status_code == 400
    assert r.headers["Content-Type"].startswith(JS)
    assert needle in _status(r).message
    assert rec.calls == 0
    assert stats.counter("requests_rejected_total", ("http", "malformed")) == 1


@pytest.mark.parametrize("body", [
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\xff\xfe"}]}]}]}',
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\\udc80"}]}]}]}',
    b'{"resourceSpans": [',
    b'[1, 2]',
])
def test_invalid_json_and_utf8_are_400(env, body):
    _, rec, _, base = env
    r = requests.post(f"{base}/v1/traces", data=body, headers={"Content-Type": JS}, timeout=10)
    assert r.status_code == 400, r.text
    assert _status(r).message
    assert rec.calls == 0


@pytest.mark.parametrize("body", [
    _pb_request().SerializeToString()[:-4],
    os.urandom(64) + b"\x0a\xff\xff\xff\x0f",
    _pb_request().SerializeToString().replace(b"pb0", b"\xff\xc3\x28"),
])
def test_malformed_protobuf_is_400_with_protobuf_status(env, body):
    _, rec, _, base = env
    r = requests.post(f"{base}/v1/traces", data=body, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 400
    assert r.headers["Content-Type"] == PB
    assert "ExportTraceServiceRequest" in _status(r).message
    assert rec.calls == 0


def test_deep_anyvalue_gives_partial_success(env):
    _, rec, stats, base = env
    deep: dict = {"intValue": "1"}
    for _ in range(40):
        deep = {"arrayValue": {"values": [deep]}}
    bad = {"traceId": TRACE, "spanId": "00000000000000aa", "name": "deep",
           "attributes": [{"key": "deep", "value": deep}]}
    doc = _json_request()
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"].append(bad)
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"].append(
        {"traceId": "0" * 32, "spanId": SPAN, "name": "zero-trace"})
    r = requests.post(f"{base}/v1/traces", json=doc, timeout=10)
    assert r.status_code == 200
    resp = json_format.Parse(r.text, ExportTraceServiceResponse())
    assert resp.partial_success.rejected_spans == 2
    assert "nested deeper than 32" in resp.partial_success.error_message
    assert [s.name for s in rec.spans()] == ["json-op"]
    assert stats.counter("spans_received_total", ("http",)) == 3
    assert stats.counter("spans_dropped_total", ("invalid",)) == 2


def test_kvlist_nesting_past_protobuf_depth_is_400(env):
    _, rec, _, base = env
    deep: dict = {"intValue": "1"}
    for _ in range(40):  # 3 messages per level: past protobuf's 100-message parse depth
        deep = {"kvlistValue": {"values": [{"key": "k", "value": deep}]}}
    span = {"traceId": TRACE, "spanId": SPAN, "attributes": [{"key": "deep", "value": deep}]}
    r = requests.post(f"{base}/v1/traces", json=_json_request(span), timeout=10)
    assert r.status_code == 400 and "too deep" in _status(r).message
    assert rec.calls == 0


# -- limits ---------------------------------------------------------------------

def test_body_over_20mib_with_content_length_is_413(env):
    _, rec, stats, base = env
    body = _pb_request().SerializeToString() + b"\x00" * (20 * 1024 * 1024)
    r = requests.post(f"{base}/v1/traces", data=body, headers={"Content-Type": PB}, timeout=30)
    assert r.status_code == 413
    assert "exceeds the limit" in _status(r).message
    assert rec.calls == 0
    assert stats.counter("requests_rejected_total", ("http", "too_large")) == 1


def test_streamed_body_over_limit_is_413():
    receiver, rec, _, base = _start(max_body_bytes=256 * 1024)
    try:
        def chunks():
            for _ in range(64):
                yield b"\x00" * 16384  # 1 MiB in total, chunked: no Content-Length
        try:
            r = requests.post(f"{base}/v1/traces", data=chunks(), headers={"Content-Type": PB}, timeout=10)
            assert r.status_code == 413
        except requests.ConnectionError:
            pytest.fail("server closed the connection without a 413 response")
        assert rec.calls == 0
    finally:
        receiver.shutdown(1.0)


def _rss_peak_during(fn) -> tuple[int, object]:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return peak - base, result


def test_gzip_bomb_is_413_without_inflating(env):
    _, rec, _, base = env
    bomb = gzip.compress(b"\x00" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100 * 1024
    # Warm up the connection machinery so the measurement sees only the bomb.
    requests.post(f"{base}/v1/traces", data=b"", headers={"Content-Type": PB}, timeout=10)
    growth, r = _rss_peak_during(lambda: requests.post(
        f"{base}/v1/traces", data=bomb, headers={"Content-Type": PB, "Content-Encoding": "gzip"}, timeout=30))
    assert r.status_code == 413
    assert "after decompression" in _status(r).message
    assert growth < 4 * 1024 * 1024, f"RSS grew by {growth} bytes"
    assert rec.calls == 0


def test_gzip_body_under_limit_is_accepted(env):
    _, rec, _, base = env
    body = gzip.compress(_pb_request(50).SerializeToString())
    r = requests.post(f"{base}/v1/traces", data=body,
                      headers={"Content-Type": PB, "Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 200 and len(rec.spans()) == 50


def test_corrupt_gzip_is_400(env):
    _, rec, _, base = env
    body = gzip.compress(_pb_request().SerializeToString())[:-6]
    r = requests.post(f"{base}/v1/traces", data=body,
                      headers={"Content-Type": PB, "Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 400 and "gzip" in _status(r).message


# -- protocol errors ----------------------------------------------------------

def test_unknown_content_encoding_is_415(env):
    _, rec, stats, base = env
    r = requests.post(f"{base}/v1/traces", data=b"xx",
                      headers={"Content-Type": PB, "Content-Encoding": "br"}, timeout=10)
    assert r.status_code == 415
    assert "'br' is not supported" in _status(r).message
    assert stats.counter("requests_rejected_total", ("http", "unsupported_encoding")) == 1


def test_unknown_content_type_is_415(env):
    _, _, _, base = env
    r = requests.post(f"{base}/v1/traces", data=b"x", headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and r.headers["Content-Type"] == PB
    assert "text/plain" in _status(r).message


def test_unknown_path_and_wrong_method(env):
    _, _, _, base = env
    r = requests.post(f"{base}/v1/metrics", data=b"", headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 404 and "/v1/traces" in _status(r).message
    r = requests.get(f"{base}/v1/traces", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


def test_backpressure_is_503_with_retry_after(env):
    _, rec, stats, base = env
    rec.pushback, rec.retry_after_s = 1, 2.2
    r = requests.post(f"{base}/v1/traces", json=_json_request(), timeout=10)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "3"
    assert r.headers["Content-Type"].startswith(JS)
    assert _status(r).message == "queue full"
    assert stats.counter_total("spans_received_total") == 0
    r = requests.post(f"{base}/v1/traces", json=_json_request(), timeout=10)
    assert r.status_code == 200 and len(rec.spans()) == 1


# -- robustness -----------------------------------------------------------------

def test_idle_connections_and_slow_body_do_not_starve_clients():
    receiver, rec, _, base = _start(body_timeout_s=2.0, idle_timeout_s=20.0)
    host, port = base[len("http://"):].split(":")
    idle: list[socket.socket] = []
    slow = None
    try:
        for _ in range(1000):
            s = socket.create_connection((host, int(port)), timeout=5)
            idle.append(s)
        # Half a request line on some of them: stuck parsing headers.
        for s in idle[:100]:
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
        body = _pb_request().SerializeToString()
        slow = socket.create_connection((host, int(port)), timeout=5)
        slow.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:3])
        t0 = time.monotonic()
        r = requests.post(f"{base}/v1/traces", data=_pb_request(2).SerializeToString(),
                          headers={"Content-Type": PB}, timeout=5)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200
        assert elapsed < 0.5, f"normal client waited {elapsed:.3f}s"
        # The trickled body never completes: the receiver gives up on it with 408.
        slow.settimeout(5)
        reply = slow.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert [s.name for s in rec.spans()] == ["pb0", "pb1"]
    finally:
        for s in idle:
            s.close()
        if slow is not None:
            slow.close()
        receiver.shutdown(1.0)


def test_idle_connection_is_closed_after_timeout():
    receiver, _, _, base = _start(idle_timeout_s=0.5)
    host, port = base[len("http://"):].split(":")
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(b"POST /v1/traces HTTP/1.1\r\n")  # headers never finished
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 3.0
        s.close()
    finally:
        receiver.shutdown(1.0)


def test_keep_alive_connection_serves_many_requests(env):
    _, rec, _, base = env
    host, port = base[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    for _ in range(20):
        conn.request("POST", "/v1/traces", body=_pb_request().SerializeToString(), headers={"Content-Type": PB})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()
    assert len(rec.batches) == 20


def test_shutdown_releases_port():
    receiver, _, _, base = _start()
    port = int(base.rsplit(":", 1)[1])
    receiver.shutdown(1.0)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{base}/v1/traces", data=b"", timeout=2)
    again = OtlpHttpReceiver(Recorder(), Stats(), f"127.0.0.1:{port}")
    again.start()
    again.shutdown(1.0)


# -- bounded decoding -------------------------------------------------------------

def test_bounded_decoder_streams_and_limits():
    import zlib
    from isoscope.receivers.otlp.limits import BodyTooLarge, BoundedDecoder, CorruptBody, UnsupportedEncoding
    data = os.urandom(3000) * 20
    gz = gzip.compress(data) + gzip.compress(b"tail")  # two members
    dec = BoundedDecoder("GZIP", 10**6)
    for i in range(0, len(gz), 11):
        dec.feed(gz[i:i + 11])
    assert dec.finish() == data + b"tail"
    dec = BoundedDecoder("deflate", 10**6)
    dec.feed(zlib.compress(data))
    assert dec.finish() == data
    with pytest.raises(BodyTooLarge):
        BoundedDecoder("gzip", len(data) - 1).feed(gzip.compress(data))
    with pytest.raises(BodyTooLarge):
        BoundedDecoder("identity", 10).feed(b"x" * 11)
    with pytest.raises(CorruptBody):
        d = BoundedDecoder("gzip", 10**6)
        d.feed(gzip.compress(data)[:-10])
        d.finish()
    with pytest.raises(CorruptBody):
        BoundedDecoder("gzip", 10**6).feed(b"definitely not gzip")
    with pytest.raises(UnsupportedEncoding):
        BoundedDecoder("zstd", 10)
    assert BoundedDecoder("gzip", 10).finish() == b""
