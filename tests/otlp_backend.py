"""A real OTLP backend on loopback for tests: gRPC and HTTP, traces, metrics and logs, recording, programmable.

Usage::

    from tests.otlp_backend import Failure, OtlpBackend

    with OtlpBackend() as backend:               # both servers listen on 127.0.0.1, free ports
        backend.grpc_endpoint                    # "127.0.0.1:PORT"   (also backend.grpc_url "grpc://…")
        backend.http_url                         # "http://127.0.0.1:PORT" (POST /v1/traces)
        backend.fail_next(Failure.unavailable(retry_after_s=0.5), times=2)
        ...                                      # send spans with any OTLP client
        assert backend.wait_for_spans(10, timeout_s=5)
        backend.span_ids()                       # hex span ids of accepted spans, arrival order
        backend.span_id_counts()                 # Counter: exactly-once checks
        backend.attempts                         # every request, accepted or not (Attempt)
        backend.stop(); backend.start()          # "down" then back, on the SAME ports

    # A backend as hosted ones are: TLS (optionally requiring a client certificate) and a token.
    with OtlpBackend(tls=BackendTls(cert_file, key_file, client_ca_file=ca), bearer_token="t0k") as b:
        b.grpc_url                               # "grpcs://127.0.0.1:PORT"
        b.http_url                               # "https://127.0.0.1:PORT"
        b.handshake_failures                     # HTTP TLS handshakes the server refused

    make_payload([1, 2, 3])                      # serialized request whose span ids are 1, 2, 3
    span_hex(1)                                  # "0000000000000001", the hex form recorded

    # Metrics and logs (gRPC MetricsService/LogsService, HTTP /v1/metrics and /v1/logs, binary protobuf):
    backend.wait_for_items("metrics", 10, timeout_s=5)   # data points accepted (log records for "logs")
    backend.payloads("logs")                     # accepted request bodies, byte for byte (decompressed)
    backend.messages("metrics")                  # the same, parsed (ExportMetricsServiceRequest)
    backend.item_count("logs")                   # log records accepted so far

Failures (each has a gRPC and an HTTP rendering, so one plan serves both protocols):

=================================  ==================================  ======================
``Failure.unavailable(s)``         UNAVAILABLE (+ RetryInfo if ``s``)   503 (+ Retry-After)
``Failure.resource_exhausted(s)``  RESOURCE_EXHAUSTED (+ RetryInfo)    429 (+ Retry-After)
``Failure.invalid_argument()``     INVALID_ARGUMENT                    400
``Failure.too_large()``            RESOURCE_EXHAUSTED, no RetryInfo    413
``Failure.partial(n, msg)``        OK with ``partial_success``         200 with ``partial_success``
``Failure.unauthenticated()``      UNAUTHENTICATED                     401
``Failure(grpc_code, http_status)``  anything else
=================================  ==================================  ======================

``Failure.*(retry_after_s, http_date=True)`` sends ``Retry-After`` as an HTTP-date.
A request answered with a failure is recorded in ``attempts`` only; its spans are
not "received". A partial success records the request as received. The failure
plan applies to every signal; a partial success of metrics or logs reports
rejected data points / log records. With
``bearer_token`` set, a request without ``Authorization: Bearer <token>`` is
answered ``Failure.unauthenticated()`` (recorded in ``attempts``), before the plan.
"""

from __future__ import annotations

import gzip
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable

import grpc
from google.protobuf import duration_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from isoscope.model import iter_spans
from isoscope.otlpjson import decode_request, encode_response

logger = logging.getLogger(__name__)

# Metrics and logs: (gRPC service, HTTP path, request type, response type, partial-success field).
_OTHER_SIGNALS: dict[str, tuple[str, str, Any, Any, str]] = {
    "metrics": ("opentelemetry.proto.collector.metrics.v1.MetricsService", "/v1/metrics",
                ExportMetricsServiceRequest, ExportMetricsServiceResponse, "rejected_data_points"),
    "logs": ("opentelemetry.proto.collector.logs.v1.LogsService", "/v1/logs",
             ExportLogsServiceRequest, ExportLogsServiceResponse, "rejected_log_records"),
}
_PATHS = {"/v1/traces": "traces", **{v[1]: k for k, v in _OTHER_SIGNALS.items()}}


