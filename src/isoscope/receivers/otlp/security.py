"""Transport security shared by the OTLP receivers: TLS, mTLS, bearer tokens.

A missing or wrong token is answered with gRPC ``UNAUTHENTICATED`` / HTTP
``401``; OTLP clients treat both as not retryable, so a misconfigured sender
drops its data instead of hammering the daemon with retries.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

_BEARER = "bearer "


class SecurityConfigError(ValueError):
    """The security settings are inconsistent or the files cannot be read."""


@dataclass(frozen=True, slots=True)
class ReceiverSecurity:
    """TLS / mTLS / bearer-token settings for both receivers.

    Attributes:
        cert_file: server certificate chain (PEM). Enables TLS together with ``key_file``.
        key_file: server private key (PEM).
        client_ca_file: CA bundle (PEM) for client certificates; when set, a
            client certificate signed by it is *required* (mTLS).
        bearer_token: when set, every request must carry
            ``Authorization: Bearer <token>``.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    bearer_token: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise SecurityConfigError("TLS needs both cert_file and key_file")
        if self.client_ca_file and not self.cert_file:
            raise SecurityConfigError("client_ca_file (mTLS) needs cert_file and key_file")
        if self.bearer_token is not None and not self.bearer_token.strip():
            raise SecurityConfigError("bearer_token must not be empty")
        for f in (self.cert_file, self.key_file, self.client_ca_file):
            if f and not Path(f).is_file():
                raise SecurityConfigError(f"{f}: no such file")

    @property
    def tls(self) -> bool:
        """Whether TLS is on."""
        return bool(self.cert_file)

    @property
    def mtls(self) -> bool:
        """Whether client certificates are required."""
        return bool(self.client_ca_file)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Server-side ``SSLContext`` for the HTTP receiver, or None without TLS."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            if self.client_ca_file:
                ctx.load_verify_locations(cafile=str(self.client_ca_file))
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise SecurityConfigError(f"cannot load TLS material: {exc}") from None
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials for the gRPC receiver, or None without TLS."""
        if not self.tls:
            return None
        try:
            key = Path(str(self.key_file)).read_bytes()
            chain = Path(str(self.cert_file)).read_bytes()
            ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        except OSError as exc:
            raise SecurityConfigError(f"cannot load TLS material: {exc}") from None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=ca, require_client_auth=ca is not None)

    def authorized(self, authorization: str | None) -> bool:
        """Check an ``Authorization`` header value against the configured token.

        Always true when no token is configured. The comparison is constant
        time so the token cannot be guessed byte by byte from response times.
        """
        if self.bearer_token is None:
            return True
        if not authorization or not authorization[:len(_BEARER)].lower() == _BEARER:
            return False
        given = authorization[len(_BEARER):].strip().encode()
        return hmac.compare_digest(given, self.bearer_token.encode())


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects gRPC calls without the right bearer token before the request is decoded."""

    def __init__(self, security: ReceiverSecurity, on_reject: Any = None) -> None:
        self._security = security
        self._on_reject = on_reject

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            if self._on_reject is not None:
                self._on_reject()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        auth = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                auth = value if isinstance(value, str) else value.decode("latin-1")
                break
        if self._security.authorized(auth):
            return continuation(handler_call_details)
        return self._deny
