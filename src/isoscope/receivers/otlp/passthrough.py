"""Receiving metrics and logs: check, bound, forward unchanged, count.

isoscope enriches traces only; metrics and logs sent to the same endpoints (as
an application's ``OTEL_EXPORTER_OTLP_ENDPOINT`` does for every signal) are
forwarded to the export targets byte for byte, without entering the
enrichment pipeline. A request is still parsed, because a malformed one must be
refused with a clear error rather than forwarded, and because the item count
(data points, log records) bounds it and is what the counters report.

The receivers hand accepted requests to a *forward* callable,
``forward(signal, payload, count)``: the daemon's fan-out to its export queues.
It may raise :class:`~isoscope.model.Backpressure` (the client is told to retry)
and returns once the payload is queued (or its loss counted).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from isoscope.exporters.signals import LOGS, METRICS, count_items, spec
from isoscope.model import Backpressure, Stats
from isoscope.receivers.otlp.ingest import ConsumerFailed
from isoscope.receivers.otlp.limits import RequestLimits, RequestOverLimit
from isoscope.receivers.otlp.signal_json import decode_signal_request

logger = logging.getLogger(__name__)

__all__ = ["ForwardSignal", "PASS_THROUGH_SIGNALS", "PassThrough", "RECEIVED_COUNTERS"]

ForwardSignal = Callable[[str, bytes, int], object]
"""``forward(signal, payload, count)``: queue a serialized request of ``signal`` holding ``count`` items."""

PASS_THROUGH_SIGNALS: tuple[str, ...] = (METRICS, LOGS)
"""Signals forwarded unchanged (traces are enriched)."""

RECEIVED_COUNTERS = {METRICS: "metric_points_received_total", LOGS: "log_records_received_total"}
"""Stats counter (label: ``protocol``) of the items received, per pass-through signal."""


class _ItemBound:
    """Counts a request's items as they are found and refuses it past the limit."""

    __slots__ = ("signal", "name", "limit", "count")

    def __init__(self, signal: str, limits: RequestLimits) -> None:
        self.signal = signal
        self.name, self.limit = limits.max_items(signal)
        self.count = 0

    def __call__(self, n: int) -> None:
        self.count += n
        if self.count > self.limit:
            raise RequestOverLimit(
                self.name, f"request holds more than {self.limit} {spec(self.signal).item}s "
                           f"(receivers.limits.{self.name}); send smaller batches")


class PassThrough:
    """Decode → bound → forward → count, for metrics and logs, for one receiver.

    Args:
        forward: where accepted requests go (see the module docstring).
        stats: shared counters.
        protocol: ``"grpc"`` or ``"http"`` (the ``protocol`` label).
        limits: the per-request item bounds (None: the defaults).
    """

    def __init__(self, forward: ForwardSignal, stats: Stats, protocol: str,
                 limits: RequestLimits | None = None) -> None:
        self._forward = forward
        self._stats = stats
        self._protocol = protocol
        self.limits = limits if limits is not None else RequestLimits()

    def reject(self, reason: str) -> None:
        """Count a rejected request (``requests_rejected_total{protocol,reason}``)."""
        self._stats.inc("requests_rejected_total", (self._protocol, reason))

    def decode_protobuf(self, signal: str, body: bytes) -> tuple[Any, int]:
        """Parse and bound a binary request.

        Returns:
            ``(request, item count)``.

        Raises:
            DecodeError: the body is not a request of ``signal``.
            RequestOverLimit: too many items (counted as rejected, ``reason="limit"``).
        """
        request = spec(signal).request_type.FromString(body)
        bound = _ItemBound(signal, self.limits)
        try:
            bound(count_items(signal, request))
        except RequestOverLimit:
            self.reject("limit")
            raise
        return request, bound.count

    def decode_json(self, signal: str, body: bytes) -> tuple[Any, int]:
        """Parse and bound an OTLP/JSON request (ids hex, as OTLP/JSON has them).

        Returns:
            ``(request, item count)``.

        Raises:
            isoscope.otlpjson.OtlpJsonError: not a valid OTLP/JSON request of ``signal``.
            RequestOverLimit: too many items (counted as rejected, ``reason="limit"``).
        """
        try:
            return decode_signal_request(signal, body, _ItemBound(signal, self.limits))
        except RequestOverLimit:
            self.reject("limit")
            raise

    def accept(self, signal: str, payload: bytes, count: int) -> Any:
        """Forward one decoded, bounded request and answer it.

        ``*_received_total`` counts the items once the request is settled, so a
        request retried after backpressure is not counted twice.

        Args:
            signal: ``metrics`` or ``logs``.
            payload: the serialized request, forwarded as is.
            count: its items.

        Returns:
            The (empty: nothing is refused item by item) ``Export…ServiceResponse``.
            A request without items is answered without being forwarded.

        Raises:
            Backpressure: the forward side is full; nothing was counted as received.
            ConsumerFailed: the forward side broke; the client should retry.
        """
        if not count:
            # Nothing a backend could store (e.g. metrics without data points).
            return spec(signal).response_type()
        try:
            self._forward(signal, payload, count)
        except Backpressure:
            self.reject("backpressure")
            raise
        except Exception as exc:
            logger.exception("%s forwarding failed", signal)
            self.reject("consumer_error")
            raise ConsumerFailed(str(exc)) from exc
        self._stats.inc(RECEIVED_COUNTERS[signal], (self._protocol,), count)
        return spec(signal).response_type()
