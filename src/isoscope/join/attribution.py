"""The join: a span's time window × the stall timeline → a per-layer breakdown.

Scope semantics:
    * thread scope: the stalls of the thread that served the span. Stalls of a
      thread that serves several concurrent requests count for each of them:
      an event-loop stall delays every request on that loop.
    * process / container scope: the request was served by one thread we were
      not told, so the breakdown is that of the thread of the process (or of the
      container's / pod's cgroups) that most plausibly served it
      (:func:`select_thread`). The thread that opened and ended the span read
      the clock at both edges, so it was on a CPU at both: a pool worker that
      was blocked in a futex or waiting for a CPU at an edge did not serve it,
      however long another request held it back. An event loop is the one thread
      on a CPU at the edges of every request it serves, so its stalls count for
      each of them, as at thread scope. Where several threads are equally
      plausible and their breakdowns differ, the most held back of them is
      reported and ``coverage`` is scaled down by the share of them that agree
      with it; where the timeline has seen no thread of the scope near the
      window, the breakdown is empty and ``coverage`` is 0.

The ``kernel`` baseline (blocked in syscalls for ordinary I/O) excludes the
parts of those syscalls that a layer already explains (a virtio request or a
run-queue wait inside a blocking ``read`` is the layer's time, not the
kernel's).
"""

from __future__ import annotations

import bisect
import logging
from typing import Iterable, Protocol

from isoscope.join.timeline import EDGE_NEAR, EDGE_UNKNOWN, PRECEDENCE, RANK_OF, RANKED, resolve
from isoscope.model import COMPONENT_LAYER, KERNEL, Breakdown, RunSegment, Stall, Workload

__all__ = ["PRECEDENCE", "Attributor", "StallSource", "StealSource", "select_thread", "thread_breakdown"]

logger = logging.getLogger(__name__)


class StallSource(Protocol):
    def query(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
              cgroup_id: int = 0, limit: int | None = None) -> dict[int, list[Stall]]: ...

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]: ...

    def coverage(self, start: int, end: int, drained_until: int, tid: int = 0) -> float: ...


class StealSource(Protocol):
    def overlay(self, segments: Iterable[RunSegment], start: int, end: int) -> int: ...

    def node_steal_ns(self, start: int, end: int) -> float:
        """Steal on any CPU between two instants (0: no thread can have lost time to it)."""


def thread_breakdown(stalls: list[Stall], start: int, end: int) -> Breakdown:
    """Per-component stall ns of one thread inside ``[start, end]`` (no steal, no coverage).

    A thread is held back by one thing at a time, so the result never exceeds
    the window: a wait two records describe is counted once, and where
    components overlap the instant goes to the one first in
    :data:`PRECEDENCE`. The kernel baseline gets only what no layer explains.
    One sweep over the stalls' edges (O(n log n)).
    """
    bd = Breakdown(duration_ns=max(0, end - start))
    ivs = []
    for s in stalls:
        a, b = max(s.start_mono_ns, start), min(s.end_mono_ns, end)
        if b <= a:
            continue
        ivs.append((a, b, RANK_OF[s.component]))
        bd.stalls.append(s)
    if ivs:
        totals: dict[int, int] = {}
        for a, b, r in resolve(ivs)[0]:
            totals[r] = totals.get(r, 0) + b - a
        bd.component_ns.update((RANKED[r], ns) for r, ns in sorted(totals.items()) if ns)
    return bd


def _overhead(component_ns: dict[str, int]) -> int:
    return sum(ns for comp, ns in component_ns.items() if COMPONENT_LAYER[comp] != KERNEL)


AGREE_FRACTION = 0.02
"""Two candidate threads' breakdowns agree when their layer time differs by at most this share of
the window (or :data:`AGREE_MIN_NS`): the span gets the same answer whichever served it."""
AGREE_MIN_NS = 100_000


def _disagreement(a: dict[str, int], b: dict[str, int]) -> int:
    """Layer ns on which two breakdowns differ (the kernel baseline is no overhead)."""
    return sum(abs(a.get(c, 0) - b.get(c, 0)) for c in set(a) | set(b) if COMPONENT_LAYER[c] != KERNEL)


