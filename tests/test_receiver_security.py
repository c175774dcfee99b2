"""TLS, mTLS and bearer-token auth on both receivers, with certificates made for the test."""

from __future__ import annotations

import ssl
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from isoscope.model import Stats, TraceBatch, iter_spans
from isoscope.receivers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver, ReceiverSecurity, SecurityConfigError

TOKEN = "s3cret-token"
METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=isoscope-test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                  "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client", "rogue"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.pem", "-days", "2", "-extfile", "client.ext", cwd=d)
    # Self-signed: a client certificate the receiver's CA never issued.
    _openssl("x509", "-req", "-in", "rogue.csr", "-signkey", "rogue.key", "-out", "rogue.pem",
             "-days", "2", "-extfile", "client.ext", cwd=d)
    return {name: str(d / name) for name in (
        "ca.pem", "server.pem", "server.key", "client.pem", "client.key", "rogue.pem", "rogue.key")}


class Recorder:
    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []
        self.lock = threading.Lock()

    def consume(self, batch: TraceBatch) -> None:
        with self.lock:
            self.batches.append(batch)

    def names(self) -> list[str]:
        return [s.name for b in self.batches for s in iter_spans(b.request)]


def _spans(name: str) -> list:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.get_tracer("t").start_span(name).end()
    return list(memory.get_finished_spans())


def _payload() -> bytes:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="raw")
    return req.SerializeToString()


# -- configuration ----------------------------------------------------------------

def test_config_errors(pki, tmp_path):
    with pytest.raises(SecurityConfigError):
        ReceiverSecurity(cert_file=pki["server.pem"])
    with pytest.raises(SecurityConfigError):
        ReceiverSecurity(client_ca_file=pki["ca.pem"])
    with pytest.raises(SecurityConfigError):
        ReceiverSecurity(bearer_token="  ")
    with pytest.raises(SecurityConfigError):
        ReceiverSecurity(cert_file=str(tmp_path / "nope.pem"), key_file=pki["server.key"])
    # Key that does not match the certificate.
    bad = ReceiverSecurity(cert_file=pki["server.pem"], key_file=pki["client.key"])
    with pytest.raises(SecurityConfigError):
        bad.ssl_context()


def test_authorized():
    sec = ReceiverSecurity(bearer_token=TOKEN)
    assert sec.authorized(f"Bearer {TOKEN}")
    assert sec.authorized(f"bearer {TOKEN}")
    assert not sec.authorized(None)
    assert not sec.authorized("")
    assert not sec.authorized(TOKEN)
    assert not sec.authorized(f"Bearer {TOKEN}x")
    assert not sec.authorized(f"Basic {TOKEN}")
    assert ReceiverSecurity().authorized(None)


# -- gRPC -------------------------------------------------------------------------

@pytest.fixture()
def grpc_env(pki):
    rec = Recorder()
    stats = Stats()
    sec = ReceiverSecurity(cert_file=pki["server.pem"], key_file=pki["server.key"],
                           client_ca_file=pki["ca.pem"], bearer_token=TOKEN)
    receiver = OtlpGrpcReceiver(rec, stats, "127.0.0.1:0", security=sec)
    addr = receiver.start()
    yield rec, stats, addr
    receiver.shutdown(1.0)


def _creds(pki, who: str = "client") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(pki["ca.pem"]).read_bytes(),
        private_key=Path(pki[f"{who}.key"]).read_bytes(),
        certificate_chain=Path(pki[f"{who}.pem"]).read_bytes())


