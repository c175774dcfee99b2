"""Keep the kernel's watched-workload maps in step with the workloads user space cares about.

Probes whose per-event cost is too high to pay for every task on a node
(blocked-in-syscall intervals, on-CPU segments for steal) only follow the
processes and cgroups in their ``watched_tgids`` / ``watched_cgroups`` maps
(see ``bpf/include/isoscope.h``). This module is the single writer of those
maps for every loaded probe that declares them.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any, Callable, Iterable

logger = logging.getLogger(__name__)

MAX_WATCHED_TGIDS = 16384
MAX_WATCHED_CGROUPS = 4096


class WatchSet:
    """The set of watched tgids and cgroup ids, mirrored into every probe that declares the maps.

    The set is kept from the start; the kernel side names the modules to mirror
    into once its probes loaded (:meth:`mirror_into`), which writes everything
    gathered so far.

    Args:
        modules: callable returning the loaded bcc modules to mirror into (none by default).
    """

    def __init__(self, modules: Callable[[], Iterable[Any]] = lambda: ()) -> None:
        self._modules = modules
        self._lock = threading.Lock()
        self.tgids: set[int] = set()
        self.cgroups: set[int] = set()
        self.watch_all = False

    @staticmethod
    def _table(bpf: Any, name: str) -> Any | None:
        try:
            return bpf[name.encode()]
        except KeyError:
            return None

    def _each(self, name: str):
        for bpf in self._modules():
            t = self._table(bpf, name)
            if t is not None:
                yield t

    def tgid_snapshot(self) -> set[int]:
        """A copy of the watched processes, safe to iterate while others add and remove."""
        with self._lock:
            return set(self.tgids)

    def add_tgid(self, tgid: int) -> bool:
        """Watch a process. Returns False when the map is full (the process is then not watched)."""
        with self._lock:
            if tgid in self.tgids:
                return True
            if len(self.tgids) >= MAX_WATCHED_TGIDS:
                return False
            self.tgids.add(tgid)
            for t in self._each("watched_tgids"):
                t[ctypes.c_uint32(tgid)] = ctypes.c_uint8(1)
            return True

    def remove_tgid(self, tgid: int) -> None:
        with self._lock:
            self.tgids.discard(tgid)
            for t in self._each("watched_tgids"):
                try:
                    del t[ctypes.c_uint32(tgid)]
                except KeyError:
                    pass

    def add_cgroup(self, cgroup_id: int) -> bool:
        """Watch every task of a cgroup (v2 id). Returns False when the map is full."""
        with self._lock:
            if cgroup_id in self.cgroups:
                return True
            if len(self.cgroups) >= MAX_WATCHED_CGROUPS:
                return False
            self.cgroups.add(cgroup_id)
            for t in self._each("watched_cgroups"):
                t[ctypes.c_uint64(cgroup_id)] = ctypes.c_uint8(1)
            return True

    def remove_cgroup(self, cgroup_id: int) -> None:
        with self._lock:
            self.cgroups.discard(cgroup_id)
            for t in self._each("watched_cgroups"):
                try:
                    del t[ctypes.c_uint64(cgroup_id)]
                except KeyError:
                    pass

    def set_watch_all(self, on: bool) -> None:
        """Follow every task on the node (costly on busy nodes; useful on small ones and in the lab)."""
        with self._lock:
            self.watch_all = on
            for t in self._each("watch_all"):
                t[ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)

    def mirror_into(self, modules: Callable[[], Iterable[Any]]) -> None:
        """Mirror into these modules from now on, starting with the whole set."""
        with self._lock:
            self._modules = modules
        self.resync()

    def resync(self) -> None:
        """Write the whole set into every module (after a probe was (re)loaded)."""
        with self._lock:
            tg, cg, on = set(self.tgids), set(self.cgroups), self.watch_all
        for t in self._each("watched_tgids"):
            for x in tg:
                t[ctypes.c_uint32(x)] = ctypes.c_uint8(1)
        for t in self._each("watched_cgroups"):
            for x in cg:
                t[ctypes.c_uint64(x)] = ctypes.c_uint8(1)
        for t in self._each("watch_all"):
            t[ctypes.c_int(0)] = ctypes.c_uint32(1 if on else 0)
