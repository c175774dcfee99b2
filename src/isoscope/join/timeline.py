"""Per-thread stall timeline: bounded, TTL-evicted, queried by span windows.

Holds the stalls (and, for watched threads, on-CPU segments) the probes
reported, indexed by thread, process and cgroup, plus what is needed to say
how complete the kernel data of a window is (probe up-time, kernel-side
losses, how far the ring buffers have been drained).

Memory is bounded by ``max_records`` overall (and ``max_per_thread`` per
thread, ``max_threads`` threads); when full, the thread updated longest ago is
dropped first. All times are CLOCK_MONOTONIC ns.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from array import array
from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Mapping

from isoscope.model import COMPONENTS, RunSegment, Stall

logger = logging.getLogger(__name__)


# Records are kept column-wise in typed arrays (≈ 30 bytes each instead of a
# few hundred for an object per record), and turned into domain objects only
# when a query returns them.
_CODES = {c: i for i, c in enumerate(COMPONENTS)}
_NO_DETAILS: Mapping[str, Any] = {}


class _Column:
    """Records of one kind for one thread, sorted by end time.

    On-CPU segments need no component or details: with ``typed=False`` those
    two columns are not kept.
    """

    __slots__ = ("ends", "starts", "cpus", "comps", "details", "max_dur")

    def __init__(self, typed: bool = True) -> None:
        self.max_dur = 0  # longest record ever held: bounds how far past a window's end a scan must look
        self.ends = array("q")
        self.starts = array("q")
        self.cpus = array("h")
        self.comps: array | None = array("B") if typed else None
        self.details: list[Mapping[str, Any] | None] | None = [] if typed else None

    def __len__(self) -> int:
        return len(self.ends)

    def insert(self, start: int, end: int, cpu: int, comp: int, details: Mapping[str, Any] | None,
               cap: int) -> int:
        """Insert in end order; returns the end of the record dropped to stay under ``cap``, or 0."""
        if end - start > self.max_dur:
            self.max_dur = end - start
        # Records arrive almost in end order (each ring buffer is ordered; several
        # CPUs/probes interleave slightly), so this is an append in the common case.
        i = len(self.ends) if not self.ends or end >= self.ends[-1] else bisect.bisect_right(self.ends, end)
        self.ends.insert(i, end)
        self.starts.insert(i, start)
        self.cpus.insert(i, cpu)
        if self.comps is not None and self.details is not None:
            self.comps.insert(i, comp)
            self.details.insert(i, details)
        if len(self.ends) > cap:
            dropped_end = self.ends[0]
            self.drop_first(1)
            return dropped_end
        return 0

    def drop_first(self, n: int) -> None:
        del self.ends[:n]
        del self.starts[:n]
        del self.cpus[:n]
        if self.comps is not None and self.details is not None:
            del self.comps[:n]
            del self.details[:n]

    def overlapping(self, start: int, end: int) -> list[int]:
        """Indexes of records overlapping ``[start, end]``."""
        ends = self.ends
        i = bisect.bisect_right(ends, start)
        # A record ending after end + max_dur started after the window ended.
        k = bisect.bisect_right(ends, end + self.max_dur, lo=i)
        starts = self.starts
        return [j for j in range(i, k) if starts[j] < end]


class _ThreadLog:
    __slots__ = ("pid", "cgroup_id", "stalls", "runs", "complete_from")

    def __init__(self, pid: int, cgroup_id: int) -> None:
        self.pid = pid
        self.cgroup_id = cgroup_id
        self.stalls = _Column()
        self.runs: _Column | None = None  # only watched threads report on-CPU segments
        self.complete_from = 0  # records ending before this were dropped for space

    def records(self) -> int:
        return len(self.stalls) + (len(self.runs) if self.runs is not None else 0)


class Timeline:
    """The stall store the join queries.

    Args:
        ttl_s: how long stalls are kept (spans older than this cannot be explained).
        max_threads: how many threads are tracked at most.
        max_per_thread: how many stalls are kept per thread (and half as many on-CPU segments).
        max_records: how many records are kept overall.
    """

    def __init__(self, ttl_s: float = 120.0, max_threads: int = 50_000, max_per_thread: int = 32768,
                 max_records: int = 250_000) -> None:
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_threads = max_threads
        self.max_per_thread = max_per_thread
        self.max_records = max_records
        self._records = 0
        self._lock = threading.Lock()
        self._threads: OrderedDict[int, _ThreadLog] = OrderedDict()
        self._by_pid: dict[int, set[int]] = defaultdict(set)
        self._by_cgroup: dict[int, set[int]] = defaultdict(set)
        self._losses: list[tuple[int, int, str]] = []
        self._evicted: OrderedDict[int, int] = OrderedDict()
        self._probe_up_since: dict[str, int | None] = {}
        self.threads_evicted = 0

    # -- ingestion ------------------------------------------------------------

    def _log_for(self, tid: int, pid: int, cgroup_id: int) -> _ThreadLog:
        log = self._threads.get(tid)
        if log is None:
            if len(self._threads) >= self.max_threads:
                self._drop_thread(next(iter(self._threads)), for_space=True)
                self.threads_evicted += 1
            log = _ThreadLog(pid, cgroup_id)
            self._threads[tid] = log
            self._by_pid[pid].add(tid)
            if cgroup_id:
                self._by_cgroup[cgroup_id].add(tid)
        else:
            self._threads.move_to_end(tid)
            if cgroup_id and cgroup_id != log.cgroup_id:
                # The thread moved to another cgroup (container entered, pod resized ...).
                self._by_cgroup.get(log.cgroup_id, set()).discard(tid)
                self._by_cgroup[cgroup_id].add(tid)
                log.cgroup_id = cgroup_id
            if pid and pid != log.pid:
                self._by_pid.get(log.pid, set()).discard(tid)
                self._by_pid[pid].add(tid)
                log.pid = pid
        return log

    def _drop_thread(self, tid: int, for_space: bool = False) -> None:
        log = self._threads.pop(tid, None)
        if log is None:
            return
        self._records -= log.records()
        if for_space and log.records():
            # A later query for this thread must not read "no stalls" as "complete".
            last = max(log.stalls.ends[-1] if len(log.stalls) else 0,
                       log.runs.ends[-1] if log.runs is not None and len(log.runs) else 0)
            self._evicted[tid] = last
            while len(self._evicted) > 50_000:
                self._evicted.popitem(last=False)
        tids = self._by_pid.get(log.pid)
        if tids is not None:
            tids.discard(tid)
            if not tids:
                del self._by_pid[log.pid]
        tids = self._by_cgroup.get(log.cgroup_id)
        if tids is not None:
            tids.discard(tid)
            if not tids:
                del self._by_cgroup[log.cgroup_id]

    def _bound(self, keep: int) -> None:
        # Over the global budget: drop whole threads, least recently updated first.
        while self._records > self.max_records and len(self._threads) > 1:
            oldest = next(iter(self._threads))
            if oldest == keep:
                self._threads.move_to_end(oldest)
                continue
            self._drop_thread(oldest, for_space=True)
            self.threads_evicted += 1

    def add_stall(self, stall: Stall) -> None:
        with self._lock:
            log = self._log_for(stall.tid, stall.pid, stall.cgroup_id)
            dropped = log.stalls.insert(stall.start_mono_ns, stall.end_mono_ns, stall.cpu,
                                        _CODES[stall.component], stall.details or None, self.max_per_thread)
            self._records += 1 - bool(dropped)
            if dropped:
                log.complete_from = max(log.complete_from, dropped)
            self._bound(stall.tid)

    def add_run(self, seg: RunSegment) -> None:
        with self._lock:
            log = self._log_for(seg.tid, seg.pid, seg.cgroup_id)
            if log.runs is None:
                log.runs = _Column(typed=False)
            dropped = log.runs.insert(seg.start_mono_ns, seg.end_mono_ns, seg.cpu, 0, None,
                                      max(1, self.max_per_thread // 2))
            self._records += 1 - bool(dropped)
            self._bound(seg.tid)

    def forget_thread(self, tid: int) -> None:
        """Drop a thread that exited once its data is older than the TTL (see :meth:`evict`)."""
        with self._lock:
            self._drop_thread(tid)

    # -- completeness ---------------------------------------------------------

    def set_probe_up(self, probe: str, up: bool, at_mono_ns: int | None = None) -> None:
        """Record that a probe whose data the coverage depends on went up or down."""
        at = time.monotonic_ns() if at_mono_ns is None else at_mono_ns
        with self._lock:
            self._probe_up_since[probe] = at if up else None

    def note_loss(self, probe: str, start_mono_ns: int, end_mono_ns: int) -> None:
        """Kernel events were lost somewhere in ``[start, end]``: that stretch is incomplete."""
        with self._lock:
            self._losses.append((start_mono_ns, end_mono_ns, probe))
            if len(self._losses) > 10_000:
                del self._losses[:1000]

    def coverage(self, start: int, end: int, drained_until: int, tid: int = 0) -> float:
        """Share of ``[start, end]`` with complete kernel data (0..1).

        Complete means: every tracked probe was up, the ring buffers had been
        drained past it, no kernel events were lost in it, and (for ``tid``)
        none of that thread's records in it were dropped to bound memory.
        """
        if end <= start:
            return 0.0
        with self._lock:
            ups = list(self._probe_up_since.values())
            losses = [(a, b) for a, b, _ in self._losses if b > start and a < end]
            thread_from = 0
            if tid:
                log = self._threads.get(tid)
                thread_from = log.complete_from if log is not None else self._evicted.get(tid, 0)
        if not ups or any(u is None for u in ups):
            return 0.0
        lo = max(start, max(ups), thread_from)  # type: ignore[type-var]
        hi = min(end, drained_until)
        if hi <= lo:
            return 0.0
        covered = hi - lo
        # Subtract the union of loss intervals inside [lo, hi].
        losses.sort()
        cur_a = cur_b = None
        lost = 0
        for a, b in losses:
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                continue
            if cur_b is None or a > cur_b:
                if cur_b is not None:
                    lost += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_b is not None:
            lost += cur_b - cur_a
        return max(0.0, (covered - lost) / (end - start))

    # -- queries --------------------------------------------------------------

    def _tids(self, tid: int, pid: int, cgroup_id: int) -> Iterable[int]:
        if tid:
            return (tid,)
        if pid:
            return tuple(self._by_pid.get(pid, ()))
        if cgroup_id:
            return tuple(self._by_cgroup.get(cgroup_id, ()))
        return ()

    def query(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
              cgroup_id: int = 0) -> dict[int, list[Stall]]:
        """Stalls overlapping ``[start, end]``, per thread, for a thread, a process or a cgroup.

        The finest key given wins: ``tid`` over ``pid`` over ``cgroup_id``.
        """
        out: dict[int, list[Stall]] = {}
        with self._lock:
            for t in self._tids(tid, pid, cgroup_id):
                log = self._threads.get(t)
                if log is None:
                    continue
                col = log.stalls
                idx = col.overlapping(start, end)
                if idx:
                    comps, details = col.comps, col.details
                    assert comps is not None and details is not None
                    out[t] = [Stall(COMPONENTS[comps[j]], col.starts[j], col.ends[j], t, log.pid,
                                    log.cgroup_id, col.cpus[j], details[j] or _NO_DETAILS) for j in idx]
        return out

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]:
        """On-CPU segments of a watched thread overlapping ``[start, end]``."""
        with self._lock:
            log = self._threads.get(tid)
            if log is None:
                return []
            col = log.runs
            if col is None:
                return []
            return [RunSegment(tid, log.pid, log.cgroup_id, col.cpus[j], col.starts[j], col.ends[j])
                    for j in col.overlapping(start, end)]

    def threads_of(self, *, pid: int = 0, cgroup_id: int = 0) -> list[int]:
        with self._lock:
            return list(self._tids(0, pid, cgroup_id))

    # -- housekeeping ---------------------------------------------------------

    def evict(self, now_mono_ns: int | None = None) -> int:
        """Drop everything older than the TTL; returns how many records went."""
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        horizon = now - self.ttl_ns
        dropped = 0
        with self._lock:
            for tid in list(self._threads):
                log = self._threads[tid]
                for col in (log.stalls, log.runs):
                    if col is None:
                        continue
                    i = bisect.bisect_left(col.ends, horizon)
                    if i:
                        col.drop_first(i)
                        dropped += i
                        self._records -= i
                if not log.records():
                    self._drop_thread(tid)
            self._losses = [x for x in self._losses if x[1] >= horizon]
        return dropped

    def size(self) -> tuple[int, int]:
        """(threads tracked, records held)."""
        with self._lock:
            return len(self._threads), self._records
