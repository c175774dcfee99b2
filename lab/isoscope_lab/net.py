"""Loopback port helpers shared by the launcher, the lab, the tests and the benchmarks."""

from __future__ import annotations

import logging
import socket

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    Another process may take it before the caller binds it; prefer binding
    port 0 and reading the real port back when the program allows it (the
    daemon launcher does).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when a TCP listener could not bind ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # The same option the daemon's listeners set: a port only in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def split_hostport(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:4317"`` / ``"[::1]:4317"`` → (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)
