"""OTLP/gRPC exporter: one ``{Trace,Metrics,Logs}Service/Export`` call per attempt.

The payload is already a serialized export request of the batch's signal, so
it is sent as is through an identity serializer (no decode/re-encode per
batch) to that signal's service: traces to ``TraceService``, metrics to
``MetricsService``, logs to ``LogsService``.
Status codes are mapped as the OTLP specification (opentelemetry-proto
``docs/specification.md``, "OTLP/gRPC Response" / "Failures") requires:

* retryable: CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE,
  DATA_LOSS, and RESOURCE_EXHAUSTED only when the server attached a
  ``google.rpc.RetryInfo`` (recovery is possible);
* everything else is not retryable;
* a ``RetryInfo.retry_delay`` becomes ``ExportOutcome.retry_after_s``;
* ``partial_success.rejected_spans`` (``rejected_data_points``,
  ``rejected_log_records``) ``> 0`` is a success that drops those items.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Union

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from isoscope.exporters.signals import SIGNALS, TRACES, rejected_of, spec
from isoscope.model import ExportOutcome, ExportResult

logger = logging.getLogger(__name__)

Headers = Union[Mapping[str, str], Callable[[], Mapping[str, str]]]
"""Fixed headers, or a callable returning the current ones (values read from rotated files)."""

EXPORT_METHOD = spec(TRACES).grpc_method

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})
"""Codes that are always retryable; RESOURCE_EXHAUSTED is decided by RetryInfo."""


def _identity(payload: bytes) -> bytes:
    return payload


def _metadata(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((k.lower(), v) for k, v in (headers or {}).items())


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The ``google.rpc.RetryInfo.retry_delay`` a server attached to an error, in seconds."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        # from_call raises ValueError when the message/code disagree with the
        # details trailer; the delay is then unknown, not an error of ours.
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def outcome_for_error(error: grpc.RpcError) -> ExportOutcome:
    """Map a failed call to an outcome following the OTLP/gRPC rules."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    message = f"{code.name if code else 'UNKNOWN'}: {details}"
    delay = retry_delay_of(error)
    if code in RETRYABLE_CODES:
        return ExportOutcome(ExportResult.RETRYABLE, delay, message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return ExportOutcome(ExportResult.RETRYABLE, delay, message)
    return ExportOutcome(ExportResult.FAILED, None, message)


class OtlpGrpcExporter:
    """Sends serialized export requests (traces, metrics, logs) to an OTLP/gRPC endpoint.

    Args:
        endpoint: ``host:port`` (a ``grpc://`` prefix is accepted and stripped).
        timeout_s: deadline of one call.
        insecure: plaintext when True; TLS otherwise.
        headers: metadata sent with every call (keys are lower-cased, as gRPC requires),
            or a callable returning it, asked before every call. Values are
            secrets: they are never logged.
        compression: ``"gzip"`` or None.
        root_certificates / certificate_chain / private_key: PEM bytes for TLS
            (server CA; client certificate and key for mTLS).
        reconnect_backoff_max_s: cap of the channel's reconnect backoff; kept
            short so a backend that comes back is used within seconds.
        name: exporter label value in ``spans_exported_total{exporter}``.
        signals: the signals this endpoint takes (all three unless the target
            was configured for traces only).
    """

    def __init__(self, endpoint: str, *, timeout_s: float = 10.0, insecure: bool = True,
                 headers: Headers | None = None, compression: str | None = None,
                 root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None, reconnect_backoff_max_s: float = 2.0,
                 name: str = "otlp_grpc", signals: tuple[str, ...] | frozenset[str] = SIGNALS) -> None:
        for prefix in ("grpc://", "grpcs://"):
            if endpoint.startswith(prefix):
                endpoint = endpoint[len(prefix):]
        self.endpoint = endpoint.rstrip("/")
        self.name = name
        for signal in signals:
            spec(signal)  # raises for an unknown one
        self.signals: frozenset[str] = frozenset(signals)
        self.timeout_s = timeout_s
        self._headers_fn = headers if callable(headers) else None
        self._metadata = _metadata(headers) if not callable(headers) else ()
        if compression == "none":
            compression = None
        if compression not in (None, "gzip"):
            raise ValueError(f"unsupported compression {compression!r}: use 'gzip' or None")
        self._compression = grpc.Compression.Gzip if compression == "gzip" else grpc.Compression.NoCompression
        backoff_ms = max(100, int(reconnect_backoff_max_s * 1000))
        options = [
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 500)),
            ("grpc.max_send_message_length", -1),
        ]
        if insecure:
            self._channel = grpc.insecure_channel(self.endpoint, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(self.endpoint, creds, options=options)
        # One callable per signal on the same channel (and connection).
        self._calls = {
            signal: self._channel.unary_unary(
                spec(signal).grpc_method,
                request_serializer=_identity,
                response_deserializer=spec(signal).response_type.FromString,
            )
            for signal in self.signals
        }
        self._closed = False

    def export(self, payload: bytes, span_count: int, signal: str = TRACES) -> ExportOutcome:
        """One ``Export`` call of ``signal``'s service; see the module docstring for the outcome mapping.

        Args:
            payload: a serialized export request of ``signal``.
            span_count: the items in it (for logs).
            signal: ``traces``, ``metrics`` or ``logs``.
        """
        call = self._calls.get(signal)
        if call is None:
            return ExportOutcome(ExportResult.FAILED, None, f"{self.name} does not export {signal}")
        if self._closed:
            return ExportOutcome(ExportResult.RETRYABLE, None, "exporter is shut down")
        try:
            metadata = _metadata(self._headers_fn()) if self._headers_fn is not None else self._metadata
            response = call(payload, timeout=self.timeout_s, metadata=metadata,
                            compression=self._compression)
        except grpc.RpcError as exc:
            outcome = outcome_for_error(exc)
            logger.debug("%s: export of %d %ss to %s: %s", self.name, span_count, spec(signal).item,
                         self.endpoint, outcome.message)
            return outcome
        except ValueError as exc:
            # grpcio raises ValueError when the channel was closed under us.
            return ExportOutcome(ExportResult.RETRYABLE, None, f"channel closed: {exc}")
        rejected, message = rejected_of(response, signal)
        if rejected > 0:
            return ExportOutcome(ExportResult.SUCCESS, None,
                                 f"backend rejected {rejected} {spec(signal).item}s: {message}",
                                 rejected_spans=rejected)
        if message:
            logger.warning("%s: backend warning: %s", self.name, message)
        return ExportOutcome(ExportResult.SUCCESS, None, "")

    def shutdown(self) -> None:
        """Close the channel; an attempt still in flight is cancelled."""
        self._closed = True
        self._channel.close()
