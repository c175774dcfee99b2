"""OTLP/HTTP receiver: ``POST /v1/traces``, and ``/v1/metrics`` / ``/v1/logs`` (binary protobuf or JSON).

Traces go to the enrichment pipeline. Metrics and logs (served when the
receiver is given a ``forward_signal``) are checked, bounded and forwarded
unchanged (:mod:`isoscope.receivers.otlp.passthrough`): a binary body is
forwarded as received (after decompression), an OTLP/JSON one as the protobuf
encoding of the same request. Both go through the same body limit, memory
reservation and worker pools as traces.

Conforms to opentelemetry-proto ``docs/specification.md`` "OTLP/HTTP":
responses use the request's ``Content-Type``; errors carry a
``google.rpc.Status`` body; the body limit applies after decompression (413);
bad data is 400; backpressure is 503 with ``Retry-After``.

The server is aiohttp on its own event loop in its own thread: idle and slow
connections cost a coroutine each instead of a thread, so they cannot starve
other clients. Decompression, decoding and ``consume()`` (which may block)
run on thread pools, never on the event loop: one pool for small requests and
a smaller one for large ones, so a sender of huge requests cannot occupy the
workers everyone else needs.

Every request reserves an estimate of its memory cost in the daemon's
:class:`~isoscope.host.memguard.MemoryGuard` as soon as its headers arrive
(and more while a compressed body inflates); when the reservation is refused
the answer is 429 with ``Retry-After``, which OTLP clients retry. A parsed
trace batch keeps a share of it until it has been handed to the exporters.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
from concurrent import futures
from typing import Any, Awaitable, Callable

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from isoscope import otlpjson
from isoscope.exporters.signals import TRACES, spec
from isoscope.host.memguard import MemoryExhausted, MemoryGuard, Reservation, process_guard
from isoscope.model import Backpressure, Stats, TraceConsumer
from isoscope.receivers.otlp.ingest import ConsumerFailed, Ingestor, Peer
from isoscope.receivers.otlp.limits import (
    DEFAULT_LARGE_REQUEST_BYTES,
    DEFAULT_MAX_HTTP_BODY_BYTES,
    BodyTooLarge,
    BoundedDecoder,
    CorruptBody,
    LimitChecker,
    RequestLimits,
    RequestOverLimit,
    UnsupportedEncoding,
    held_estimate,
    memory_estimate,
)
from isoscope.metadata.peer import PeerResolver
from isoscope.receivers.otlp.passthrough import PASS_THROUGH_SIGNALS, ForwardSignal, PassThrough
from isoscope.receivers.otlp.security import ReceiverSecurity

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_BACKLOG = 4096


class _Reject(Exception):
    """Answer the request with an error status and a ``google.rpc.Status`` body."""

    def __init__(self, http_status: int, code: int, message: str, reason: str,
                 headers: dict[str, str] | None = None, *, counted: bool = False) -> None:
        super().__init__(message)
        self.counted = counted
        self.http_status = http_status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers or {}

    @classmethod
    def busy(cls, bp: Backpressure, default: str) -> _Reject:
        """503 for a retryable refusal downstream, with its Retry-After in whole seconds (at least 1)."""
        return cls(503, code_pb2.UNAVAILABLE, str(bp) or default, "backpressure",
                   {"Retry-After": str(max(1, math.ceil(bp.retry_after_s)))}, counted=True)

    @classmethod
    def failed(cls, message: str) -> _Reject:
        """503 for a consumer that raised: the sender may retry in a second."""
        return cls(503, code_pb2.UNAVAILABLE, message, "consumer_error", {"Retry-After": "1"}, counted=True)


def _media_type(request: web.BaseRequest) -> str:
    return request.content_type.strip().lower()


def _encode(msg: Any, media: str) -> bytes:
    if media == JSON:
        if isinstance(msg, ExportTraceServiceResponse):
            return otlpjson.encode_response(msg).encode()
        return json_format.MessageToJson(msg, indent=None).encode()
    return msg.SerializeToString()


class OtlpHttpReceiver:
    """OTLP/HTTP receiver of traces (enriched) and, with ``forward_signal``, metrics and logs (passed through).

    Args:
        consumer: receives every accepted ``TraceBatch``.
        stats: shared counters.
        listen: ``host:port`` to bind (port 0 picks a free port).
        max_body_bytes: largest accepted body, after decompression.
        security: TLS / mTLS / bearer token, or None for plaintext without auth.
        workers: threads that decode requests and call ``consume()``.
        idle_timeout_s: close a connection that sends no (complete) request
            headers for this long.
        body_timeout_s: answer 408 and close when a body takes longer than
            this to arrive.
        proc_root: procfs used to resolve loopback peers to pids.
        resolve_peers: whether to resolve loopback peers to pids at all.
        limits: span and attribute limits per request (None: the defaults).
        memory: where requests reserve their memory (None: the process-wide guard).
        large_request_bytes: requests larger than this (decoded, estimated for
            compressed bodies) go to the large-request pool.
        large_workers: threads of the large-request pool (default: half of ``workers``, at least 1).
        forward_signal: ``forward(signal, payload, count)`` taking accepted
            metrics and logs requests; without it ``/v1/metrics`` and
            ``/v1/logs`` are not served (404).
    """

    def __init__(self, consumer: TraceConsumer, stats: Stats, listen: str = "127.0.0.1:4318", *,
                 max_body_bytes: int = DEFAULT_MAX_HTTP_BODY_BYTES,
                 security: ReceiverSecurity | None = None, workers: int = 4,
                 idle_timeout_s: float = 30.0, body_timeout_s: float = 15.0,
                 proc_root: str = "/proc", resolve_peers: bool = True,
                 limits: RequestLimits | None = None, memory: MemoryGuard | None = None,
                 large_request_bytes: int = DEFAULT_LARGE_REQUEST_BYTES,
                 large_workers: int | None = None, forward_signal: ForwardSignal | None = None) -> None:
        self._listen = listen
        self._max = max_body_bytes
        self._security = security
        self._workers = workers
        self._large_workers = large_workers if large_workers is not None else max(1, workers // 2)
        self._large_bytes = large_request_bytes
        self._idle_timeout = idle_timeout_s
        self._body_timeout = body_timeout_s
        self._ingest = Ingestor(consumer, stats, "http",
                                PeerResolver(proc_root) if resolve_peers else None, limits)
        self._passthrough = PassThrough(forward_signal, stats, "http", self._ingest.limits) \
            if forward_signal is not None else None
        self._memory = memory if memory is not None else process_guard()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._large_pool: futures.ThreadPoolExecutor | None = None
        self._port = 0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        return self._port

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> str:
        """Bind and start serving in a background thread.

        Returns:
            The bound ``host:port``.

        Raises:
            RuntimeError: the address cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("receiver already started")
        ssl_ctx = self._security.ssl_context() if self._security is not None else None
        host, _, port_s = self._listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port_s)))
            sock.listen(_BACKLOG)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot listen on {self._listen}: {exc}") from None
        self._port = sock.getsockname()[1]
        self._pool = futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="otlp-http")
        self._large_pool = futures.ThreadPoolExecutor(max_workers=self._large_workers,
                                                      thread_name_prefix="otlp-http-large")
        self._thread = threading.Thread(target=self._run, args=(sock, ssl_ctx),
                                        name="otlp-http-loop", daemon=True)
        self._thread.start()
        self._started.wait(10.0)
        if self._start_error is not None:
            raise RuntimeError(f"cannot start OTLP/HTTP receiver: {self._start_error}")
        addr = f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"
        logger.info("OTLP/HTTP receiver listening on %s%s", addr, " (TLS)" if ssl_ctx else "")
        return addr

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting requests and wait up to ``grace_s`` for running ones."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        thread.join(grace_s + 2.0)
        for pool in (self._pool, self._large_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._thread = None
        self._loop = None

    def _run(self, sock: socket.socket, ssl_ctx: Any) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock, ssl_ctx))
        except BaseException as exc:  # surfaced to start() or logged
            if not self._started.is_set():
                self._start_error = exc
            else:
                logger.exception("OTLP/HTTP receiver loop failed")
        finally:
            self._started.set()
            loop.close()

    async def _serve(self, sock: socket.socket, ssl_ctx: Any) -> None:
        self._stop = asyncio.Event()
        app = web.Application(middlewares=[self._errors_middleware], client_max_size=self._max)
        app.router.add_post(TRACES_PATH, self._handler(TRACES))
        for signal in self._signals()[1:]:
            app.router.add_post(spec(signal).http_path, self._handler(signal))
        # auto_decompress=False: aiohttp would otherwise inflate gzip bodies
        # itself, outside the limit enforced by BoundedDecoder.
        runner = web.AppRunner(app, auto_decompress=False, keepalive_timeout=self._idle_timeout,
                               access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        # asyncio re-listens with this backlog (default 128) and accepts up to
        # that many per wake-up: a burst of connections must not overflow it.
        site = web.SockSite(runner, sock, ssl_context=ssl_ctx, backlog=_BACKLOG)
        await site.start()
        self._runner = runner
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    # -- request handling --------------------------------------------------

    @web.middleware
    async def _errors_middleware(self, request: web.Request,
                                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                                 ) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Reject as rej:
            return self._error_response(request, rej)
        except web.HTTPNotFound:
            paths = ", ".join(spec(s).http_path for s in self._signals())
            return self._error_response(request, _Reject(
                404, code_pb2.NOT_FOUND, f"unknown path {request.path!r}; OTLP requests go to {paths}",
                "not_found"))
        except web.HTTPMethodNotAllowed:
            return self._error_response(request, _Reject(
                405, code_pb2.UNIMPLEMENTED, f"method {request.method} not allowed; use POST",
                "method_not_allowed", {"Allow": "POST"}))
        except web.HTTPException:
            raise
        except Exception:
            logger.exception("OTLP/HTTP request failed")
            return self._error_response(request, _Reject(
                500, code_pb2.INTERNAL, "internal error while receiving the request", "internal"))

    def _error_response(self, request: web.Request, rej: _Reject) -> web.Response:
        if not rej.counted:
            self._ingest.reject(rej.reason)
        media = JSON if _media_type(request) == JSON else PROTOBUF
        body = _encode(status_pb2.Status(code=rej.code, message=rej.message), media)
        resp = web.Response(status=rej.http_status, body=body, content_type=media, headers=rej.headers)
        if rej.http_status in (408, 413) or request.can_read_body and not request.content.at_eof():
            # The rest of the body was not read: the connection cannot be reused.
            resp.force_close()
        return resp

    def _signals(self) -> tuple[str, ...]:
        """The signals served, traces first."""
        return (TRACES, *PASS_THROUGH_SIGNALS) if self._passthrough is not None else (TRACES,)

    def _handler(self, signal: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, signal)
        return handle

    async def _handle(self, request: web.Request, signal: str = TRACES) -> web.StreamResponse:
        if self._security is not None and not self._security.authorized(request.headers.get("Authorization")):
            raise _Reject(401, code_pb2.UNAUTHENTICATED, "missing or invalid bearer token",
                          "unauthenticated", {"WWW-Authenticate": 'Bearer realm="isoscope"'})
        media = _media_type(request)
        if media not in (PROTOBUF, JSON):
            raise _Reject(415, code_pb2.INVALID_ARGUMENT,
                          f"Content-Type {request.content_type!r} is not supported; "
                          f"use {PROTOBUF} or {JSON}", "unsupported_media_type")
        encoding = request.headers.get("Content-Encoding", "identity")
        try:
            BoundedDecoder(encoding, self._max)  # only checks that the encoding is supported
        except UnsupportedEncoding as exc:
            raise _Reject(415, code_pb2.INVALID_ARGUMENT, str(exc), "unsupported_encoding") from None
        compressed = encoding.strip().lower() not in ("", "identity")
        length = request.content_length
        if length is not None and length > self._max:
            raise _Reject(413, code_pb2.RESOURCE_EXHAUSTED,
                          f"request body of {length} bytes exceeds the limit of "
                          f"{self._max} bytes", "too_large")
        # Reserve before reading the body: a refusal costs the daemon nothing.
        # An identity body's whole cost is known from its length; a compressed
        # one reserves its raw bytes now and the rest as it inflates.
        large = length is not None and self._is_large(length, compressed)
        share = _LARGE_SHARE if large else 1.0
        estimate = (length or 0) + (0 if compressed else memory_estimate(length or 0, media))
        reservation = self._reserve(estimate, share)
        try:
            chunks: list[bytes] = []
            raw = 0
            try:
                async with asyncio.timeout(self._body_timeout):
                    async for chunk in request.content.iter_any():
                        raw += len(chunk)
                        if raw > self._max:
                            raise BodyTooLarge(self._max)
                        if length is None:  # chunked: reserve as it comes
                            reservation.grow(len(chunk) + (0 if compressed else memory_estimate(len(chunk), media)))
                        chunks.append(chunk)
            except TimeoutError:
                raise _Reject(408, code_pb2.DEADLINE_EXCEEDED,
                              f"request body not received within {self._body_timeout:g} s",
                              "body_timeout") from None
            except BodyTooLarge as exc:
                raise _Reject(413, code_pb2.RESOURCE_EXHAUSTED, str(exc), "too_large") from None
            except MemoryExhausted as exc:
                raise _too_busy(exc) from None
            peer = None
            peername = request.transport.get_extra_info("peername") if request.transport else None
            if peername:
                peer = Peer(str(peername[0]), int(peername[1]), self._port)
            pool = self._large_pool if self._is_large(raw, compressed) else self._pool
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(pool, self._process, encoding, chunks, media, peer,
                                                  reservation, compressed, signal)
        finally:
            reservation.release()
        return web.Response(status=200, body=_encode(response, media), content_type=media)

    def _is_large(self, raw_bytes: int, compressed: bool) -> bool:
        # OTLP compresses 5-10x with gzip: judge a compressed body by what it will become.
        return raw_bytes * (_COMPRESSION_GUESS if compressed else 1) > self._large_bytes

    def _reserve(self, nbytes: int, share: float) -> Reservation:
        try:
            return self._memory.reserve(nbytes, share)
        except MemoryExhausted as exc:
            raise _too_busy(exc) from None

    def _process(self, encoding: str, chunks: list[bytes], media: str, peer: Peer | None,
                 reservation: Reservation, compressed: bool, signal: str = TRACES) -> Any:
        """Decompress, decode and ingest or forward (runs on a worker pool: all of it may be slow)."""
        decoder = BoundedDecoder(encoding, self._max)
        try:
            for i in range(len(chunks)):
                chunk, chunks[i] = chunks[i], b""
                decoder.feed(chunk)
            if compressed:
                # The counting pass told the decoded size: reserve its cost
                # before anything is inflated for real.
                decoded = decoder.decoded_size
                reservation.grow(decoded + memory_estimate(decoded, media))
            body = decoder.finish()
        except BodyTooLarge as exc:
            raise _Reject(413, code_pb2.RESOURCE_EXHAUSTED, str(exc), "too_large") from None
        except CorruptBody as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "malformed") from None
        except MemoryExhausted as exc:
            raise _too_busy(exc) from None
        if signal != TRACES:
            return self._pass_through(signal, body, media)
        checker = LimitChecker(self._ingest.limits)
        try:
            if media == JSON:
                request = otlpjson.decode_request(body, span_filter=checker.span_problem_json,
                                                  on_spans=checker.count_spans)
            else:
                request = ExportTraceServiceRequest.FromString(body)
        except otlpjson.OtlpJsonError as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "malformed") from None
        except DecodeError as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT,
                          f"cannot decode ExportTraceServiceRequest: {exc}", "malformed") from None
        except RequestOverLimit as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "limit") from None
        # The batch keeps its share of the reservation until it has been exported (OTLP/JSON is
        # about twice the size of the protobuf the batch becomes).
        held = reservation.split(held_estimate(len(body) // 2 if media == JSON else len(body)))
        del body
        try:
            return self._ingest.ingest(request, peer, checker.rejected, memory=held)
        except RequestOverLimit as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "limit", counted=True) from None
        except Backpressure as bp:
            raise _Reject.busy(bp, "pipeline is full") from None
        except ConsumerFailed as exc:
            raise _Reject.failed(f"trace pipeline failed: {exc}") from None


    def _pass_through(self, signal: str, body: bytes, media: str) -> Any:
        """Check, bound and forward one metrics or logs request (on a worker pool)."""
        passthrough = self._passthrough
        assert passthrough is not None  # the path is routed only with it
        try:
            if media == JSON:
                request, count = passthrough.decode_json(signal, body)
                # Exporters speak binary protobuf: forward the same request in that encoding.
                body = request.SerializeToString()
                del request
            else:
                count = passthrough.decode_protobuf(signal, body)[1]  # the parsed message is not kept
        except otlpjson.OtlpJsonError as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "malformed") from None
        except DecodeError as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT,
                          f"cannot decode {spec(signal).request_type.DESCRIPTOR.name}: {exc}", "malformed") from None
        except RequestOverLimit as exc:
            raise _Reject(400, code_pb2.INVALID_ARGUMENT, str(exc), "limit", counted=True) from None
        try:
            return passthrough.accept(signal, body, count)
        except Backpressure as bp:
            raise _Reject.busy(bp, "export queues are full") from None
        except ConsumerFailed as exc:
            raise _Reject.failed(f"{signal} forwarding failed: {exc}") from None


_LARGE_SHARE = 0.75
"""Share of the in-flight memory cap that large requests may fill together (the rest stays for small ones)."""
_COMPRESSION_GUESS = 8


def _too_busy(exc: MemoryExhausted) -> _Reject:
    """429 + ``Retry-After``: OTLP/HTTP clients retry it after the delay."""
    retry = max(1, math.ceil(exc.retry_after_s))
    return _Reject(429, code_pb2.RESOURCE_EXHAUSTED, str(exc), "memory_limit", {"Retry-After": str(retry)})