def select_thread(evidence: dict[int, tuple[dict[str, int], int, int]],
                  duration_ns: int) -> tuple[int, dict[str, int], float]:
    """The thread that most plausibly served a span, among a process's (or container's) threads.

    Args:
        evidence: per thread seen near the window, its per-component stall ns in
            the window and its ``EDGE_*`` state at the window's start and end
            (:meth:`isoscope.join.timeline.Timeline.evidence_many`).
        duration_ns: the window's length.

    Returns:
        ``(tid, component_ns, confidence)``: the thread (0 when none was seen),
        its breakdown, and how sure the choice is (0..1). Threads are ranked by
        their state at the two edges (on a CPU at an edge is what the serving
        thread was; off a CPU rules a thread out there). Among the best ranked,
        the most held back is chosen (the conservative answer when the data
        cannot tell them apart), and the confidence is the share of them whose
        breakdown agrees with it. When none of the best ranked was seen on a
        CPU at either edge, nothing sets them apart from a thread the timeline
        has not seen near the window (an unwatched process's serving thread that
        was never held back long enough to be recorded): such a thread, with an
        empty breakdown, counts as one more of them.
    """
    if not evidence:
        return 0, {}, 0.0
    best = max(s + e for _, s, e in evidence.values())
    tied = [(tid, comp) for tid, (comp, s, e) in evidence.items() if s + e == best]
    tid, comp = max(tied, key=lambda tc: (_overhead(tc[1]), -tc[0]))
    seen_on_cpu = any(max(s, e) >= EDGE_NEAR for _, s, e in evidence.values() if s + e == best)
    if not seen_on_cpu:
        tied.append((0, {}))
    if len(tied) == 1:
        return tid, comp, 1.0
    tol = max(int(duration_ns * AGREE_FRACTION), AGREE_MIN_NS)
    agree = sum(1 for _, c in tied if _disagreement(c, comp) <= tol)
    return tid, comp, agree / len(tied)


MAX_CHILD_STALLS = 512
"""Stalls of one span read to build its child spans (the most recent ones of its window)."""


