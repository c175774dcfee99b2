"""The daemon forwards as an OpenTelemetry Collector agent would: to a backend that wants TLS with a
private CA, a client certificate and a bearer token, configured either as an ``exporters.targets``
entry or through ``OTEL_EXPORTER_OTLP_*`` alone.

The daemon runs without probes here (the forwarding path is what is under test; enrichment has its
own tests); spans go in over OTLP/gRPC and must arrive at the backend unchanged in identity.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from isoscope_lab.launcher import IsoscopeDaemon
from tests.otlp_backend import BackendTls, OtlpBackend, make_payload, span_hex
from tests.pki import make_pki
from tests.reliability.clients import GrpcClient, wait_until

TOKEN = "e2e-forwarding-token-5c1d"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_backend(pki: dict[str, str]) -> Iterator[OtlpBackend]:
    with OtlpBackend(tls=BackendTls(pki["server.pem"], pki["server.key"], client_ca_file=pki["ca.pem"]),
                     bearer_token=TOKEN) as b:
        yield b


def _send_and_expect(daemon: IsoscopeDaemon, backend: OtlpBackend, span_ids: list[int]) -> None:
    client = GrpcClient(daemon.grpc_endpoint)
    try:
        code, details, _ = client.export(make_payload(span_ids))
    finally:
        client.close()
    assert code.name == "OK", details
    assert backend.wait_for_span_ids(span_ids, timeout_s=60), (
        f"backend got {sorted(backend.span_ids())}, wanted {[span_hex(s) for s in span_ids]}; "
        f"daemon log: {daemon.log_tail()}")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_configured_target_with_mtls_and_bearer_token_delivers(mtls_backend, pki, tmp_path, protocol):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    target = {
        "name": "vendor",
        "endpoint": mtls_backend.grpc_url if protocol == "grpc" else mtls_backend.http_url,
        "protocol": protocol,
        "headers": {"authorization": {"value_file": str(token_file), "prefix": "Bearer "}},
        "tls": {"ca_file": pki["ca.pem"], "cert_file": pki["client.pem"], "key_file": pki["client.key"]},
    }
    with IsoscopeDaemon(probes=False, config={"exporters": {"targets": [target]}}) as d:
        _send_and_expect(d, mtls_backend, [0x51, 0x52, 0x53])
        assert TOKEN not in d.log_text(), "the bearer token was logged"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otel_exporter_environment_alone_delivers(mtls_backend, pki, protocol):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": mtls_backend.grpc_url.replace("grpcs://", "https://")
        if protocol == "grpc" else mtls_backend.http_url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer%20{TOKEN}",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": pki["ca.pem"],
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki["client.pem"],
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": pki["client.key"],
    }
    with IsoscopeDaemon(probes=False, env=env) as d:
        _send_and_expect(d, mtls_backend, [0x61, 0x62])
        assert TOKEN not in d.log_text(), "the bearer token was logged"


def test_file_export_is_capped_and_rotated(tmp_path):
    """The default file export (on when nothing is forwarded) never grows past `exporters.file.max_bytes`."""
    path = tmp_path / "traces.jsonl"
    cap = 64 * 1024
    cfg = {"exporters": {"file": {"path": str(path), "max_bytes": cap, "keep": 1}}}
    with IsoscopeDaemon(probes=False, config=cfg) as d:
        client = GrpcClient(d.grpc_endpoint)
        try:
            for i in range(40):  # ≈ 40 × 5 KB of OTLP/JSON
                code, details, _ = client.export(make_payload(range(1000 + 20 * i, 1020 + 20 * i)))
                assert code.name == "OK", details
        finally:
            client.close()
        rotated = tmp_path / "traces.jsonl.1"
        assert wait_until(lambda: rotated.exists() and path.stat().st_size > 0, timeout_s=30), d.log_tail()
    assert not (tmp_path / "traces.jsonl.2").exists(), "keep: 1 keeps one rotated file"
    for f in (path, rotated):
        assert f.stat().st_size <= cap + 64 * 1024, f"{f} is {f.stat().st_size} bytes"  # cap + one request line
