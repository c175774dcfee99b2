"""Who lives in which namespace: network namespace → pids, PID namespace → pids.

Built once from ``/proc/*/ns/{net,pid}`` (two ``readlink`` per process), then
kept current from the daemon's lifecycle events (exec, fork, exit, unshare,
setns, clone with new namespaces) and a bounded rescan: a full rescan happens
at most every ``min_rescan_s`` when a lookup misses (a process that forked
while nobody watched it) and every ``refresh_s`` otherwise, never per span.

The index answers three questions the identity checks ask:

* which processes share a network namespace (a TCP socket's owner is searched
  among them only);
* which host pid a pid *as seen inside a PID namespace* is (``NSpid``
  translation among that namespace's members, never a ``/proc`` scan per span);
* which host tid a tid seen inside a process's PID namespace is, and whether it
  is a thread of that process at all.

Two more things are kept for the peer resolver and the pipeline:

* when each network namespace last changed (created, entered: a namespace
  event of one of its members), so the peer resolver re-reads the addresses of
  just that namespace when a connection arrives from an unknown address, and
  ``net_generation``, bumped by every such change (cached misses are retried);
* for ``exit_grace_s`` after a process exits, its namespaces and thread table
  (a *tombstone*): spans it sent just before exiting are resolved after it is
  gone (they are held for the kernel data of their window first).

Everything takes the procfs root as a parameter (``/host/proc`` in a pod).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable

from isoscope.host import cgroupfs
from isoscope.model import LifecycleEvent, LifecycleKind

logger = logging.getLogger(__name__)

__all__ = ["NamespaceIndex", "shared_index"]

_NS_PREFIX = {"net": "net:[", "pid": "pid:["}


def _ns_inode(proc_root: str, pid: int | str, kind: str) -> int:
    try:
        target = os.readlink(f"{proc_root}/{pid}/ns/{kind}")
    except OSError:
        return 0
    prefix = _NS_PREFIX[kind]
    if target.startswith(prefix) and target.endswith("]"):
        try:
            return int(target[len(prefix):-1])
        except ValueError:
            return 0
    return 0


def _starttime(proc_root: str, pid: int | str) -> int:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # comm may contain spaces and parentheses: fields resume after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return 0


class NamespaceIndex:
    """Network and PID namespace membership of every process, kept incrementally.

    Args:
        proc_root: procfs root.
        refresh_s: a full rescan at most this old is used (checked lazily on lookups).
        min_rescan_s: minimum interval between rescans triggered by lookup misses.
        max_exited_threads: bound on the remembered exited threads (tid → tgid).
        exit_grace_s: how long an exited process's namespaces and threads are still answered.
        max_tombstones: bound on the exited processes remembered that way.

    Attributes:
        scans: full ``/proc`` scans done so far (for tests and ``/debug/status``).
        net_generation: bumped whenever a network namespace is created or entered.
    """

    def __init__(self, proc_root: str = "/proc", *, refresh_s: float = 30.0, min_rescan_s: float = 1.0,
                 max_exited_threads: int = 65_536, exit_grace_s: float = 30.0,
                 max_tombstones: int = 4096) -> None:
        self.proc_root = proc_root
        self.refresh_s = refresh_s
        self.min_rescan_s = min_rescan_s
        self.scans = 0
        self._lock = threading.RLock()
        self._pids: dict[int, tuple[int, int]] = {}  # pid -> (netns, pidns)
        self._net: dict[int, set[int]] = {}
        self._pidns: dict[int, set[int]] = {}
        # pidns -> {innermost ns pid: host pid}; rebuilt lazily when membership changes.
        self._nsmap: dict[int, dict[int, int]] = {}
        # (host pid, starttime) -> {ns tid: host tid} for processes in a child PID namespace.
        self._tids: OrderedDict[tuple[int, int], dict[int, int]] = OrderedDict()
        self._exited: OrderedDict[int, int] = OrderedDict()  # host tid -> tgid (threads that exited)
        self._max_exited = max_exited_threads
        # pid -> (exit monotonic s, (netns, pidns), {ns tid: host tid} or None): exited processes.
        self._tombstones: OrderedDict[int, tuple[float, tuple[int, int], dict[int, int] | None]] = OrderedDict()
        self.exit_grace_s = exit_grace_s
        self._max_tombstones = max_tombstones
        self._net_changed: dict[int, float] = {}  # netns -> when a namespace event last touched it
        self.net_generation = 0
        self._built_at = -1e18
        self._rescan_at = -1e18
        self._exit_listeners: list[Any] = []
        self.root_pidns = 0
        self.root_netns = 0

    # -- building ---------------------------------------------------------------

    def rebuild(self) -> None:
        """Rescan ``/proc`` (one ``readlink`` per process and namespace kind)."""
        pids: dict[int, tuple[int, int]] = {}
        try:
            names = os.listdir(self.proc_root)
        except OSError:
            names = []
        for name in names:
            if not name.isdigit():
                continue
            net = _ns_inode(self.proc_root, name, "net")
            pidns = _ns_inode(self.proc_root, name, "pid")
            if net or pidns:
                pids[int(name)] = (net, pidns)
        net_idx: dict[int, set[int]] = {}
        pid_idx: dict[int, set[int]] = {}
        for pid, (net, pidns) in pids.items():
            net_idx.setdefault(net, set()).add(pid)
            pid_idx.setdefault(pidns, set()).add(pid)
        now = time.monotonic()
        with self._lock:
            self._pids, self._net, self._pidns = pids, net_idx, pid_idx
            self._nsmap.clear()
            self._built_at = self._rescan_at = now
            self.scans += 1
            one = pids.get(1)
            if one is not None:
                self.root_netns, self.root_pidns = one
        logger.debug("namespace index: %d processes, %d netns, %d pidns", len(pids), len(net_idx), len(pid_idx))

    def _ensure(self) -> None:
        if time.monotonic() - self._built_at > self.refresh_s:
            self.rebuild()

    def rescan_on_miss(self) -> bool:
        """Rescan now unless one ran less than ``min_rescan_s`` ago; True if it rescanned."""
        with self._lock:
            if time.monotonic() - self._rescan_at < self.min_rescan_s:
                return False
        self.rebuild()
        return True

    # -- maintenance from lifecycle events ----------------------------------------

    def add_pid(self, pid: int) -> None:
        """(Re)read one process's namespaces (it started, exec'd or changed namespace)."""
        net = _ns_inode(self.proc_root, pid, "net")
        pidns = _ns_inode(self.proc_root, pid, "pid")
        if not net and not pidns:
            self.remove_pid(pid)
            return
        with self._lock:
            self._tombstones.pop(pid, None)  # a live process under this number: the tombstone is stale
            old = self._pids.get(pid)
            if old == (net, pidns):
                return
            if old is not None:
                self._unlink(pid, old)
            self._pids[pid] = (net, pidns)
            self._net.setdefault(net, set()).add(pid)
            self._pidns.setdefault(pidns, set()).add(pid)
            self._nsmap.pop(pidns, None)

    def _unlink(self, pid: int, old: tuple[int, int]) -> None:
        net, pidns = old
        for idx, key in ((self._net, net), (self._pidns, pidns)):
            members = idx.get(key)
            if members is not None:
                members.discard(pid)
                if not members:
                    del idx[key]
        self._nsmap.pop(pidns, None)

    def remove_pid(self, pid: int) -> None:
        """Forget a process (it exited); its namespaces and threads stay answerable for ``exit_grace_s``."""
        with self._lock:
            old = self._pids.pop(pid, None)
            if old is not None:
                self._unlink(pid, old)
            tids: dict[int, int] | None = None
            for key in [k for k in self._tids if k[0] == pid]:
                tids = self._tids.pop(key)
            if old is not None and self.exit_grace_s > 0:
                self._tombstones[pid] = (time.monotonic(), old, tids)
                self._tombstones.move_to_end(pid)
                while len(self._tombstones) > self._max_tombstones:
                    self._tombstones.popitem(last=False)
        for ref in list(self._exit_listeners):
            fn = ref()
            if fn is None:
                self._exit_listeners.remove(ref)
                continue
            try:
                fn(pid)
            except Exception:  # a listener's bug must not stop the index
                logger.debug("exit listener failed", exc_info=True)

    def add_exit_listener(self, method: Callable[[int], None]) -> None:
        """Call ``method(pid)`` when a process leaves the index (held weakly: a bound method)."""
        self._exit_listeners.append(weakref.WeakMethod(method))  # type: ignore[arg-type]

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        """Apply one kernel lifecycle event.

        ``EXEC`` / ``FORK`` / ``CLONE_NS`` / ``UNSHARE`` / ``SETNS`` re-read the
        process's namespaces; ``EXIT`` of a thread-group leader removes it, of
        another thread remembers it as a thread of its process (its stalls are
        still in the timeline after it is gone).
        """
        kind = ev.kind
        if kind is LifecycleKind.EXIT:
            if ev.pid == ev.tid:
                self.remove_pid(ev.pid)
            else:
                with self._lock:
                    self._exited[ev.tid] = ev.pid
                    self._exited.move_to_end(ev.tid)
                    while len(self._exited) > self._max_exited:
                        self._exited.popitem(last=False)
        elif kind in (LifecycleKind.EXEC, LifecycleKind.FORK, LifecycleKind.CLONE_NS,
                      LifecycleKind.UNSHARE, LifecycleKind.SETNS):
            if ev.pid:
                self.add_pid(ev.pid)
            if kind is LifecycleKind.FORK or kind is LifecycleKind.CLONE_NS:
                with self._lock:
                    self._exited.pop(ev.pid, None)  # a reused number is a new thread
            if kind is not LifecycleKind.EXEC and kind is not LifecycleKind.FORK and ev.pid:
                self._net_touched(ev.pid, ev.tid or ev.pid)

    def _net_touched(self, pid: int, tid: int) -> None:
        # setns() changes the calling thread only: the thread's own link names the namespace
        # it entered (a CNI plugin's thread configuring a pod's addresses, say).
        net = _ns_inode(self.proc_root, f"{pid}/task/{tid}", "net") or _ns_inode(self.proc_root, pid, "net")
        if not net:
            return
        now = time.monotonic()
        with self._lock:
            self._net_changed[net] = now
            self.net_generation += 1
            if len(self._net_changed) > 4096:
                # Bounded: the oldest changes are long settled.
                for ns, _at in sorted(self._net_changed.items(), key=lambda kv: kv[1])[:1024]:
                    del self._net_changed[ns]

    def net_changes(self) -> dict[int, float]:
        """Network namespace → when a namespace event last touched it (monotonic s)."""
        with self._lock:
            return dict(self._net_changed)

    def _tombstone(self, pid: int) -> tuple[float, tuple[int, int], dict[int, int] | None] | None:
        with self._lock:
            t = self._tombstones.get(pid)
            if t is None:
                return None
            if time.monotonic() - t[0] > self.exit_grace_s:
                del self._tombstones[pid]
                return None
            return t

    # -- queries -------------------------------------------------------------------

    def namespaces_of(self, pid: int) -> tuple[int, int]:
        """(netns inode, pidns inode) of a process; read from procfs when not indexed.

        A process that exited less than ``exit_grace_s`` ago still answers with
        the namespaces it had; (0, 0) for one gone longer or never seen.
        """
        self._ensure()
        with self._lock:
            hit = self._pids.get(pid)
        if hit is not None:
            return hit
        tomb = self._tombstone(pid)
        if tomb is not None and not os.path.isdir(f"{self.proc_root}/{pid}"):
            return tomb[1]
        self.add_pid(pid)
        with self._lock:
            return self._pids.get(pid, (0, 0))

    def exited_recently(self, pid: int) -> bool:
        """Whether ``pid`` is a process that exited less than ``exit_grace_s`` ago (its number not reused)."""
        return self._tombstone(pid) is not None and not os.path.isdir(f"{self.proc_root}/{pid}")

    def netns_members(self, netns: int) -> list[int]:
        """Pids whose network namespace is ``netns``."""
        self._ensure()
        with self._lock:
            return sorted(self._net.get(netns, ()))

    def pidns_members(self, pidns: int) -> list[int]:
        """Pids whose PID namespace is ``pidns``."""
        self._ensure()
        with self._lock:
            return sorted(self._pidns.get(pidns, ()))

    def network_namespaces(self) -> dict[int, int]:
        """Every known network namespace → one live member (a representative for ``/proc/<pid>/net``)."""
        self._ensure()
        with self._lock:
            items = [(ns, min(members)) for ns, members in self._net.items() if members and ns]
        return dict(items)

    def representative(self, netns: int) -> int:
        """A live member of a network namespace (0 when none is known)."""
        for pid in self.netns_members(netns):
            if _ns_inode(self.proc_root, pid, "net") == netns:
                return pid
        return 0

    def translate(self, pidns: int, ns_pid: int) -> int:
        """Host pid of the process that is ``ns_pid`` inside PID namespace ``pidns`` (0 if none).

        Only members of ``pidns`` itself are considered: a pid is interpreted in
        exactly one namespace. In the root PID namespace the answer is the pid
        itself when that process exists there.
        """
        if ns_pid <= 0 or not pidns:
            return 0
        self._ensure()
        if pidns == self.root_pidns:
            return ns_pid if _ns_inode(self.proc_root, ns_pid, "pid") == pidns else 0
        for attempt in (0, 1):
            host = self._translate_once(pidns, ns_pid)
            if host:
                return host
            # The process may have started unseen (an unwatched fork): one bounded rescan.
            if attempt == 0 and not self.rescan_on_miss():
                return 0
        return 0

    def _translate_once(self, pidns: int, ns_pid: int) -> int:
        with self._lock:
            table = self._nsmap.get(pidns)
            members = None if table is not None else sorted(self._pidns.get(pidns, ()))
        if table is None:
            table = {}
            for pid in members or ():
                chain = cgroupfs.nspid(pid, self.proc_root)
                if chain:
                    table[chain[-1]] = pid
            with self._lock:
                self._nsmap[pidns] = table
        host = table.get(ns_pid, 0)
        if not host:
            return 0
        # Verify: the number may have been reused since the table was built.
        chain = cgroupfs.nspid(host, self.proc_root)
        if chain and chain[-1] == ns_pid and _ns_inode(self.proc_root, host, "pid") == pidns:
            return host
        with self._lock:
            self._nsmap.pop(pidns, None)
        return 0

    def thread_of(self, host_pid: int, tid: int) -> int:
        """Host tid of thread ``tid`` (as the process itself sees it) of ``host_pid``; 0 if it is not one.

        A process of the root PID namespace sees host tids: the thread must be
        listed in ``/proc/<pid>/task`` or have exited as a thread of that
        process (lifecycle events). A process in a child PID namespace sees its
        own tids: they are translated through each task's ``NSpid``.
        """
        if tid <= 0 or host_pid <= 0:
            return 0
        _net, pidns = self.namespaces_of(host_pid)
        if not pidns:
            return 0
        if pidns == self.root_pidns:
            if os.path.isdir(f"{self.proc_root}/{host_pid}/task/{tid}"):
                return tid
            with self._lock:
                if self._exited.get(tid) == host_pid:
                    return tid
            # The leader of an exited process is no entry of _exited (its exit removed the process).
            return tid if tid == host_pid and self.exited_recently(host_pid) else 0
        if self.exited_recently(host_pid):
            tomb = self._tombstone(host_pid)
            return (tomb[2] or {}).get(tid, 0) if tomb is not None else 0
        key = (host_pid, _starttime(self.proc_root, host_pid))
        with self._lock:
            table = self._tids.get(key)
        if table is not None and tid in table:
            return table[tid]
        table = self._task_table(host_pid)  # threads come and go: re-list on a miss
        with self._lock:
            self._tids[key] = table
            self._tids.move_to_end(key)
            while len(self._tids) > 4096:
                self._tids.popitem(last=False)
        return table.get(tid, 0)

    def _task_table(self, host_pid: int) -> dict[int, int]:
        out: dict[int, int] = {}
        try:
            tasks = os.listdir(f"{self.proc_root}/{host_pid}/task")
        except OSError:
            return out
        for t in tasks:
            chain = cgroupfs.nspid(f"{host_pid}/task/{t}", self.proc_root)
            if chain:
                out[chain[-1]] = int(t)
        return out

    def size(self) -> dict[str, int]:
        """Counts for ``/debug/status``."""
        with self._lock:
            return {"processes": len(self._pids), "netns": len(self._net), "pidns": len(self._pidns),
                    "scans": self.scans, "tombstones": len(self._tombstones)}


_shared: dict[str, NamespaceIndex] = {}
_shared_lock = threading.Lock()


def shared_index(proc_root: str = "/proc") -> NamespaceIndex:
    """The one :class:`NamespaceIndex` of a procfs root, shared by the peer resolver and the workload resolver."""
    with _shared_lock:
        idx = _shared.get(proc_root)
        if idx is None:
            idx = _shared[proc_root] = NamespaceIndex(proc_root)
        return idx