class Attributor:
    """Computes breakdowns from the timeline (and the steal sampler when present).

    Args:
        timeline: the stall store.
        steal: per-CPU steal laid over on-CPU segments; None when unavailable.
    """

    def __init__(self, timeline: StallSource, steal: StealSource | None = None) -> None:
        self.timeline = timeline
        self.steal = steal

    def breakdown(self, workload: Workload, start: int, end: int, drained_until: int) -> Breakdown:
        """The breakdown of a span window (CLOCK_MONOTONIC ns) for a resolved workload.

        Its ``stalls`` are those of the thread the breakdown describes (for child spans).
        """
        bd, tid = self.join_many(workload, [(start, end)], drained_until)[0]
        if not bd.stalls and tid:
            bd.stalls = self.stalls(tid, start, end)
        return bd

    def join_many(self, workload: Workload, windows: list[tuple[int, int]],
                  drained_until: int) -> list[tuple[Breakdown, int]]:
        """Breakdowns of many span windows of one workload, without their stalls.

        Args:
            workload: the resolved workload all the windows belong to.
            windows: ``(start, end)`` CLOCK_MONOTONIC ns.
            drained_until: how far the kernel data has been drained.

        Returns:
            Per window, the breakdown and the thread it describes (0 when none):
            at thread scope the span's thread, at process or container scope the
            thread :func:`select_thread` found to have served it. Fetch that
            thread's stalls with :meth:`stalls` only when they are needed.
        """
        if workload.scope == "thread":
            out = self._join_thread(workload, windows)
            confidence = [1.0] * len(out)
        else:
            out, confidence = self._join_scope(workload, windows)
        if self.steal is not None:
            # Most windows hold no steal on any CPU: then no thread's on-CPU segments need reading.
            # One look covers the batch's ordinary windows when none of them can hold any.
            short = [w for w in windows if w[1] - w[0] <= BATCH_WINDOW_MAX_NS]
            short_steal = bool(short) and self.steal.node_steal_ns(min(w[0] for w in short),
                                                                   max(w[1] for w in short)) > 0
            for (start, end), (bd, t) in zip(windows, out):
                if not t or (not short_steal and end - start <= BATCH_WINDOW_MAX_NS):
                    continue
                if self.steal.node_steal_ns(start, end) <= 0:
                    continue
                runs = self.timeline.runs(start, end, t)
                if runs:
                    steal_ns = int(self.steal.overlay(runs, start, end))
                    if steal_ns > 0:
                        bd.component_ns["steal"] = bd.component_ns.get("steal", 0) + steal_ns
        coverage_many = getattr(self.timeline, "coverage_many", None)
        if coverage_many is not None:
            covs = coverage_many([(start, end, t) for (start, end), (_, t) in zip(windows, out)], drained_until)
        else:
            covs = [self.timeline.coverage(start, end, drained_until, tid=t)
                    for (start, end), (_, t) in zip(windows, out)]
        for (bd, _), cov, conf in zip(out, covs, confidence):
            bd.coverage = cov * conf
        return out

    def _join_thread(self, workload: Workload, windows: list[tuple[int, int]]) -> list[tuple[Breakdown, int]]:
        tid = workload.tid
        window_many = getattr(self.timeline, "window_many", None)
        if window_many is not None:
            per_window = window_many(windows, tid=tid)
            return [(Breakdown(component_ns=per_thread.get(tid, {}), duration_ns=max(0, end - start)), tid)
                    for (start, end), per_thread in zip(windows, per_window)]
        # A stall source without resolved timelines: join its raw stalls.
        return [(thread_breakdown(self.timeline.query(start, end, tid=tid).get(tid, []), start, end), tid)
                for start, end in windows]

    def _join_scope(self, workload: Workload,
                    windows: list[tuple[int, int]]) -> tuple[list[tuple[Breakdown, int]], list[float]]:
        """Process / container scope: per window the thread that served it (see :func:`select_thread`)."""
        pid = workload.pid if workload.scope == "process" else 0
        cgroup_ids = tuple(workload.cgroup_ids) or ((workload.cgroup_id,) if workload.cgroup_id else ())
        evidence_many = getattr(self.timeline, "evidence_many", None)
        if evidence_many is not None:
            per_window = evidence_many(windows, pid=pid, cgroup_ids=cgroup_ids)
        else:
            per_window = [self._evidence_from_stalls(start, end, pid, cgroup_ids) for start, end in windows]
        out: list[tuple[Breakdown, int]] = []
        confidence: list[float] = []
        for (start, end), evidence in zip(windows, per_window):
            tid, comp, conf = select_thread(evidence, max(0, end - start))
            out.append((Breakdown(component_ns=dict(comp), duration_ns=max(0, end - start)), tid))
            confidence.append(conf)
        return out, confidence

    def _evidence_from_stalls(self, start: int, end: int, pid: int,
                              cgroup_ids: tuple[int, ...]) -> dict[int, tuple[dict[str, int], int, int]]:
        # A stall source that only answers raw queries: no edge evidence, every thread with
        # stalls in the window is equally plausible.
        found: dict[int, list[Stall]] = {}
        if pid:
            found = self.timeline.query(start, end, pid=pid)
        else:
            for cg in cgroup_ids:
                found.update(self.timeline.query(start, end, cgroup_id=cg))
        return {t: (thread_breakdown(stalls, start, end).component_ns, EDGE_UNKNOWN, EDGE_UNKNOWN)
                for t, stalls in found.items() if stalls}

    def batch_stalls(self, bounds: dict[int, tuple[int, int]]) -> "BatchStalls":
        """A reader of :meth:`stalls` for one batch: each thread's stalls are read once, over
        ``bounds[tid]`` (the smallest interval holding the thread's windows in the batch)."""
        return BatchStalls(self, bounds)

    def stalls(self, tid: int, start: int, end: int, limit: int = MAX_CHILD_STALLS) -> list[Stall]:
        """The stalls of thread ``tid`` overlapping ``[start, end]`` (for child spans).

        A window longer than the timeline keeps stalls is clipped to its last
        TTL: nothing older is held. At most the last ``limit`` stalls are read, so
        a span whose window holds thousands of them (a long poll, a forged
        0…2^64 window) costs no more than an ordinary one: its children then
        show the end of the span, while its attributes still count every stall.
        """
        ttl = getattr(self.timeline, "ttl_ns", 0)
        lo = max(start, end - ttl) if ttl else start
        return [s for s in self.timeline.query(lo, end, tid=tid, limit=limit).get(tid, ())
                if min(s.end_mono_ns, end) > max(s.start_mono_ns, lo)]


