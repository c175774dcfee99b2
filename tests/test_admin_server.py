"""The admin HTTP server against hostile clients, over real loopback sockets.

Idle and slow-loris connections, a connection flood beyond the cap, oversized
requests, and the opt-in ``/debug/status``. Time bounds are generous upper
limits (a busy machine must pass); lower bounds are the server's own timeouts,
which it can never beat.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest

from isoscope.metrics.admin import AdminServer
from isoscope.metrics.prometheus import PrometheusExporter
from isoscope.model import Stats

SLACK_S = 10.0
"""Generous bound for anything that should happen 'at once' or 'right after a timeout'."""


def get(host: str, port: int, path: str, timeout: float = SLACK_S) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def admin_factory() -> Iterator[Callable[..., AdminServer]]:
    servers: list[AdminServer] = []

    def make(**kwargs) -> AdminServer:
        kwargs.setdefault("metrics", PrometheusExporter(Stats()))
        kwargs.setdefault("ready", lambda: (True, "ready"))
        server = AdminServer("127.0.0.1", 0, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


def _connect(addr: tuple[str, int]) -> socket.socket:
    return socket.create_connection(addr, timeout=SLACK_S)


def _wait_closed(socks: list[socket.socket], timeout: float, count: int | None = None) -> dict[socket.socket, float]:
    """Wait until the server closed ``count`` (default: all) sockets.

    Returns:
        socket → monotonic time its EOF was seen.
    """
    closed: dict[socket.socket, float] = {}
    want = len(socks) if count is None else count
    deadline = time.monotonic() + timeout
    while len(closed) < want and time.monotonic() < deadline:
        pending = [s for s in socks if s not in closed]
        readable, _, _ = select.select(pending, [], [], 0.5)
        for s in readable:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"unexpected bytes on an idle connection: {data[:80]!r}"
            closed[s] = time.monotonic()
    return closed


def _admin_threads(server: AdminServer) -> int:
    prefix = f"isoscope-admin-{server.address[1]}"
    return sum(1 for t in threading.enumerate() if t.name == prefix or t.name.startswith(prefix + "-"))


def test_hundreds_of_idle_connections_cost_no_threads_and_readyz_still_answers(admin_factory) -> None:
    server = admin_factory(read_timeout_s=2.0, max_connections=64, workers=2)
    addr = server.address
    idle = [_connect(addr) for _ in range(500)]
    try:
        assert server.open_connections <= 64
        # One loop thread and at most the fixed worker pool, however many clients wait.
        assert _admin_threads(server) == 1 + 2
        status, body = get(*addr, "/readyz")
        assert (status, body) == (200, b"ready\n")
        closed = _wait_closed(idle, timeout=server.read_timeout_s + SLACK_S)
        assert len(closed) == len(idle), f"{len(idle) - len(closed)} idle connections still open"
        counts = server.counts()
        # Each idle connection was either replaced by a newer one (cap) or timed out; never served.
        assert counts["evicted"] + counts["timed_out"] == len(idle) and counts["timed_out"] >= 1
        assert server.open_connections == 0
    finally:
        for s in idle:
            s.close()


def test_idle_connections_are_closed_after_the_read_timeout(admin_factory) -> None:
    server = admin_factory(read_timeout_s=1.5, max_connections=64)
    opened: dict[socket.socket, float] = {}
    for _ in range(20):
        t0 = time.monotonic()
        opened[_connect(server.address)] = t0
    try:
        closed = _wait_closed(list(opened), timeout=server.read_timeout_s + SLACK_S)
        assert len(closed) == len(opened)
        for s, at in closed.items():
            assert at - opened[s] >= server.read_timeout_s  # never before the timeout
        assert server.counts()["timed_out"] == 20 and "evicted" not in server.counts()
    finally:
        for s in opened:
            s.close()


def test_slow_loris_trickling_a_request_is_closed_at_the_read_timeout(admin_factory) -> None:
    server = admin_factory(read_timeout_s=1.5)
    t0 = time.monotonic()
    s = _connect(server.address)
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        received = b""
        closed_at = None
        # Keep trickling one header byte at a time, well inside the timeout each time.
        while time.monotonic() - t0 < server.read_timeout_s + SLACK_S:
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed_at = time.monotonic()
                    break
                received += chunk
        assert closed_at is not None, "a trickling client kept its connection past the read timeout"
        assert closed_at - t0 >= server.read_timeout_s
        assert received == b""  # never answered: the request never completed
        assert server.counts()["timed_out"] == 1
    finally:
        s.close()


def _healthz_over(s: socket.socket) -> bytes:
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def test_connection_cap_replaces_the_longest_waiting_idle_connection(admin_factory) -> None:
    # Long timeout: only the cap can close anything during this test.
    server = admin_factory(read_timeout_s=120.0, max_connections=8)
    socks = [_connect(server.address) for _ in range(20)]
    try:
        closed = _wait_closed(socks, timeout=SLACK_S, count=12)
        assert set(closed) == set(socks[:12]), "the oldest idle connections are the ones replaced"
        # The server closes the evicted connection before it registers the new one: the twelfth close
        # can be seen a moment before the twentieth connection is counted.
        deadline = time.monotonic() + SLACK_S
        while server.open_connections != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.open_connections == 8
        # The eight newest are still served.
        for s in socks[12:]:
            assert _healthz_over(s).startswith(b"HTTP/1.1 200 OK")
        assert server.counts()["evicted"] == 12 and "refused" not in server.counts()
    finally:
        for s in socks:
            s.close()


def test_connection_beyond_the_cap_is_closed_at_once_when_all_are_busy(admin_factory) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_ready() -> tuple[bool, str]:
        entered.release()
        release.wait(SLACK_S * 3)
        return True, "ready"

    server = admin_factory(read_timeout_s=120.0, max_connections=4, workers=4, ready=slow_ready)
    busy = [_connect(server.address) for _ in range(4)]
    extra = None
    try:
        for s in busy:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in busy:  # all four requests are being served
            assert entered.acquire(timeout=SLACK_S)
        extra = _connect(server.address)
        assert _wait_closed([extra], timeout=SLACK_S), "the connection beyond the cap was kept"
        assert server.counts()["refused"] == 1 and "evicted" not in server.counts()
        release.set()
        for s in busy:
            s.settimeout(SLACK_S)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        release.set()
        for s in busy + ([extra] if extra else []):
            s.close()


def test_debug_status_is_off_unless_enabled(admin_factory) -> None:
    doc = {"probes": {"sched": "attached"}, "workloads": 3}
    off = admin_factory(status=lambda: doc)
    assert get(*off.address, "/debug/status")[0] == 404
    on = admin_factory(status=lambda: doc, debug_status=True)
    status, body = get(*on.address, "/debug/status")
    assert status == 200 and json.loads(body) == doc
    no_doc = admin_factory(debug_status=True)
    assert get(*no_doc.address, "/debug/status")[0] == 404


def test_keep_alive_and_pipelined_requests_on_one_connection(admin_factory) -> None:
    server = admin_factory()
    conn = http.client.HTTPConnection(*server.address, timeout=SLACK_S)
    try:
        for path, code in (("/healthz", 200), ("/readyz", 200), ("/nope", 404), ("/metrics", 200)):
            conn.request("GET", path)
            resp = conn.getresponse()
            assert resp.status == code
            resp.read()
    finally:
        conn.close()
    s = _connect(server.address)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"ready\n")
    finally:
        s.close()


def test_oversized_request_head_is_refused(admin_factory) -> None:
    server = admin_factory(max_request_bytes=1024)
    s = _connect(server.address)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 4096 + b"\r\n\r\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        assert out.startswith(b"HTTP/1.1 431 ")
        assert server.counts()["too_large"] == 1
    finally:
        s.close()


def test_request_with_a_body_is_answered_then_closed(admin_factory) -> None:
    server = admin_factory()
    s = _connect(server.address)
    try:
        # The body would be read as a second request if the connection were kept open.
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 33\r\n\r\n"
                  b"GET /debug/status HTTP/1.1\r\n\r\n\r\n")
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        assert out.startswith(b"HTTP/1.1 200 OK") and out.count(b"HTTP/1.1") == 1
        assert b"Connection: close" in out
    finally:
        s.close()


def test_shutdown_closes_connections_and_frees_the_port(admin_factory) -> None:
    server = admin_factory(read_timeout_s=120.0)
    s = _connect(server.address)
    try:
        server.shutdown()
        assert _wait_closed([s], timeout=SLACK_S)
        assert _admin_threads(server) == 0
        # The port is free again: a new server can bind it.
        again = AdminServer(*server.address, metrics=None, ready=lambda: (True, ""))
        again.start()
        again.shutdown()
        server.shutdown()  # idempotent
    finally:
        s.close()
