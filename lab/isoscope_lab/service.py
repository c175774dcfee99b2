"""One hop of the lab chain: a small HTTP service instrumented with the OpenTelemetry SDK.

Run as ``python -m isoscope_lab.service --name hop1 --listen IP:PORT ...``
inside its own network, PID, mount and UTS namespaces and its own cgroup
(the lab starts it that way). Each ``GET /work`` request:

1. continues the caller's trace (W3C ``traceparent``) in a SERVER span,
2. snapshots the kernel truth of the handling thread,
3. does the hop's work (:class:`isoscope_lab.faults.RequestWork`),
4. calls the next hop, if any, propagating the trace context over the veth,
5. writes the truth deltas (``test.truth.*``) onto the span and ends it.

How a request is served (``--server``), the shapes the daemon meets in the field:

* ``threads``: a thread per connection (``ThreadingHTTPServer``);
* ``pool``: connections are read by per-connection threads, but every request
  is handled by one of ``--workers`` pre-started pool threads (whichever is
  free; with one request at a time they take turns), so consecutive spans of
  one connection run on different OS threads;
* ``asyncio``: one event loop thread serves every connection; the downstream
  call is awaited on the loop.

Spans leave through the SDK's OTLP/HTTP exporter from the service's own
network namespace to the node address it is given (the root-namespace end of
its veth: how a pod reaches a node agent's ``hostPort``), so the daemon sees
the connection arrive from the pod's address. ``--host-netns-fd`` keeps an
older path for backends on the host's loopback: the exporter's thread then
enters the root network namespace before it opens sockets.
``--no-thread-id`` leaves ``thread.id`` off the spans (``process.pid``, the
service's pid inside its own PID namespace, is then the finest claim).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import http.client
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from isoscope.instrumentation import ThreadIdSpanProcessor
from isoscope_lab.faults import Fault, RequestWork, WorkTruth
from isoscope_lab.truth import TruthRecorder

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
HOP_ATTR = "lab.hop"
RUN_ATTR = "lab.run"
SERVERS = ("threads", "pool", "asyncio")
"""How a service serves its requests (module docstring)."""


def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsExporter(SpanExporter):
    """Wraps an exporter so the exporting thread first joins another network namespace.

    ``setns(CLONE_NEWNET)`` changes only the calling thread; the request
    handlers keep the service's own namespace.
    """

    def __init__(self, inner: SpanExporter, netns_fd: int) -> None:
        self._inner = inner
        self._fd = netns_fd
        self._local = threading.local()

    def _enter(self) -> None:
        if self._fd >= 0 and not getattr(self._local, "entered", False):
            _setns(self._fd, CLONE_NEWNET)
            self._local.entered = True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._enter()
        return self._inner.export(spans)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._enter()
        return self._inner.force_flush(timeout_millis)


class _Downstream(threading.local):
    conn: http.client.HTTPConnection | None = None


class WorkerPool:
    """A fixed pool of pre-started worker threads taking requests from one queue.

    Idle workers wait on the queue in turn (``queue.Queue`` wakes the longest
    waiter first), so with one request at a time consecutive requests land on
    different threads, as in an application server's pool.

    Args:
        workers: number of threads (all started now).
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        self._q: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name=f"pool-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting connection thread
                fut.set_exception(exc)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a worker and wait for its result."""
        fut: Future[Any] = Future()
        self._q.put((fn, args, fut))
        return fut.result()

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)


class _AsyncDownstream:
    """One kept-alive HTTP/1.1 connection to the next hop, driven by the event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def get(self, path: str, headers: dict[str, str]) -> int:
        async with self._lock:  # one request at a time on the connection
            for attempt in range(2):
                try:
                    if self._rw is None:
                        self._rw = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 30)
                    reader, writer = self._rw
                    lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
                    writer.write("\r\n".join(lines).encode("latin-1"))
                    await writer.drain()
                    status_line = await asyncio.wait_for(reader.readline(), 30)
                    if not status_line:
                        raise ConnectionResetError("downstream closed the connection")
                    status = int(status_line.split()[1])
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                        k, _, v = line.decode("latin-1").partition(":")
                        if k.strip().lower() == "content-length":
                            length = int(v.strip())
                    if length:
                        await reader.readexactly(length)
                    return status
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
                    self.close()
                    if attempt == 1:
                        raise OSError(f"downstream {self.host}:{self.port} failed")
        return 599

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


