"""Which process sent a request: TCP peer → socket → owning pid, across network namespaces.

Applications on the node reach the daemon over loopback, or from their own
network namespace (a pod reaching the node's address through ``hostPort``, a
service behind a veth). Either way the client end of the connection is a
socket in *some* network namespace of this node: its inode leads to the
process holding it through ``/proc/<pid>/fd``. That pid is the proven sender
of every span on the connection: claims in the spans (``process.pid``,
``thread.id``, ``container.id``, ``k8s.pod.uid``) are checked against it
(:mod:`isoscope.metadata.resolver`).

Scanning fds is expensive, so the search is limited to the members of the
sender's network namespace (:class:`isoscope.host.namespaces.NamespaceIndex`)
and results are cached per connection.
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
from dataclasses import dataclass
from typing import Any

from isoscope.host.namespaces import NamespaceIndex, shared_index

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


@dataclass(slots=True)
class _Entry:
    at: float         # when it was looked up (monotonic s)
    checked: float    # when it was last verified
    pid: int
    netns: int        # 0 = the daemon's own table (loopback)
    inode: int
    gen: int = 0      # the namespace index's net_generation at lookup (a miss is retried after a change)


_V4_LOCAL = "/32 host LOCAL"


def _own_netns() -> int:
    # Namespace inodes are the same in every procfs view, so the daemon's own
    # namespace is found through its own /proc even when reading /host/proc.
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _netns_addresses(proc_root: str, rep: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses local to the network namespace of ``rep`` (``fib_trie`` host routes, ``if_inet6``)."""
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        with open(f"{proc_root}/{rep}/net/fib_trie", encoding="ascii") as fh:
            last = ""
            for line in fh:
                s = line.strip()
                if s.startswith("|-- "):
                    last = s[4:]
                elif s == _V4_LOCAL and last:
                    try:
                        out.add(ipaddress.IPv4Address(last))
                    except ValueError:
                        pass
    except OSError:
        pass
    try:
        with open(f"{proc_root}/{rep}/net/if_inet6", encoding="ascii") as fh:
            for line in fh:
                f = line.split()
                if f:
                    try:
                        out.add(ipaddress.IPv6Address(bytes.fromhex(f[0])))
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


