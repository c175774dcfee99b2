"""Hostile and broken input against the running daemon.

Each case sends one kind of bad request through the real receivers and checks
the answer (status and code), then that a well-behaved gRPC client, a
well-behaved HTTP client and a ``/metrics`` scrape are still served and the
daemon is still running. One daemon serves the whole module, so a case that
leaves damage behind (a leaked thread, a wedged loop, swollen memory) shows up
in the cases after it.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import random
import socket
import threading
import time
import zlib
from typing import Iterator

import grpc
import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.otlp_backend import OtlpBackend, make_payload, make_request, span_hex
from isoscope_lab.launcher import IsoscopeDaemon
from tests.reliability.clients import GrpcClient, http_post, wait_until
logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IsoscopeDaemon, OtlpBackend]]:
    backend = OtlpBackend()
    d = IsoscopeDaemon(tmp_path_factory.mktemp("bad-input"), forward=[backend.grpc_url], probes=False,
                       config={"exporters": {"queue": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}}})
    try:
        d.start()
        yield d, backend
    finally:
        d.stop()
        backend.stop(graceful=False)


_next_id = iter(range(1_000_000, 2_000_000, 10))


def assert_still_serving(d: IsoscopeDaemon, backend: OtlpBackend) -> None:
    """A good gRPC and a good HTTP client get through, /metrics answers, the daemon runs."""
    assert d.alive(), d.log_tail()
    first = next(_next_id)
    client = GrpcClient(d.grpc_endpoint)
    try:
        code, details, _ = client.export(make_payload([first, first + 1]), timeout_s=10)
    finally:
        client.close()
    assert code is grpc.StatusCode.OK, details
    status, _, body = http_post(d.http_traces_url, make_payload([first + 2, first + 3]), timeout_s=10)
    assert status == 200, body
    assert "isoscope_spans_received_total" in d.metrics_text(timeout_s=10)
    want = {span_hex(first + i) for i in range(4)}
    assert wait_until(lambda: want <= set(backend.span_ids()), 15), "good spans were not forwarded"


def _ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    out = bytearray([(field << 3) | 2])
    n = len(payload)
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + payload


def _request_with_span_extra(extra_span_bytes: bytes) -> bytes:
    """A valid one-span request whose span carries extra raw field bytes (merged by protobuf)."""
    req = make_request([next(_next_id)])
    rs = req.resource_spans[0]
    span = rs.scope_spans[0].spans[0].SerializeToString() + extra_span_bytes
    scope = rs.scope_spans[0].scope.SerializeToString()
    scope_spans = _ld(1, scope) + _ld(2, span)
    resource_spans = _ld(1, rs.resource.SerializeToString()) + _ld(2, scope_spans)
    return _ld(1, resource_spans)


def _deep_anyvalue(depth: int) -> bytes:
    value = b""
    for _ in range(depth):
        value = _ld(5, _ld(1, value))  # AnyValue.array_value → ArrayValue.values → AnyValue
    return value


# -- size limits -------------------------------------------------------------------


def test_grpc_message_over_4_mib_is_resource_exhausted(env):
    d, backend = env
    big = make_request([next(_next_id)])
    big.resource_spans[0].scope_spans[0].spans[0].name = "x" * (5 * MIB)
    client = GrpcClient(d.grpc_endpoint)
    try:
        code, details, _ = client.export(big.SerializeToString(), timeout_s=20)
    finally:
        client.close()
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert_still_serving(d, backend)


def test_http_body_over_20_mib_is_413(env):
    d, backend = env
    status, _, _ = http_post(d.http_traces_url, b"\x0a" * (21 * MIB), timeout_s=30)
    assert status == 413
    # Same without a Content-Length (chunked): the limit holds while streaming.
    conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=30)
    try:
        def chunks() -> Iterator[bytes]:
            for _ in range(22):
                yield b"\x0a" * MIB
        try:
            conn.request("POST", "/v1/traces", body=chunks(), headers={"Content-Type": "application/x-protobuf"},
                         encode_chunked=True)
            status = conn.getresponse().status
        except (BrokenPipeError, ConnectionResetError):
            status = 413  # the server answered and closed while we were still sending
    finally:
        conn.close()
    assert status == 413
    assert_still_serving(d, backend)


def test_gzip_bomb_is_refused_without_memory_growth(env):
    """~500 KiB of gzip that inflates to 512 MiB: 413, and the daemon's RSS barely moves."""
    d, backend = env
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\x00" * (4 * MIB)
    bomb = b"".join(comp.compress(zeros) for _ in range(128)) + comp.flush()
    assert len(bomb) < MIB
    rss_before = d.rss_bytes()
    status, _, _ = http_post(d.http_traces_url, bomb, headers={"Content-Encoding": "gzip"}, timeout_s=60)
    assert status == 413
    growth = d.rss_bytes() - rss_before
    assert growth < 32 * MIB, f"RSS grew by {growth / MIB:.1f} MiB on a gzip bomb"
    # gRPC compression is inflated by gRPC core under its own limit.
    assert_still_serving(d, backend)


def test_unknown_content_encoding_is_415(env):
    d, backend = env
    status, _, _ = http_post(d.http_traces_url, make_payload([next(_next_id)]), headers={"Content-Encoding": "br"})
    assert status == 415
    status, _, _ = http_post(d.http_traces_url, make_payload([next(_next_id)]), content_type="text/plain")
    assert status == 415
    assert_still_serving(d, backend)


