"""OTLP/gRPC receiver against real gRPC clients and the real OpenTelemetry SDK exporter."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from isoscope.model import Backpressure, Stats, TraceBatch, iter_spans
from isoscope.receivers.otlp import OtlpGrpcReceiver

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Recorder:
    """A consumer that keeps batches and can push back a given number of times."""

    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []
        self.pushback = 0
        self.retry_after_s = 0.3
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


@pytest.fixture()
def env():
    rec, stats = Recorder(), Stats()
    receiver = OtlpGrpcReceiver(rec, stats, "127.0.0.1:0")
    addr = receiver.start()
    channel = grpc.insecure_channel(addr)
    yield receiver, rec, stats, addr, channel
    channel.close()
    receiver.shutdown(1.0)


def _raw_call(channel: grpc.Channel, payload: bytes, **kw):
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    return call.with_call(payload, timeout=10, **kw)


def _request(spans: list[dict]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for s in spans:
        ss.spans.add(**s)
    return req


def _good(i: int = 1) -> dict:
    return {"trace_id": bytes(15) + bytes([i]), "span_id": bytes(7) + bytes([i]), "name": f"op{i}"}


def _finished_spans(*names: str) -> list:
    """Real SDK spans, finished, kept in memory so a test can time the export itself."""
    memory = InMemorySpanExporter()
    provider = _provider(memory)
    for name in names:
        provider.get_tracer("t").start_span(name).end()
    return list(memory.get_finished_spans())


def _provider(exporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "grpc-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_sdk_exporter_delivers_spans_with_peer(env):
    receiver, rec, stats, addr, _ = env
    provider = _provider(OTLPSpanExporter(endpoint=addr, insecure=True, timeout=10))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("parent"):
        with tracer.start_as_current_span("child"):
            pass
    provider.shutdown()
    names = sorted(s.name for s in rec.spans())
    assert names == ["child", "parent"]
    b = rec.batches[0]
    assert b.protocol == "grpc" and b.span_count == 1
    assert b.peer_addr.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:"))
    # The exporter runs in this process: its socket is ours.
    assert b.peer_pid == os.getpid()
    assert b.received_mono_ns > 0
    assert stats.counter("spans_received_total", ("grpc",)) == 2


def test_sdk_exporter_with_gzip(env):
    from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression
    _, rec, _, addr, _ = env
    provider = _provider(OTLPSpanExporter(endpoint=addr, insecure=True, compression=Compression.Gzip))
    provider.get_tracer("t").start_span("zipped", attributes={"pad": "x" * 10000}).end()
    provider.shutdown()
    assert [s.name for s in rec.spans()] == ["zipped"]
    assert rec.spans()[0].attributes[0].value.string_value == "x" * 10000


def test_peer_pid_of_another_process(env):
    _, rec, _, addr, _ = env
    script = textwrap.dedent(f"""
        import grpc, os, sys
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        req = ExportTraceServiceRequest()
        req.resource_spans.add().scope_spans.add().spans.add(
            trace_id=b"\\x01" * 16, span_id=b"\\x02" * 8, name="from-child")
        ch = grpc.insecure_channel({addr!r})
        ch.unary_unary({METHOD!r})(req.SerializeToString(), timeout=10)
        print(os.getpid())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    child_pid = int(out.stdout.strip())
    assert child_pid != os.getpid()
    assert [b.peer_pid for b in rec.batches] == [child_pid]


def test_empty_request_is_success_without_consuming(env):
    _, rec, stats, _, channel = env
    resp, call = _raw_call(channel, b"")
    assert call.code() == grpc.StatusCode.OK
    assert not ExportTraceServiceResponse.FromString(resp).HasField("partial_success")
    assert rec.calls == 0
    # A request with empty envelopes carries no data either.
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add()
    _raw_call(channel, req.SerializeToString())
    assert rec.calls == 0 and stats.counter_total("spans_received_total") == 0