class Hop:
    """The service's state: tracer, work, truth recorder and the next hop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.name
        self.index = args.index
        self.run_id = args.run_id
        fault = Fault.from_json(args.fault)
        self.work = RequestWork(fault, args.work_ms, args.data_dir, args.peer_ip)
        self.truth = TruthRecorder(args.cpu_dir or None, fault.kind, args.v2_dir or None)
        self.downstream = urlsplit(args.downstream) if args.downstream else None
        self._down = _Downstream()
        # process.pid is what the SDK's process detector reports: the pid inside the
        # service's own PID namespace (1 here), never the host's.
        resource = Resource.create({"service.name": args.name, "process.pid": os.getpid(),
                                    "service.namespace": "isoscope-lab", RUN_ATTR: args.run_id})
        self.provider = TracerProvider(resource=resource)
        if args.thread_id:
            self.provider.add_span_processor(ThreadIdSpanProcessor())
        exporter: SpanExporter = OTLPSpanExporter(endpoint=args.otlp_endpoint, timeout=10)
        if args.host_netns_fd >= 0:
            exporter = NetnsExporter(exporter, args.host_netns_fd)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500,
                                                            max_export_batch_size=256))
        self.tracer = self.provider.get_tracer("isoscope.lab")
        self.pool = WorkerPool(args.workers) if args.server == "pool" else None

    def call_downstream(self, path: str) -> int:
        """GET ``path`` on the next hop over a kept-alive connection; returns the status."""
        assert self.downstream is not None
        headers: dict[str, str] = {}
        propagate.inject(headers)
        for attempt in range(2):
            conn = self._down.conn
            if conn is None:
                conn = http.client.HTTPConnection(self.downstream.hostname, self.downstream.port, timeout=30)
                self._down.conn = conn
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                return resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                self._down.conn = None
                if attempt == 1:
                    raise
        return 599

    def _begin(self, headers: dict[str, str]) -> tuple[Any, int, Any]:
        # The span covers exactly the oracle's window: it starts just before the first
        # counter is read and ends just after the last. Whatever the tracer itself does
        # around that (allocating attributes can reclaim under a tight memcg limit) is
        # outside both, so the oracle is the span's own.
        ctx = propagate.extract(headers)
        start = time.time_ns()
        before = self.truth.begin()
        span = self.tracer.start_span(f"{self.name} GET /work", context=ctx, kind=trace.SpanKind.SERVER,
                                      start_time=start)
        return span, start, before

    def _finish(self, span: Any, before: Any, io: WorkTruth, status: int) -> int:
        truth = self.truth.end(before, io.io_ns, io.device_ns)
        end = time.time_ns()
        span.set_attributes(truth)
        span.set_attributes({HOP_ATTR: self.index, "http.response.status_code": status})
        if status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        span.end(end_time=end)
        return status

    def handle(self, headers: dict[str, str]) -> int:
        """Serve one ``/work`` request on the calling thread; returns the HTTP status."""
        span, _start, before = self._begin(headers)
        io = WorkTruth()
        status = 200
        try:
            with trace.use_span(span, end_on_exit=False):
                io = self.work.run()
                if self.downstream is not None:
                    try:
                        status = self.call_downstream("/work")
                    except (OSError, http.client.HTTPException) as exc:
                        span.record_exception(exc)
                        status = 502
        finally:
            self._finish(span, before, io, status)
        return status

    async def handle_async(self, headers: dict[str, str], down: _AsyncDownstream | None) -> int:
        """Serve one ``/work`` request on the event loop; the downstream call is awaited."""
        span, _start, before = self._begin(headers)
        io = WorkTruth()
        status = 200
        try:
            with trace.use_span(span, end_on_exit=False):
                io = self.work.run()  # the hop's work blocks the loop, as CPU work does
                if down is not None:
                    out: dict[str, str] = {}
                    propagate.inject(out)
                    try:
                        status = await down.get("/work", out)
                    except OSError as exc:
                        span.record_exception(exc)
                        status = 502
        finally:
            self._finish(span, before, io, status)
        return status


def _handler_class(hop: Hop) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection, one handling thread

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/healthz":
                status = 200
            elif self.path == "/work":
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = hop.pool.run(hop.handle, headers) if hop.pool is not None else hop.handle(headers)
            else:
                status = 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug("%s " + fmt, hop.name, *args)

    return Handler


_REASONS = {200: "OK", 404: "Not Found", 502: "Bad Gateway"}


async def _serve_connection(hop: Hop, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    down = (_AsyncDownstream(hop.downstream.hostname or "", hop.downstream.port or 80)
            if hop.downstream is not None else None)
    try:
        while line := await reader.readline():
            parts = line.decode("latin-1").split()
            headers: dict[str, str] = {}
            while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            if int(headers.get("content-length", "0") or 0):
                await reader.readexactly(int(headers["content-length"]))
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                status = 200
            elif path == "/work":
                status = await hop.handle_async(headers, down)
            else:
                status = 404
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Length: 0\r\n\r\n"
                         .encode("latin-1"))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        if down is not None:
            down.close()
        writer.close()


def _serve_asyncio(hop: Hop, host: str, port: int, stop: threading.Event) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _serve_connection(hop, r, w), host, port)
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(main())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="isoscope_lab.service", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--run-id", default="")
    p.add_argument("--listen", required=True, help="IP:PORT")
    p.add_argument("--downstream", default="", help="http://IP:PORT of the next hop")
    p.add_argument("--fault", default='{"kind": "none"}', help="Fault as JSON")
    p.add_argument("--work-ms", type=float, default=4.0)
    p.add_argument("--data-dir", default="/var/tmp/isoscope-lab")
    p.add_argument("--cpu-dir", default="", help="cgroup directory with cpu.stat")
    p.add_argument("--v2-dir", default="", help="cgroup v2 directory (memory.pressure)")
    p.add_argument("--peer-ip", default="")
    p.add_argument("--otlp-endpoint", default="http://127.0.0.1:4318/v1/traces")
    p.add_argument("--host-netns-fd", type=int, default=-1,
                   help="export from the root network namespace (a backend on the host's loopback)")
    p.add_argument("--server", choices=SERVERS, default="threads")
    p.add_argument("--workers", type=int, default=4, help="pool threads (--server pool)")
    p.add_argument("--no-thread-id", dest="thread_id", action="store_false",
                   help="do not record thread.id on spans")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then flush spans and exit."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [lab] %(message)s")
    args = parse_args(argv)
    try:
        socket.sethostname(args.name)  # own UTS namespace
    except OSError:
        pass
    hop = Hop(args)
    host, port = args.listen.rsplit(":", 1)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # PID 1 of a PID namespace ignores signals it has no handler for.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server: ThreadingHTTPServer | None = None
    if args.server == "asyncio":
        t = threading.Thread(target=_serve_asyncio, args=(hop, host, int(port), stop), name="loop", daemon=True)
    else:
        server = ThreadingHTTPServer((host, int(port)), _handler_class(hop))
        server.daemon_threads = True
        t = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    t.start()
    logger.info("%s (%s) listening on %s (pid %d)", args.name, args.server, args.listen, os.getpid())
    stop.wait()
    if server is not None:
        server.shutdown()
    t.join(timeout=5)
    if hop.pool is not None:
        hop.pool.close()
    hop.provider.shutdown()
    hop.work.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
