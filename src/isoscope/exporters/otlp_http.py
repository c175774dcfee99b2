"""OTLP/HTTP exporter (binary protobuf): one POST per attempt.

Each signal has its own URL: for a base endpoint, ``/v1/traces``,
``/v1/metrics`` and ``/v1/logs`` are appended to its path; an endpoint given
exactly (a ``TRACES_ENDPOINT``) takes traces only, unless URLs for the other
signals are given too.

Response handling follows the OTLP specification (opentelemetry-proto
``docs/specification.md``, "OTLP/HTTP Response"):

* 2xx: success; a ``partial_success`` with rejected items (spans, data
  points, log records) drops those items;
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
from isoscope.exporters.signals import SIGNALS, TRACES, rejected_of, spec
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
    return signal_url(endpoint, TRACES)


def signal_url(endpoint: str, signal: str) -> str:
    """The URL of ``signal`` under a base endpoint: ``http://h:p/otlp`` → ``http://h:p/otlp/v1/metrics``.

    A base that already ends in a signal path (``…/v1/traces``, as OTLP users
    sometimes write a base endpoint) has that path replaced, so the result is
    never ``…/v1/traces/v1/metrics``.
    """
    endpoint = endpoint.rstrip("/")
    for other in SIGNALS:
        if endpoint.endswith(spec(other).http_path):
            endpoint = endpoint[:-len(spec(other).http_path)]
            break
    return endpoint + spec(signal).http_path


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
    """POSTs serialized export requests to ``<endpoint>/v1/traces`` (``/v1/metrics``, ``/v1/logs``).

    Args:
        endpoint: ``http(s)://host:port`` (the signal's path is appended unless present).
        timeout_s: total time of one request.
        headers: extra request headers (e.g. authentication), or a callable
            returning them, asked before every request. Values are secrets:
            they are never logged.
        compression: ``"gzip"``, ``"none"`` or None.
        ca_certs: CA bundle path for https (the system store when unset).
        cert_file / key_file: client certificate chain and key (PEM) for mTLS.
        insecure_skip_verify: https without verifying the server's certificate.
        append_traces_path: False to POST traces to ``endpoint`` exactly as
            given (an OTLP ``TRACES_ENDPOINT``); metrics and logs are then only
            sent where ``signal_urls`` says.
        name: exporter label value in ``spans_exported_total{exporter}``.
        max_connections: connections kept per host (match the queue's workers).
        signal_urls: exact URLs per signal, overriding the ones derived from
            ``endpoint``; a signal mapped to None is not exported.
    """

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0,
                 headers: Headers | None = None, compression: str | None = "gzip",
                 ca_certs: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, insecure_skip_verify: bool = False,
                 append_traces_path: bool = True, name: str = "otlp_http",
                 max_connections: int = 4, signal_urls: Mapping[str, str | None] | None = None) -> None:
        if compression == "none":
            compression = None
        if compression not in (None, "gzip"):
            raise ValueError(f"unsupported compression {compression!r}: use 'gzip' or None")
        urls: dict[str, str | None] = (
            {s: signal_url(endpoint, s) for s in SIGNALS} if append_traces_path else {TRACES: endpoint})
        for signal, url in (signal_urls or {}).items():
            spec(signal)  # raises for an unknown one
            urls[signal] = url
        self.urls: dict[str, str] = {s: u for s, u in urls.items() if u}
        self.signals: frozenset[str] = frozenset(self.urls)
        self.url = self.urls.get(TRACES, "")
        """The traces URL (empty when this exporter takes no traces)."""
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

    def export(self, payload: bytes, span_count: int, signal: str = TRACES) -> ExportOutcome:
        """One POST to ``signal``'s URL; see the module docstring for the outcome mapping.

        Args:
            payload: a serialized export request of ``signal``.
            span_count: the items in it.
            signal: ``traces``, ``metrics`` or ``logs``.
        """
        url = self.urls.get(signal)
        if url is None:
            return ExportOutcome(ExportResult.FAILED, None, f"{self.name} does not export {signal}")
        body = gzip.compress(payload, compresslevel=6) if self.compression == "gzip" else payload
        headers = self._headers
        if self._headers_fn is not None:
            headers = {**self._headers_fn(), **self._fixed}
        try:
            resp = self._pool.request(
                "POST", url, body=body, headers=headers,
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
            return self._success(resp.data, content_type, signal, url)
        text = _error_text(resp.data, content_type)
        message = f"HTTP {status}: {text}"
        if status in RETRYABLE_STATUSES:
            return ExportOutcome(ExportResult.RETRYABLE,
                                 parse_retry_after(resp.headers.get("Retry-After")), message)
        return ExportOutcome(ExportResult.FAILED, None, message)

    def _success(self, body: bytes, content_type: str, signal: str, url: str) -> ExportOutcome:
        response = spec(signal).response_type()
        if body and "protobuf" in content_type:
            try:
                response.ParseFromString(body)
            except DecodeError:
                logger.warning("%s: undecodable success response from %s", self.name, url)
        rejected, message = rejected_of(response, signal)
        if rejected > 0:
            return ExportOutcome(ExportResult.SUCCESS, None,
                                 f"backend rejected {rejected} {spec(signal).item}s: {message}",
                                 rejected_spans=rejected)
        return ExportOutcome(ExportResult.SUCCESS, None, "")

    def shutdown(self) -> None:
        """Close pooled connections."""
        self._pool.clear()
