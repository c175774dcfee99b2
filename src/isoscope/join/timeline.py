"""Per-thread stall timeline: bounded, TTL-evicted, queried by span windows.

Holds the stalls (and, for watched threads, on-CPU segments) the probes
reported, indexed by thread, process and cgroup, plus what is needed to say
how complete the kernel data of a window is (probe up-time, kernel-side
losses, how far the ring buffers have been drained).

Memory is bounded by ``max_records`` overall (and ``max_per_thread`` per
thread, ``max_threads`` threads); when full, the thread updated longest ago is
dropped first. All times are CLOCK_MONOTONIC ns.

Besides the raw stalls (what child spans and :meth:`Timeline.query` return),
each thread keeps its stalls *resolved*: disjoint segments, each owned by the
one component that gets that instant under :data:`PRECEDENCE` (the kernel
baseline where no layer explains a syscall), with per-component prefix sums.
A window's breakdown is then two binary searches and edge clipping
(:meth:`Timeline.window_ns`), whatever the window's length. A stall is
resolved when it arrives, re-resolving only the stretch it can change (from
its start, or from the start of the syscall run it joins).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from array import array
from collections import OrderedDict, defaultdict
from typing import Any, Iterable, Mapping

from isoscope.model import COMPONENT_LAYER, COMPONENTS, KERNEL, RunSegment, Stall

logger = logging.getLogger(__name__)


# Records are kept column-wise in typed arrays (≈ 30 bytes each instead of a
# few hundred for an object per record), and turned into domain objects only
# when a query returns them.
_CODES = {c: i for i, c in enumerate(COMPONENTS)}
_NO_DETAILS: Mapping[str, Any] = {}

# When two components claim the same instant of one thread, the first here
# gets it. Reclaim comes first: a thread preempted or throttled in the middle of
# reclaiming is still stalled on memory (the kernel's pressure accounting
# counts it the same way); throttling before plain run-queue contention because
# the quota is the cause of that wait.
PRECEDENCE: tuple[str, ...] = ("memory_reclaim", "cpu_throttle", "runqueue", "virtio_io", "netns", "pv_exit",
                               "ept", "vm_exit", "sandbox", "steal")

# Ranks: the layer components in precedence order, then the kernel baseline last
# (it gets only what no layer explains). A resolved segment stores its rank.
RANKED: tuple[str, ...] = (PRECEDENCE + tuple(c for c in COMPONENTS
                                              if c not in PRECEDENCE and COMPONENT_LAYER[c] != KERNEL)
                           + ("syscall",))
SYSCALL_RANK = len(RANKED) - 1
VIRTIO_RANK = RANKED.index("virtio_io")
_N_RANKS = len(RANKED)
RANK_OF: dict[str, int] = {c: (SYSCALL_RANK if COMPONENT_LAYER[c] == KERNEL else RANKED.index(c))
                           for c in COMPONENTS}
_RANK_OF_CODE = array("B", [RANK_OF[c] for c in COMPONENTS])
_SYSCALL_CODES = frozenset(i for i, c in enumerate(COMPONENTS) if COMPONENT_LAYER[c] == KERNEL)

# What a thread was doing at one instant, as far as its records say (see
# :meth:`Timeline.evidence_many`). A thread that read the clock at that instant
# (the thread that opened or ended a span) was on a CPU then.
EDGE_OFF = 0
"""Not on a CPU: blocked in a syscall, waiting for a CPU or throttled all around the instant,
or (a watched thread) between two recorded on-CPU segments neither of which holds it."""
EDGE_UNKNOWN = 1
"""Nothing recorded says either way."""
EDGE_NEAR = 2
"""An on-CPU segment comes within the tolerance of the instant."""
EDGE_ON = 3
"""An on-CPU segment holds the instant itself."""

EDGE_TOL_NS = 50_000
"""How far from a span edge an on-CPU segment still counts: span times are wall-clock, converted
with an offset re-measured every second, so an edge may be off by some microseconds."""

# Ranks during which a thread cannot be running its own code: blocked in a syscall, runnable
# but not running (contention, throttling), reclaiming memory in the kernel.
_OFF_CPU_RANKS = frozenset(RANK_OF[c] for c in ("syscall", "runqueue", "cpu_throttle", "memory_reclaim"))


def _merge_sorted(ivs: list[tuple[int, int]]) -> list[list[int]]:
    """Union of intervals sorted by start; touching intervals become one."""
    out: list[list[int]] = []
    for a, b in ivs:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1][1] = b
        else:
            out.append([a, b])
    return out


def resolve(ivs: Iterable[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """One thread's stalls as disjoint segments, each owned by one component (a sweep, O(n log n)).

    Args:
        ivs: ``(start, end, rank)`` with ``end > start``; rank from :data:`RANK_OF`.

    Returns:
        ``(segments, converted)``: segments ``(start, end, rank)`` sorted and
        disjoint, where an instant goes to the highest-precedence layer component
        holding it, else to the kernel baseline (``SYSCALL_RANK``); ``converted``
        are the syscall runs (merged syscalls) that waited on a virtio request
        and so count as ``virtio_io`` end to end.
    """
    layer: list[tuple[int, int, int]] = []
    sys_iv: list[tuple[int, int]] = []
    for a, b, r in ivs:
        if r == SYSCALL_RANK:
            sys_iv.append((a, b))
        else:
            layer.append((a, b, r))
    events: list[tuple[int, int, int]] = []
    converted: list[tuple[int, int]] = []
    if sys_iv:
        sys_iv.sort()
        runs = _merge_sorted(sys_iv)
        dev = _merge_sorted(sorted((a, b) for a, b, r in layer if r == VIRTIO_RANK))
        j = 0
        for ra, rb in runs:
            # A blocking syscall that waited on a virtio request is the paravirtual I/O
            # path end to end: the request setup, the virtqueue kick and the completion
            # it runs on the way are the device's time too, not the kernel baseline.
            while j < len(dev) and dev[j][1] <= ra:
                j += 1
            rank = SYSCALL_RANK
            if j < len(dev) and dev[j][0] < rb:
                rank = VIRTIO_RANK
                converted.append((ra, rb))
            events.append((ra, 1, rank))
            events.append((rb, -1, rank))
    for a, b, r in layer:
        events.append((a, 1, r))
        events.append((b, -1, r))
    if not events:
        return [], converted
    events.sort()
    counts = [0] * _N_RANKS
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(events)
    while i < n:
        pos = events[i][0]
        while i < n and events[i][0] == pos:
            counts[events[i][2]] += events[i][1]
            i += 1
        if i == n:
            break
        top = -1
        for r in range(_N_RANKS):
            if counts[r]:
                top = r
                break
        if top < 0:
            continue
        nxt = events[i][0]
        if out and out[-1][2] == top and out[-1][1] == pos:
            out[-1] = (out[-1][0], nxt, top)
        else:
            out.append((pos, nxt, top))
    return out, converted


def _union_within(ivs: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Length of the union of sorted ``ivs`` inside ``[lo, hi]``."""
    total = 0
    cur_a = cur_b = None
    for a, b in ivs:
        if a >= hi:
            break
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        elif b > cur_b:
            cur_b = b
    if cur_b is not None:
        total += cur_b - cur_a
    return total


