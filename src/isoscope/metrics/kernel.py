"""Mirror the probes' in-kernel aggregates into the layer metrics.

Node-wide layer time comes from the kernel's own totals, not from the stall
records that cross to user space: those are only the stalls above the
threshold, while the totals count every wait. Each pass reads the cumulative
maps, turns them into increases per workload, and feeds the Prometheus
exporter (``isoscope_layer_stall_seconds_total``, the run-queue and syscall
latency histograms, the KVM exit counters, ``isoscope_runqueue_neighbor_seconds_total``
from the sched probe's ``runq_neighbors`` totals).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Mapping, Protocol

from isoscope.metrics.prometheus import WORKLOAD_LABELS

logger = logging.getLogger(__name__)

Labels = tuple[str, str, str]
"""(namespace, pod, container) of a cgroup."""

MIRRORED_COMPONENTS = frozenset({"runqueue", "cpu_throttle", "virtio_io", "netns", "memory_reclaim"})
"""Components whose node-wide totals come from kernel maps (their stall events are not counted again)."""

SYSCALL_CLASS_NAMES = {0: "other", 1: "net", 2: "file", 3: "lock", 4: "sleep"}


SELF_LABELS: Labels = ("", "", "self")
KERNEL_LABELS: Labels = ("", "", "kernel")
OTHER_LABELS: Labels = ("other", "other", "other")
ROOT_CGROUP_ID = 1
"""The cgroup v2 root's id (``ISO_ROOT_CGROUP_ID``): kernel threads, unconfined tasks; the probe adds idle."""


class LayerMetricsSink(Protocol):
    def add_stall_ns(self, component: str, ns: int, namespace: str, pod: str, container: str) -> None: ...

    def add_runqueue_neighbor_ns(self, victim: Labels, neighbor: Labels, ns: int) -> None: ...

    def set_log2_histogram(self, metric: str, labels: Mapping[str, str], slot_counts: Mapping[int, int],
                           sum_seconds: float | None) -> None: ...


def _items(bpf: Any, name: str) -> list[tuple[Any, Any]]:
    try:
        return list(bpf[name.encode()].items())
    except KeyError:
        return []


class KernelMetrics:
    """Reads kernel aggregates and feeds their increases to the metrics sink.

    Args:
        bpf_of: returns the loaded bcc module of a probe, or None.
        sink: the Prometheus exporter.
        labels_of: cgroup v2 id → (namespace, pod, container).
        is_virtio_dev: whether a kernel dev_t is a virtio disk.
    """

    def __init__(self, bpf_of: Callable[[str], Any], sink: LayerMetricsSink, labels_of: Callable[[int], Labels],
                 is_virtio_dev: Callable[[int], bool] = lambda dev: True) -> None:
        self._bpf_of = bpf_of
        self._sink = sink
        self._labels_of = labels_of
        self._is_virtio = is_virtio_dev
        self._seen: dict[tuple[str, int, int], int] = {}

    def _add(self, component: str, cgroup_id: int, cls: int, total_ns: int) -> None:
        key = (component, cgroup_id, cls)
        prev = self._seen.get(key, 0)
        # An LRU map may have evicted and re-created the entry: a smaller total starts over.
        delta = total_ns - prev if total_ns >= prev else total_ns
        self._seen[key] = total_ns
        if delta > 0:
            self._sink.add_stall_ns(component, delta, *self._labels_of(cgroup_id))

    def collect(self) -> None:
        """One pass over every loaded probe's aggregates."""
        self._sched()
        self._totals("block", "virtio_io", lambda cls: self._is_virtio(cls))
        self._totals("netns", "netns", lambda cls: True)
        self._totals("vmscan", "memory_reclaim", lambda cls: True)
        self._histogram("syscalls", "syscall_latency_seconds", by_class=True)
        if len(self._seen) > 200_000:  # bounded bookkeeping under extreme cgroup churn
            self._seen.clear()

    def _sched(self) -> None:
        bpf = self._bpf_of("sched")
        if bpf is None:
            return
        for k, v in _items(bpf, "cgroup_totals"):
            cg = int(k.value) if hasattr(k, "value") else int(k)
            self._add("runqueue", cg, 0, int(v.runq_ns))
            self._add("cpu_throttle", cg, 0, int(v.throttle_ns))
        self._histogram("sched", "runqueue_latency_seconds", table="runq_hist", by_class=False)
        self._neighbors(bpf)

    def _neighbor_labels(self, victim: int, neighbor: int) -> Labels:
        if neighbor == victim:
            return SELF_LABELS
        if neighbor == ROOT_CGROUP_ID:
            return KERNEL_LABELS
        if neighbor == 0:
            return OTHER_LABELS
        return self._labels_of(neighbor)

    def _neighbors(self, bpf: Any) -> None:
        """Who delayed whom: increases of the (victim cgroup, neighbour cgroup) wait totals."""
        add = getattr(self._sink, "add_runqueue_neighbor_ns", None)
        if add is None:
            return
        for k, v in _items(bpf, "runq_neighbors"):
            victim, neighbor = int(k.victim_id), int(k.neighbor_id)
            total = int(v.value) if hasattr(v, "value") else int(v)
            key = ("neighbor", victim, neighbor)
            prev = self._seen.get(key, 0)
            delta = total - prev if total >= prev else total  # an LRU eviction starts the entry over
            self._seen[key] = total
            if delta > 0:
                add(self._labels_of(victim), self._neighbor_labels(victim, neighbor), delta)

    def _totals(self, probe: str, component: str, keep: Callable[[int], bool]) -> None:
        bpf = self._bpf_of(probe)
        if bpf is None:
            return
        for k, v in _items(bpf, "totals"):
            if keep(int(k.class_id)):
                self._add(component, int(k.cgroup_id), int(k.class_id), int(v.sum_ns))

    def _histogram(self, probe: str, metric: str, *, table: str = "hist", by_class: bool) -> None:
        bpf = self._bpf_of(probe)
        if bpf is None:
            return
        merged: dict[tuple[str, ...], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for k, v in _items(bpf, table):
            labels = self._labels_of(int(k.cgroup_id))
            key = (SYSCALL_CLASS_NAMES.get(int(k.class_id), "other"), *labels) if by_class else labels
            merged[key][int(k.slot)] += int(v.value) if hasattr(v, "value") else int(v)
        for key, slots in merged.items():
            workload = key[1:] if by_class else key
            labels = dict(zip(WORKLOAD_LABELS, workload))
            if by_class:
                labels["class"] = key[0]
            self._sink.set_log2_histogram(metric, labels, dict(slots), None)
