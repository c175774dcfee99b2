"""Which local process sent a request: loopback TCP peer → pid.

Applications on the node talk to the daemon over loopback, so the client end
of the connection is a socket in this host's ``/proc/net/tcp{,6}``. Its inode
leads to the process holding it through ``/proc/<pid>/fd``. That pid is the
fallback identity for spans that carry no ``process.pid`` of their own.

Scanning every process's fds is expensive, so results are cached per
connection (a connection's owner does not change) in a bounded LRU with a TTL
(ports are reused after a connection closes).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict

logger = logging.getLogger(__name__)

def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _parse_hex_addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode ``0100007F:1F90`` (kernel byte order per 32-bit word) into (ip, port)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints each 32-bit word of the address in host byte order.
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    fixed = b"".join(struct.pack(">I", w) for w in words)
    addr = ipaddress.ip_address(fixed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(port, 16)


def _norm(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


class PeerResolver:
    """Resolve the pid owning the client end of a loopback TCP connection.

    Args:
        proc_root: procfs mount to read (``/proc``; the host's procfs when the
            daemon runs in a container with ``hostPID``).
        max_entries: LRU capacity (connections remembered).
        ttl_s: how long a result (including "unknown") is trusted.
    """

    def __init__(self, proc_root: str = "/proc", *, max_entries: int = 4096, ttl_s: float = 30.0) -> None:
        self._proc = proc_root
        self._max = max_entries
        self._ttl = ttl_s
        self._cache: OrderedDict[tuple[str, int, int], tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, peer_ip: str, peer_port: int, local_port: int) -> int:
        """Pid owning the socket ``peer_ip:peer_port`` connected to our ``local_port``.

        Args:
            peer_ip: the client's address as seen by the server.
            peer_port: the client's port.
            local_port: the server's listening port the client connected to.

        Returns:
            The pid, or 0 if it cannot be found (non-loopback peer, process
            gone, no permission). Never raises.
        """
        key = (peer_ip, peer_port, local_port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < self._ttl:
                self._cache.move_to_end(key)
                return hit[1]
        try:
            pid = self._lookup(peer_ip, peer_port, local_port)
        except Exception:  # resolution is best effort: never fail a request over it
            logger.debug("peer lookup failed for %s:%d", peer_ip, peer_port, exc_info=True)
            pid = 0
        with self._lock:
            self._cache[key] = (now, pid)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return pid

    def cache_size(self) -> int:
        """Number of cached connections."""
        with self._lock:
            return len(self._cache)

    def _lookup(self, peer_ip: str, peer_port: int, local_port: int) -> int:
        want = _norm(peer_ip)
        if want is None or not want.is_loopback:
            return 0
        inode = self._find_inode(want, peer_port, local_port)
        if inode == 0:
            return 0
        return self._find_pid(inode)

    def _find_inode(self, want: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    peer_port: int, local_port: int) -> int:
        for name in ("tcp", "tcp6"):
            path = os.path.join(self._proc, "net", name)
            try:
                with open(path, encoding="ascii") as fh:
                    next(fh, None)  # header
                    for line in fh:
                        f = line.split()
                        # Any state: a client that already half-closed still owns its socket.
                        if len(f) < 10 or f[9] == "0":
                            continue
                        # Cheap port checks before decoding addresses.
                        if int(f[1].rsplit(":", 1)[1], 16) != peer_port:
                            continue
                        if int(f[2].rsplit(":", 1)[1], 16) != local_port:
                            continue
                        laddr, _ = _parse_hex_addr(f[1])
                        if laddr == want:
                            return int(f[9])
            except OSError:
                continue
        return 0

    def _find_pid(self, inode: int) -> int:
        target = f"socket:[{inode}]"
        try:
            entries = os.scandir(self._proc)
        except OSError:
            return 0
        with entries:
            for ent in entries:
                if not ent.name.isdigit():
                    continue
                fd_dir = os.path.join(ent.path, "fd")
                try:
                    fds = os.listdir(fd_dir)
                except OSError:
                    continue  # process gone or not ours to read
                for fd in fds:
                    try:
                        if os.readlink(os.path.join(fd_dir, fd)) == target:
                            return int(ent.name)
                    except OSError:
                        continue
        return 0


def split_peer(peer: str) -> tuple[str, int] | None:
    """Split ``ip:port`` / ``[v6]:port`` / gRPC ``ipv4:ip:port`` into (ip, port)."""
    s = peer
    for prefix in ("ipv4:", "ipv6:"):
        if s.startswith(prefix):
            s = s[len(prefix):]
            break
    else:
        if ":" not in s or s.startswith("unix:"):
            return None
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        return None


def format_addr(ip: str, port: int) -> str:
    """``ip:port``, bracketing IPv6 addresses."""
    try:
        socket.inet_pton(socket.AF_INET6, ip)
        return f"[{ip}]:{port}"
    except OSError:
        return f"{ip}:{port}"
