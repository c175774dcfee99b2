"""The admin HTTP server: ``/metrics``, ``/healthz``, ``/readyz`` and (opt-in) ``/debug/status``.

The port is reachable from the pod network, so the server assumes hostile
clients. One event-loop thread owns every socket (non-blocking, ``selectors``);
a small fixed pool of worker threads turns complete requests into responses.
No thread ever waits on a client, so idle or slow connections cost a file
descriptor and a few hundred bytes, not a thread:

* **read timeout**: a connection must deliver a complete request head within
  ``read_timeout_s`` of starting to wait for it (accept, or the end of the
  previous response); trickling one byte at a time does not extend it
  (slow-loris). Writing a response has the same bound.
* **connection cap**: at most ``max_connections`` are open. A new connection
  beyond the cap replaces the connection that has waited longest without
  sending a complete request, so idle connections cannot lock health probes
  out; when every open connection has a request in progress the new one is
  closed at once.
* **bounded request head** (``max_request_bytes``); request bodies are never
  read (the connection is closed after the response instead).

Requests are parsed by the standard library's ``BaseHTTPRequestHandler`` over
in-memory buffers, so only the transport is custom.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import logging
import queue
import re
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Mapping, Protocol

logger = logging.getLogger(__name__)

__all__ = ["AdminServer", "MetricsSource", "ReadyCheck", "StatusSource"]

DEFAULT_READ_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_WORKERS = 4
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024
_LISTEN_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
_ACCEPT_BATCH = 256  # accepts per loop turn, so a connection flood cannot starve reads and writes
_RECV_SIZE = 8192
_ACCEPT_PAUSE_S = 0.5  # after accept() fails for lack of file descriptors
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class ReadyCheck(Protocol):
    """``/readyz`` callback: ``(ready, reason)``."""

    def __call__(self) -> tuple[bool, str]: ...


class StatusSource(Protocol):
    """``/debug/status`` callback: a JSON-serialisable document."""

    def __call__(self) -> Mapping[str, Any]: ...


class MetricsSource(Protocol):
    """What ``/metrics`` renders (``isoscope.metrics.prometheus.PrometheusExporter``)."""

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """``(body, content type)`` for an HTTP ``Accept`` header."""
        ...


class _Conn:
    """One client connection, owned by the event-loop thread."""

    __slots__ = ("sock", "fd", "addr", "buf", "out", "state", "since", "close_after", "events")

    READING, BUSY, WRITING, CLOSED = "reading", "busy", "writing", "closed"

    def __init__(self, sock: socket.socket, addr: Any, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.state = _Conn.READING
        self.since = now  # start of the current read or write phase; its deadline counts from here
        self.close_after = False
        self.events = 0  # selector interest currently registered (0: not registered)


class AdminServer:
    """Serves the admin endpoints from one event-loop thread and a bounded worker pool.

    Endpoints: ``/metrics`` (content-negotiated like Prometheus' client library,
    gzip when accepted), ``/healthz`` (200 while the server runs), ``/readyz``
    (200 or 503 with the reason from ``ready``), ``/debug/status`` (JSON from
    ``status``; 404 unless ``debug_status`` is on, because it lists workloads
    and probe internals).

    Args:
        host: listen address (an IPv6 address binds an IPv6 socket).
        port: listen port; 0 picks a free one.
        metrics: the metrics to render; None answers ``/metrics`` with 404.
        ready: readiness callback; an exception counts as not ready.
        status: ``/debug/status`` document callback.
        debug_status: serve ``/debug/status`` (off by default).
        read_timeout_s: time a connection gets to deliver a complete request head,
            and to take a complete response.
        max_connections: open connections at most.
        workers: threads rendering responses.
        max_request_bytes: largest request head accepted (431 beyond).
    """

    def __init__(self, host: str, port: int, *, metrics: MetricsSource | None, ready: ReadyCheck,
                 status: StatusSource | None = None, debug_status: bool = False,
                 read_timeout_s: float = DEFAULT_READ_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 workers: int = DEFAULT_WORKERS, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if read_timeout_s <= 0 or max_connections < 1 or workers < 1 or max_request_bytes < 256:
            raise ValueError("read_timeout_s, max_connections, workers and max_request_bytes must be positive "
                             "(max_request_bytes >= 256)")
        self._host = host
        self._port = port
        self._app = _App(metrics, ready, status if debug_status else None)
        self.read_timeout_s = float(read_timeout_s)
        self.max_connections = int(max_connections)
        self._n_workers = int(workers)
        self._max_request = int(max_request_bytes)
        self._listener: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._workers: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[tuple[_Conn, bytes] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Insertion order = order connections started waiting: the first READING one is the eviction victim.
        self._conns: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._done: queue.SimpleQueue[tuple[_Conn, bytes, bool]] = queue.SimpleQueue()
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._address: tuple[str, int] | None = None
        self._accept_paused_until = 0.0

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind and start serving on a background thread.

        Returns:
            The bound ``(host, port)``.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: already started (or started and shut down).
        """
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("already serving (an AdminServer starts once)")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.create_server((self._host, self._port), family=family, backlog=_LISTEN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        bound = listener.getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        name = f"isoscope-admin-{self._address[1]}"
        self._workers = [threading.Thread(target=self._work, name=f"{name}-worker-{i}", daemon=True)
                         for i in range(self._n_workers)]
        for worker in self._workers:
            worker.start()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        logger.info("admin server listening on http://%s:%d (/metrics, /healthz, /readyz)", *self._address)
        return self._address

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound ``(host, port)`` once started."""
        return self._address

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close every connection (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake()
        thread.join(timeout=timeout_s)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            # A worker stuck in a callback (a hung readiness check) is a daemon thread: not waited for.
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._workers = []
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()

    def counts(self) -> dict[str, int]:
        """Connection events so far: ``accepted``, ``evicted``, ``refused``, ``timed_out``, ``too_large``."""
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, event: str) -> None:
        with self._counts_lock:
            self._counts[event] += 1

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._conns)

    # -- event loop -------------------------------------------------------------

    def _wake(self) -> None:
        try:
            assert self._wake_w is not None
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a full wake pipe already guarantees a wake-up; a closed one means we are stopping

    def _loop(self) -> None:
        assert self._sel is not None
        try:
            while not self._stop.is_set():
                for key, mask in self._sel.select(self._next_timeout()):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._on_event(key.data, mask)
                self._finish_responses()
                now = time.monotonic()
                self._expire(now)
                if self._accept_paused_until and now >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        except Exception:
            logger.exception("admin server loop failed; admin endpoints are down")
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ and conn.state == _Conn.READING:
            self._safely(conn, self._on_readable)
        if mask & selectors.EVENT_WRITE and conn.state == _Conn.WRITING:
            self._safely(conn, self._flush)

    def _safely(self, conn: _Conn, step: Callable[..., None], *args: Any) -> None:
        try:
            step(conn, *args)
        except Exception:  # one broken connection must not take the endpoints down
            logger.exception("admin server: dropping connection from %s", conn.addr)
            self._close(conn)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        wake_at = [c.since + self.read_timeout_s for c in self._conns.values() if c.state != _Conn.BUSY]
        if self._accept_paused_until:
            wake_at.append(self._accept_paused_until)
        return max(0.0, min([1.0] + [t - now for t in wake_at]))

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: the connection stays in the backlog and the listener stays
                # readable; stop watching it for a moment instead of spinning on it.
                logger.warning("admin server: accept failed, pausing accepts: %s", exc)
                assert self._sel is not None
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S
                return
            self._count("accepted")
            if len(self._conns) >= self.max_connections and not self._evict_one():
                self._count("refused")
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, addr, time.monotonic())
            self._conns[conn.fd] = conn
            self._watch(conn, selectors.EVENT_READ)
            # The request often arrived with the handshake: take it now, before a burst of
            # later connections could make this one the longest-waiting.
            self._safely(conn, self._on_readable)

    def _evict_one(self) -> bool:
        """Close the connection waiting longest for a request; False when all are busy."""
        for conn in self._conns.values():
            if conn.state == _Conn.READING:
                self._count("evicted")
                self._close(conn)
                return True
        return False

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._dispatch(conn)

    def _dispatch(self, conn: _Conn) -> None:
        """Hand a complete request head to a worker; refuse an oversized one."""
        m = _HEAD_END.search(conn.buf, 0, self._max_request + 4)
        if m is None:
            if len(conn.buf) > self._max_request:
                self._count("too_large")
                self._respond(conn, _error_response(431, "request header fields too large"), close=True)
            return
        head = bytes(conn.buf[:m.end()])
        del conn.buf[:m.end()]
        conn.state = _Conn.BUSY
        # Nothing is read while the request is served: pipelined requests wait in the
        # socket buffer, and a level-triggered selector must not report them meanwhile.
        self._watch(conn, 0)
        self._jobs.put((conn, head))

    def _work(self) -> None:
        """Worker thread: turn request heads into responses for the loop thread, which owns the sockets."""
        while (job := self._jobs.get()) is not None:
            conn, head = job
            try:
                body, close = self._app.handle(head, conn.addr)
            except Exception:
                logger.exception("admin request failed")
                body, close = _error_response(500, "internal error"), True
            self._done.put((conn, body, close))
            self._wake()

    def _finish_responses(self) -> None:
        while True:
            try:
                conn, body, close = self._done.get_nowait()
            except queue.Empty:
                return
            if self._conns.get(conn.fd) is conn:
                self._safely(conn, self._respond, body, close)

    def _respond(self, conn: _Conn, body: bytes, close: bool) -> None:
        conn.state = _Conn.WRITING
        conn.out = memoryview(body)
        conn.close_after = close
        conn.since = time.monotonic()
        self._flush(conn)
        if conn.state == _Conn.WRITING:
            self._watch(conn, selectors.EVENT_WRITE)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            conn.out = conn.out[sent:]
        if conn.close_after:
            self._close(conn)
            return
        # Keep-alive: wait for the next request, with a fresh deadline, at the back of the eviction order.
        conn.state = _Conn.READING
        conn.since = time.monotonic()
        self._conns.move_to_end(conn.fd)
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:
            self._dispatch(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        """Set the selector interest of ``conn`` (0 removes it)."""
        assert self._sel is not None
        if events == conn.events:
            return
        if not events:
            self._sel.unregister(conn.sock)
        elif conn.events:
            self._sel.modify(conn.sock, events, conn)
        else:
            self._sel.register(conn.sock, events, conn)
        conn.events = events

    def _expire(self, now: float) -> None:
        limit = now - self.read_timeout_s
        for conn in [c for c in self._conns.values() if c.state != _Conn.BUSY and c.since <= limit]:
            self._count("timed_out")
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is not conn:
            return  # already closed (its fd number may belong to a newer connection now)
        del self._conns[conn.fd]
        self._watch(conn, 0)
        conn.state = _Conn.CLOSED
        conn.sock.close()


def _error_response(code: int, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {code} {text.title()}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _App:
    """The routes; runs on worker threads."""

    def __init__(self, metrics: MetricsSource | None, ready: Callable[[], tuple[bool, str]],
                 status: Callable[[], Mapping[str, Any]] | None) -> None:
        self.metrics = metrics
        self.ready = ready
        self.status = status

    def handle(self, head: bytes, client_address: Any) -> tuple[bytes, bool]:
        """Serve one request head; returns ``(response bytes, close the connection)``."""
        handler = _Handler(self, head, client_address)
        return handler.wfile.getvalue(), bool(handler.close_connection)


class _Handler(BaseHTTPRequestHandler):
    """The standard library's request parsing over in-memory buffers (no socket)."""

    protocol_version = "HTTP/1.1"

    def __init__(self, app: _App, head: bytes, client_address: Any) -> None:  # noqa: D107
        # Not calling super().__init__: it would read from and write to a socket.
        self.app = app
        self.client_address = client_address
        self.rfile = io.BytesIO(head)
        self.wfile = io.BytesIO()
        self.close_connection = True
        self.handle_one_request()

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
            # A body is never read, so its bytes must not be taken for the next request.
            self.close_connection = True
        path = self.path.split("?", 1)[0]
        app = self.app
        try:
            if path == "/metrics" and app.metrics is not None:
                body, ctype = app.metrics.render_for(self.headers.get("Accept", ""))
                self._send(200, body, ctype)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                try:
                    ok, reason = app.ready()
                except Exception as exc:  # a broken check means "not ready", never a crash
                    logger.exception("readiness check failed")
                    ok, reason = False, f"readiness check failed: {exc}"
                text = (reason or ("ready" if ok else "not ready")) + "\n"
                self._send(200 if ok else 503, text.encode(), "text/plain; charset=utf-8")
            elif path == "/debug/status" and app.status is not None:
                body = json.dumps(app.status(), default=str, indent=2).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except Exception:
            logger.exception("error serving %s", path)
            self.close_connection = True
            self._headers_buffer = []  # drop a half-built response
            self.wfile.seek(0)
            self.wfile.truncate()
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        if len(body) > 1024 and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            encoding: str | None = "gzip"
        else:
            encoding = None
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def version_string(self) -> str:
        """``Server`` header: no Python version for a port open to the pod network."""
        return "isoscope"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s - " + format, self.address_string(), *args)
