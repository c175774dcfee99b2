"""Forward targets against real backends: TLS with a private CA, mTLS, bearer tokens, OTEL_EXPORTER_OTLP_*.

Every delivery test sends a real request through an exporter built from a
:class:`ForwardTarget` to the loopback OTLP backend of ``tests/otlp_backend.py``
(gRPC and HTTP servers with real TLS), and checks what the backend received.
The PKI (a private CA, a server certificate for 127.0.0.1, a client
certificate, and a second CA nobody uses) is made with the ``openssl`` CLI.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from isoscope.exporters.targets import (
    ForwardTarget,
    HeaderSource,
    build_exporter,
    resolve_targets,
    target_from_url,
    targets_from_env,
)
from isoscope.model import ExportResult
from tests.otlp_backend import BackendTls, OtlpBackend, make_payload, span_hex
from tests.pki import make_pki

TOKEN = "tok-9f8e7d6c5b4a-secret"
OTHER_TOKEN = "tok-rotated-1a2b3c-secret"
PROTOCOLS = ["grpc", "http/protobuf"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """CA + server cert (SAN 127.0.0.1) + client cert signed by it, and an unrelated CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_backend(pki):
    """TLS (private CA) and a required bearer token; no client certificate needed."""
    with OtlpBackend(tls=BackendTls(pki["server.pem"], pki["server.key"]), bearer_token=TOKEN) as b:
        yield b


@pytest.fixture
def mtls_backend(pki):
    """TLS, a client certificate signed by the private CA required, and a bearer token."""
    with OtlpBackend(tls=BackendTls(pki["server.pem"], pki["server.key"], client_ca_file=pki["ca.pem"]),
                     bearer_token=TOKEN) as b:
        yield b


def _endpoint(backend: OtlpBackend, protocol: str) -> str:
    return backend.grpc_url if protocol == "grpc" else backend.http_url


def _send(target: ForwardTarget, span_ids: list[int]):
    exporter = build_exporter(target)
    try:
        return exporter.export(make_payload(span_ids), len(span_ids))
    finally:
        exporter.shutdown()