class PeerResolver:
    """Resolve the pid owning the client end of a TCP connection to the daemon.

    Loopback peers are in the daemon's own network namespace. Any other peer
    (a pod reaching the node's address through ``hostPort``, a service in its
    own namespace behind a veth) is looked up in the sender's network
    namespace: the namespace that owns the peer address (from an address index
    over every network namespace of the node) is searched for a socket whose
    *local* end is the peer ``ip:port`` — the sender's view, before any DNAT of
    the destination — and the socket's inode is searched among the ``fd``
    links of that namespace's processes only (then, if it is held by a thread
    that joined the namespace on its own, among all processes once).

    Results are cached per connection (``peer ip:port`` → receiver port): an
    entry is re-verified against the socket table after ``verify_after_s``,
    expires after ``ttl_s``, and is dropped when its owner exits (lifecycle
    events through the shared :class:`~isoscope.host.namespaces.NamespaceIndex`)
    or when the receiver reports the connection closed (:meth:`forget`). A
    cached miss is retried at once when a network namespace changed since.

    The address index must find a new pod's first connection, yet a sender
    from many unknown addresses must not make it re-read every namespace on
    the node per request. So, on a miss: first only the namespaces that are
    new or that a namespace event (created, entered: how a CNI plugin or
    ``ip netns`` configures addresses) touched less than ``changed_settle_s``
    before they were last read are re-read, at most every ``changed_reread_s``
    (work bounded by namespace churn, not by the sender); then the whole index
    is rebuilt, at most every ``address_refresh_s``.

    Args:
        proc_root: procfs mount to read (``/proc``; the host's procfs when the
            daemon runs in a container with ``hostPID``).
        max_entries: LRU capacity (connections remembered).
        ttl_s: how long a result (including "unknown") is used at most.
        verify_after_s: a cached owner older than this is checked against the
            socket table again (a port reused by another process is noticed).
        namespaces: the namespace index; the shared one of ``proc_root`` by default.
        address_refresh_s: minimum interval between full rebuilds of the address
            index when a peer address is not found in it.
        changed_settle_s: how long after a namespace event its addresses are still
            re-read on a miss (an address is configured just after the namespace is entered).
        changed_reread_s: minimum interval between re-reads of changed namespaces.
    """

    def __init__(self, proc_root: str = "/proc", *, max_entries: int = 4096, ttl_s: float = 30.0,
                 verify_after_s: float = 1.0, namespaces: NamespaceIndex | None = None,
                 address_refresh_s: float = 1.0, changed_settle_s: float = 5.0,
                 changed_reread_s: float = 0.05) -> None:
        self._proc = proc_root
        self._max = max_entries
        self._ttl = ttl_s
        self._verify_after = min(verify_after_s, ttl_s)
        self._ns = namespaces if namespaces is not None else shared_index(proc_root)
        self._ns.add_exit_listener(self._owner_exited)
        self._cache: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._addr_lock = threading.Lock()
        self._addrs: dict[int, set[Any]] = {}   # netns -> local addresses
        self._addr_built = -1e18
        self._addr_refresh = address_refresh_s
        self._addr_read: dict[int, float] = {}  # netns -> when its addresses were read
        self._settle = changed_settle_s
        self._reread_every = changed_reread_s
        self._reread_at = -1e18
        self.stats = {"lookups": 0, "fd_scans": 0, "full_fd_scans": 0, "ambiguous": 0, "address_rebuilds": 0,
                      "address_rereads": 0}

    # -- public ---------------------------------------------------------------------

    def resolve(self, peer_ip: str, peer_port: int, local_port: int) -> int:
        """Pid owning the socket ``peer_ip:peer_port`` connected to our ``local_port``.

        Args:
            peer_ip: the client's address as seen by the server.
            peer_port: the client's port.
            local_port: the server's listening port the client connected to.

        Returns:
            The host pid, or 0 if it cannot be found (a peer on another host,
            process gone, address translated, ambiguous). Never raises.
        """
        key = (peer_ip, peer_port, local_port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        # An owner found is kept for the connection's life (re-verified now and then); a miss only
        # briefly, so a keep-alive connection whose first lookup raced its socket is found soon.
        if hit is not None and not hit.pid and hit.gen != self._ns.net_generation:
            hit = None  # a namespace was created or entered since this miss: look again now
        if hit is not None and now - hit.at < (self._ttl if hit.pid else self._verify_after):
            if now - hit.checked < self._verify_after or self._still_valid(hit, peer_ip, peer_port):
                with self._lock:
                    hit.checked = now
                    if key in self._cache:
                        self._cache.move_to_end(key)
                return hit.pid
        gen = self._ns.net_generation
        try:
            entry = self._lookup(peer_ip, peer_port, local_port, now)
        except Exception:  # resolution is best effort: never fail a request over it
            logger.debug("peer lookup failed for %s:%d", peer_ip, peer_port, exc_info=True)
            entry = _Entry(now, now, 0, 0, 0)
        entry.gen = gen
        with self._lock:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return entry.pid

    def forget(self, peer_ip: str, peer_port: int) -> None:
        """The connection from ``peer_ip:peer_port`` closed: drop what is cached about it."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == peer_ip and k[1] == peer_port]:
                del self._cache[key]

    def cache_size(self) -> int:
        """Number of cached connections."""
        with self._lock:
            return len(self._cache)

    # -- invalidation -------------------------------------------------------------------

    def _owner_exited(self, pid: int) -> None:
        with self._lock:
            for key in [k for k, e in self._cache.items() if e.pid == pid]:
                del self._cache[key]

    def _still_valid(self, e: _Entry, peer_ip: str, peer_port: int) -> bool:
        if not e.pid or not e.inode:
            return False  # unknown answers are not re-verified, only aged out
        want = _norm(peer_ip)
        if want is None:
            return False
        base = self._table_base(e.netns)
        if base is None:
            return False
        found = self._sockets(base, want, peer_port)
        if e.inode not in (inode for inode, _rport in found):
            return False
        # Same socket: the owner only changes if it exited (dropped through the listener).
        return os.path.isdir(f"{self._proc}/{e.pid}")

    # -- lookup -------------------------------------------------------------------------

    def _table_base(self, netns: int) -> str | None:
        if netns == 0:
            return self._proc
        rep = self._ns.representative(netns)
        return f"{self._proc}/{rep}" if rep else None

    def _lookup(self, peer_ip: str, peer_port: int, local_port: int, now: float) -> _Entry:
        self.stats["lookups"] += 1
        want = _norm(peer_ip)
        if want is None:
            return _Entry(now, now, 0, 0, 0)
        if want.is_loopback:
            found = [(inode, rport) for inode, rport in self._sockets(self._proc, want, peer_port)
                     if rport == local_port]
            if len(found) != 1:
                return _Entry(now, now, 0, 0, 0)
            inode = found[0][0]
            pid = self._owner(inode, self._ns.netns_members(_own_netns()) if _own_netns() else [])
            return _Entry(now, now, pid, 0, inode)
        hits = self._search_namespaces(want, peer_port, local_port)
        if len(hits) != 1:
            if len(hits) > 1:
                self.stats["ambiguous"] += 1
                logger.debug("peer %s:%d matches sockets in %d namespaces: not attributed",
                             peer_ip, peer_port, len(hits))
            return _Entry(now, now, 0, 0, 0)
        netns, inode = hits[0]
        return _Entry(now, now, self._owner(inode, self._ns.netns_members(netns)), netns, inode)

    def _search_namespaces(self, want: Any, peer_port: int, local_port: int) -> list[tuple[int, int]]:
        """(netns, inode) of sockets whose local end is ``want:peer_port``, in the namespaces owning ``want``."""
        hits: list[tuple[int, int, bool]] = []
        # The index as it is; then with new and just-changed namespaces re-read; then rebuilt
        # (rate-limited). A cached owner can be stale (its namespace is gone and a new pod holds
        # the address): finding no socket is a miss like an unknown address.
        for mode in ("cached", "changed", "full"):
            index = self._address_index(mode)
            if index is None:
                continue  # nothing new to look at
            for netns in [ns for ns, addrs in index.items() if want in addrs]:
                base = self._table_base(netns)
                if base is None:
                    continue
                for inode, rport in self._sockets(base, want, peer_port):
                    hits.append((netns, inode, rport == local_port))
            if hits:
                break
        # The destination port the sender sees may differ from ours (DNAT): prefer an exact
        # match, accept a unique source match.
        exact = [(n, i) for n, i, same in hits if same]
        return exact if exact else [(n, i) for n, i, _ in hits]

    def _address_index(self, mode: str) -> dict[int, set[Any]] | None:
        """The address index for a lookup step (``cached``, ``changed``, ``full``); None: unchanged, skip."""
        with self._addr_lock:
            now = time.monotonic()
            if not self._addrs or now - self._addr_built > 30.0:
                self._rebuild(now)
                return self._addrs
            if mode == "cached":
                return self._addrs
            if mode == "changed":
                return self._addrs if self._reread_changed(now) else None
            if now - self._addr_built <= self._addr_refresh:
                return None
            self._ns.rescan_on_miss()
            self._rebuild(time.monotonic())
            return self._addrs

    def _rebuild(self, now: float) -> None:
        addrs = {}
        for netns, rep in self._ns.network_namespaces().items():
            addrs[netns] = _netns_addresses(self._proc, rep)
        self._addrs = addrs
        self._addr_read = dict.fromkeys(addrs, now)
        self._addr_built = now
        self.stats["address_rebuilds"] += 1

    def _reread_changed(self, now: float) -> bool:
        """Re-read new namespaces and those changed shortly before their last read; True if any was."""
        if now - self._reread_at < self._reread_every:
            return False
        changes = self._ns.net_changes()
        nets = self._ns.network_namespaces()
        todo = [(ns, rep) for ns, rep in nets.items()
                if ns not in self._addrs or self._addr_read.get(ns, -1e18) < changes.get(ns, -1e18) + self._settle]
        if not todo:
            return False
        self._reread_at = now
        addrs = {ns: a for ns, a in self._addrs.items() if ns in nets}  # namespaces gone: dropped
        for ns, rep in todo:
            addrs[ns] = _netns_addresses(self._proc, rep)
            self._addr_read[ns] = now
        for ns in [ns for ns in self._addr_read if ns not in addrs]:
            del self._addr_read[ns]
        self._addrs = addrs
        self.stats["address_rereads"] += len(todo)
        return True

    @staticmethod
    def _sockets(base: str, want: Any, peer_port: int) -> list[tuple[int, int]]:
        """(inode, remote port) of every socket in ``<base>/net/tcp{,6}`` whose local end is ``want:peer_port``."""
        out: list[tuple[int, int]] = []
        for name in ("tcp", "tcp6"):
            try:
                with open(f"{base}/net/{name}", encoding="ascii") as fh:
                    next(fh, None)  # header
                    for line in fh:
                        f = line.split()
                        # Any state: a client that already half-closed still owns its socket.
                        if len(f) < 10 or f[9] == "0":
                            continue
                        # Cheap port check before decoding addresses.
                        if int(f[1].rsplit(":", 1)[1], 16) != peer_port:
                            continue
                        laddr, _ = _parse_hex_addr(f[1])
                        if laddr == want:
                            out.append((int(f[9]), int(f[2].rsplit(":", 1)[1], 16)))
            except OSError:
                continue
        return out

    def _owner(self, inode: int, members: list[int]) -> int:
        """Pid holding ``socket:[inode]``: among ``members`` first, then (once) among all processes."""
        target = f"socket:[{inode}]"
        self.stats["fd_scans"] += 1
        for pid in members:
            if self._holds(str(pid), target):
                return pid
        self.stats["full_fd_scans"] += 1
        skip = set(members)
        try:
            names = os.listdir(self._proc)
        except OSError:
            return 0
        for name in names:
            if name.isdigit() and int(name) not in skip and self._holds(name, target):
                return int(name)
        return 0

    def _holds(self, pid: str, target: str) -> bool:
        fd_dir = os.path.join(self._proc, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            return False  # process gone or not ours to read
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    return True
            except OSError:
                continue
        return False


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
