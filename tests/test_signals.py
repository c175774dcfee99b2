"""Metrics and logs pass-through: the real OpenTelemetry SDK exporters → isoscope → a recording backend.

The chain is real end to end: the SDK's OTLP metric and log exporters (gRPC
and HTTP) send to isoscope's receivers, whose ``forward_signal`` feeds a real
:class:`ExportQueue` with a real OTLP exporter, which sends to
:class:`tests.otlp_backend.OtlpBackend`. What the backend receives must be the
bytes the SDK sent. The daemon-level test at the end runs the real daemon.
"""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any, Callable, Iterator

import grpc
import pytest
import requests
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from isoscope.exporters import (
    ExportQueue,
    FileExporter,
    ForwardTarget,
    OtlpGrpcExporter,
    OtlpHttpExporter,
    build_exporter,
)
from isoscope.host.memguard import MemoryGuard
from isoscope.model import Backpressure, Stats, TraceBatch
from isoscope.receivers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, RequestLimits
from tests.otlp_backend import Failure, OtlpBackend

PB = "application/x-protobuf"
JS = "application/json"
WAIT_S = 30.0  # bounds a failure only: every wait returns as soon as the data is there


class TraceRecorder:
    """The trace consumer: metrics and logs must never reach it."""

    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []

    def consume(self, batch: TraceBatch) -> None:
        self.batches.append(batch)


class Chain:
    """isoscope's receivers → ``forward_signal`` → ExportQueue → OTLP exporter → ``backend``."""

    def __init__(self, backend: OtlpBackend, exporter: str = "grpc", *,
                 limits: RequestLimits | None = None, memory: MemoryGuard | None = None,
                 forward: Callable[[str, bytes, int], object] | None = None) -> None:
        self.stats = Stats()
        self.traces = TraceRecorder()
        exp = (OtlpGrpcExporter(backend.grpc_endpoint, name="fwd") if exporter == "grpc"
               else OtlpHttpExporter(backend.http_url, name="fwd", compression="none"))
        self.queue = ExportQueue(exp, self.stats, name="fwd", initial_backoff_s=0.05, max_backoff_s=0.2)
        self.queue.start()
        fwd = forward or (lambda signal, payload, count: self.queue.enqueue(payload, count, signal))
        common = dict(resolve_peers=False, limits=limits, memory=memory or MemoryGuard(None),
                      forward_signal=fwd)
        self.grpc = OtlpGrpcReceiver(self.traces, self.stats, "127.0.0.1:0", **common)
        self.http = OtlpHttpReceiver(self.traces, self.stats, "127.0.0.1:0", **common)
        self.grpc_addr = self.grpc.start()
        self.http_base = f"http://{self.http.start()}"

    def close(self) -> None:
        self.grpc.shutdown(1.0)
        self.http.shutdown(1.0)
        self.queue.shutdown(5.0)


@pytest.fixture()
def backend() -> Iterator[OtlpBackend]:
    with OtlpBackend() as b:
        yield b


@pytest.fixture()
def chains(backend: OtlpBackend) -> Iterator[Callable[..., Chain]]:
    made: list[Chain] = []

    def make(exporter: str = "grpc", **kw: Any) -> Chain:
        chain = Chain(backend, exporter, **kw)
        made.append(chain)
        return chain

    yield make
    for chain in made:
        chain.close()


# -- the SDK side, with the bytes it sends recorded ------------------------------------------


class _GrpcCapture:
    """Mixin for the SDK's gRPC exporters: remember the serialized request of every call."""

    sent: list[bytes]

    def _translate_data(self, data: Any) -> Any:  # noqa: D401 - SDK hook
        request = super()._translate_data(data)  # type: ignore[misc]
        self.sent.append(request.SerializeToString())
        return request


class CapturingGrpcMetricExporter(_GrpcCapture, GrpcMetricExporter):
    pass


