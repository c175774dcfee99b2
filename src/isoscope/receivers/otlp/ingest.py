"""The part of receiving that is the same for every transport.

Validate the parsed request, hand it to the consumer with its peer identity,
count what happened, and build the OTLP response (partial success included).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from isoscope.model import Backpressure, Releasable, Stats, TraceBatch, TraceConsumer
from isoscope.metadata.peer import PeerResolver, format_addr
from isoscope.receivers.otlp.limits import RequestLimits, RequestOverLimit
from isoscope.receivers.otlp.validate import validate_request

logger = logging.getLogger(__name__)


class ConsumerFailed(Exception):
    """The consumer raised something other than ``Backpressure``."""


@dataclass(slots=True)
class Peer:
    """The sending end of a connection.

    Attributes:
        ip: client address.
        port: client port.
        local_port: the receiver port it connected to.
    """

    ip: str
    port: int
    local_port: int


class Ingestor:
    """Validate → consume → count → respond, for one receiver.

    Args:
        consumer: where accepted batches go.
        stats: shared counters.
        protocol: ``"grpc"`` or ``"http"`` (the ``protocol`` label).
        peer_resolver: resolves loopback peers to pids; None disables it.
        limits: span and attribute limits (None: the defaults of ``RequestLimits``).
    """

    def __init__(self, consumer: TraceConsumer, stats: Stats, protocol: str,
                 peer_resolver: PeerResolver | None, limits: RequestLimits | None = None) -> None:
        self._consumer = consumer
        self._stats = stats
        self._protocol = protocol
        self._peers = peer_resolver
        self.limits = limits if limits is not None else RequestLimits()

    def reject(self, reason: str) -> None:
        """Count a rejected request (``requests_rejected_total{protocol,reason}``)."""
        self._stats.inc("requests_rejected_total", (self._protocol, reason))

    def ingest(self, request: ExportTraceServiceRequest, peer: Peer | None,
               dropped: Counter[str] | None = None, memory: Releasable | None = None) -> ExportTraceServiceResponse:
        """Process one parsed request.

        ``spans_received_total`` counts spans once the request is settled
        (consumed, or entirely invalid), so a request retried after
        backpressure is not counted twice.

        Args:
            request: the parsed request.
            peer: the sender, if known.
            dropped: spans already removed while decoding (reason → count),
                reported with the others through partial success.
            memory: a memory reservation (``release()``) for the batch's life in the
                pipeline; ingest owns it: it travels with the batch, or is released
                here when no batch is handed on.

        Raises:
            RequestOverLimit: the request is over a per-request limit; it was
                counted as rejected (``reason="limit"``) and nothing was consumed.
            Backpressure: the consumer is full; nothing was counted as received.
            ConsumerFailed: the consumer broke; the client should retry.
        """
        consumed = False
        try:
            response, consumed = self._ingest(request, peer, dropped, memory)
            return response
        finally:
            if not consumed and memory is not None:
                memory.release()  # no batch took it

    def _ingest(self, request: ExportTraceServiceRequest, peer: Peer | None, dropped: Counter[str] | None,
                memory: Releasable | None) -> tuple[ExportTraceServiceResponse, bool]:
        """:meth:`ingest`; also says whether a batch (with ``memory``) went to the consumer."""
        consumed = False
        try:
            result = validate_request(request, self.limits)
        except RequestOverLimit:
            self.reject("limit")
            raise
        if dropped:
            result.rejected += sum(dropped.values())
            detail = "; ".join(f"{n} span(s): {why}" for why, n in sorted(dropped.items()))
            if result.message:
                result.message += "; " + detail
            else:
                result.message = f"rejected {result.rejected} span(s): {detail}"
        if result.accepted_spans:
            batch = TraceBatch(request=result.accepted, protocol=self._protocol,
                               span_count=result.accepted_spans,
                               received_mono_ns=time.monotonic_ns(), memory=memory)
            if peer is not None:
                batch.peer_addr = format_addr(peer.ip, peer.port)
                # Loopback or not: the peer resolver finds the socket in the sender's own network
                # namespace (a pod reaching a hostPort arrives from its pod IP).
                if self._peers is not None:
                    batch.peer_pid = self._peers.resolve(peer.ip, peer.port, peer.local_port)
            try:
                self._consumer.consume(batch)
            except Backpressure:
                batch.memory = None  # refused: the caller's release returns it
                self.reject("backpressure")
                raise
            except Exception as exc:
                batch.memory = None
                logger.exception("trace consumer failed")
                self.reject("consumer_error")
                raise ConsumerFailed(str(exc)) from exc
            consumed = True
        if result.received_spans:
            self._stats.inc("spans_received_total", (self._protocol,), result.received_spans)
        response = ExportTraceServiceResponse()
        if result.rejected:
            self._stats.inc("spans_dropped_total", ("invalid",), result.rejected)
            response.partial_success.rejected_spans = result.rejected
            response.partial_success.error_message = result.message
        return response, consumed