# -- delivery through real TLS backends ---------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_token_and_private_ca_deliver(tls_backend, pki, protocol):
    target = ForwardTarget(endpoint=_endpoint(tls_backend, protocol),
                           headers={"Authorization": f"Bearer {TOKEN}"}, tls={"ca_file": pki["ca.pem"]})
    assert target.destination().protocol == protocol and target.destination().secure
    outcome = _send(target, [1, 2, 3])
    assert outcome.result is ExportResult.SUCCESS, outcome.message
    assert tls_backend.span_ids() == [span_hex(i) for i in (1, 2, 3)]
    assert tls_backend.attempts[-1].headers["authorization"] == f"Bearer {TOKEN}"
    assert tls_backend.attempts[-1].protocol == ("grpc" if protocol == "grpc" else "http")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mtls_client_certificate_delivers(mtls_backend, pki, protocol):
    target = ForwardTarget(endpoint=_endpoint(mtls_backend, protocol), headers={"authorization": f"Bearer {TOKEN}"},
                           tls={"ca_file": pki["ca.pem"], "cert_file": pki["client.pem"],
                                "key_file": pki["client.key"]})
    outcome = _send(target, [7])
    assert outcome.result is ExportResult.SUCCESS, outcome.message
    assert mtls_backend.span_ids() == [span_hex(7)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mtls_without_client_certificate_is_refused_and_retryable(mtls_backend, pki, protocol):
    # A refused handshake is a transport failure: retryable, as every OTLP
    # exporter treats it (gRPC reports UNAVAILABLE; the Collector retries it).
    target = ForwardTarget(endpoint=_endpoint(mtls_backend, protocol), headers={"authorization": f"Bearer {TOKEN}"},
                           tls={"ca_file": pki["ca.pem"]})
    outcome = _send(target, [8])
    assert outcome.result is ExportResult.RETRYABLE, outcome.message
    assert mtls_backend.span_ids() == []
    assert not mtls_backend.attempts  # never got past TLS
    if protocol == "http/protobuf":
        assert mtls_backend.handshake_failures, "the server did not see (and refuse) a handshake"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_token_is_not_retryable(tls_backend, pki, protocol):
    target = ForwardTarget(endpoint=_endpoint(tls_backend, protocol), headers={"authorization": "Bearer nope"},
                           tls={"ca_file": pki["ca.pem"]})
    outcome = _send(target, [4])
    # OTLP: UNAUTHENTICATED / HTTP 401 are not in the retryable sets.
    assert outcome.result is ExportResult.FAILED, outcome.message
    assert ("UNAUTHENTICATED" in outcome.message) if protocol == "grpc" else ("HTTP 401" in outcome.message)
    assert tls_backend.span_ids() == []
    assert [a.failure.http_status for a in tls_backend.attempts] == [401]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_ca_is_retryable_and_delivers_nothing(tls_backend, pki, protocol):
    target = ForwardTarget(endpoint=_endpoint(tls_backend, protocol), headers={"authorization": f"Bearer {TOKEN}"},
                           tls={"ca_file": pki["other-ca.pem"]})
    outcome = _send(target, [5])
    assert outcome.result is ExportResult.RETRYABLE, outcome.message
    assert tls_backend.span_ids() == [] and not tls_backend.attempts
    if protocol == "http/protobuf":
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.message


def test_http_insecure_skip_verify_trusts_any_certificate(tls_backend, pki):
    target = ForwardTarget(endpoint=tls_backend.http_url, headers={"authorization": f"Bearer {TOKEN}"},
                           tls={"insecure_skip_verify": True})
    outcome = _send(target, [6])
    assert outcome.result is ExportResult.SUCCESS, outcome.message
    assert tls_backend.span_ids() == [span_hex(6)]


def test_bare_host_port_is_grpc_plaintext_only_when_insecure():
    with OtlpBackend() as backend:
        target = ForwardTarget(endpoint=backend.grpc_endpoint, tls={"insecure": True})
        assert _send(target, [11]).result is ExportResult.SUCCESS
        assert backend.span_ids() == [span_hex(11)]
        # Without tls.insecure a bare host:port means TLS (as in the Collector): the plaintext server refuses it.
        tls_target = ForwardTarget(endpoint=backend.grpc_endpoint)
        assert tls_target.destination().secure
        assert _send(tls_target, [12]).result is ExportResult.RETRYABLE
        assert backend.span_ids() == [span_hex(11)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_header_from_file_follows_secret_rotation(tls_backend, pki, tmp_path, protocol):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # Secret files usually end with a newline
    target = ForwardTarget(endpoint=_endpoint(tls_backend, protocol), tls={"ca_file": pki["ca.pem"]},
                           headers={"authorization": {"value_file": str(token_file), "prefix": "Bearer "}})
    exporter = build_exporter(target)
    try:
        assert exporter.export(make_payload([21]), 1).result is ExportResult.SUCCESS
        # The backend rotates its token; until the Secret file follows, exports are refused.
        tls_backend.bearer_token = OTHER_TOKEN
        assert exporter.export(make_payload([22]), 1).result is ExportResult.FAILED
        # Kubernetes replaces the file atomically (a symlink swap): do the same.
        new = tmp_path / "token.new"
        new.write_text(OTHER_TOKEN + "\n")
        os.replace(new, token_file)
        assert exporter.export(make_payload([23]), 1).result is ExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert tls_backend.span_ids() == [span_hex(21), span_hex(23)]
    assert tls_backend.attempts[-1].headers["authorization"] == f"Bearer {OTHER_TOKEN}"


def test_compression_setting_reaches_the_wire():
    with OtlpBackend() as backend:
        for compression, expected in (("gzip", "gzip"), ("none", None)):
            target = ForwardTarget(endpoint=backend.http_url, compression=compression)
            assert _send(target, [31]).result is ExportResult.SUCCESS
            assert backend.attempts[-1].headers.get("content-encoding") == expected


# -- OTEL_EXPORTER_OTLP_* ------------------------------------------------------------

def test_env_only_delivers_over_http_with_mtls_and_token(mtls_backend, pki):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": mtls_backend.http_url,  # base: /v1/traces appended
        "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{TOKEN},x-tenant=a%2Cb",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": pki["ca.pem"],
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki["client.pem"],
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": pki["client.key"],
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
    }
    [target] = targets_from_env(env)
    assert target.destination().protocol == "http/protobuf"  # the specification's default
    assert target.destination().address == f"{mtls_backend.http_url}/v1/traces"
    assert target.timeout_s == 2.5
    assert _send(target, [41, 42]).result is ExportResult.SUCCESS
    assert mtls_backend.span_ids() == [span_hex(41), span_hex(42)]
    got = mtls_backend.attempts[-1].headers
    assert got["authorization"] == f"Bearer {TOKEN}" and got["x-tenant"] == "a,b"
    assert got["content-encoding"] == "gzip"


def test_env_only_delivers_over_grpc_with_mtls_and_token(mtls_backend, pki):
    env = {
        # The specification's gRPC form: an https:// URL means TLS.
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://127.0.0.1:{mtls_backend.grpc_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": f"authorization=Bearer {TOKEN}",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer wrong",  # the signal-specific one wins
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": pki["ca.pem"],
        "OTEL_EXPORTER_OTLP_CERTIFICATE": pki["other-ca.pem"],      # loses too
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": pki["client.pem"],
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": pki["client.key"],
    }
    [target] = targets_from_env(env)
    assert target.destination().protocol == "grpc"
    assert _send(target, [43]).result is ExportResult.SUCCESS
    assert mtls_backend.span_ids() == [span_hex(43)]


def test_env_traces_endpoint_is_used_as_is(tls_backend, pki):
    base = {"OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {TOKEN}",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": pki["ca.pem"]}
    # A signal endpoint without the path is posted to "/", which the backend does not serve.
    [target] = targets_from_env({**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": tls_backend.http_url,
                                 "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert target.destination().address == tls_backend.http_url + "/"
    outcome = _send(target, [51])
    assert outcome.result is ExportResult.FAILED and "HTTP 404" in outcome.message
    [target] = targets_from_env({**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": tls_backend.http_url + "/v1/traces"})
    assert _send(target, [52]).result is ExportResult.SUCCESS
    assert tls_backend.span_ids() == [span_hex(52)]


def test_env_rules():
    assert targets_from_env({}) == []
    # No endpoint: no forwarding (the daemon itself listens on localhost:4317/4318).
    assert targets_from_env({"OTEL_EXPORTER_OTLP_HEADERS": "a=b"}) == []
    assert targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}) == []
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/prefix/"})
    assert (t.destination().address, t.compression, t.timeout_s) == ("http://c:4318/prefix/v1/traces", "none", 10.0)
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"})
    assert t.destination() == t.destination().__class__("grpc", False, "c:4317")
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "c:4317"})
    assert t.destination().secure
    # INSECURE does not override a scheme.
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                            "OTEL_EXPORTER_OTLP_INSECURE": "true"})
    assert t.destination() == t.destination().__class__("grpc", True, "c:443")
    # Invalid optional values are ignored (warned about), as the specification asks.
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
                            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "brotli",
                            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert (t.timeout_s, t.compression, t.destination().protocol) == (10.0, "none", "http/protobuf")
    # The signal-specific value wins per setting, and an empty one counts as unset.
    [t] = targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TIMEOUT": "1000",
                            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "", "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
                            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"})
    assert (t.timeout_s, t.compression) == (1.0, "gzip")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c:1"})


