"""Per-thread stall timeline: bounded, TTL-evicted, queried by span windows.

Holds the stalls (and, for watched threads, on-CPU segments) the probes
reported, indexed by thread, process and cgroup, plus what is needed to say
how complete the kernel data of a window is (probe up-time, kernel-side
losses, how far the ring buffers have been drained).

Memory is fixed by ``max_threads × max_per_thread``; when full, the thread
updated longest ago is dropped first. All times are CLOCK_MONOTONIC ns.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from collector.model import RunSegment, Stall

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _ThreadLog:
    pid: int
    cgroup_id: int
    stall_ends: list[int] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    run_ends: list[int] = field(default_factory=list)
    runs: list[RunSegment] = field(default_factory=list)


def _insert(ends: list[int], items: list, end: int, item: object, cap: int) -> None:
    # Records arrive almost in end order (each ring buffer is ordered; several
    # CPUs/probes interleave slightly), so this is an append in the common case.
    if not ends or end >= ends[-1]:
        ends.append(end)
        items.append(item)
    else:
        i = bisect.bisect_right(ends, end)
        ends.insert(i, end)
        items.insert(i, item)
    if len(ends) > cap:
        del ends[0]
        del items[0]


def _overlapping(ends: list[int], items: list, start: int, end: int) -> list:
    i = bisect.bisect_right(ends, start)
    return [it for it in items[i:] if it.start_mono_ns < end]


class Timeline:
    """The stall store the join queries.

    Args:
        ttl_s: how long stalls are kept (spans older than this cannot be explained).
        max_threads: how many threads are tracked at most.
        max_per_thread: how many stalls (and run segments) are kept per thread.
    """

    def __init__(self, ttl_s: float = 120.0, max_threads: int = 50_000, max_per_thread: int = 512) -> None:
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_threads = max_threads
        self.max_per_thread = max_per_thread
        self._lock = threading.Lock()
        self._threads: OrderedDict[int, _ThreadLog] = OrderedDict()
        self._by_pid: dict[int, set[int]] = defaultdict(set)
        self._by_cgroup: dict[int, set[int]] = defaultdict(set)
        self._losses: list[tuple[int, int, str]] = []
        self._probe_up_since: dict[str, int | None] = {}
        self.cgroup_totals: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        """Σ stall ns per cgroup id and component since start (for metrics)."""
        self.threads_evicted = 0

    # -- ingestion ------------------------------------------------------------

    def _log_for(self, tid: int, pid: int, cgroup_id: int) -> _ThreadLog:
        log = self._threads.get(tid)
        if log is None:
            if len(self._threads) >= self.max_threads:
                self._drop_thread(next(iter(self._threads)))
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

    def _drop_thread(self, tid: int) -> None:
        log = self._threads.pop(tid, None)
        if log is None:
            return
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

    def add_stall(self, stall: Stall) -> None:
        with self._lock:
            log = self._log_for(stall.tid, stall.pid, stall.cgroup_id)
            _insert(log.stall_ends, log.stalls, stall.end_mono_ns, stall, self.max_per_thread)
            self.cgroup_totals[stall.cgroup_id or log.cgroup_id][stall.component] += stall.duration_ns

    def add_run(self, seg: RunSegment) -> None:
        with self._lock:
            log = self._log_for(seg.tid, seg.pid, seg.cgroup_id)
            _insert(log.run_ends, log.runs, seg.end_mono_ns, seg, self.max_per_thread)

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

    def coverage(self, start: int, end: int, drained_until: int) -> float:
        """Share of ``[start, end]`` with complete kernel data (0..1).

        Complete means: every tracked probe was up, the ring buffers had been
        drained past it, and no kernel events were lost in it.
        """
        if end <= start:
            return 0.0
        with self._lock:
            ups = list(self._probe_up_since.values())
            losses = [(a, b) for a, b, _ in self._losses if b > start and a < end]
        if not ups or any(u is None for u in ups):
            return 0.0
        lo = max(start, max(ups))  # type: ignore[type-var]
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
                hits = _overlapping(log.stall_ends, log.stalls, start, end)
                if hits:
                    out[t] = hits
        return out

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]:
        """On-CPU segments of a watched thread overlapping ``[start, end]``."""
        with self._lock:
            log = self._threads.get(tid)
            if log is None:
                return []
            return _overlapping(log.run_ends, log.runs, start, end)

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
                i = bisect.bisect_left(log.stall_ends, horizon)
                if i:
                    del log.stall_ends[:i]
                    del log.stalls[:i]
                    dropped += i
                j = bisect.bisect_left(log.run_ends, horizon)
                if j:
                    del log.run_ends[:j]
                    del log.runs[:j]
                    dropped += j
                if not log.stalls and not log.runs:
                    self._drop_thread(tid)
            self._losses = [x for x in self._losses if x[1] >= horizon]
        return dropped

    def size(self) -> tuple[int, int]:
        """(threads tracked, records held)."""
        with self._lock:
            return len(self._threads), sum(len(l.stalls) + len(l.runs) for l in self._threads.values())
