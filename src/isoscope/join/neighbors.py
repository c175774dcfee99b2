"""Who ran on the CPU while a thread waited: a span window's run-queue time split by workload.

The sched probe splits each run-queue wait of a watched thread by the cgroups that ran on the
CPU meanwhile (:class:`isoscope.model.RunqueueNeighbors` in the ``runqueue`` stall's details).
This module adds those splits up over a span window and names the result:

* ``self`` — threads of the waiting thread's own cgroup (the workload's own contention);
* ``kernel`` — the root cgroup (kworkers, ksoftirqd, unconfined tasks) and the idle task;
* a workload name per other cgroup, as ``namespace/pod/container`` where the cgroup is a
  Kubernetes container, else its cgroup path;
* ``other`` — other cgroups beyond the top ones, and any part of a wait older than the CPU's
  slice history (not attributed).

A wait only partly inside the window counts in proportion to its part inside.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from isoscope.model import NEIGHBORS_DETAIL, RunqueueNeighbors, Stall

logger = logging.getLogger(__name__)

SELF = "self"
KERNEL = "kernel"
OTHER = "other"
SPECIAL_NAMES = frozenset({SELF, KERNEL, OTHER})
"""Entries of a neighbour list that are not another workload."""

TOP_NEIGHBORS = 3
"""Named workloads per span (the rest goes to ``other``)."""


@dataclass(slots=True)
class NeighborTally:
    """Run-queue wait ns by who ran meanwhile, summed over stalls.

    Attributes:
        by_cgroup: other cgroups' ns.
        self_ns: the waiting thread's own cgroup.
        kernel_ns: root cgroup and idle.
        other_ns: beyond the kernel's top contributors, or unseen.
    """

    by_cgroup: dict[int, float] = field(default_factory=dict)
    self_ns: float = 0.0
    kernel_ns: float = 0.0
    other_ns: float = 0.0

    def add(self, nb: RunqueueNeighbors, fraction: float = 1.0) -> None:
        """Add one wait's split, scaled by the share of the wait that counts."""
        self.self_ns += nb.self_ns * fraction
        self.kernel_ns += nb.kernel_ns * fraction
        self.other_ns += (nb.other_ns + nb.unseen_ns) * fraction
        for cg, ns in nb.top:
            self.by_cgroup[cg] = self.by_cgroup.get(cg, 0.0) + ns * fraction

    @property
    def total_ns(self) -> float:
        return self.self_ns + self.kernel_ns + self.other_ns + sum(self.by_cgroup.values())

    def __bool__(self) -> bool:
        return self.total_ns > 0

    def named(self, name_of: Callable[[int], str], top: int = TOP_NEIGHBORS) -> list[tuple[str, int]]:
        """``(name, ns)`` entries, longest first: the ``top`` longest-running workloads by name,
        ``self``, ``kernel`` and ``other`` (the remaining workloads included); zero entries left out.

        Cgroups that resolve to the same name (a container restarted in a new cgroup) add up.
        """
        by_name: dict[str, float] = {}
        for cg, ns in self.by_cgroup.items():
            name = name_of(cg) or f"cgroup:{cg}"
            if name in SPECIAL_NAMES:
                name = f"cgroup:{cg}"
            by_name[name] = by_name.get(name, 0.0) + ns
        ranked = sorted(by_name.items(), key=lambda kv: (-kv[1], kv[0]))
        other = self.other_ns + sum(ns for _, ns in ranked[top:])
        entries = ranked[:top] + [(SELF, self.self_ns), (KERNEL, self.kernel_ns), (OTHER, other)]
        out = [(name, int(round(ns))) for name, ns in entries]
        return sorted((e for e in out if e[1] > 0), key=lambda kv: (-kv[1], kv[0]))


def stall_neighbors(stall: Stall) -> RunqueueNeighbors | None:
    """The neighbour split a stall carries (watched threads' run-queue waits), or None."""
    details = stall.details
    if not details:
        return None
    nb = details.get(NEIGHBORS_DETAIL)
    return nb if isinstance(nb, RunqueueNeighbors) else None


def window_neighbors(stalls: Iterable[Stall], start: int, end: int) -> NeighborTally:
    """Sum the neighbour splits of the ``runqueue`` stalls overlapping ``[start, end]``.

    A stall cut by an edge counts for its share inside the window.
    """
    tally = NeighborTally()
    for s in stalls:
        if s.component != "runqueue":
            continue
        nb = stall_neighbors(s)
        if nb is None:
            continue
        dur = s.end_mono_ns - s.start_mono_ns
        inside = min(s.end_mono_ns, end) - max(s.start_mono_ns, start)
        if dur <= 0 or inside <= 0:
            continue
        tally.add(nb, min(1.0, inside / dur))
    return tally


def merge_neighbors(splits: Iterable[RunqueueNeighbors]) -> RunqueueNeighbors | None:
    """One split for several waits (a merged child span), keeping every named cgroup; None if none."""
    tally = NeighborTally()
    seen = False
    for nb in splits:
        tally.add(nb)
        seen = True
    if not seen:
        return None
    top = tuple(sorted(((cg, int(ns)) for cg, ns in tally.by_cgroup.items()), key=lambda kv: -kv[1]))
    return RunqueueNeighbors(int(tally.self_ns), int(tally.kernel_ns), int(tally.other_ns), 0, top)


class CgroupNamer:
    """Names a cgroup for neighbour lists: ``namespace/pod/container`` when it is a Kubernetes
    container, else its cgroup path (``cgroup:<id>`` once it is gone). Bounded cache.

    Args:
        labels_of: cgroup v2 id → (namespace, pod, container) (the resolver's ``cgroup_labels``).
        path_of: cgroup v2 id → cgroup path, or None when no live cgroup has that id.
        max_entries: cache bound.
    """

    def __init__(self, labels_of: Callable[[int], tuple[str, str, str]],
                 path_of: Callable[[int], str | None], max_entries: int = 4096) -> None:
        self._labels_of = labels_of
        self._path_of = path_of
        self._max = max_entries
        self._cache: OrderedDict[int, str] = OrderedDict()

    def __call__(self, cgroup_id: int) -> str:
        hit = self._cache.get(cgroup_id)
        if hit is not None:
            return hit
        name = ""
        try:
            ns, pod, container = self._labels_of(cgroup_id)
            if pod:
                name = "/".join((ns, pod, container)) if container else f"{ns}/{pod}"
            else:
                name = self._path_of(cgroup_id) or ""
        except Exception:  # a metadata failure must not cost the span its enrichment
            logger.debug("naming cgroup %d failed", cgroup_id, exc_info=True)
        if not name:
            # Not cached: the cgroup may be created (or its pod learnt) a moment later.
            return f"cgroup:{cgroup_id}"
        self._cache[cgroup_id] = name
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return name
