"""Raw OTLP clients for the reliability tests: any bytes in, status out; and a polling helper."""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Mapping

logger = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class GrpcClient:
    """A raw-bytes OTLP/gRPC client: sends any bytes, returns ``(code, details, trailers)``."""

    def __init__(self, endpoint: str, *, max_send_bytes: int = 64 * 1024 * 1024) -> None:
        import grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.max_send_message_length", max_send_bytes)])
        self._call = self.channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                              response_deserializer=None)

    def export(self, payload: bytes, timeout_s: float = 10.0) -> tuple[Any, str, dict[str, Any]]:
        try:
            _resp, call = self._call.with_call(payload, timeout=timeout_s)
            return call.code(), call.details() or "", dict(call.trailing_metadata() or ())
        except self._grpc.RpcError as exc:
            return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())

    def close(self) -> None:
        self.channel.close()


def http_post(url: str, body: bytes, *, content_type: str = "application/x-protobuf",
              headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """POST one request on a fresh connection; returns ``(status, headers, body)``."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_until(check: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``check()`` until it is true or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - a check that cannot be read yet is "not yet"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
