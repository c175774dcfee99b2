"""OTLP/HTTP trace exporter (binary protobuf): one POST per attempt.

Response handling follows the OTLP specification (opentelemetry-proto
``docs/specification.md``, "OTLP/HTTP Response"):

* 2xx: success; a ``partial_success`` with rejected spans drops those spans;
* 429, 502, 503, 504: retryable, honouring ``Retry-After`` (delta-seconds or
  an HTTP-date);
* any other status: not retryable;
* connection errors and timeouts: retryable (the backend may come back).

urllib3's ``PoolManager`` is used because it is documented thread-safe, so the
queue's workers can share one connection pool.
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import time
from typing import Callable, Mapping, Union

import urllib3
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from isoscope.model import ExportOutcome, ExportResult

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
Headers = Union[Mapping[str, str], Callable[[], Mapping[str, str]]]
"""Fixed headers, or a callable returning the current ones (values read from rotated files)."""
RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 502, 503, 504})


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value.

    Args:
        value: delta-seconds (``"3"``) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``).
        now: current wall-clock time (for tests); defaults to ``time.time()``.

    Returns:
        Non-negative seconds, or None if absent or unparseable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def traces_url(endpoint: str) -> str:
    """``http://host:port`` → ``http://host:port/v1/traces`` (a full URL is kept)."""
    endpoint = endpoint.rstrip("/")
    if endpoint.endswith(TRACES_PATH):
        return endpoint
    return endpoint + TRACES_PATH


def _error_text(body: bytes, content_type: str) -> str:
    """The ``google.rpc.Status`` message of an error body, or a printable prefix of it."""
    if "protobuf" in content_type:
        status = status_pb2.Status()
        try:
            status.ParseFromString(body)
            if status.message:
                return status.message
        except DecodeError:
            pass
    return body[:200].decode("utf-8", "replace")


class OtlpHttpExporter:
    """POSTs serialized trace requests to ``<endpoint>/v1/traces``.

    Args:
        endpoint: ``http(s)://host:port`` (``/v1/traces`` is appended unless present).
        timeout_s: total time of one request.
        headers: extra request headers (e.g. authentication), or a callable
            returning them, asked before every request. Values are secrets:
            they are never logged.
        compression: ``"gzip"``, ``"none"`` or None.
        ca_certs: CA bundle path for https (the system store when unset).
        cert_file / key_file: client certificate chain and key (PEM) for mTLS.
        insecure_skip_verify: https without verifying the server's certificate.
        append_traces_path: False to POST to ``endpoint`` exactly as given
            (an OTLP ``TRACES_ENDPOINT``).
        name: exporter label value in ``spans_exported_total{exporter}``.
        max_connections: connections kept per host (match the queue's workers).
    """

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0,
                 headers: Headers | None = None, compression: str | None = "gzip",
                 ca_certs: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, insecure_skip_verify: bool = False,
                 append_traces_path: bool = True, name: str = "otlp_http",
                 max_connections: int = 4) -> None:
        if compression == "none":
            compression = None
        if compression not in (None, "gzip"):
            raise ValueError(f"unsupported compression {compression!r}: use 'gzip' or None")
        self.url = traces_url(endpoint) if append_traces_path else endpoint
        self.name = name
        self.timeout_s = timeout_s
        self.compression = compression
        self._fixed = {"Content-Type": "application/x-protobuf"}
        if compression == "gzip":
            self._fixed["Content-Encoding"] = "gzip"
        self._headers_fn = headers if callable(headers) else None
        self._headers = {**(headers or {}), **self._fixed} if not callable(headers) else self._fixed
        tls: dict[str, object] = {}
        if ca_certs:
            tls["ca_certs"] = ca_certs
        if cert_file:
            tls["cert_file"] = cert_file
        if key_file:
            tls["key_file"] = key_file
        if insecure_skip_verify:
            tls["cert_reqs"] = "CERT_NONE"
            tls["assert_hostname"] = False
            # The choice was made (and logged) once by whoever configured it;
            # a warning per request would flood the log.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=max_connections, block=False, **tls)

    def export(self, payload: bytes, span_count: int) -> ExportOutcome:
        """One POST; see the module docstring for the outcome mapping."""
        body = gzip.compress(payload, compresslevel=6) if self.compression == "gzip" else payload
        headers = self._headers
        if self._headers_fn is not None:
            headers = {**self._headers_fn(), **self._fixed}
        try:
            resp = self._pool.request(
                "POST", self.url, body=body, headers=headers,
                timeout=urllib3.Timeout(total=self.timeout_s), retries=False, redirect=False,
                preload_content=True,
            )
        except urllib3.exceptions.HTTPError as exc:
            # Refused connection, reset, timeout, TLS failure: the backend may
            # be restarting, so the batch is worth retrying.
            return ExportOutcome(ExportResult.RETRYABLE, None, f"{type(exc).__name__}: {exc}")
        status = resp.status
        content_type = resp.headers.get("Content-Type", "")
        if 200 <= status < 300:
            return self._success(resp.data, content_type)
        text = _error_text(resp.data, content_type)
        message = f"HTTP {status}: {text}"
        if status in RETRYABLE_STATUSES:
            return ExportOutcome(ExportResult.RETRYABLE,
                                 parse_retry_after(resp.headers.get("Retry-After")), message)
        return ExportOutcome(ExportResult.FAILED, None, message)

    def _success(self, body: bytes, content_type: str) -> ExportOutcome:
        response = ExportTraceServiceResponse()
        if body and "protobuf" in content_type:
            try:
                response.ParseFromString(body)
            except DecodeError:
                logger.warning("%s: undecodable success response from %s", self.name, self.url)
        partial = response.partial_success
        if partial.rejected_spans > 0:
            return ExportOutcome(ExportResult.SUCCESS, None,
                                 f"backend rejected {partial.rejected_spans} spans: {partial.error_message}",
                                 rejected_spans=int(partial.rejected_spans))
        return ExportOutcome(ExportResult.SUCCESS, None, "")

    def shutdown(self) -> None:
        """Close pooled connections."""
        self._pool.clear()