def test_grpc_sdk_exporter_over_mtls_with_token(pki, grpc_env):
    rec, _, addr = grpc_env
    exporter = GrpcExporter(endpoint=addr, credentials=_creds(pki),
                            headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert exporter.export(_spans("secure")) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert rec.names() == ["secure"]


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),)])
def test_grpc_wrong_or_missing_token_is_unauthenticated(pki, grpc_env, metadata):
    rec, stats, addr = grpc_env
    with grpc.secure_channel(addr, _creds(pki)) as ch:
        call = ch.unary_unary(METHOD)
        with pytest.raises(grpc.RpcError) as ei:
            call(_payload(), metadata=metadata, timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert rec.batches == []
    assert stats.counter("requests_rejected_total", ("grpc", "unauthenticated")) == 1


def test_grpc_sdk_exporter_with_wrong_token_does_not_retry(pki, grpc_env):
    rec, stats, addr = grpc_env
    exporter = GrpcExporter(endpoint=addr, credentials=_creds(pki),
                            headers={"authorization": "Bearer nope"}, timeout=10)
    t0 = time.monotonic()
    assert exporter.export(_spans("denied")) == SpanExportResult.FAILURE
    assert time.monotonic() - t0 < 1.0  # UNAUTHENTICATED is final: no backoff and retry
    exporter.shutdown()
    assert stats.counter("requests_rejected_total", ("grpc", "unauthenticated")) == 1


@pytest.mark.parametrize("who", [None, "rogue"])
def test_grpc_mtls_rejects_missing_or_foreign_client_cert(pki, grpc_env, who):
    rec, _, addr = grpc_env
    if who is None:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(pki["ca.pem"]).read_bytes())
    else:
        creds = _creds(pki, who)
    with grpc.secure_channel(addr, creds) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary(METHOD)(_payload(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    assert rec.batches == []


def test_grpc_plaintext_client_cannot_talk_to_tls_receiver(grpc_env):
    rec, _, addr = grpc_env
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError):
            ch.unary_unary(METHOD)(_payload(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
    assert rec.batches == []


def test_grpc_token_without_tls(pki):
    rec = Recorder()
    receiver = OtlpGrpcReceiver(rec, Stats(), "127.0.0.1:0", security=ReceiverSecurity(bearer_token=TOKEN))
    addr = receiver.start()
    try:
        with grpc.insecure_channel(addr) as ch:
            call = ch.unary_unary(METHOD)
            call(_payload(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
            with pytest.raises(grpc.RpcError) as ei:
                call(_payload(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rec.names() == ["raw"]
    finally:
        receiver.shutdown(1.0)


# -- HTTP -------------------------------------------------------------------------

@pytest.fixture()
def http_env(pki):
    rec = Recorder()
    stats = Stats()
    sec = ReceiverSecurity(cert_file=pki["server.pem"], key_file=pki["server.key"],
                           client_ca_file=pki["ca.pem"], bearer_token=TOKEN)
    receiver = OtlpHttpReceiver(rec, stats, "127.0.0.1:0", security=sec)
    addr = receiver.start()
    yield rec, stats, f"https://{addr}/v1/traces"
    receiver.shutdown(1.0)


@pytest.fixture()
def no_ca_bundle_env(monkeypatch):
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's
    # own CA file, which is how the SDK exporter passes certificate_file.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def test_http_sdk_exporter_over_mtls_with_token(pki, http_env, no_ca_bundle_env):
    rec, _, url = http_env
    exporter = HttpExporter(endpoint=url, certificate_file=pki["ca.pem"],
                            client_certificate_file=pki["client.pem"], client_key_file=pki["client.key"],
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert exporter.export(_spans("secure-http")) == SpanExportResult.SUCCESS
    exporter.shutdown()
    assert rec.names() == ["secure-http"]
    assert rec.batches[0].peer_addr.startswith("127.0.0.1:")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_http_wrong_or_missing_token_is_401(pki, http_env, headers):
    rec, stats, url = http_env
    r = requests.post(url, data=_payload(), headers={"Content-Type": "application/x-protobuf", **headers},
                      verify=pki["ca.pem"], cert=(pki["client.pem"], pki["client.key"]), timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert rec.batches == []
    assert stats.counter("requests_rejected_total", ("http", "unauthenticated")) == 1


def test_http_sdk_exporter_with_wrong_token_fails_without_retry(pki, http_env, no_ca_bundle_env):
    rec, stats, url = http_env
    exporter = HttpExporter(endpoint=url, certificate_file=pki["ca.pem"],
                            client_certificate_file=pki["client.pem"], client_key_file=pki["client.key"],
                            headers={"Authorization": "Bearer nope"}, timeout=10)
    t0 = time.monotonic()
    assert exporter.export(_spans("denied")) == SpanExportResult.FAILURE
    assert time.monotonic() - t0 < 1.0  # 401 is final: no backoff and retry
    exporter.shutdown()
    assert stats.counter("requests_rejected_total", ("http", "unauthenticated")) == 1


@pytest.mark.parametrize("who", [None, "rogue"])
def test_http_mtls_rejects_missing_or_foreign_client_cert(pki, http_env, who):
    rec, _, url = http_env
    cert = (pki[f"{who}.pem"], pki[f"{who}.key"]) if who else None
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, data=_payload(),
                      headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"},
                      verify=pki["ca.pem"], cert=cert, timeout=10)
    assert rec.batches == []


def test_http_server_certificate_verifies_against_ca(pki, http_env):
    _, _, url = http_env
    host_port = url.split("/")[2]
    host, port = host_port.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    ctx.load_cert_chain(pki["client.pem"], pki["client.key"])
    import socket
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert()["subject"][0][0] == ("commonName", "server")


def test_http_tls_without_client_ca_accepts_any_client(pki):
    rec = Recorder()
    sec = ReceiverSecurity(cert_file=pki["server.pem"], key_file=pki["server.key"])
    receiver = OtlpHttpReceiver(rec, Stats(), "127.0.0.1:0", security=sec)
    addr = receiver.start()
    try:
        r = requests.post(f"https://{addr}/v1/traces", data=_payload(),
                          headers={"Content-Type": "application/x-protobuf"}, verify=pki["ca.pem"], timeout=10)
        assert r.status_code == 200 and rec.names() == ["raw"]
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(f"https://{addr}/v1/traces", data=_payload(),
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)  # system CAs
    finally:
        receiver.shutdown(1.0)
