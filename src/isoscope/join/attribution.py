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

from isoscope.model import COMPONENT_LAYER, KERNEL, Breakdown, RunSegment, Stall, Workload

logger = logging.getLogger(__name__)


class StallSource(Protocol):
    def query(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
              cgroup_id: int = 0) -> dict[int, list[Stall]]: ...

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]: ...

    def coverage(self, start: int, end: int, drained_until: int, tid: int = 0) -> float: ...


class StealSource(Protocol):
    def overlay(self, segments: Iterable[RunSegment], start: int, end: int) -> int: ...


def _clip(stall: Stall, start: int, end: int) -> tuple[int, int]:
    return max(stall.start_mono_ns, start), min(stall.end_mono_ns, end)


def _union_length(intervals: list[tuple[int, int]]) -> int:
    total = 0
    cur_a = cur_b = None
    for a, b in sorted(intervals):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        elif b > cur_b:
            cur_b = b
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def _covered(a: int, b: int, intervals: list[tuple[int, int]]) -> int:
    """Length of [a, b] covered by the union of ``intervals``."""
    return _union_length([(max(x, a), min(y, b)) for x, y in intervals if y > a and x < b])


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# When two components claim the same instant of one thread, the first here
# gets it. Reclaim comes first: a thread preempted or throttled in the middle of
# reclaiming is still stalled on memory (the kernel's pressure accounting
# counts it the same way); throttling before plain run-queue contention because
# the quota is the cause of that wait.
PRECEDENCE: tuple[str, ...] = ("memory_reclaim", "cpu_throttle", "runqueue", "virtio_io", "netns", "pv_exit",
                               "ept", "vm_exit", "sandbox", "steal")


def _subtract(ivs: list[tuple[int, int]], taken: list[tuple[int, int]]) -> int:
    """Length of the union of ``ivs`` not already in ``taken`` (both merged, sorted)."""
    return sum(b - a - _covered(a, b, taken) for a, b in ivs)


def thread_breakdown(stalls: list[Stall], start: int, end: int) -> Breakdown:
    """Per-component stall ns of one thread inside ``[start, end]`` (no steal, no coverage).

    A thread is held back by one thing at a time, so the result never exceeds
    the window: a wait two records describe is counted once, and where
    components overlap the instant goes to the one first in
    :data:`PRECEDENCE`. The kernel baseline gets only what no layer explains.
    """
    bd = Breakdown(duration_ns=max(0, end - start))
    per_comp: dict[str, list[tuple[int, int]]] = {}
    syscalls: list[tuple[int, int]] = []
    for s in stalls:
        a, b = _clip(s, start, end)
        if b <= a:
            continue
        if COMPONENT_LAYER[s.component] == KERNEL:
            syscalls.append((a, b))
        else:
            per_comp.setdefault(s.component, []).append((a, b))
        bd.stalls.append(s)
    if syscalls and "virtio_io" in per_comp:
        # A blocking syscall that waited on a virtio request is the paravirtual I/O
        # path end to end: the request setup, the virtqueue kick and the completion
        # it runs on the way are the device's time too, not the kernel baseline.
        dev = _merge(per_comp["virtio_io"])
        per_comp["virtio_io"] += [(a, b) for a, b in _merge(syscalls) if _covered(a, b, dev)]
    comp = bd.component_ns
    taken: list[tuple[int, int]] = []
    order = [c for c in PRECEDENCE if c in per_comp] + [c for c in per_comp if c not in PRECEDENCE]
    for name in order:
        merged = _merge(per_comp[name])
        ns = _subtract(merged, taken) if taken else sum(b - a for a, b in merged)
        if ns:
            comp[name] = ns
        taken = _merge(taken + merged)
    if syscalls:
        kernel = _subtract(_merge(syscalls), taken)
        if kernel:
            comp["syscall"] = kernel
    return bd


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
        """The breakdown of a span window (CLOCK_MONOTONIC ns) for a resolved workload."""
        per_thread = self.timeline.query(start, end, tid=workload.tid if workload.scope == "thread" else 0,
                                         pid=workload.pid if workload.scope in ("thread", "process") else 0,
                                         cgroup_id=workload.cgroup_id)
        best: Breakdown | None = None
        best_tid = 0
        for tid, stalls in per_thread.items():
            bd = thread_breakdown(stalls, start, end)
            if best is None or bd.overhead_ns() > best.overhead_ns():
                best, best_tid = bd, tid
        if best is None:
            best = Breakdown(duration_ns=max(0, end - start))
            best_tid = workload.tid
        if self.steal is not None and best_tid:
            runs = self.timeline.runs(start, end, best_tid)
            if runs:
                steal_ns = int(self.steal.overlay(runs, start, end))
                if steal_ns > 0:
                    best.component_ns["steal"] = best.component_ns.get("steal", 0) + steal_ns
        best.coverage = self.timeline.coverage(start, end, drained_until, tid=best_tid)
        return best
