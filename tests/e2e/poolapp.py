"""Instrumented servers whose spans carry no ``thread.id``: a thread pool and an asyncio loop.

``--kind pool``: a waitress-like server. The main thread accepts connections
(``select``), a queue hands each to one of ``--workers`` threads, and the worker
serves it: ``GET /cpu?ms=N`` burns N ms of its own CPU time, ``GET /down?ms=N``
calls the downstream URL (``--downstream``, which answers after N ms) and waits
for it blocked in ``recv``. Idle workers wait on the queue (a futex).

``--kind asyncio``: one event loop serves every request: ``GET /mix?cpu=N&wait=W``
burns N ms, awaits W ms (other requests run meanwhile), burns N ms again.

Spans are exported over OTLP/HTTP with the real SDK exporter; the resource has
``service.name`` and ``process.pid`` only, so the daemon joins at process scope.

Truth, per request, measured by the serving thread itself over the span's own
window: each counter read is bracketed by two clock reads, retried until the
two are within 50 µs (no wait for a CPU fits between them), and the span's
edges are those clock reads (:meth:`Truth._bracketed`):
``test.truth.run_delay_ns`` (the thread's ``/proc/thread-self/schedstat`` run
delay: every wait for a CPU, throttled or not) and
``test.truth.cg_throttled_ns`` (the cgroup's ``cpu.stat`` ``throttled_usec``).
The response body carries the same numbers, the span id and the serving tid.

Run: ``python -m tests.e2e.poolapp --kind pool --endpoint http://127.0.0.1:P/v1/traces
--ready-file F [--downstream URL] [--cgroup-stat /sys/fs/cgroup/.../cpu.stat]``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, urlsplit

from tests.e2e.flaskapp import burn_cpu

logger = logging.getLogger(__name__)


class Truth:
    """Reads the serving thread's run delay and the cgroup's throttled time (one pread each)."""

    def __init__(self, cgroup_stat: str) -> None:
        self._cg_fd = os.open(cgroup_stat, os.O_RDONLY) if cgroup_stat else -1

    def cg_throttled_ns(self) -> int:
        if self._cg_fd < 0:
            return 0
        for line in os.pread(self._cg_fd, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_usec":  # cgroup v2
                return int(value) * 1000
            if key == "throttled_time":  # cgroup v1 cpu controller, ns
                return int(value)
        return 0

    @staticmethod
    def run_delay(fd: int) -> int:
        return int(os.pread(fd, 256, 0).split()[1])

    def _bracketed(self, fd: int) -> tuple[int, int, int, int]:
        """(clock before, run delay, throttled ns, clock after), retried until nothing ran in between.

        A wait for a CPU can only fall between two reads of this thread's clock if
        they are far apart; with both reads within :data:`BRACKET_NS`, whichever
        instant is taken as the span's edge, the truth and the window see the same
        waits (the probe reports none shorter than that anyway).
        """
        best = None
        for _ in range(BRACKET_TRIES):
            c0 = time.time_ns()
            rd = self.run_delay(fd)
            cg = self.cg_throttled_ns()
            c1 = time.time_ns()
            if best is None or c1 - c0 < best[3] - best[0]:
                best = (c0, rd, cg, c1)
            if c1 - c0 <= BRACKET_NS:
                break
        assert best is not None
        return best

    def begin(self) -> tuple[int, int, int, int, int]:
        """(schedstat fd, run delay, cgroup throttled ns, span start, bracket ns)."""
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        c0, rd, cg, c1 = self._bracketed(fd)
        return fd, rd, cg, c0, c1 - c0

    def end(self, fd: int, rd0: int, cg0: int) -> tuple[int, int, int, int]:
        """(span end, run delay delta, throttled delta, bracket ns)."""
        c0, rd, cg, c1 = self._bracketed(fd)
        os.close(fd)
        return c1, rd - rd0, cg - cg0, c1 - c0


BRACKET_NS = 50_000
"""The widest a counter read's clock bracket may be (below the probe's 100 µs stall threshold)."""
BRACKET_TRIES = 200


def _tracer(endpoint: str) -> tuple[Any, Any]:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "e2e-pool", "process.pid": os.getpid()}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=200))
    return provider, provider.get_tracer("tests.e2e.poolapp")


def _record(tracer: Any, name: str, start: int, end: int, run_delay: int, cg: int, extra: dict) -> dict:
    span = tracer.start_span(name, start_time=start)
    span.set_attribute("test.truth.run_delay_ns", run_delay)
    span.set_attribute("test.truth.cg_throttled_ns", cg)
    for k, v in extra.items():
        span.set_attribute(k, v)
    span.end(end_time=end)
    return {"span_id": format(span.get_span_context().span_id, "016x"), "run_delay_ns": run_delay,
            "cg_throttled_ns": cg, "tid": threading.get_native_id(), "start": start, "end": end,
            "bracket_ns": extra.get("test.truth.bracket_ns", 0)}


def _parse(request_line: bytes) -> tuple[str, dict[str, float]]:
    target = request_line.split()[1].decode()
    parts = urlsplit(target)
    return parts.path, {k: float(v[0]) for k, v in parse_qs(parts.query).items()}


def _reply(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " \
        + str(len(data)).encode() + b"\r\n\r\n" + data


# -- the thread pool --------------------------------------------------------------------


def _read_head(conn: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def serve_pool(listener: socket.socket, workers: int, downstream: str, truth: Truth, tracer: Any,
               stop: threading.Event) -> None:
    """Accept on the main thread, serve on ``workers`` pool threads (see the module docstring)."""
    tasks: queue.Queue[socket.socket | None] = queue.Queue()
    down = urlsplit(downstream) if downstream else None

    def call_downstream(ms: float) -> None:
        assert down is not None
        c = http.client.HTTPConnection(down.hostname, down.port, timeout=120)
        try:
            c.request("GET", f"/sleep?ms={ms}")
            c.getresponse().read()
        finally:
            c.close()

    def handle(conn: socket.socket) -> None:
        with conn:
            path, q = _parse(_read_head(conn).split(b"\r\n", 1)[0])
            work: Callable[[], None]
            if path == "/cpu":
                work = lambda: burn_cpu(q.get("ms", 10))  # noqa: E731
            elif path == "/down":
                work = lambda: call_downstream(q.get("ms", 50))  # noqa: E731
            else:
                conn.sendall(_reply({"ok": True}))
                return
            fd, rd0, cg0, start, gap0 = truth.begin()
            work()
            end, rd, cg, gap1 = truth.end(fd, rd0, cg0)
            conn.sendall(_reply(_record(tracer, f"pool{path}", start, end, rd, cg,
                                        {"test.class": path[1:], "test.truth.bracket_ns": max(gap0, gap1)})))

    def worker() -> None:
        while True:
            conn = tasks.get()
            if conn is None:
                return
            try:
                handle(conn)
            except Exception:  # a broken client must not kill the worker
                logger.exception("request failed")

    threads = [threading.Thread(target=worker, name=f"worker-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while not stop.is_set():
        for _ in sel.select(timeout=0.5):
            conn, _addr = listener.accept()
            conn.setblocking(True)
            tasks.put(conn)
    for _ in threads:
        tasks.put(None)
    for t in threads:
        t.join()


# -- the event loop ---------------------------------------------------------------------


async def serve_asyncio(listener: socket.socket, truth: Truth, tracer: Any, stop: threading.Event) -> None:
    """One loop serves every request (see the module docstring)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path, q = _parse(head.split(b"\r\n", 1)[0])
        if path != "/mix":
            writer.write(_reply({"ok": True}))
        else:
            fd, rd0, cg0, start, gap0 = truth.begin()
            burn_cpu(q.get("cpu", 5))
            await asyncio.sleep(q.get("wait", 20) / 1000)
            burn_cpu(q.get("cpu", 5))
            end, rd, cg, gap1 = truth.end(fd, rd0, cg0)
            writer.write(_reply(_record(tracer, "loop/mix", start, end, rd, cg,
                                        {"test.class": "mix", "test.truth.bracket_ns": max(gap0, gap1)})))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        while not stop.is_set():
            await asyncio.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("pool", "asyncio"), required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--downstream", default="")
    p.add_argument("--endpoint", required=True, help="OTLP/HTTP traces URL")
    p.add_argument("--ready-file", required=True)
    p.add_argument("--cgroup-stat", default="", help="cpu.stat of the cgroup the server runs in")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    provider, tracer = _tracer(args.endpoint)
    truth = Truth(args.cgroup_stat)
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(str(listener.getsockname()[1]))
    os.replace(tmp, args.ready_file)
    try:
        if args.kind == "pool":
            serve_pool(listener, args.workers, args.downstream, truth, tracer, stop)
        else:
            asyncio.run(serve_asyncio(listener, truth, tracer, stop))
    finally:
        provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
