"""Single-attempt exporters against a real loopback OTLP backend, plus file/memory isoscope.exporters."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest

from isoscope.model import ExportOutcome, ExportResult
from isoscope.otlpjson import decode_request
from isoscope.exporters import (
    FileExporter,
    InMemoryExporter,
    OtlpGrpcExporter,
    OtlpHttpExporter,
    exporter_from_url,
)
from isoscope.exporters.otlp_http import parse_retry_after, signal_url, traces_url
from tests.otlp_backend import Failure, OtlpBackend, make_payload, make_request, span_hex


@pytest.fixture
def backend():
    b = OtlpBackend()
    try:
        yield b
    finally:
        b.stop()


# (failure, expected result, expected retry_after_s) — OTLP spec, "OTLP/gRPC Response"
GRPC_CASES = [
    (Failure.unavailable(), ExportResult.RETRYABLE, None),
    (Failure.unavailable(retry_after_s=1.25), ExportResult.RETRYABLE, 1.25),
    (Failure.resource_exhausted(), ExportResult.FAILED, None),
    (Failure.resource_exhausted(retry_after_s=2.5), ExportResult.RETRYABLE, 2.5),
    (Failure.invalid_argument(), ExportResult.FAILED, None),
    (Failure.too_large(), ExportResult.FAILED, None),
    (Failure(grpc.StatusCode.ABORTED, 500), ExportResult.RETRYABLE, None),
    (Failure(grpc.StatusCode.OUT_OF_RANGE, 500), ExportResult.RETRYABLE, None),
    (Failure(grpc.StatusCode.DATA_LOSS, 500), ExportResult.RETRYABLE, None),
    (Failure(grpc.StatusCode.CANCELLED, 500), ExportResult.RETRYABLE, None),
    (Failure(grpc.StatusCode.PERMISSION_DENIED, 403), ExportResult.FAILED, None),
    (Failure(grpc.StatusCode.UNAUTHENTICATED, 401), ExportResult.FAILED, None),
    (Failure(grpc.StatusCode.INTERNAL, 500), ExportResult.FAILED, None),
]


@pytest.mark.parametrize("failure,result,retry_after", GRPC_CASES,
                         ids=[f"{c[0].grpc_code.name}-{c[0].retry_after_s}" for c in GRPC_CASES])
def test_grpc_status_mapping(backend, failure, result, retry_after):
    exp = OtlpGrpcExporter(backend.grpc_endpoint, timeout_s=5)
    try:
        backend.fail_next(failure)
        outcome = exp.export(make_payload([1, 2]), 2)
        assert outcome.result is result, outcome
        assert outcome.retry_after_s == (pytest.approx(retry_after) if retry_after else None)
        assert failure.grpc_code.name in outcome.message
        assert backend.span_ids() == []
        assert len(backend.attempts) == 1
        # The failure was consumed: the next attempt goes through.
        assert exp.export(make_payload([3]), 1).result is ExportResult.SUCCESS
        assert backend.span_ids() == [span_hex(3)]
    finally:
        exp.shutdown()


def test_grpc_sends_payload_bytes_headers_and_gzip(backend):
    exp = OtlpGrpcExporter(backend.grpc_url, headers={"X-Tenant": "blue"}, compression="gzip")
    try:
        payload = make_payload(range(1, 51), service="svc-a")
        assert exp.export(payload, 50).result is ExportResult.SUCCESS
        assert backend.requests[0].SerializeToString() == payload
        assert backend.attempts[0].headers["x-tenant"] == "blue"
        assert backend.span_ids() == [span_hex(i) for i in range(1, 51)]
    finally:
        exp.shutdown()


def test_grpc_partial_success(backend):
    exp = OtlpGrpcExporter(backend.grpc_endpoint)
    try:
        backend.fail_next(Failure.partial(3, "3 spans too old"))
        outcome = exp.export(make_payload([1, 2, 3, 4]), 4)
        assert outcome.result is ExportResult.SUCCESS
        assert outcome.rejected_spans == 3
        assert "3 spans too old" in outcome.message
    finally:
        exp.shutdown()


def test_grpc_backend_down_is_retryable_and_deadline_is_enforced(backend):
    slow = OtlpBackend(grpc_enabled=True, http_enabled=False, delay_s=1.0)
    exp = OtlpGrpcExporter(backend.grpc_endpoint, timeout_s=2)
    exp_slow = OtlpGrpcExporter(slow.grpc_endpoint, timeout_s=0.3)
    try:
        backend.stop()
        outcome = exp.export(make_payload([1]), 1)
        assert outcome.result is ExportResult.RETRYABLE
        assert "UNAVAILABLE" in outcome.message
        t0 = time.monotonic()
        outcome = exp_slow.export(make_payload([1]), 1)
        assert outcome.result is ExportResult.RETRYABLE
        assert "DEADLINE_EXCEEDED" in outcome.message
        assert time.monotonic() - t0 < 0.9
    finally:
        exp.shutdown()
        exp_slow.shutdown()
        slow.stop()


HTTP_CASES = [
    (Failure.unavailable(), ExportResult.RETRYABLE, None),
    (Failure.unavailable(retry_after_s=3), ExportResult.RETRYABLE, 3.0),
    (Failure.resource_exhausted(), ExportResult.RETRYABLE, None),
    (Failure.resource_exhausted(retry_after_s=7), ExportResult.RETRYABLE, 7.0),
    (Failure(grpc.StatusCode.UNAVAILABLE, 502), ExportResult.RETRYABLE, None),
    (Failure(grpc.StatusCode.UNAVAILABLE, 504, 1.5), ExportResult.RETRYABLE, 1.5),
    (Failure.invalid_argument(), ExportResult.FAILED, None),
    (Failure.too_large(), ExportResult.FAILED, None),
    (Failure(grpc.StatusCode.INTERNAL, 500, 5), ExportResult.FAILED, None),
    (Failure(grpc.StatusCode.UNAUTHENTICATED, 401), ExportResult.FAILED, None),
]


@pytest.mark.parametrize("compression", ["gzip", None])
@pytest.mark.parametrize("failure,result,retry_after", HTTP_CASES,
                         ids=[f"{c[0].http_status}-{c[0].retry_after_s}" for c in HTTP_CASES])
def test_http_status_mapping(backend, failure, result, retry_after, compression):
    exp = OtlpHttpExporter(backend.http_url, compression=compression)
    try:
        backend.fail_next(failure)
        outcome = exp.export(make_payload([1, 2]), 2)
        assert outcome.result is result, outcome
        assert outcome.retry_after_s == (pytest.approx(retry_after) if retry_after else None)
        assert f"HTTP {failure.http_status}" in outcome.message
        assert failure.message in outcome.message  # google.rpc.Status body decoded
        assert exp.export(make_payload([3]), 1).result is ExportResult.SUCCESS
        assert backend.span_ids() == [span_hex(3)]
        encodings = {a.headers.get("content-encoding") for a in backend.attempts}
        assert encodings == ({"gzip"} if compression else {None})
    finally:
        exp.shutdown()


def test_http_retry_after_as_http_date(backend):
    exp = OtlpHttpExporter(backend.http_url)
    try:
        backend.fail_next(Failure.resource_exhausted(retry_after_s=30, http_date=True))
        outcome = exp.export(make_payload([1]), 1)
        assert outcome.result is ExportResult.RETRYABLE
        # HTTP-dates have 1 s resolution.
        assert 28.0 <= outcome.retry_after_s <= 30.0
    finally:
        exp.shutdown()


def test_parse_retry_after_forms():
    now = 1_700_000_000.0
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5", now=now) == 0.0


def test_http_partial_success_and_url(backend):
    assert traces_url("http://h:1") == "http://h:1/v1/traces"
    assert traces_url("http://h:1/v1/traces/") == "http://h:1/v1/traces"
    exp = OtlpHttpExporter(backend.http_url + "/", headers={"Authorization": "Bearer t"})
    try:
        backend.fail_next(Failure.partial(1, "one bad span"))
        outcome = exp.export(make_payload([1, 2]), 2)
        assert outcome.result is ExportResult.SUCCESS
        assert outcome.rejected_spans == 1
        assert backend.attempts[0].headers["authorization"] == "Bearer t"
        assert backend.attempts[0].headers["content-type"] == "application/x-protobuf"
    finally:
        exp.shutdown()


def test_http_backend_down_then_back_on_kept_alive_connection(backend):
    exp = OtlpHttpExporter(backend.http_url, timeout_s=2)
    try:
        assert exp.export(make_payload([1]), 1).result is ExportResult.SUCCESS
        backend.stop()
        outcome = exp.export(make_payload([2]), 1)
        assert outcome.result is ExportResult.RETRYABLE
        backend.start()
        # The pooled connection died with the old server; the exporter must not
        # fail permanently because of it.
        results = [exp.export(make_payload([3]), 1).result for _ in range(2)]
        assert ExportResult.SUCCESS in results
        assert ExportResult.FAILED not in results
        assert span_hex(3) in backend.span_ids()
    finally:
        exp.shutdown()


def test_file_exporter_writes_otlp_json_lines(tmp_path):
    path = tmp_path / "deep" / "dir" / "traces.jsonl"
    exp = FileExporter(path)
    first = make_request([1, 2, 3])
    second = make_request([4])
    assert exp.export(first.SerializeToString(), 3).result is ExportResult.SUCCESS
    assert exp.export(second.SerializeToString(), 1).result is ExportResult.SUCCESS
    # Flushed per batch: readable before shutdown.
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    doc = json.loads(lines[0])
    assert doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] == span_hex(1)
    assert decode_request(lines[0]) == first
    assert decode_request(lines[1]) == second
    exp.shutdown()
    # Appends across restarts.
    exp2 = FileExporter(path)
    assert exp2.export(second.SerializeToString(), 1).result is ExportResult.SUCCESS
    exp2.shutdown()
    assert len(path.read_text().splitlines()) == 3


def test_file_exporter_rotation_and_bad_payload(tmp_path):
    path = tmp_path / "t.jsonl"
    line_len = None
    exp = FileExporter(path, max_bytes=1, rotate=2)
    for i in range(1, 6):
        assert exp.export(make_payload([i]), 1).result is ExportResult.SUCCESS
        line_len = line_len or path.stat().st_size
    exp.shutdown()
    files = sorted(os.listdir(tmp_path))
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    # Newest in the live file, older ones shifted; the oldest beyond rotate=2 are gone.
    ids = [json.loads((tmp_path / f).read_text())["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"]
           for f in ("t.jsonl", "t.jsonl.1", "t.jsonl.2")]
    assert ids == [span_hex(5), span_hex(4), span_hex(3)]
    outcome = FileExporter(tmp_path / "x.jsonl").export(b"\xff\xff\xff not protobuf", 1)
    assert outcome.result is ExportResult.FAILED


def test_memory_exporter_scripts_outcomes():
    exp = InMemoryExporter()
    exp.script([ExportOutcome(ExportResult.RETRYABLE, 0.1, "busy"), ExportOutcome(ExportResult.FAILED)])
    assert exp.export(make_payload([1]), 1).result is ExportResult.RETRYABLE
    assert exp.export(make_payload([2]), 1).result is ExportResult.FAILED
    assert exp.export(make_payload([3, 4]), 2).result is ExportResult.SUCCESS
    assert exp.span_ids() == [span_hex(3), span_hex(4)]
    assert [a[2] for a in exp.attempts()] == [ExportResult.RETRYABLE, ExportResult.FAILED, ExportResult.SUCCESS]
    exp.set_default(lambda req, n: ExportOutcome(ExportResult.FAILED, None, f"{n} refused"))
    assert exp.export(make_payload([5]), 1).message == "1 refused"
    assert exp.wait_for_spans(2, 0.1) and not exp.wait_for_spans(3, 0.05)


def test_exporter_from_url(backend, tmp_path):
    g = exporter_from_url(backend.grpc_url, compression=None)
    h = exporter_from_url(backend.http_url)
    f = exporter_from_url(f"file://{tmp_path}/out/t.jsonl")
    try:
        assert isinstance(g, OtlpGrpcExporter) and g.name == "otlp_grpc"
        assert isinstance(h, OtlpHttpExporter) and h.url == backend.http_url + "/v1/traces"
        assert isinstance(f, FileExporter)
        assert g.export(make_payload([1]), 1).result is ExportResult.SUCCESS
        assert h.export(make_payload([2]), 1).result is ExportResult.SUCCESS
        assert f.export(make_payload([3]), 1).result is ExportResult.SUCCESS
        assert sorted(backend.span_ids()) == [span_hex(1), span_hex(2)]
        assert (tmp_path / "out" / "t.jsonl").exists()
        assert isinstance(exporter_from_url("https://collector.example:4318", name="up"), OtlpHttpExporter)
        for bad in ("ftp://x:1", "grpc://nohost", "http://", "localhost:4317"):
            with pytest.raises(ValueError):
                exporter_from_url(bad)
    finally:
        g.shutdown()
        h.shutdown()
        f.shutdown()


# ---------------------------------------------------------------------------
# Signals: each goes to its own path / service
# ---------------------------------------------------------------------------

def test_signal_urls_under_a_base_endpoint():
    assert signal_url("http://c:4318", "metrics") == "http://c:4318/v1/metrics"
    assert signal_url("http://c:4318/otlp/", "logs") == "http://c:4318/otlp/v1/logs"
    # A base written with a signal path has it replaced, never doubled.
    assert signal_url("http://c:4318/v1/traces", "logs") == "http://c:4318/v1/logs"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    exp = OtlpHttpExporter("http://c:4318/base")
    assert exp.urls == {"traces": "http://c:4318/base/v1/traces", "metrics": "http://c:4318/base/v1/metrics",
                        "logs": "http://c:4318/base/v1/logs"}
    exact = OtlpHttpExporter("http://c:4318/ingest/spans", append_traces_path=False)
    assert exact.signals == frozenset({"traces"}) and exact.url == "http://c:4318/ingest/spans"
    out = exact.export(b"", 1, signal="logs")
    assert out.result is ExportResult.FAILED and "does not export logs" in out.message


def test_grpc_exporter_calls_each_signals_service():
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    metrics = ExportMetricsServiceRequest()
    metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="m").sum.data_points.add(as_int=1)
    logs = ExportLogsServiceRequest()
    logs.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "hi"
    with OtlpBackend(http_enabled=False) as backend:
        exp = OtlpGrpcExporter(backend.grpc_endpoint)
        try:
            assert exp.export(metrics.SerializeToString(), 1, signal="metrics").result is ExportResult.SUCCESS
            assert exp.export(logs.SerializeToString(), 1, signal="logs").result is ExportResult.SUCCESS
            assert exp.export(make_payload([3]), 1).result is ExportResult.SUCCESS
        finally:
            exp.shutdown()
        assert backend.messages("metrics") == [metrics] and backend.messages("logs") == [logs]
        assert backend.span_ids() == [span_hex(3)]
    traces_only = OtlpGrpcExporter("127.0.0.1:1", signals=("traces",))
    try:
        assert traces_only.export(b"", 1, signal="metrics").result is ExportResult.FAILED
    finally:
        traces_only.shutdown()
