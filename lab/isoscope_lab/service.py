"""One hop of the lab chain: a small HTTP service instrumented with the OpenTelemetry SDK.

Run as ``python -m isoscope_lab.service --name hop1 --listen IP:PORT ...``
inside its own network, PID, mount and UTS namespaces and its own cgroup
(the lab starts it that way). Each ``GET /work`` request:

1. continues the caller's trace (W3C ``traceparent``) in a SERVER span,
2. snapshots the kernel truth of the handling thread,
3. does the hop's work (:class:`isoscope_lab.faults.RequestWork`),
4. calls the next hop, if any, propagating the trace context over the veth,
5. writes the truth deltas (``test.truth.*``) onto the span and ends it.

Spans leave through the SDK's OTLP/HTTP exporter. The exporter's thread
enters the root network namespace (a namespace fd inherited from the lab)
before it opens sockets, so the spans reach a daemon listening on the host's
loopback — where the daemon can tell which process sent them — while the
request traffic itself stays on the veths.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import logging
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from isoscope.instrumentation import ThreadIdSpanProcessor
from isoscope_lab.faults import Fault, RequestWork
from isoscope_lab.truth import TruthRecorder

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
HOP_ATTR = "lab.hop"
RUN_ATTR = "lab.run"


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
        resource = Resource.create({"service.name": args.name, "process.pid": os.getpid(),
                                    "service.namespace": "isoscope-lab", RUN_ATTR: args.run_id})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(ThreadIdSpanProcessor())
        exporter = NetnsExporter(OTLPSpanExporter(endpoint=args.otlp_endpoint, timeout=10), args.host_netns_fd)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500,
                                                            max_export_batch_size=256))
        self.tracer = self.provider.get_tracer("isoscope.lab")

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

    def handle(self, headers: dict[str, str]) -> int:
        ctx = propagate.extract(headers)
        # The span covers exactly the oracle's window: it starts just before the first
        # counter is read and ends just after the last. Whatever the tracer itself does
        # around that (allocating attributes can reclaim under a tight memcg limit) is
        # outside both, so the oracle is the span's own.
        start = time.time_ns()
        before = self.truth.begin()
        end = None
        with self.tracer.start_as_current_span(f"{self.name} GET /work", context=ctx, kind=trace.SpanKind.SERVER,
                                               start_time=start, end_on_exit=False) as span:
            try:
                status = 200
                io_ns = self.work.run()
                if self.downstream is not None:
                    try:
                        status = self.call_downstream("/work")
                    except (OSError, http.client.HTTPException) as exc:
                        span.record_exception(exc)
                        status = 502
                truth = self.truth.end(before, io_ns)
                end = time.time_ns()
                span.set_attributes(truth)
                span.set_attributes({HOP_ATTR: self.index, "http.response.status_code": status})
                if status >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
                return status
            finally:
                span.end(end_time=end)


def _handler_class(hop: Hop) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: one connection, one handling thread

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path == "/healthz":
                status = 200
            elif self.path == "/work":
                status = hop.handle({k.lower(): v for k, v in self.headers.items()})
            else:
                status = 404
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug("%s " + fmt, hop.name, *args)

    return Handler


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
    p.add_argument("--host-netns-fd", type=int, default=-1)
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
    server = ThreadingHTTPServer((host, int(port)), _handler_class(hop))
    server.daemon_threads = True
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    # PID 1 of a PID namespace ignores signals it has no handler for.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    t.start()
    logger.info("%s listening on %s (pid %d)", args.name, args.listen, os.getpid())
    stop.wait()
    server.shutdown()
    hop.provider.shutdown()
    hop.work.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