def test_corrupt_gzip_is_400(env):
    d, backend = env
    body = gzip.compress(make_payload([next(_next_id)]))
    status, _, _ = http_post(d.http_traces_url, body[:-12], headers={"Content-Encoding": "gzip"})
    assert status == 400
    status, _, _ = http_post(d.http_traces_url, b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert status == 400
    assert_still_serving(d, backend)


# -- malformed protobuf ------------------------------------------------------------


def _both_protocols_refuse(d: IsoscopeDaemon, body: bytes) -> None:
    status, _, _ = http_post(d.http_traces_url, body)
    assert status == 400
    client = GrpcClient(d.grpc_endpoint)
    try:
        code, details, _ = client.export(body)
    finally:
        client.close()
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)


def test_truncated_protobuf_is_refused(env):
    d, backend = env
    good = make_payload(list(range(next(_next_id), next(_next_id))))
    for cut in (len(good) // 3, len(good) // 2, len(good) - 1):
        _both_protocols_refuse(d, good[:cut])
    assert_still_serving(d, backend)


def test_random_protobuf_is_refused(env):
    d, backend = env
    rng = random.Random(20240611)
    refused = 0
    for _ in range(20):
        body = rng.randbytes(rng.randint(1, 8192))
        try:
            ExportTraceServiceRequest.FromString(body)
        except DecodeError:
            _both_protocols_refuse(d, body)
            refused += 1
            continue
        # Random bytes that happen to parse: any definite answer, no crash.
        status, _, _ = http_post(d.http_traces_url, body)
        assert status in (200, 400)
    assert refused >= 15
    assert_still_serving(d, backend)


def test_deeply_nested_anyvalue_is_refused(env):
    d, backend = env
    body = _request_with_span_extra(_ld(9, _ld(1, b"deep") + _ld(2, _deep_anyvalue(5000))))
    _both_protocols_refuse(d, body)
    # The same depth in OTLP/JSON (built as text: json.dumps itself would hit the recursion limit).
    nested = '{"arrayValue":{"values":[' * 3000 + '{"stringValue":"x"}' + "]}}" * 3000
    text = ('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"' + "01" * 16 + '","spanId":"'
            + span_hex(next(_next_id)) + '","name":"deep","startTimeUnixNano":"1","endTimeUnixNano":"2",'
            + '"attributes":[{"key":"deep","value":' + nested + "}]}]}]}]}")
    status, _, _ = http_post(d.http_traces_url, text.encode(), content_type="application/json")
    assert status == 400
    assert_still_serving(d, backend)


def test_invalid_utf8_is_refused(env):
    d, backend = env
    # Span.name (field 5) with bytes that are not UTF-8: proto3 strings must be valid.
    _both_protocols_refuse(d, _request_with_span_extra(_ld(5, b"caf\xc3\x28\xff")))
    raw = ('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"' + "01" * 16 + '","spanId":"'
           + span_hex(next(_next_id)) + '","name":"').encode() + b"\xff\xfe" + b'"}]}]}]}'
    status, _, _ = http_post(d.http_traces_url, raw, content_type="application/json")
    assert status == 400
    assert_still_serving(d, backend)


@pytest.mark.parametrize("trace_id,span_id", [
    ("0123", "0000000000000001"),                    # trace id too short
    ("01" * 17, "0000000000000001"),                 # trace id too long
    ("01" * 16, "00000001"),                         # span id too short
    ("zz" * 16, "0000000000000001"),                 # trace id not hex
    ("01" * 16, "xyxyxyxyxyxyxyxy"),                 # span id not hex
    ("AQEBAQEBAQEBAQEBAQEBAQ==", "0000000000000001"),  # base64 where hex is required
])
def test_bad_json_ids_are_400(env, trace_id, span_id):
    d, backend = env
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": trace_id, "spanId": span_id, "name": "bad-ids",
        "startTimeUnixNano": "1", "endTimeUnixNano": "2"}]}]}]}
    status, _, body = http_post(d.http_traces_url, json.dumps(doc).encode(), content_type="application/json")
    assert status == 400, body
    assert_still_serving(d, backend)


# -- connection abuse --------------------------------------------------------------


def test_1000_idle_connections_do_not_starve_clients(env):
    d, backend = env
    socks: list[socket.socket] = []
    try:
        for i in range(1000):
            port = d.http_port if i % 2 else d.grpc_port
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        # Some HTTP ones sent part of a request head and went quiet.
        for s in socks[1:200:2]:
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert_still_serving(d, backend)
        assert time.monotonic() - t0 < 10
    finally:
        for s in socks:
            s.close()
    assert_still_serving(d, backend)


def test_slowly_trickled_bodies_time_out_while_others_are_served(env):
    d, backend = env
    results: list[int | str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def trickle() -> None:
        try:
            s = socket.create_connection(("127.0.0.1", d.http_port), timeout=40)
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                      b"Content-Length: 100000\r\n\r\n")
            s.settimeout(0.5)
            answer = b""
            while not stop.is_set():
                try:
                    s.sendall(b"\x0a")
                except OSError:
                    pass
                try:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                    if b"\r\n" in answer:
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
            s.close()
            line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
            with lock:
                results.append(int(line.split()[1]) if line.startswith("HTTP/") else f"no answer: {line!r}")
        except OSError as exc:
            with lock:
                results.append(f"error: {exc}")

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(30)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            assert_still_serving(d, backend)
            time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert results == [408] * 30, results
    assert_still_serving(d, backend)