@pytest.mark.parametrize("payload", [
    _request([_good()]).SerializeToString()[:-3],  # truncated
    bytes(range(256)) * 4,                         # not protobuf
    b"\x0a\xff\xff\xff\xff\x0f",                   # length prefix past the end
])
def test_malformed_protobuf_is_invalid_argument(env, payload):
    _, rec, stats, _, channel = env
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, payload)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ExportTraceServiceRequest" in ei.value.details()
    assert rec.calls == 0
    assert stats.counter("requests_rejected_total", ("grpc", "malformed")) == 1


def test_invalid_utf8_string_is_invalid_argument(env):
    _, rec, _, _, channel = env
    data = _request([dict(_good(), name="QQQQ")]).SerializeToString()
    data = data.replace(b"QQQQ", b"\xff\xfe\xc3\x28")
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, data)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rec.calls == 0


def test_message_over_4mib_is_resource_exhausted(env):
    _, rec, _, _, channel = env
    req = _request([dict(_good(), name="n" * (4 * 1024 * 1024 + 10))])
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, req.SerializeToString())
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rec.calls == 0


def test_gzip_message_over_4mib_decompressed_is_resource_exhausted(env):
    _, rec, _, _, channel = env
    req = _request([dict(_good(), name="n" * (5 * 1024 * 1024))])
    payload = req.SerializeToString()
    assert len(gzip.compress(payload)) < 64 * 1024  # small on the wire
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, payload, compression=grpc.Compression.Gzip)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rec.calls == 0


def test_message_just_under_limit_is_accepted(env):
    _, rec, _, _, channel = env
    req = _request([dict(_good(), name="n" * (4 * 1024 * 1024 - 200))])
    _, call = _raw_call(channel, req.SerializeToString())
    assert call.code() == grpc.StatusCode.OK
    assert len(rec.spans()) == 1


def test_partial_success_removes_invalid_spans(env):
    _, rec, stats, _, channel = env
    deep = _good(5)
    req = _request([
        _good(1),
        {"trace_id": b"\x01" * 15, "span_id": b"\x01" * 8, "name": "short-trace"},
        {"trace_id": bytes(16), "span_id": b"\x01" * 8, "name": "zero-trace"},
        {"trace_id": b"\x01" * 16, "span_id": bytes(8), "name": "zero-span"},
        {"trace_id": b"\x01" * 16, "span_id": b"\x01" * 8, "parent_span_id": b"\x01" * 4, "name": "bad-parent"},
        deep,
        dict(_good(6), parent_span_id=b"\x07" * 8),
    ])
    v = req.resource_spans[0].scope_spans[0].spans[5].attributes.add(key="deep").value
    # Arrays: kvlists this deep already exceed protobuf's own parse depth limit.
    for _ in range(40):
        v = v.array_value.values.add()
    v.int_value = 1
    resp_bytes, call = _raw_call(channel, req.SerializeToString())
    resp = ExportTraceServiceResponse.FromString(resp_bytes)
    assert call.code() == grpc.StatusCode.OK
    assert resp.partial_success.rejected_spans == 5
    assert "trace_id" in resp.partial_success.error_message
    assert "nested deeper than 32" in resp.partial_success.error_message
    assert sorted(s.name for s in rec.spans()) == ["op1", "op6"]
    assert rec.batches[0].span_count == 2
    assert stats.counter("spans_received_total", ("grpc",)) == 7
    assert stats.counter("spans_dropped_total", ("invalid",)) == 5


def test_nesting_beyond_protobuf_depth_limit_is_invalid_argument(env):
    _, rec, _, _, channel = env
    req = _request([_good()])
    v = req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="deep").value
    for _ in range(60):
        v = v.kvlist_value.values.add(key="k").value
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, req.SerializeToString())
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rec.calls == 0


def test_backpressure_is_unavailable_with_retry_info(env):
    _, rec, stats, _, channel = env
    rec.pushback, rec.retry_after_s = 1, 2.5
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, _request([_good()]).SerializeToString())
    err = ei.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(err)
    assert status is not None
    infos = []
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1
    assert infos[0].retry_delay.seconds == 2 and infos[0].retry_delay.nanos == 500_000_000
    assert stats.counter("requests_rejected_total", ("grpc", "backpressure")) == 1
    assert stats.counter_total("spans_received_total") == 0


