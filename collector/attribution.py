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

from collector.model import COMPONENT_LAYER, KERNEL, Breakdown, RunSegment, Stall, Workload

logger = logging.getLogger(__name__)


class StallSource(Protocol):
    def query(self, start: int, end: int, *, tid: int = 0, pid: int = 0,
              cgroup_id: int = 0) -> dict[int, list[Stall]]: ...

    def runs(self, start: int, end: int, tid: int) -> list[RunSegment]: ...

    def coverage(self, start: int, end: int, drained_until: int) -> float: ...


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


def thread_breakdown(stalls: list[Stall], start: int, end: int) -> Breakdown:
    """Per-component stall ns of one thread inside ``[start, end]`` (no steal, no coverage).

    A thread is held back by one thing at a time, so the result never exceeds
    the window: each component counts the union of its intervals (a wait two
    records describe is counted once), and where components overlap each
    other, the overlap is shared out so that their sum is the union of all
    layer time.
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
    comp = bd.component_ns
    layer_iv: list[tuple[int, int]] = []
    for name, ivs in per_comp.items():
        merged = _merge(ivs)
        comp[name] = sum(b - a for a, b in merged)
        layer_iv.extend(merged)
    if len(per_comp) > 1:
        union = _union_length(layer_iv)
        total = sum(comp.values())
        if total > union:
            # Scale every component by the same factor; rounding leftovers go to the largest.
            scaled = {k: v * union // total for k, v in comp.items()}
            scaled[max(comp, key=comp.__getitem__)] += union - sum(scaled.values())
            comp.update(scaled)
    if syscalls:
        kernel = sum(b - a - _covered(a, b, layer_iv) for a, b in _merge(syscalls))
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
        best.coverage = self.timeline.coverage(start, end, drained_until)
        return best
