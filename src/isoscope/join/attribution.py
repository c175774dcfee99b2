"""The join: a span's time window × the stall timeline → a per-layer breakdown.

Scope semantics:
    * thread scope: the stalls of the thread that served the span. Stalls of a
      thread that serves several concurrent requests count for each of them:
      an event-loop stall delays every request on that loop.
    * process / container scope: the request was served by one thread we do
      not know, so the breakdown is that of the process's (or container's)
      thread that was held back the most inside the window — the worst case a
      single thread of that workload went through, bounded by the window.

The ``kernel`` baseline (blocked in syscalls for ordinary I/O) excludes the
parts of those syscalls that a layer already explains (a virtio request or a
run-queue wait inside a blocking ``read`` is the layer's time, not the
kernel's).
"""

from __future__ import annotations

import logging
from typing import Iterable, Protocol

from isoscope.join.timeline import PRECEDENCE, RANK_OF, RANKED, resolve
from isoscope.model import COMPONENT_LAYER, KERNEL, Breakdown, RunSegment, Stall, Workload

__all__ = ["PRECEDENCE", "Attributor", "StallSource", "StealSource", "thread_breakdown"]

logger = logging.getLogger(__name__)


class StallSource(Protocol):
    def query(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
              cgroup_id: int = 0) -> dict[int, list[Stall]]: ...

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]: ...

    def coverage(self, start: int, end: int, drained_until: int, tid: int = 0) -> float: ...


class StealSource(Protocol):
    def overlay(self, segments: Iterable[RunSegment], start: int, end: int) -> int: ...


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
            workload's thread held back the most inside the window. Fetch that
            thread's stalls with :meth:`stalls` only when they are needed.
        """
        tid = workload.tid if workload.scope == "thread" else 0
        pid = workload.pid if workload.scope in ("thread", "process") else 0
        cgroup_id = workload.cgroup_id
        window_many = getattr(self.timeline, "window_many", None)
        out: list[tuple[Breakdown, int]] = []
        if window_many is not None:
            per_window = window_many(windows, tid=tid, pid=pid, cgroup_id=cgroup_id)
            for (start, end), per_thread in zip(windows, per_window):
                best: dict[str, int] | None = None
                best_tid = 0
                best_ns = -1
                for t, comp in per_thread.items():
                    ns = _overhead(comp)
                    if ns > best_ns:
                        best, best_tid, best_ns = comp, t, ns
                bd = Breakdown(component_ns=best if best is not None else {}, duration_ns=max(0, end - start))
                out.append((bd, best_tid if best is not None else workload.tid))
        else:
            # A stall source without resolved timelines: join its raw stalls.
            for start, end in windows:
                best_bd: Breakdown | None = None
                best_tid = 0
                for t, stalls in self.timeline.query(start, end, tid=tid, pid=pid, cgroup_id=cgroup_id).items():
                    bd = thread_breakdown(stalls, start, end)
                    if best_bd is None or bd.overhead_ns() > best_bd.overhead_ns():
                        best_bd, best_tid = bd, t
                if best_bd is None:
                    best_bd, best_tid = Breakdown(duration_ns=max(0, end - start)), workload.tid
                out.append((best_bd, best_tid))
        if self.steal is not None:
            for (start, end), (bd, t) in zip(windows, out):
                if not t:
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
        for (bd, _), cov in zip(out, covs):
            bd.coverage = cov
        return out

    def stalls(self, tid: int, start: int, end: int) -> list[Stall]:
        """The stalls of thread ``tid`` overlapping ``[start, end]`` (for child spans).

        A window longer than the timeline keeps stalls is clipped to its last
        TTL: nothing older is held, and the scan stays bounded.
        """
        ttl = getattr(self.timeline, "ttl_ns", 0)
        lo = max(start, end - ttl) if ttl else start
        return [s for s in self.timeline.query(lo, end, tid=tid).get(tid, ())
                if min(s.end_mono_ns, end) > max(s.start_mono_ns, lo)]