BATCH_WINDOW_MAX_NS = 10_000_000_000
"""Windows longer than this are not read through a batch's shared read (:class:`BatchStalls`): a
forged or long-poll window would make every other window of its thread pay for its range."""
BATCH_STALLS_MAX = 8 * MAX_CHILD_STALLS
"""A thread whose stalls over the batch's windows exceed this is read window by window instead."""


class BatchStalls:
    """:meth:`Attributor.stalls` for the windows of one batch, one read per thread.

    The spans of a batch are mostly recent and many share a thread (a request
    of an SDK holds the last seconds of its process), so their windows overlap;
    reading (and building) the thread's stalls once for all of them and slicing
    per window gives the same stalls as a read per window. Windows longer than
    :data:`BATCH_WINDOW_MAX_NS`, threads without bounds and threads with more
    than :data:`BATCH_STALLS_MAX` stalls in the range are read per window.

    Args:
        attributor: whose :meth:`Attributor.stalls` answers.
        bounds: per thread, ``(lo, hi)`` covering every window that will be asked for.
    """

    def __init__(self, attributor: Attributor, bounds: dict[int, tuple[int, int]]) -> None:
        self._attributor = attributor
        self._bounds = bounds
        # tid → (stalls sorted by end, their ends, the longest one's length), or None: read per window
        self._read: dict[int, tuple[list[Stall], list[int], int] | None] = {}

    def __call__(self, tid: int, start: int, end: int) -> list[Stall]:
        """The stalls of ``tid`` overlapping ``[start, end]`` (at most the last :data:`MAX_CHILD_STALLS`)."""
        got = self._read.get(tid, _UNREAD)
        if got is _UNREAD:
            got = self._read[tid] = self._read_thread(tid)
        bounds = self._bounds.get(tid)
        if (got is None or bounds is None or end - start > BATCH_WINDOW_MAX_NS
                or start < bounds[0] or end > bounds[1]):
            return self._attributor.stalls(tid, start, end)
        stalls, ends, max_dur = got
        # As the timeline's own read does: the records overlapping the window (the last
        # MAX_CHILD_STALLS of them), then those with time inside it.
        i = bisect.bisect_right(ends, start)
        k = bisect.bisect_right(ends, end + max_dur, lo=i)
        near = [s for s in stalls[i:k] if s.start_mono_ns < end]
        if len(near) > MAX_CHILD_STALLS:
            near = near[-MAX_CHILD_STALLS:]
        return [s for s in near if min(s.end_mono_ns, end) > max(s.start_mono_ns, start)]

    def _read_thread(self, tid: int) -> tuple[list[Stall], list[int], int] | None:
        bounds = self._bounds.get(tid)
        ttl = getattr(self._attributor.timeline, "ttl_ns", 0)
        if bounds is None or (ttl and bounds[1] - bounds[0] > ttl):
            return None  # the read would be clipped to its last TTL, unlike a read per window
        # Every record overlapping the range, those of no length included (as a read per window sees them).
        stalls = self._attributor.timeline.query(bounds[0], bounds[1], tid=tid,
                                                 limit=BATCH_STALLS_MAX + 1).get(tid, [])
        if len(stalls) > BATCH_STALLS_MAX:
            return None
        return stalls, [s.end_mono_ns for s in stalls], max((s.end_mono_ns - s.start_mono_ns for s in stalls),
                                                            default=0)


_UNREAD = object()