def test_env_used_only_when_nothing_is_configured():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://from-env:4318"}
    assert [t.destination().address for t in resolve_targets([], [], env)] == ["http://from-env:4318/v1/traces"]
    got = resolve_targets(["grpc://a:4317"], [ForwardTarget(endpoint="https://b")], env)
    assert [t.destination().address for t in got] == ["a:4317", "https://b:443/v1/traces"]


# -- --forward URLs and validation ----------------------------------------------------

def test_forward_urls_keep_their_meaning():
    cases = {
        "grpc://h:4317": ("grpc", False, "h:4317"),
        "grpcs://h:4317": ("grpc", True, "h:4317"),
        "http://h:4318": ("http/protobuf", False, "http://h:4318/v1/traces"),
        "https://h:4318/v1/traces": ("http/protobuf", True, "https://h:4318/v1/traces"),
        "grpc://[::1]:4317": ("grpc", False, "[::1]:4317"),
    }
    for url, (protocol, secure, address) in cases.items():
        dest = target_from_url(url).destination()
        assert (dest.protocol, dest.secure, dest.address) == (protocol, secure, address), url
    assert target_from_url("grpc://h:1").label() == "otlp_grpc"
    assert target_from_url("http://h:1").label() == "otlp_http"
    for bad in ("h:4317", "ftp://h:1", "grpc://h", "http://"):
        with pytest.raises(ValueError):
            target_from_url(bad)