class CapturingGrpcLogExporter(_GrpcCapture, GrpcLogExporter):
    pass


def _sdk_exporter(signal: str, protocol: str, chain: Chain) -> tuple[Any, list[bytes]]:
    """The SDK's OTLP exporter of ``signal`` over ``protocol`` pointed at ``chain``, and the bytes it sends."""
    if protocol == "grpc":
        cls = CapturingGrpcMetricExporter if signal == "metrics" else CapturingGrpcLogExporter
        exporter = cls(endpoint=chain.grpc_addr, insecure=True, timeout=10)
        exporter.sent = []
        return exporter, exporter.sent
    cls = HttpMetricExporter if signal == "metrics" else HttpLogExporter
    exporter = cls(endpoint=f"{chain.http_base}/v1/{signal}", timeout=10)
    sent: list[bytes] = []
    send = exporter._client.export

    def capture(data: bytes, *args: Any, **kwargs: Any) -> Any:
        sent.append(data)
        return send(data, *args, **kwargs)

    exporter._client.export = capture  # the real send still happens: this only records its input
    return exporter, sent


def _emit_metrics(exporter: Any) -> int:
    """Record a counter, a histogram and an up-down counter (exemplars from a sampled span), export once.

    Returns:
        The number of data points the SDK exported.
    """
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "shop"}))
    tracer = TracerProvider().get_tracer("t")
    meter = provider.get_meter("checkout", "1.2.3")
    counter = meter.create_counter("orders", unit="1", description="orders placed")
    hist = meter.create_histogram("latency", unit="ms")
    gauge = meter.create_up_down_counter("inflight")
    with tracer.start_as_current_span("checkout"):
        for region in ("eu", "us", "ap"):
            counter.add(3, {"region": region})
            hist.record(12.5, {"region": region})
        gauge.add(-2, {"pool": "db"})
    provider.shutdown()  # the reader's final collection: one export
    return 3 + 3 + 1


def _emit_logs(exporter: Any) -> int:
    """Emit log records (one inside a span, so it carries trace and span ids), one export each.

    Returns:
        The number of log records emitted.
    """
    provider = LoggerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("checkout", "1.2.3")
    tracer = TracerProvider().get_tracer("t")
    logger.emit(body="no trace", severity_number=SeverityNumber.INFO, attributes={"k": "v"})
    with tracer.start_as_current_span("checkout"):
        logger.emit(body={"order": 17, "items": ["a", "b"]}, severity_number=SeverityNumber.ERROR,
                    severity_text="ERROR", attributes={"order.id": 17})
    provider.shutdown()
    return 2