def test_sdk_exporter_honours_retry_info(env):
    _, rec, stats, addr, _ = env
    rec.pushback, rec.retry_after_s = 1, 0.4
    exporter = OTLPSpanExporter(endpoint=addr, insecure=True, timeout=10)
    captured = _finished_spans("retried")
    t0 = time.monotonic()
    result = exporter.export(captured)
    elapsed = time.monotonic() - t0
    exporter.shutdown()
    assert result == SpanExportResult.SUCCESS
    assert rec.calls == 2 and [s.name for s in rec.spans()] == ["retried"]
    # The client waited the server's RetryInfo delay, not its own 1 s+ backoff.
    assert 0.35 <= elapsed < 0.9, elapsed
    assert stats.counter("spans_received_total", ("grpc",)) == 1


def test_consumer_failure_is_retryable(env):
    receiver, rec, stats, _, channel = env

    def broken(batch):
        raise RuntimeError("boom")
    rec.consume = broken
    with pytest.raises(grpc.RpcError) as ei:
        _raw_call(channel, _request([_good()]).SerializeToString())
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stats.counter("requests_rejected_total", ("grpc", "consumer_error")) == 1


def test_unknown_method_is_unimplemented(env):
    _, _, _, _, channel = env
    call = channel.unary_unary("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export")
    with pytest.raises(grpc.RpcError) as ei:
        call(b"", timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_start_twice_and_bad_address():
    rec, stats = Recorder(), Stats()
    r1 = OtlpGrpcReceiver(rec, stats, "127.0.0.1:0")
    addr = r1.start()
    try:
        with pytest.raises(RuntimeError):
            r1.start()
        port = int(addr.rsplit(":", 1)[1])
        r2 = OtlpGrpcReceiver(rec, stats, f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError):
            r2.start()
    finally:
        r1.shutdown(0.5)


# -- peer resolution ------------------------------------------------------------

def _connected_pair(family: int, host: str):
    import socket
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname()[:2], timeout=5)
    acc, addr = srv.accept()
    return srv, cli, acc, addr


@pytest.mark.parametrize("family,host", [(2, "127.0.0.1"), (10, "::1")])
def test_peer_resolver_finds_owner(family, host):
    from isoscope.metadata.peer import PeerResolver
    srv, cli, acc, addr = _connected_pair(family, host)
    try:
        r = PeerResolver()
        assert r.resolve(addr[0], addr[1], srv.getsockname()[1]) == os.getpid()
        # Wrong local port: a different connection, so unknown.
        assert r.resolve(addr[0], addr[1], srv.getsockname()[1] + 1 or 1) == 0
    finally:
        for s in (srv, cli, acc):
            s.close()


def test_peer_resolver_never_raises_and_is_bounded(tmp_path):
    from isoscope.metadata.peer import PeerResolver
    r = PeerResolver(proc_root=str(tmp_path / "missing"), max_entries=8, ttl_s=60)
    for port in range(20):
        assert r.resolve("127.0.0.1", 40000 + port, 4317) == 0
    assert r.cache_size() == 8
    assert r.resolve("10.1.2.3", 1, 2) == 0       # not loopback: never looked up
    assert r.resolve("not-an-ip", 1, 2) == 0


def test_peer_resolver_cache_and_ttl(tmp_path):
    """A fake procfs: the cache answers until the TTL expires, then procfs is read again."""
    from isoscope.metadata.peer import PeerResolver
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    # 127.0.0.1:50000 -> 127.0.0.1:4317, inode 777
    (proc / "net" / "tcp").write_text(
        header + "   0: 0100007F:C350 0100007F:10DD 01 00000000:00000000 00:00000000 00000000     0        0 777\n")
    (proc / "net" / "tcp6").write_text(header)
    (proc / "4242" / "fd").mkdir(parents=True)
    os.symlink("socket:[777]", proc / "4242" / "fd" / "5")
    r = PeerResolver(proc_root=str(proc), ttl_s=0.2)
    assert r.resolve("127.0.0.1", 50000, 4317) == 4242
    os.unlink(proc / "4242" / "fd" / "5")
    assert r.resolve("127.0.0.1", 50000, 4317) == 4242  # cached
    time.sleep(0.25)
    assert r.resolve("127.0.0.1", 50000, 4317) == 0     # expired, re-read
