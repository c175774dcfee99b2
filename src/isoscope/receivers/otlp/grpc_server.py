"""OTLP/gRPC receiver: ``TraceService/Export``, and ``MetricsService`` / ``LogsService``.

Traces go to the enrichment pipeline. Metrics and logs (served when the
receiver is given a ``forward_signal``) are checked, bounded and forwarded
unchanged (:mod:`isoscope.receivers.otlp.passthrough`), under the same message
size limit, memory reservation and large-message slots as traces.

Conforms to opentelemetry-proto ``docs/specification.md`` "OTLP/gRPC":
oversized messages get ``RESOURCE_EXHAUSTED`` (enforced by gRPC core before
the message is buffered), undecodable ones and ones over a per-request limit
``INVALID_ARGUMENT``, invalid spans and spans over a per-span limit a partial
success, and backpressure ``UNAVAILABLE`` with a ``RetryInfo``.

Each call reserves an estimate of its memory cost in the daemon's
:class:`~isoscope.host.memguard.MemoryGuard` before it parses anything; a
refusal, and a large message arriving while the large-message slots are all
taken, is ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` (which makes it
retryable for OTLP clients). Large messages can occupy at most half of the
workers, so small ones from other senders are always served. The parsed batch
keeps a share of the reservation (:func:`~isoscope.receivers.otlp.limits.held_estimate`)
until the pipeline has handed it to the exporters: the join's hold queue is
inside the memory budget too.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any, Callable

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.exporters.signals import TRACES, spec
from isoscope.host.memguard import MemoryExhausted, MemoryGuard, Reservation, process_guard
from isoscope.model import Backpressure, Stats, TraceConsumer
from isoscope.receivers.otlp.ingest import ConsumerFailed, Ingestor, Peer
from isoscope.receivers.otlp.limits import (
    DEFAULT_LARGE_REQUEST_BYTES,
    DEFAULT_MAX_GRPC_MESSAGE_BYTES,
    RequestLimits,
    RequestOverLimit,
    held_estimate,
    memory_estimate,
)
from isoscope.metadata.peer import PeerResolver, split_peer
from isoscope.receivers.otlp.passthrough import PASS_THROUGH_SIGNALS, ForwardSignal, PassThrough
from isoscope.receivers.otlp.security import BearerTokenInterceptor, ReceiverSecurity

logger = logging.getLogger(__name__)

SERVICE = spec(TRACES).grpc_service
METHOD = "Export"

# The OpenTelemetry SDK exporters read the delay from this trailer rather
# than from the rich status, so both are sent.
RETRY_INFO_TRAILER = "google.rpc.retryinfo-bin"


def _retry_status(message: str, retry_after_s: float, code: int = code_pb2.UNAVAILABLE) -> grpc.Status:
    secs = max(retry_after_s, 0.0)
    delay = duration_pb2.Duration(seconds=int(secs), nanos=int((secs - int(secs)) * 1e9))
    info = error_details_pb2.RetryInfo(retry_delay=delay)
    st = status_pb2.Status(code=code, message=message)
    st.details.add().Pack(info)
    rich = rpc_status.to_status(st)
    return _Status(rich.code, rich.details, tuple(rich.trailing_metadata) + (
        (RETRY_INFO_TRAILER, info.SerializeToString()),))


class _Status(grpc.Status):
    """A concrete ``grpc.Status`` (the interface has no public constructor)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class OtlpGrpcReceiver:
    """OTLP/gRPC receiver of traces (enriched) and, with ``forward_signal``, metrics and logs (passed through).

    Args:
        consumer: receives every accepted ``TraceBatch``.
        stats: shared counters.
        listen: ``host:port`` to bind (port 0 picks a free port).
        max_message_bytes: largest accepted (decompressed) message.
        security: TLS / mTLS / bearer token, or None for plaintext without auth.
        workers: threads running ``Export`` calls (consume() may block).
        proc_root: procfs used to resolve loopback peers to pids.
        resolve_peers: whether to resolve loopback peers to pids at all.
        limits: span and attribute limits per request (None: the defaults).
        memory: where calls reserve their memory (None: the process-wide guard).
        large_request_bytes: messages larger than this are "large".
        large_workers: how many large messages are processed at once (default:
            half of ``workers``, at least 1); one more is refused retryably.
        forward_signal: ``forward(signal, payload, count)`` taking accepted
            metrics and logs requests; without it those services are not
            served (``UNIMPLEMENTED``).
    """

    def __init__(self, consumer: TraceConsumer, stats: Stats, listen: str = "127.0.0.1:4317", *,
                 max_message_bytes: int = DEFAULT_MAX_GRPC_MESSAGE_BYTES,
                 security: ReceiverSecurity | None = None, workers: int = 4,
                 proc_root: str = "/proc", resolve_peers: bool = True,
                 limits: RequestLimits | None = None, memory: MemoryGuard | None = None,
                 large_request_bytes: int = DEFAULT_LARGE_REQUEST_BYTES,
                 large_workers: int | None = None, forward_signal: ForwardSignal | None = None) -> None:
        self._listen = listen
        self._max = max_message_bytes
        self._security = security
        self._workers = workers
        self._stats = stats
        self._ingest = Ingestor(consumer, stats, "grpc",
                                PeerResolver(proc_root) if resolve_peers else None, limits)
        self._passthrough = PassThrough(forward_signal, stats, "grpc", self._ingest.limits) \
            if forward_signal is not None else None
        self._memory = memory if memory is not None else process_guard()
        self._large_bytes = large_request_bytes
        self._large_slots = threading.BoundedSemaphore(
            large_workers if large_workers is not None else max(1, workers // 2))
        self._server: grpc.Server | None = None
        self._port = 0
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        return self._port

    def start(self) -> str:
        """Bind and start serving.

        Returns:
            The bound ``host:port``.

        Raises:
            RuntimeError: the address cannot be bound.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("receiver already started")
            interceptors = []
            if self._security is not None and self._security.bearer_token is not None:
                interceptors.append(BearerTokenInterceptor(
                    self._security, on_reject=lambda: self._ingest.reject("unauthenticated")))
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="otlp-grpc"),
                interceptors=interceptors,
                options=[
                    ("grpc.max_receive_message_length", self._max),
                    ("grpc.max_send_message_length", 1024 * 1024),
                    # A restarted daemon must not share the port with a stale one.
                    ("grpc.so_reuseport", 0),
                ],
            )
            # Raw bytes in: decoding here lets a malformed message be answered
            # with INVALID_ARGUMENT and a message instead of a generic error.
            handlers = [grpc.method_handlers_generic_handler(SERVICE, {METHOD: self._handler(
                self._export_reserved)})]
            if self._passthrough is not None:
                for signal in PASS_THROUGH_SIGNALS:
                    handlers.append(grpc.method_handlers_generic_handler(spec(signal).grpc_service, {
                        METHOD: self._handler(lambda raw, ctx, _r, s=signal: self._export_signal_reserved(s, raw, ctx))}))
            server.add_generic_rpc_handlers(tuple(handlers))
            creds = self._security.grpc_credentials() if self._security is not None else None
            try:
                if creds is not None:
                    port = server.add_secure_port(self._listen, creds)
                else:
                    port = server.add_insecure_port(self._listen)
            except RuntimeError as exc:
                raise RuntimeError(f"cannot listen on {self._listen}: {exc}") from None
            if port == 0:
                raise RuntimeError(f"cannot listen on {self._listen}")
            server.start()
            self._server = server
            self._port = port
            host = self._listen.rsplit(":", 1)[0]
            addr = f"{host}:{port}"
            logger.info("OTLP/gRPC receiver listening on %s%s", addr, " (TLS)" if creds else "")
            return addr

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls and wait up to ``grace_s`` for running ones."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait(grace_s + 1.0)

    def _handler(self, reserved: Callable[[bytes, grpc.ServicerContext, Reservation], Any]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            lambda raw, context: self._export(raw, context, reserved),
            request_deserializer=None, response_serializer=lambda m: m.SerializeToString())

    def _export(self, raw: bytes, context: grpc.ServicerContext,
                reserved: Callable[[bytes, grpc.ServicerContext, Reservation], Any]) -> Any:
        large = len(raw) > self._large_bytes
        if large and not self._large_slots.acquire(blocking=False):
            self._ingest.reject("memory_limit")
            context.abort_with_status(_retry_status(
                "too many large requests in flight; retry later", 1.0, code_pb2.RESOURCE_EXHAUSTED))
        try:
            try:
                reservation = self._memory.reserve(memory_estimate(len(raw)), _LARGE_SHARE if large else 1.0)
            except MemoryExhausted as exc:
                self._ingest.reject("memory_limit")
                context.abort_with_status(_retry_status(str(exc), exc.retry_after_s, code_pb2.RESOURCE_EXHAUSTED))
            with reservation:
                return reserved(raw, context, reservation)
        finally:
            if large:
                self._large_slots.release()

    def _export_reserved(self, raw: bytes, context: grpc.ServicerContext, reservation: Reservation) -> Any:
        try:
            request = ExportTraceServiceRequest.FromString(raw)
        except DecodeError as exc:
            self._ingest.reject("malformed")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"cannot decode ExportTraceServiceRequest: {exc}")
        # The batch keeps its share of the reservation until it has been exported.
        held = reservation.split(held_estimate(len(raw)))
        del raw
        peer = None
        parsed = split_peer(context.peer() or "")
        if parsed is not None:
            peer = Peer(parsed[0], parsed[1], self._port)
        try:
            return self._ingest.ingest(request, peer, memory=held)
        except RequestOverLimit as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Backpressure as bp:
            context.abort_with_status(_retry_status(str(bp) or "pipeline is full", bp.retry_after_s))
        except ConsumerFailed as exc:
            context.abort_with_status(_retry_status(f"trace pipeline failed: {exc}", 1.0))
        raise AssertionError("unreachable")  # abort raises

    def _export_signal_reserved(self, signal: str, raw: bytes, context: grpc.ServicerContext) -> Any:
        passthrough = self._passthrough
        assert passthrough is not None  # the service is registered only with it
        try:
            count = passthrough.decode_protobuf(signal, raw)[1]  # the parsed message is not kept
        except DecodeError as exc:
            passthrough.reject("malformed")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"cannot decode {spec(signal).request_type.DESCRIPTOR.name}: {exc}")
        except RequestOverLimit as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # The request was parsed only to check and count it: the bytes received
        # are what is forwarded, unchanged.
        try:
            return passthrough.accept(signal, raw, count)
        except Backpressure as bp:
            context.abort_with_status(_retry_status(str(bp) or "export queues are full", bp.retry_after_s))
        except ConsumerFailed as exc:
            context.abort_with_status(_retry_status(f"{signal} forwarding failed: {exc}", 1.0))
        raise AssertionError("unreachable")  # abort raises


_LARGE_SHARE = 0.75
"""Share of the in-flight memory cap that large requests may fill together (the rest stays for small ones)."""