_EXPORT_METHODS = {"metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                   "logs": "/opentelemetry.proto.collector.logs.v1.LogsService/Export"}


def _raw_export(ch: grpc.Channel, signal: str) -> Any:
    """``signal``'s OTLP Export method on ``ch``, sending and returning raw bytes (no client-side checks)."""
    return ch.unary_unary(_EXPORT_METHODS[signal], request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize("signal", ["metrics", "logs"])
@pytest.mark.parametrize("sdk_protocol", ["grpc", "http"])
@pytest.mark.parametrize("forward_protocol", ["grpc", "http"])
def test_sdk_signal_arrives_byte_identical(backend, chains, signal, sdk_protocol, forward_protocol):
    chain = chains(forward_protocol)
    exporter, sent = _sdk_exporter(signal, sdk_protocol, chain)
    items = _emit_metrics(exporter) if signal == "metrics" else _emit_logs(exporter)

    assert backend.wait_for_items(signal, items, WAIT_S), backend.attempts
    assert chain.queue.shutdown(10.0)
    assert sent and backend.payloads(signal) == sent  # forwarded byte for byte, in order
    assert backend.item_count(signal) == items
    assert all(a.protocol == forward_protocol and a.signal == signal for a in backend.attempts)
    other = "logs" if signal == "metrics" else "metrics"
    assert backend.payloads(other) == [] and backend.span_ids() == []
    assert chain.traces.batches == []  # never entered the trace pipeline
    counter = "metric_points_received_total" if signal == "metrics" else "log_records_received_total"
    assert chain.stats.counter(counter, (sdk_protocol,)) == items
    assert chain.stats.counter("signals_exported_total", ("fwd", signal, "success")) == items
    assert chain.stats.counter_total("spans_received_total") == 0
    assert chain.stats.counter_total("spans_exported_total") == 0
    if signal == "logs":
        traced = [r for m in backend.messages("logs") for rl in m.resource_logs for sl in rl.scope_logs
                  for r in sl.log_records if r.trace_id]
        assert len(traced) == 1 and len(traced[0].span_id) == 8
    else:
        exemplars = [e for m in backend.messages("metrics") for rm in m.resource_metrics
                     for sm in rm.scope_metrics for met in sm.metrics if met.WhichOneof("data") == "histogram"
                     for p in met.histogram.data_points for e in p.exemplars]
        assert exemplars and all(len(e.trace_id) == 16 for e in exemplars)


def test_gzip_http_body_is_forwarded_decompressed(backend, chains):
    chain = chains("grpc")
    exporter = HttpLogExporter(endpoint=f"{chain.http_base}/v1/logs", timeout=10, compression=Compression.Gzip)
    sent: list[bytes] = []
    send = exporter._client.export
    exporter._client.export = lambda data, *a, **k: (sent.append(data), send(data, *a, **k))[1]
    n = _emit_logs(exporter)
    assert backend.wait_for_items("logs", n, WAIT_S)
    # The hook sees the request before the client compresses it: that is what arrives.
    assert sent and sent == backend.payloads("logs")
    assert chain.stats.counter("log_records_received_total", ("http",)) == n


# -- OTLP/JSON ----------------------------------------------------------------------------------

TRACE_HEX = "5b8efff798038103d269b633813fc60c"
SPAN_HEX = "eee19b7ec3c1b174"


def _json_logs() -> dict:
    return {"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeLogs": [{"scope": {"name": "s"}, "logRecords": [
            {"timeUnixNano": "1700000000000000000", "severityNumber": 9, "body": {"stringValue": "hello"},
             "traceId": TRACE_HEX, "spanId": SPAN_HEX, "flags": 1},
            {"timeUnixNano": "1700000000000000001", "body": {"stringValue": "untraced"}},
        ]}]}]}


def _json_metrics() -> dict:
    return {"resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeMetrics": [{"scope": {"name": "s"}, "metrics": [
            {"name": "requests", "sum": {"aggregationTemporality": 2, "isMonotonic": True, "dataPoints": [
                {"asInt": "5", "timeUnixNano": "1700000000000000000",
                 "exemplars": [{"asInt": "1", "timeUnixNano": "1700000000000000000",
                                "traceId": TRACE_HEX, "spanId": SPAN_HEX}]},
                {"asInt": "7", "timeUnixNano": "1700000000000000000"}]}},
            {"name": "temp", "gauge": {"dataPoints": [{"asDouble": 21.5}]}},
        ]}]}]}