class _Resolved:
    """One thread's resolved segments with per-rank prefix sums.

    ``cum[r][j]`` is the total length of rank ``r``'s segments before segment
    ``j`` (an array only for ranks the thread has had). Dropping the first
    segments keeps differences valid, so nothing is rebased.
    """

    __slots__ = ("starts", "ends", "ranks", "cum", "present", "conv_starts", "conv_ends")

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.ranks = array("B")
        self.cum: list[array | None] = [None] * _N_RANKS
        self.present: list[int] = []
        self.conv_starts = array("q")
        self.conv_ends = array("q")

    def truncate(self, p: int) -> None:
        """Forget everything from ``p`` on (a segment across ``p`` keeps its part before it)."""
        j = bisect.bisect_right(self.ends, p)  # segments [j:] end after p
        cut: tuple[int, int] | None = None
        if j < len(self.starts) and self.starts[j] < p:
            cut = (self.starts[j], self.ranks[j])
        del self.starts[j:]
        del self.ends[j:]
        del self.ranks[j:]
        for r in self.present:
            del self.cum[r][j + 1:]  # type: ignore[index]
        if cut is not None:
            self.append(cut[0], p, cut[1])
        c = bisect.bisect_left(self.conv_ends, p + 1)
        del self.conv_starts[c:]
        del self.conv_ends[c:]

    def append(self, a: int, b: int, rank: int) -> None:
        cum = self.cum
        if cum[rank] is None:
            col = array("q", bytes(8 * (len(self.starts) + 1)))
            cum[rank] = col
            self.present.append(rank)
        self.starts.append(a)
        self.ends.append(b)
        self.ranks.append(rank)
        for r in self.present:
            col = cum[r]
            col.append(col[-1] + (b - a if r == rank else 0))  # type: ignore[index]

    def drop_until(self, t: int) -> None:
        """Drop the segments (and converted runs) that end at or before ``t``."""
        j = bisect.bisect_right(self.ends, t)
        if j:
            del self.starts[:j]
            del self.ends[:j]
            del self.ranks[:j]
            for r in self.present:
                del self.cum[r][:j]  # type: ignore[index]
        c = bisect.bisect_right(self.conv_ends, t)
        if c:
            del self.conv_starts[:c]
            del self.conv_ends[:c]

    def sums(self, start: int, end: int) -> dict[int, int] | None:
        """Per-rank ns inside ``[start, end]`` from the prefix sums; None when nothing overlaps."""
        i = bisect.bisect_right(self.ends, start)
        k = bisect.bisect_left(self.starts, end, lo=i)
        if k <= i:
            return None
        out: dict[int, int] = {}
        cum = self.cum
        for r in self.present:
            col = cum[r]
            v = col[k] - col[i]  # type: ignore[index]
            if v:
                out[r] = v
        s = self.starts[i]
        if s < start:
            out[self.ranks[i]] -= start - s
        e = self.ends[k - 1]
        if e > end:
            out[self.ranks[k - 1]] -= e - end
        return out

    def edge_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Converted syscall runs cut by a window edge, as their part inside the window.

        Inside the window only what the window holds decides whether a syscall run
        waited on the device, so those parts are resolved again from the raw stalls.
        """
        cs = self.conv_starts
        if not cs:
            return []
        out = []
        for edge in (start, end):
            c = bisect.bisect_left(self.conv_ends, edge + 1)  # first run ending after edge
            if c < len(cs) and cs[c] < edge:
                part = (max(cs[c], start), min(self.conv_ends[c], end))
                if part[1] > part[0] and part not in out:
                    out.append(part)
        return out


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

    def overlapping(self, start: int, end: int, limit: int | None = None) -> list[int]:
        """Indexes of records overlapping ``[start, end]`` (in order); with ``limit``, only the last
        ``limit`` of them, found without visiting the rest."""
        ends = self.ends
        i = bisect.bisect_right(ends, start)
        # A record ending after end + max_dur started after the window ended.
        k = bisect.bisect_right(ends, end + self.max_dur, lo=i)
        starts = self.starts
        if limit is None or k - i <= limit:
            return [j for j in range(i, k) if starts[j] < end]
        out: list[int] = []
        for j in range(k - 1, i - 1, -1):
            if starts[j] < end:
                out.append(j)
                if len(out) == limit:
                    break
        out.reverse()
        return out


_CLEAN = 1 << 62
"""``_ThreadLog.dirty_from`` when the resolved intervals are up to date."""


class _ThreadLog:
    __slots__ = ("pid", "cgroup_id", "stalls", "runs", "complete_from", "resolved", "dirty_from")

    def __init__(self, pid: int, cgroup_id: int) -> None:
        self.pid = pid
        self.cgroup_id = cgroup_id
        self.stalls = _Column()
        self.runs: _Column | None = None  # only watched threads report on-CPU segments
        self.complete_from = 0  # records ending before this were dropped for space
        self.resolved = _Resolved()
        # Resolving is deferred to the first read: records of one thread arrive out of order (each
        # probe's ring is drained in turn), and resolving at every insert made a burst quadratic.
        self.dirty_from = _CLEAN

    def settle(self) -> None:
        """Bring the resolved intervals up to date (one resolve from the earliest changed start)."""
        if self.dirty_from != _CLEAN:
            p, self.dirty_from = self.dirty_from, _CLEAN
            self.reresolve_from(p)

    def reresolve_from(self, start: int) -> None:
        """Resolve again the part of the thread's timeline a stall starting at ``start`` can change.

        That is everything from ``start`` on, or from the start of the syscall
        run ``start`` falls in (a syscall joining or a virtio request landing in
        a run changes the whole run).
        """
        col = self.stalls
        ends, starts, comps = col.ends, col.starts, col.comps
        assert comps is not None
        sys_code = _SYSCALL_CODES
        p = start
        while True:
            m = p
            for x in range(bisect.bisect_left(ends, p), len(ends)):
                if comps[x] in sys_code and starts[x] < m:
                    m = starts[x]
            if m >= p:
                break
            p = m
        ranks = _RANK_OF_CODE
        ivs = []
        for x in range(bisect.bisect_right(ends, p), len(ends)):
            a = starts[x]
            if a < p:
                a = p
            b = ends[x]
            if b > a:
                ivs.append((a, b, ranks[comps[x]]))
        res = self.resolved
        res.truncate(p)
        segments, converted = resolve(ivs)
        for a, b, r in segments:
            res.append(a, b, r)
        for a, b in converted:
            res.conv_starts.append(a)
            res.conv_ends.append(b)

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
                # Records before complete_from are incomplete anyway (coverage says so).
                log.resolved.drop_until(dropped)
            if stall.start_mono_ns < log.dirty_from:
                log.dirty_from = stall.start_mono_ns
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
        return self.coverage_many([(start, end, tid)], drained_until)[0]

    def coverage_many(self, windows: list[tuple[int, int, int]], drained_until: int) -> list[float]:
        """:meth:`coverage` of many ``(start, end, tid)`` windows, reading the shared state once."""
        if not windows:
            return []
        lo_all = min(w[0] for w in windows)
        hi_all = max(w[1] for w in windows)
        with self._lock:
            ups = list(self._probe_up_since.values())
            losses = sorted((a, b) for a, b, _ in self._losses if b > lo_all and a < hi_all)
            froms = {}
            for _, _, tid in windows:
                if tid and tid not in froms:
                    log = self._threads.get(tid)
                    froms[tid] = log.complete_from if log is not None else self._evicted.get(tid, 0)
        if not ups or any(u is None for u in ups):
            return [0.0] * len(windows)
        up = max(ups)  # type: ignore[type-var]
        out = []
        for start, end, tid in windows:
            if end <= start:
                out.append(0.0)
                continue
            lo = max(start, up, froms.get(tid, 0) if tid else 0)
            hi = min(end, drained_until)
            if hi <= lo:
                out.append(0.0)
                continue
            lost = _union_within(losses, lo, hi) if losses else 0
            out.append(max(0.0, (hi - lo - lost) / (end - start)))
        return out

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
              cgroup_id: int = 0, limit: int | None = None) -> dict[int, list[Stall]]:
        """Stalls overlapping ``[start, end]``, per thread, for a thread, a process or a cgroup.

        The finest key given wins: ``tid`` over ``pid`` over ``cgroup_id``. With ``limit``, at most
        the last ``limit`` stalls per thread (the cost stays bounded whatever the window).
        """
        out: dict[int, list[Stall]] = {}
        with self._lock:
            for t in self._tids(tid, pid, cgroup_id):
                log = self._threads.get(t)
                if log is None:
                    continue
                col = log.stalls
                idx = col.overlapping(start, end, limit)
                if idx:
                    comps, details = col.comps, col.details
                    assert comps is not None and details is not None
                    out[t] = [Stall(COMPONENTS[comps[j]], col.starts[j], col.ends[j], t, log.pid,
                                    log.cgroup_id, col.cpus[j], details[j] or _NO_DETAILS) for j in idx]
        return out

    def window_ns(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
                  cgroup_id: int = 0) -> dict[int, dict[str, int]]:
        """Per-component stall ns inside ``[start, end]``, per thread that has stalls there.

        For each thread, the same figures as
        :func:`isoscope.join.attribution.thread_breakdown` over that thread's
        :meth:`query` result (precedence, no double counting, kernel baseline),
        in O(log n) per thread whatever the window's length. The finest key
        given wins: ``tid`` over ``pid`` over ``cgroup_id``.
        """
        return self.window_many([(start, end)], tid=tid, pid=pid, cgroup_id=cgroup_id)[0]

    def window_many(self, windows: list[tuple[int, int]], *, tid: int = 0, pid: int = 0,
                    cgroup_id: int = 0) -> list[dict[int, dict[str, int]]]:
        """:meth:`window_ns` of many windows of one workload, under one lock."""
        out: list[dict[int, dict[str, int]]] = [{} for _ in windows]
        with self._lock:
            for t in self._tids(tid, pid, cgroup_id):
                log = self._threads.get(t)
                if log is None:
                    continue
                for n, (start, end) in enumerate(windows):
                    got = self._thread_window(log, start, end)
                    if got is not None:
                        out[n][t] = got
        return out

    def evidence_many(self, windows: list[tuple[int, int]], *, pid: int = 0, cgroup_ids: Iterable[int] = (),
                      tol_ns: int = EDGE_TOL_NS) -> list[dict[int, tuple[dict[str, int], int, int]]]:
        """What each thread of a process (or of a set of cgroups) did in each window, to tell which served it.

        For every thread with a record (stall or on-CPU segment) within
        ``tol_ns`` of the window: its per-component stall ns inside the window
        (as :meth:`window_ns`) and its state at the window's start and end
        (``EDGE_ON``, ``EDGE_NEAR``, ``EDGE_UNKNOWN`` or ``EDGE_OFF``). A thread
        with no record near the window is left out: the timeline has not seen
        it there. O(log n) per thread and window.

        Args:
            windows: ``(start, end)`` CLOCK_MONOTONIC ns.
            pid: the process (wins over ``cgroup_ids``).
            cgroup_ids: cgroups whose threads are candidates (a container, or a pod's containers).
            tol_ns: how far from an edge an on-CPU segment still counts (:data:`EDGE_TOL_NS`).
        """
        out: list[dict[int, tuple[dict[str, int], int, int]]] = [{} for _ in windows]
        with self._lock:
            if pid:
                tids: Iterable[int] = tuple(self._by_pid.get(pid, ()))
            else:
                seen: set[int] = set()
                for cg in cgroup_ids:
                    if cg:
                        seen.update(self._by_cgroup.get(cg, ()))
                tids = sorted(seen)
            for t in tids:
                log = self._threads.get(t)
                if log is None:
                    continue
                for n, (start, end) in enumerate(windows):
                    if not self._seen_near(log, start - tol_ns, end + tol_ns):
                        continue
                    comp = self._thread_window(log, start, end) or {}
                    out[n][t] = (comp, self._edge_state(log, start, tol_ns), self._edge_state(log, end, tol_ns))
        return out

    @staticmethod
    def _seen_near(log: _ThreadLog, lo: int, hi: int) -> bool:
        log.settle()
        res = log.resolved
        i = bisect.bisect_right(res.ends, lo)
        if i < len(res.starts) and res.starts[i] < hi:
            return True
        runs = log.runs
        if runs is not None and len(runs):
            i = bisect.bisect_right(runs.ends, lo)
            if i < len(runs) and runs.starts[i] < hi:
                return True
        # A raw stall not (yet) in the resolved segments cannot exist: every stall is resolved on arrival.
        return False

    @staticmethod
    def _edge_state(log: _ThreadLog, x: int, tol: int) -> int:
        """The thread's state at instant ``x`` (``EDGE_*``), from its on-CPU segments and resolved stalls."""
        lo, hi = x - tol, x + tol
        runs = log.runs
        if runs is not None and len(runs):
            # A thread's on-CPU segments are disjoint, so sorted by end they are sorted by start too.
            i = bisect.bisect_right(runs.ends, lo)  # first segment ending after lo
            if i < len(runs) and runs.starts[i] <= hi:
                return EDGE_ON if runs.starts[i] <= x < runs.ends[i] else EDGE_NEAR
            if i < len(runs):
                # It ran after the instant and no segment holds the instant: a segment holding it
                # would have ended (and been reported) before the later one began.
                return EDGE_OFF
        log.settle()
        res = log.resolved
        j = bisect.bisect_right(res.ends, lo)
        n = len(res.starts)
        if j < n and res.starts[j] <= lo:
            pos = lo
            while j < n and res.starts[j] <= pos and res.ranks[j] in _OFF_CPU_RANKS:
                pos = res.ends[j]
                if pos >= hi:
                    return EDGE_OFF
                j += 1
        return EDGE_UNKNOWN

    @staticmethod
    def _thread_window(log: _ThreadLog, start: int, end: int) -> dict[str, int] | None:
        log.settle()
        res = log.resolved
        sums = res.sums(start, end)
        if sums is None:
            return None
        if res.conv_starts:
            for a, b in res.edge_runs(start, end):
                for r, v in (res.sums(a, b) or {}).items():
                    sums[r] -= v
                col = log.stalls
                comps = col.comps
                assert comps is not None
                ivs = []
                for j in col.overlapping(a, b):
                    x, y = max(col.starts[j], a), min(col.ends[j], b)
                    if y > x:
                        ivs.append((x, y, _RANK_OF_CODE[comps[j]]))
                for x, y, r in resolve(ivs)[0]:
                    sums[r] = sums.get(r, 0) + y - x
        return {RANKED[r]: v for r, v in sorted(sums.items()) if v}

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

    def thread_pid(self, tid: int) -> int:
        """The process the kernel recorded thread ``tid`` in (0 if the timeline holds no record of it).

        The kernel's own records prove a thread belonged to a process after the thread is gone
        from ``/proc`` (a thread per request exits before its spans are exported)."""
        with self._lock:
            log = self._threads.get(tid)
            return log.pid if log is not None else 0

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
                        if col is log.stalls:
                            log.resolved.drop_until(col.ends[i - 1])
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