def count_items(signal: str, request: Any) -> int:
    """Spans, metric data points or log records in a parsed request."""
    if signal == "metrics":
        return sum(len(getattr(m, m.WhichOneof("data")).data_points)
                   for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                   if m.WhichOneof("data"))
    if signal == "logs":
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    return sum(1 for _ in iter_spans(request))


@dataclass(frozen=True)
class Failure:
    """How the backend answers one request instead of accepting it.

    Attributes:
        grpc_code: status code for gRPC (OK with ``partial_rejected`` = partial success).
        http_status: status for HTTP.
        retry_after_s: RetryInfo delay (gRPC) / ``Retry-After`` (HTTP), if any.
        http_date: send ``Retry-After`` as an HTTP-date rather than seconds.
        message: status message.
        partial_rejected: for partial success: spans reported as rejected.
    """

    grpc_code: grpc.StatusCode
    http_status: int
    retry_after_s: float | None = None
    http_date: bool = False
    message: str = "injected failure"
    partial_rejected: int = 0

    @classmethod
    def unavailable(cls, retry_after_s: float | None = None, *, http_date: bool = False) -> "Failure":
        return cls(grpc.StatusCode.UNAVAILABLE, 503, retry_after_s, http_date, "backend unavailable")

    @classmethod
    def resource_exhausted(cls, retry_after_s: float | None = None, *, http_date: bool = False) -> "Failure":
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, retry_after_s, http_date, "rate limited")

    @classmethod
    def invalid_argument(cls) -> "Failure":
        return cls(grpc.StatusCode.INVALID_ARGUMENT, 400, None, False, "bad request")

    @classmethod
    def too_large(cls) -> "Failure":
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, None, False, "request too large")

    @classmethod
    def unauthenticated(cls) -> "Failure":
        return cls(grpc.StatusCode.UNAUTHENTICATED, 401, None, False, "missing or invalid bearer token")

    @classmethod
    def partial(cls, rejected: int, message: str = "some spans rejected") -> "Failure":
        return cls(grpc.StatusCode.OK, 200, None, False, message, rejected)

    @property
    def is_partial(self) -> bool:
        return self.grpc_code is grpc.StatusCode.OK


@dataclass
class Attempt:
    """One request that reached the backend.

    Attributes:
        protocol: ``"grpc"`` or ``"http"``.
        at: ``time.monotonic()`` when it arrived.
        span_ids: hex span ids in the request.
        failure: the failure it was answered with, None if accepted.
        headers: gRPC metadata / HTTP headers (lower-case keys).
        signal: ``traces``, ``metrics`` or ``logs``.
        items: spans, data points or log records in the request.
    """

    protocol: str
    at: float
    span_ids: list[str]
    failure: Failure | None
    headers: dict[str, str] = field(default_factory=dict)
    signal: str = "traces"
    items: int = 0