def test_json_logs_are_transcoded_with_hex_ids(backend, chains):
    chain = chains("grpc")
    r = requests.post(f"{chain.http_base}/v1/logs", data=json.dumps(_json_logs()),
                      headers={"Content-Type": JS}, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(JS)
    assert r.json() == {}
    assert backend.wait_for_items("logs", 2, WAIT_S)
    (got,) = backend.messages("logs")
    first, second = got.resource_logs[0].scope_logs[0].log_records
    assert first.trace_id.hex() == TRACE_HEX and first.span_id.hex() == SPAN_HEX
    assert first.body.string_value == "hello" and first.severity_number == 9 and first.flags == 1
    assert second.trace_id == b"" and second.body.string_value == "untraced"
    assert chain.stats.counter("log_records_received_total", ("http",)) == 2


def test_json_metrics_are_transcoded_with_hex_exemplar_ids(backend, chains):
    chain = chains("http")
    r = requests.post(f"{chain.http_base}/v1/metrics", data=json.dumps(_json_metrics()),
                      headers={"Content-Type": JS}, timeout=10)
    assert r.status_code == 200, r.text
    assert backend.wait_for_items("metrics", 3, WAIT_S)
    (got,) = backend.messages("metrics")
    req_sum = got.resource_metrics[0].scope_metrics[0].metrics[0].sum
    assert [p.as_int for p in req_sum.data_points] == [5, 7] and req_sum.is_monotonic
    (ex,) = req_sum.data_points[0].exemplars
    assert ex.trace_id.hex() == TRACE_HEX and ex.span_id.hex() == SPAN_HEX
    assert got.resource_metrics[0].scope_metrics[0].metrics[1].gauge.data_points[0].as_double == 21.5


@pytest.mark.parametrize("path,doc,why", [
    ("/v1/logs", {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "zz"}]}]}]}, "not hex"),
    ("/v1/logs", {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"spanId": "abcd"}]}]}]}, "8 bytes"),
    ("/v1/logs", {"resourceLogs": {"no": "list"}}, "must be an array"),
    ("/v1/metrics", {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"gauge": {"dataPoints": [
        {"exemplars": [{"traceId": TRACE_HEX[:-2]}]}]}}]}]}]}, "16 bytes"),
    ("/v1/metrics", [1, 2], "JSON object"),
])
def test_bad_json_is_400_with_the_reason(backend, chains, path, doc, why):
    chain = chains("grpc")
    r = requests.post(f"{chain.http_base}{path}", data=json.dumps(doc), headers={"Content-Type": JS}, timeout=10)
    assert r.status_code == 400
    assert why in r.json()["message"]
    assert chain.stats.counter("requests_rejected_total", ("http", "malformed")) == 1
    assert backend.attempts == []


# -- bad input, limits, backpressure -----------------------------------------------------------