@pytest.mark.parametrize("fields, message", [
    ({"endpoint": "http://h:1", "tls": {"ca_file": "/x"}}, "plaintext"),
    ({"endpoint": "grpcs://h:1", "tls": {"insecure_skip_verify": True}}, "not supported for gRPC"),
    ({"endpoint": "https://h:1", "tls": {"insecure": True}}, "tls.insecure"),
    ({"endpoint": "h:1", "protocol": "http/protobuf"}, "needs an http"),
    ({"endpoint": "grpc://h:1", "protocol": "http/protobuf"}, "is gRPC"),
    ({"endpoint": "https://h:1", "tls": {"cert_file": "/c"}}, "both cert_file and key_file"),
    ({"endpoint": "https://h:1", "traces_endpoint": "https://h:1"}, "exactly one"),
    ({"endpoint": "https://h:1", "name": "../../etc"}, "name"),
    ({"endpoint": "https://h:1", "headers": {"content-type": "x"}}, "set by the exporter"),
    ({"endpoint": "https://h:1", "headers": {"bad header": "x"}}, "valid HTTP header name"),
    ({"endpoint": "https://h:1", "headers": {"a": {"value": "x", "value_file": "/f"}}}, "not both"),
])
def test_invalid_targets_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        ForwardTarget(**fields)


def test_unreadable_tls_or_header_file_fails_at_build(tmp_path, pki):
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="tls.ca_file .*missing.pem"):
        build_exporter(ForwardTarget(endpoint="grpcs://127.0.0.1:1", tls={"ca_file": missing}))
    with pytest.raises(ValueError, match="tls.key_file .*missing.pem"):
        build_exporter(ForwardTarget(endpoint="https://127.0.0.1:1",
                                     tls={"cert_file": pki["client.pem"], "key_file": missing}))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="authorization"):
        build_exporter(ForwardTarget(endpoint="https://127.0.0.1:1",
                                     headers={"authorization": {"value_file": str(tmp_path / "empty")}}))


def test_timeout_and_name_reach_the_exporter():
    exporter = build_exporter(ForwardTarget(endpoint="grpc://127.0.0.1:1", timeout_s=0.75, name="backend-a"))
    try:
        assert (exporter.timeout_s, exporter.name) == (0.75, "backend-a")
    finally:
        exporter.shutdown()


# -- secrets never shown ---------------------------------------------------------------

def test_secrets_are_masked_everywhere(tls_backend, pki, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    target = ForwardTarget(endpoint=tls_backend.http_url, tls={"ca_file": pki["ca.pem"]},
                           headers={"authorization": f"Bearer {TOKEN}", "x-api-key": TOKEN,
                                    "x-from-file": {"value_file": str(token_file)}})
    shown = [repr(target), str(target), repr(target.headers), str(target.model_dump()),
             target.model_dump_json(), yaml.safe_dump({"exporters": {"targets": [target.model_dump()]}}),
             repr(HeaderSource(target.headers))]
    for text in shown:
        assert TOKEN not in text, text
    assert "***" in str(target.model_dump())
    assert str(token_file) in shown[-2]  # the file's path is configuration, not a secret

    # Logging through build, success, refusal (wrong token), and a malformed environment.
    exporter = build_exporter(target)
    assert exporter.export(make_payload([61]), 1).result is ExportResult.SUCCESS
    exporter.shutdown()
    tls_backend.bearer_token = "something-else"
    exporter = build_exporter(target)
    assert exporter.export(make_payload([62]), 1).result is ExportResult.FAILED
    exporter.shutdown()
    targets_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": tls_backend.http_url,
                      "OTEL_EXPORTER_OTLP_HEADERS": f"authorization=Bearer {TOKEN},{TOKEN},x=\x01{TOKEN}"})
    # A header file that disappears keeps its last value and is reported without it.
    source = HeaderSource(target.headers)
    token_file.unlink()
    assert source()["x-from-file"] == TOKEN
    assert "forwarding to" in caplog.text and "keeping the previous value" in caplog.text
    assert TOKEN not in caplog.text

    # Validation errors never echo a header value.
    for bad in ({"a": f"{TOKEN}\r\nx: y"}, {"a": {"value": f"{TOKEN}\n"}}, {"a": {"value": TOKEN, "valu": TOKEN}}):
        with pytest.raises(ValidationError) as err:
            ForwardTarget(endpoint="https://h:1", headers=bad)
        assert TOKEN not in str(err.value)
        assert all(TOKEN not in repr(e.get("input")) or isinstance(e.get("input"), dict)
                   for e in err.value.errors())
    with pytest.raises(ValidationError) as err:
        ForwardTarget(endpoint=f"https://user:{TOKEN}@h:1")
    assert TOKEN not in str(err.value)