@dataclass(frozen=True)
class BackendTls:
    """Server-side TLS of the backend (PEM files).

    Attributes:
        cert_file: server certificate chain (its SAN must cover 127.0.0.1).
        key_file: server private key.
        client_ca_file: when set, clients must present a certificate signed by it (mTLS).
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def grpc_credentials(self) -> grpc.ServerCredentials:
        with open(self.key_file, "rb") as k, open(self.cert_file, "rb") as c:
            pair = (k.read(), c.read())
        ca = None
        if self.client_ca_file:
            with open(self.client_ca_file, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


class OtlpBackend:
    """Recording OTLP/gRPC + OTLP/HTTP backend (traces, metrics, logs) on loopback.

    Args:
        grpc_enabled: run the gRPC server (TraceService, MetricsService, LogsService).
        http_enabled: run the HTTP server (``/v1/traces``, ``/v1/metrics``, ``/v1/logs``).
        delay_s: time every request takes before it is answered (a slow backend).
        start: listen right away (otherwise call :meth:`start`).
        tls: serve both protocols over TLS (mTLS when it names a client CA).
        bearer_token: require ``Authorization: Bearer <token>`` on every request.
    """

    def __init__(self, *, grpc_enabled: bool = True, http_enabled: bool = True,
                 delay_s: float = 0.0, start: bool = True, tls: BackendTls | None = None,
                 bearer_token: str | None = None) -> None:
        self.tls = tls
        self.bearer_token = bearer_token
        self.handshake_failures: list[str] = []
        self.delay_s = delay_s
        self._grpc_enabled = grpc_enabled
        self._http_enabled = http_enabled
        self._cond = threading.Condition()
        self._plan: list[list[Any]] = []  # [failure, remaining times or None for always]
        self.attempts: list[Attempt] = []
        self.requests: list[ExportTraceServiceRequest] = []
        self._accepted_ids: list[str] = []
        # Accepted metrics / logs requests: (raw body, parsed, item count).
        self._signal_accepted: dict[str, list[tuple[bytes, Any, int]]] = {s: [] for s in _OTHER_SIGNALS}
        self.grpc_port = 0
        self.http_port = 0
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        if start:
            self.start()

    # -- addresses ------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def grpc_url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Listen (again). After :meth:`stop`, the same ports are reused."""
        if self._grpc_enabled and self._grpc_server is None:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
            server.add_generic_rpc_handlers(tuple(_raw_handler(self, signal) for signal in _OTHER_SIGNALS))
            address = f"127.0.0.1:{self.grpc_port}"
            port = (server.add_secure_port(address, self.tls.grpc_credentials()) if self.tls
                    else server.add_insecure_port(address))
            if port == 0:
                raise OSError(f"cannot bind gRPC port {self.grpc_port}")
            self.grpc_port = port
            server.start()
            self._grpc_server = server
        if self._http_enabled and self._http_server is None:
            httpd = _HttpServer(("127.0.0.1", self.http_port), _HttpHandler, self)
            if self.tls:
                # The handshake is done by the handler thread (see _HttpHandler.setup), so
                # a client that fails it cannot stall the accept loop.
                httpd.socket = self.tls.ssl_context().wrap_socket(
                    httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.http_port = httpd.server_address[1]
            self._http_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                                 name="otlp-backend-http", daemon=True)
            self._http_thread.start()
            self._http_server = httpd

    def stop(self, *, graceful: bool = True) -> None:
        """Go down: stop listening and cut every connection.

        Args:
            graceful: let requests already being handled finish and get their
                answer first (like a collector shutting down cleanly), so a
                request is never recorded as received while its client sees a
                failure. ``False`` cuts in-flight calls too (a crash); their
                clients retry, and the spans may then be received twice.
        """
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=2.0 if graceful else None).wait(5)
            self._grpc_server = None
        if self._http_server is not None:
            httpd = self._http_server
            httpd.closing = True  # requests arriving from now on are cut unanswered
            httpd.shutdown()
            httpd.server_close()
            if graceful:
                httpd.wait_idle(5)
            httpd.cut_connections()
            if self._http_thread is not None:
                self._http_thread.join(5)
            self._http_server = None

    @property
    def running(self) -> bool:
        return self._grpc_server is not None or self._http_server is not None

    def __enter__(self) -> "OtlpBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- failure plan ---------------------------------------------------------

    def fail_next(self, failure: Failure, times: int = 1) -> None:
        """Answer the next ``times`` requests (either protocol) with ``failure``."""
        with self._cond:
            self._plan.append([failure, times])

    def fail_always(self, failure: Failure) -> None:
        """Answer every request with ``failure`` until :meth:`clear_failures`."""
        with self._cond:
            self._plan.append([failure, None])

    def clear_failures(self) -> None:
        with self._cond:
            self._plan.clear()

    def _next_failure(self) -> Failure | None:
        with self._cond:
            while self._plan:
                failure, remaining = self._plan[0]
                if remaining is None:
                    return failure
                if remaining > 0:
                    self._plan[0][1] = remaining - 1
                    if remaining - 1 == 0:
                        self._plan.pop(0)
                    return failure
                self._plan.pop(0)
            return None

    # -- recording ------------------------------------------------------------

    def _handle(self, protocol: str, request: Any, headers: dict[str, str], signal: str = "traces",
                raw: bytes = b"") -> Failure | None:
        """Decide and record one request; returns the failure to answer with, if any."""
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.bearer_token is not None and headers.get("authorization") != f"Bearer {self.bearer_token}":
            failure: Failure | None = Failure.unauthenticated()
        else:
            failure = self._next_failure()
        ids = [span.span_id.hex() for span in iter_spans(request)] if signal == "traces" else []
        items = count_items(signal, request)
        with self._cond:
            self.attempts.append(Attempt(protocol, time.monotonic(), ids, failure, headers, signal, items))
            if failure is None or failure.is_partial:
                if signal == "traces":
                    self.requests.append(request)
                    self._accepted_ids.extend(ids)
                else:
                    self._signal_accepted[signal].append((raw, request, items))
            self._cond.notify_all()
        return failure

    def payloads(self, signal: str) -> list[bytes]:
        """Accepted ``metrics`` / ``logs`` request bodies, byte for byte (decompressed), in arrival order."""
        with self._cond:
            return [raw for raw, _, _ in self._signal_accepted[signal]]

    def messages(self, signal: str) -> list[Any]:
        """Accepted ``metrics`` / ``logs`` requests, parsed, in arrival order."""
        with self._cond:
            return [msg for _, msg, _ in self._signal_accepted[signal]]

    def item_count(self, signal: str) -> int:
        """Data points (``metrics``) or log records (``logs``) accepted so far, duplicates included."""
        with self._cond:
            return sum(n for _, _, n in self._signal_accepted[signal])

    def wait_for_items(self, signal: str, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` data points / log records of ``signal`` were accepted."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(n for _, _, n in self._signal_accepted[signal]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def span_ids(self) -> list[str]:
        """Hex span ids of accepted spans in arrival order (duplicates kept)."""
        with self._cond:
            return list(self._accepted_ids)

    def span_id_counts(self) -> Counter[str]:
        """How many times each span id was accepted."""
        with self._cond:
            return Counter(self._accepted_ids)

    def failed_attempts(self) -> list[Attempt]:
        with self._cond:
            return [a for a in self.attempts if a.failure is not None and not a.failure.is_partial]

    def wait_for_spans(self, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` spans were accepted, or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self._accepted_ids) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_for_span_ids(self, span_ids: Iterable[int], timeout_s: float) -> bool:
        """Block until every given span id was accepted at least once.

        Unlike :meth:`wait_for_spans` a duplicate delivery (an export that timed
        out after the backend took it, then retried) cannot stand in for a
        span that has not arrived yet.
        """
        want = {span_hex(i) for i in span_ids}
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not want.issubset(self._accepted_ids):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_for_attempts(self, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` requests arrived (accepted or not)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.attempts) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


def span_hex(span_id: int) -> str:
    """The hex form of an integer span id, as :meth:`OtlpBackend.span_ids` reports it."""
    return span_id.to_bytes(8, "big").hex()


def make_request(span_ids: Iterable[int], *, service: str = "test-service",
                 trace_id: bytes = b"\x01" * 16) -> ExportTraceServiceRequest:
    """A small valid trace request whose spans have the given integer span ids (non-zero)."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    attr = rs.resource.attributes.add()
    attr.key = "service.name"
    attr.value.string_value = service
    ss = rs.scope_spans.add()
    ss.scope.name = "tests.otlp_backend"
    now = time.time_ns()
    for sid in span_ids:
        span = ss.spans.add()
        span.trace_id = trace_id
        span.span_id = sid.to_bytes(8, "big")
        span.name = f"op-{sid}"
        span.kind = 2  # SERVER
        span.start_time_unix_nano = now
        span.end_time_unix_nano = now + 1_000_000
    return request


def make_payload(span_ids: Iterable[int], **kwargs: Any) -> bytes:
    """:func:`make_request` serialized: what exporters and queues take."""
    return make_request(span_ids, **kwargs).SerializeToString()


def _response_for(failure: Failure | None, signal: str = "traces") -> Any:
    if signal == "traces":
        response, field_name = ExportTraceServiceResponse(), "rejected_spans"
    else:
        response, field_name = _OTHER_SIGNALS[signal][3](), _OTHER_SIGNALS[signal][4]
    if failure is not None and failure.is_partial:
        setattr(response.partial_success, field_name, failure.partial_rejected)
        response.partial_success.error_message = failure.message
    return response


def _status_proto(failure: Failure, code: int) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=failure.message)
    if failure.retry_after_s is not None:
        seconds = int(failure.retry_after_s)
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=seconds, nanos=int(round((failure.retry_after_s - seconds) * 1e9))))
        detail = AnyProto()
        detail.Pack(info)
        status.details.append(detail)
    return status


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, backend: OtlpBackend) -> None:
        self._backend = backend

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext) -> ExportTraceServiceResponse:  # noqa: N802
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        failure = self._backend._handle("grpc", request, headers)
        if failure is not None and not failure.is_partial:
            context.abort_with_status(rpc_status.to_status(_status_proto(failure, failure.grpc_code.value[0])))
        return _response_for(failure)


def _raw_handler(backend: OtlpBackend, signal: str) -> grpc.GenericRpcHandler:
    """The ``Export`` method of a metrics / logs service, keeping the request's bytes as received."""
    service, _, request_type, _, _ = _OTHER_SIGNALS[signal]

    def export(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = request_type.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError: INVALID_ARGUMENT, as a collector answers
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode: {exc}")
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        failure = backend._handle("grpc", request, headers, signal, raw)
        if failure is not None and not failure.is_partial:
            context.abort_with_status(rpc_status.to_status(_status_proto(failure, failure.grpc_code.value[0])))
        return _response_for(failure, signal)

    handler = grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=lambda m: m.SerializeToString())
    return grpc.method_handlers_generic_handler(service, {"Export": handler})


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, backend: OtlpBackend) -> None:
        self.backend = backend
        self.closing = False
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Condition()
        self._busy = 0
        super().__init__(address, handler)

    def begin(self) -> bool:
        """Mark a request as being handled; False when the server is going down."""
        with self._conns_lock:
            if self.closing:
                return False
            self._busy += 1
            return True

    def end(self) -> None:
        with self._conns_lock:
            self._busy -= 1
            self._conns_lock.notify_all()

    def wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._conns_lock:
            while self._busy and time.monotonic() < deadline:
                self._conns_lock.wait(max(0.0, deadline - time.monotonic()))

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Kill kept-alive connections so a stopped backend is really down."""
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HttpHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real collectors
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("otlp backend http: " + format, *args)

    def setup(self) -> None:
        self._refused = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self._refused = True
                with self.server.backend._cond:
                    self.server.backend.handshake_failures.append(f"{type(exc).__name__}: {exc}")
            self.request.settimeout(None)
        super().setup()

    def handle(self) -> None:
        if not self._refused:
            super().handle()

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if not self.server.begin():
            # Going down: drop the connection without an answer, as a dying
            # server does; nothing is recorded.
            self.close_connection = True
            return
        try:
            self._post()
        finally:
            self.server.end()

    def _post(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        signal = _PATHS.get(self.path.split("?")[0])
        if signal is None:
            self._reply(404, b"not found", "text/plain")
            return
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                self._reply(400, b"bad gzip body", "text/plain")
                return
        is_json = "json" in self.headers.get("Content-Type", "")
        if is_json and signal != "traces":
            self._reply(415, b"this backend takes metrics and logs as binary protobuf only", "text/plain")
            return
        try:
            if signal != "traces":
                request = _OTHER_SIGNALS[signal][2].FromString(body)
            else:
                request = decode_request(body) if is_json else ExportTraceServiceRequest.FromString(body)
        except Exception as exc:  # noqa: BLE001 - OtlpJsonError, DecodeError …: any is a 400
            self._reply(400, str(exc).encode(), "text/plain")
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        failure = self.server.backend._handle("http", request, headers, signal, body)
        if failure is None or failure.is_partial:
            response = _response_for(failure, signal)
            if is_json:
                self._reply(200, encode_response(response).encode(), "application/json")
            else:
                self._reply(200, response.SerializeToString(), "application/x-protobuf")
            return
        extra = {}
        if failure.retry_after_s is not None:
            if failure.http_date:
                extra["Retry-After"] = formatdate(time.time() + failure.retry_after_s, usegmt=True)
            else:
                extra["Retry-After"] = f"{failure.retry_after_s:g}"
        status = _status_proto(failure, failure.grpc_code.value[0])
        self._reply(failure.http_status, status.SerializeToString(), "application/x-protobuf", extra)

    def _reply(self, status: int, body: bytes, content_type: str,
               extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