def test_malformed_protobuf_is_refused_on_both_protocols(backend, chains):
    chain = chains("grpc")
    junk = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message
    r = requests.post(f"{chain.http_base}/v1/metrics", data=junk, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 400
    status = status_pb2.Status.FromString(r.content)
    assert "ExportMetricsServiceRequest" in status.message
    with grpc.insecure_channel(chain.grpc_addr) as ch:
        call = _raw_export(ch, "logs")
        with pytest.raises(grpc.RpcError) as err:
            call(junk, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ExportLogsServiceRequest" in err.value.details()
    assert chain.stats.counter("requests_rejected_total", ("http", "malformed")) == 1
    assert chain.stats.counter("requests_rejected_total", ("grpc", "malformed")) == 1
    assert backend.attempts == []


def _logs_request(n: int) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    for i in range(n):
        sl.log_records.add(body={"string_value": f"r{i}"}, time_unix_nano=1_700_000_000_000_000_000 + i)
    return req


def _metrics_request(points: int) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    for i in range(points):
        m.gauge.data_points.add(as_int=i)
    return req


def test_item_limits_refuse_the_whole_request(backend, chains):
    chain = chains("grpc", limits=RequestLimits(max_data_points_per_request=10, max_log_records_per_request=5))
    ok = _logs_request(5).SerializeToString()
    r = requests.post(f"{chain.http_base}/v1/logs", data=ok, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 200
    over = _logs_request(6).SerializeToString()
    r = requests.post(f"{chain.http_base}/v1/logs", data=over, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 400 and "max_log_records_per_request" in status_pb2.Status.FromString(r.content).message
    doc = json_format.MessageToDict(_metrics_request(11))
    r = requests.post(f"{chain.http_base}/v1/metrics", data=json.dumps(doc), headers={"Content-Type": JS}, timeout=10)
    assert r.status_code == 400 and "max_data_points_per_request" in r.json()["message"]
    with grpc.insecure_channel(chain.grpc_addr) as ch:
        call = _raw_export(ch, "metrics")
        with pytest.raises(grpc.RpcError) as err:
            call(_metrics_request(11).SerializeToString(), timeout=10)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        call(_metrics_request(10).SerializeToString(), timeout=10)
    assert backend.wait_for_items("metrics", 10, WAIT_S) and backend.wait_for_items("logs", 5, WAIT_S)
    assert chain.queue.shutdown(10.0)
    assert backend.item_count("metrics") == 10 and backend.item_count("logs") == 5
    assert chain.stats.counter("requests_rejected_total", ("http", "limit")) == 2
    assert chain.stats.counter("requests_rejected_total", ("grpc", "limit")) == 1


def test_backpressure_is_retryable_and_not_counted_as_received(backend, chains):
    refusals = {"left": 1}

    def forward(signal: str, payload: bytes, count: int) -> None:
        if refusals["left"]:
            refusals["left"] -= 1
            raise Backpressure("export queues are full", retry_after_s=2.0)
        chain.queue.enqueue(payload, count, signal)

    chain = chains("grpc", forward=forward)
    body = _logs_request(3).SerializeToString()
    r = requests.post(f"{chain.http_base}/v1/logs", data=body, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert chain.stats.counter("log_records_received_total", ("http",)) == 0
    with grpc.insecure_channel(chain.grpc_addr) as ch:
        call = _raw_export(ch, "logs")
        refusals["left"] = 1
        with pytest.raises(grpc.RpcError) as err:
            call(body, timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        call(body, timeout=10)  # the retry goes through
    assert backend.wait_for_items("logs", 3, WAIT_S)
    assert backend.payloads("logs") == [body]
    assert chain.stats.counter("log_records_received_total", ("grpc",)) == 3
    assert chain.stats.counter("requests_rejected_total", ("http", "backpressure")) == 1
    assert chain.stats.counter("requests_rejected_total", ("grpc", "backpressure")) == 1


def test_memory_reservation_applies_to_metrics(backend, chains):
    # Another request holds most of the in-flight cap: this one is refused before its body is parsed.
    guard = MemoryGuard(None, max_inflight_bytes=64 * 1024)
    chain = chains("grpc", memory=guard)
    held = guard.reserve(60 * 1024)
    body = _metrics_request(200).SerializeToString()
    r = requests.post(f"{chain.http_base}/v1/metrics", data=body, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    with grpc.insecure_channel(chain.grpc_addr) as ch:
        call = _raw_export(ch, "metrics")
        with pytest.raises(grpc.RpcError) as err:
            call(body, timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert chain.stats.counter("requests_rejected_total", ("http", "memory_limit")) == 1
    assert chain.stats.counter("requests_rejected_total", ("grpc", "memory_limit")) == 1
    assert backend.attempts == []
    held.release()  # the other request finished: now it fits
    r = requests.post(f"{chain.http_base}/v1/metrics", data=body, headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 200
    assert backend.wait_for_items("metrics", 200, WAIT_S)
    assert guard.reserved_bytes == 0


def test_body_limit_applies_to_logs(backend):
    stats = Stats()
    rx = OtlpHttpReceiver(TraceRecorder(), stats, "127.0.0.1:0", max_body_bytes=4096, resolve_peers=False,
                          memory=MemoryGuard(None), forward_signal=lambda s, p, n: None)
    base = f"http://{rx.start()}"
    try:
        body = _logs_request(400).SerializeToString()
        assert len(body) > 4096
        r = requests.post(f"{base}/v1/logs", data=gzip.compress(body),
                          headers={"Content-Type": PB, "Content-Encoding": "gzip"}, timeout=10)
        assert r.status_code == 413
        assert stats.counter("requests_rejected_total", ("http", "too_large")) == 1
    finally:
        rx.shutdown(1.0)


def test_without_forward_signal_metrics_and_logs_are_not_served():
    stats = Stats()
    grpc_rx = OtlpGrpcReceiver(TraceRecorder(), stats, "127.0.0.1:0", resolve_peers=False, memory=MemoryGuard(None))
    http_rx = OtlpHttpReceiver(TraceRecorder(), stats, "127.0.0.1:0", resolve_peers=False, memory=MemoryGuard(None))
    addr, base = grpc_rx.start(), f"http://{http_rx.start()}"
    try:
        r = requests.post(f"{base}/v1/metrics", data=b"", headers={"Content-Type": PB}, timeout=10)
        assert r.status_code == 404
        with grpc.insecure_channel(addr) as ch:
            call = _raw_export(ch, "logs")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=10)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        grpc_rx.shutdown(1.0)
        http_rx.shutdown(1.0)


def test_request_without_items_is_answered_but_not_forwarded(backend, chains):
    chain = chains("grpc")
    empty = ExportMetricsServiceRequest()
    empty.resource_metrics.add().scope_metrics.add().metrics.add(name="no-points")
    r = requests.post(f"{chain.http_base}/v1/metrics", data=empty.SerializeToString(),
                      headers={"Content-Type": PB}, timeout=10)
    assert r.status_code == 200
    r = requests.post(f"{chain.http_base}/v1/logs", data=_logs_request(1).SerializeToString(),
                      headers={"Content-Type": PB}, timeout=10)
    assert backend.wait_for_items("logs", 1, WAIT_S)
    assert chain.queue.shutdown(10.0)
    assert backend.payloads("metrics") == []


# -- export side: backend answers, targets, file exporter ----------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_partial_success_and_retries_per_signal(backend, protocol):
    stats = Stats()
    exp = (OtlpGrpcExporter(backend.grpc_endpoint, name="fwd") if protocol == "grpc"
           else OtlpHttpExporter(backend.http_url, name="fwd", compression="gzip"))
    queue = ExportQueue(exp, stats, name="fwd", initial_backoff_s=0.01, max_backoff_s=0.05)
    backend.fail_next(Failure.unavailable(retry_after_s=0.05), times=2)
    backend.fail_next(Failure.partial(2, "2 records are too old"))
    backend.fail_next(Failure.partial(1, "1 point is too old"))
    queue.start()
    logs = _logs_request(4).SerializeToString()
    metrics = _metrics_request(5).SerializeToString()
    assert queue.enqueue(logs, 4, "logs")  # retried twice, then accepted partially
    assert queue.enqueue(metrics, 5, "metrics")  # accepted partially
    assert queue.shutdown(10.0)
    assert backend.payloads("logs") == [logs] and backend.payloads("metrics") == [metrics]
    assert [a.signal for a in backend.attempts] == ["logs", "logs", "logs", "metrics"]
    # rejected_log_records and rejected_data_points are read from the signal's own response.
    assert stats.counter("signals_exported_total", ("fwd", "logs", "success")) == 2
    assert stats.counter("signals_exported_total", ("fwd", "logs", "failed")) == 2
    assert stats.counter("signals_dropped_total", ("logs", "rejected_by_backend")) == 2
    assert stats.counter("signals_exported_total", ("fwd", "metrics", "success")) == 4
    assert stats.counter("signals_exported_total", ("fwd", "metrics", "failed")) == 1
    assert stats.counter("signals_dropped_total", ("metrics", "rejected_by_backend")) == 1
    assert stats.counter_total("spans_exported_total") == 0 and stats.counter_total("spans_dropped_total") == 0


def test_backend_without_metrics_support_drops_them_without_blocking_traces(backend):
    from tests.otlp_backend import make_payload
    stats = Stats()
    queue = ExportQueue(OtlpHttpExporter(backend.http_url, name="fwd", compression="none"), stats, name="fwd",
                        initial_backoff_s=0.01)
    backend.fail_next(Failure(grpc.StatusCode.UNIMPLEMENTED, 404, message="no metrics here"))
    queue.start()
    assert queue.enqueue(_metrics_request(3).SerializeToString(), 3, "metrics")
    assert queue.enqueue(make_payload([1, 2]), 2)
    assert queue.shutdown(10.0)
    assert backend.span_ids() == ["0000000000000001", "0000000000000002"]
    assert stats.counter("signals_dropped_total", ("metrics", "rejected")) == 3
    assert stats.counter("spans_exported_total", ("fwd", "success")) == 2


def test_http_target_with_base_endpoint_appends_each_signal_path(backend):
    target = ForwardTarget(endpoint=f"{backend.http_url}/", name="hc")
    assert target.signals() == ("traces", "metrics", "logs")
    assert target.signal_destination("metrics").address == f"{backend.http_url}/v1/metrics"
    assert ForwardTarget(endpoint="https://otlp.example:4318/otlp/v1/traces").signal_destination(
        "logs").address == "https://otlp.example:4318/otlp/v1/logs"
    stats = Stats()
    queue = ExportQueue(build_exporter(target), stats, name="hc")
    queue.start()
    logs = _logs_request(2).SerializeToString()
    assert queue.enqueue(logs, 2, "logs")
    assert queue.shutdown(10.0)
    assert backend.payloads("logs") == [logs] and backend.attempts[0].protocol == "http"


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_traces_endpoint_target_takes_no_metrics_or_logs(backend, protocol):
    from tests.otlp_backend import make_payload
    url = f"{backend.http_url}/v1/traces" if protocol == "http/protobuf" else backend.grpc_url
    target = ForwardTarget(traces_endpoint=url, protocol=protocol, name="t")
    assert target.signals() == ("traces",) and target.signal_destination("metrics") is None
    exporter = build_exporter(target)
    assert exporter.signals == frozenset({"traces"})
    stats = Stats()
    queue = ExportQueue(exporter, stats, name="t")
    queue.start()
    assert not queue.enqueue(_metrics_request(4).SerializeToString(), 4, "metrics")
    assert not queue.enqueue(_logs_request(3).SerializeToString(), 3, "logs")
    assert queue.enqueue(make_payload([9]), 1)
    assert queue.shutdown(10.0)
    assert backend.span_ids() == ["0000000000000009"]
    assert [a.signal for a in backend.attempts] == ["traces"]
    assert stats.counter("signals_dropped_total", ("metrics", "no_target")) == 4
    assert stats.counter("signals_dropped_total", ("logs", "no_target")) == 3
    assert stats.counter("signals_exported_total", ("t", "logs", "dropped")) == 3


def test_file_exporter_skips_other_signals_counted(tmp_path):
    from tests.otlp_backend import make_payload
    stats = Stats()
    path = tmp_path / "traces.jsonl"
    queue = ExportQueue(FileExporter(path), stats, name="file")
    queue.start()
    assert not queue.enqueue(_logs_request(2).SerializeToString(), 2, "logs")
    assert queue.enqueue(make_payload([5]), 1)
    assert queue.shutdown(10.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["resourceSpans"]
    assert stats.counter("signals_dropped_total", ("logs", "no_target")) == 2
    # Asked directly, it refuses rather than writing a non-trace line.
    assert FileExporter(path).export(b"", 0, signal="metrics").result.value == "failed"


def test_spooled_signals_are_replayed_to_their_own_endpoints(backend, tmp_path):
    from tests.otlp_backend import make_payload
    backend.stop()
    stats = Stats()
    exp = OtlpHttpExporter(backend.http_url, name="fwd", compression="none", timeout_s=1.0)
    queue = ExportQueue(exp, stats, name="fwd", persist_dir=tmp_path, initial_backoff_s=0.05)
    queue.start()
    batches = [(make_payload([1]), 1, "traces"), (_metrics_request(2).SerializeToString(), 2, "metrics"),
               (_logs_request(3).SerializeToString(), 3, "logs")]
    for payload, n, signal in batches:
        assert queue.enqueue(payload, n, signal)
    queue.shutdown(0.5)  # the backend is down: everything stays on disk
    backend.start()
    stats2 = Stats()
    again = ExportQueue(OtlpHttpExporter(backend.http_url, name="fwd", compression="none"), stats2, name="fwd",
                        persist_dir=tmp_path, initial_backoff_s=0.05)
    again.start()
    assert backend.wait_for_items("logs", 3, WAIT_S)
    assert again.shutdown(10.0)
    assert backend.span_ids() == ["0000000000000001"]
    assert backend.payloads("metrics") == [batches[1][0]] and backend.payloads("logs") == [batches[2][0]]
    assert stats2.counter("signals_exported_total", ("fwd", "metrics", "success")) == 2
    assert list(tmp_path.glob("*.batch")) == []


def test_metrics_and_logs_cannot_crowd_traces_out_of_a_queue():
    from tests.otlp_backend import make_payload
    stats = Stats()
    # Not started: accepted batches stay held, so the bounds are what decides.
    queue = ExportQueue(OtlpGrpcExporter("127.0.0.1:1", name="q"), stats, name="q", max_batches=4)
    logs = _logs_request(1).SerializeToString()
    assert queue.enqueue(logs, 1, "logs") and queue.enqueue(logs, 1, "logs")
    assert not queue.enqueue(logs, 1, "logs")  # half of the batches is the most they may hold
    assert queue.enqueue(make_payload([1]), 1) and queue.enqueue(make_payload([2]), 1)
    assert stats.counter("signals_dropped_total", ("logs", "queue_full")) == 1
    queue.shutdown(0.0)
    assert stats.counter("signals_dropped_total", ("logs", "shutdown")) == 2


# -- the daemon ---------------------------------------------------------------------------------


def test_daemon_forwards_sdk_metrics_and_logs_unchanged(backend):
    from isoscope_lab.launcher import IsoscopeDaemon

    with IsoscopeDaemon(probes=False, forward=[backend.grpc_url]) as d:
        host_port = d.grpc_endpoint
        metric_exp = CapturingGrpcMetricExporter(endpoint=host_port, insecure=True, timeout=10)
        metric_exp.sent = []
        points = _emit_metrics(metric_exp)
        log_exp = HttpLogExporter(endpoint=f"{d.http_url}/v1/logs", timeout=10)
        sent_logs: list[bytes] = []
        send = log_exp._client.export
        log_exp._client.export = lambda data, *a, **k: (sent_logs.append(data), send(data, *a, **k))[1]
        records = _emit_logs(log_exp)
        assert backend.wait_for_items("metrics", points, WAIT_S), d.log_tail()
        assert backend.wait_for_items("logs", records, WAIT_S), d.log_tail()
        assert backend.payloads("metrics") == metric_exp.sent
        assert backend.payloads("logs") == sent_logs
        assert backend.span_ids() == []
        # The SDK exports synchronously and each answer follows the count: the counters are settled.
        assert d.metric("isoscope_metric_points_received_total", protocol="grpc") == points
        assert d.metric("isoscope_log_records_received_total", protocol="http") == records


def _b64(hex_id: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def test_hex_ids_decode_to_the_same_bytes_as_the_protobuf_json_mapping():
    # The transcoded ids are the bytes a base64 (plain protobuf JSON) encoding would give.
    from isoscope.receivers.otlp.signal_json import decode_signal_request
    doc = _json_logs()
    msg, n = decode_signal_request("logs", json.dumps(doc))
    plain = json.loads(json.dumps(doc))
    rec = plain["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    rec["traceId"], rec["spanId"] = _b64(TRACE_HEX), _b64(SPAN_HEX)
    assert n == 2 and msg == json_format.ParseDict(plain, ExportLogsServiceRequest())
