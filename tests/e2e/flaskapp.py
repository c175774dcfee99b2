"""A real instrumented two-service HTTP application for end-to-end tests.

Service ``a`` (front) answers ``GET /front?ms=N`` by calling service ``b``
(``GET /work?ms=N``) with ``requests``; ``b`` burns ``N`` ms of its own CPU
time. Both are Flask apps instrumented with ``opentelemetry-instrumentation-
flask`` / ``-requests`` (so the W3C ``traceparent`` header carries the trace
from a to b) and :class:`isoscope.instrumentation.ThreadIdSpanProcessor`, and
export their spans with the real OTLP exporters (``--otlp grpc`` or ``http``).

Ground truth: around the CPU burn, ``b`` opens a span ``b.burn`` and reads its
own thread's ``/proc/thread-self/schedstat`` run delay before and after; the
delta (time runnable but not running: run-queue waits *and* CFS throttling,
since a throttled task stays runnable) is recorded as
``test.truth.run_delay_ns`` on ``b.burn`` and on b's server span. The window
of ``b.burn`` is set to the two reads' own window (:func:`measured_window`),
so the kernel-side stall time inside that window must match the oracle.

Every span the application ends is also written (span id, trace id, parent,
name, attributes, resource) as one JSON line to ``--record``, so a test can
check that what arrives at the backend kept every original attribute.

Run: ``python -m tests.e2e.flaskapp --role b --port 0 --otlp http --endpoint
http://127.0.0.1:P/v1/traces --record b.jsonl --ready-file b.port``. The bound
port is written to ``--ready-file`` once the server listens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

ORIGINAL_ATTRIBUTES = {
    "test.original.string": "kept",
    "test.original.int": 42,
    "test.original.double": 2.5,
    "test.original.bool": True,
    "test.original.array": ("x", "y"),
}
"""Set by the application on its server spans; the forwarded spans must carry them unchanged."""


def measured_window(work: Callable[[], None]) -> tuple[int, int, int]:
    """Run ``work``; return (start, end) wall-clock ns of the window the run delay was read over, and the delta.

    CFS throttling takes effect when the thread returns to user space —
    typically from the first system call after the quota ran out, which may be
    the one reading the counter. The counter is read with one ``pread`` on a
    file opened beforehand, and the clock on the side of it that keeps such a
    wait out of both or in both: at the start, counter then clock (a wait at
    the read's return is after the value was taken and before the window); at
    the end, clock then counter (the same wait is after the window and after
    the value). So the span window and the oracle cover the same waits.
    """
    fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    try:
        before = int(os.pread(fd, 256, 0).split()[1])
        start = time.time_ns()
        work()
        end = time.time_ns()
        after = int(os.pread(fd, 256, 0).split()[1])
    finally:
        os.close(fd)
    return start, end, after - before


def burn_cpu(ms: float) -> None:
    """Spend ``ms`` milliseconds of this thread's own CPU time (not wall time)."""
    end = time.thread_time_ns() + int(ms * 1e6)
    x = 0
    while time.thread_time_ns() < end:
        for i in range(2000):
            x += i * i


class _RecordingExporter:
    """A SpanExporter that writes each finished span as one JSON line (the test's copy of the truth)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            ctx = s.get_span_context()
            attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (s.attributes or {}).items()}
            lines.append(json.dumps({
                "span_id": format(ctx.span_id, "016x"), "trace_id": format(ctx.trace_id, "032x"),
                "parent_span_id": format(s.parent.span_id, "016x") if s.parent else "",
                "name": s.name, "kind": s.kind.name, "attributes": attrs,
                "resource": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.resource.attributes.items()},
            }))
        with self._lock, open(self._path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _tracer_provider(service: str, otlp: str, endpoint: str, record: str) -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from isoscope.instrumentation import ThreadIdSpanProcessor

    resource = Resource.create({"service.name": service, "process.pid": os.getpid(),
                                "test.resource.marker": f"{service}-resource"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(ThreadIdSpanProcessor())
    if otlp == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        exporter: Any = GrpcExporter(endpoint=endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        exporter = HttpExporter(endpoint=endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    provider.add_span_processor(SimpleSpanProcessor(_RecordingExporter(record)))
    trace.set_tracer_provider(provider)
    return provider


def build_app(role: str, downstream: str) -> Any:
    """The Flask app of service ``a`` (front, calls ``downstream``) or ``b`` (CPU work)."""
    import requests
    from flask import Flask, jsonify, request
    from opentelemetry import trace
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    app = Flask(f"isoscope-e2e-{role}")
    tracer = trace.get_tracer("tests.e2e.flaskapp")
    RequestsInstrumentor().instrument()
    session = requests.Session()

    def mark_original() -> None:
        span = trace.get_current_span()
        for k, v in ORIGINAL_ATTRIBUTES.items():
            span.set_attribute(k, v)

    @app.get("/healthz")
    def healthz() -> Any:
        return "ok"

    @app.get("/front")
    def front() -> Any:
        mark_original()
        ms = request.args.get("ms", "5")
        r = session.get(f"{downstream}/work", params={"ms": ms}, timeout=60)
        r.raise_for_status()
        return jsonify({"b": r.json(), "tid": threading.get_native_id()})

    @app.get("/work")
    def work() -> Any:
        mark_original()
        ms = float(request.args.get("ms", "5"))
        server_span = trace.get_current_span()
        # The span is given exactly the oracle's window (see measured_window).
        start, end, run_delay = measured_window(lambda: burn_cpu(ms))
        burn = tracer.start_span("b.burn", start_time=start)
        burn.set_attribute("test.truth.run_delay_ns", run_delay)
        burn.end(end_time=end)
        server_span.set_attribute("test.truth.run_delay_ns", run_delay)
        return jsonify({"run_delay_ns": run_delay, "tid": threading.get_native_id(), "pid": os.getpid()})

    FlaskInstrumentor().instrument_app(app)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("a", "b"), required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--downstream", default="", help="base URL of service b (role a)")
    p.add_argument("--otlp", choices=("grpc", "http"), required=True)
    p.add_argument("--endpoint", required=True, help="gRPC host:port or HTTP .../v1/traces URL")
    p.add_argument("--record", required=True, help="JSON-lines file of every span this service ended")
    p.add_argument("--ready-file", required=True, help="the bound port is written here once listening")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    provider = _tracer_provider(f"e2e-svc-{args.role}", args.otlp, args.endpoint, args.record)
    app = build_app(args.role, args.downstream)

    import signal

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", args.port, app, threaded=True)

    def stop(*_: Any) -> None:
        # Flush the batch processor before exiting, on SIGTERM as on SIGINT.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(str(server.server_port))
    os.replace(tmp, args.ready_file)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
