"""Reconcile kernel-derived CFS throttling with each cgroup's own ``cpu.stat``.

The sched probe measures throttling per *thread* (time a runnable thread was
held back because its cgroup ran out of quota) and sums it per cgroup v2 id in
its ``cgroup_totals`` map. The kernel's ``cpu.stat`` measures it per *run
queue*: v1 ``throttled_time`` (ns) and v2 ``throttled_usec`` add up, for every
CPU, how long that CPU's cfs_rq of the cgroup was throttled. The two agree
when one thread per CPU is throttled; several threads throttled together on
one CPU make the per-thread sum larger (each thread really lost that time);
a throttled run queue with no waiting thread makes ``cpu.stat`` larger.

Per tracked cgroup and per sampling interval this module reports both deltas,
their ratio (the factor that scales the kernel figure to ``cpu.stat``) and
whether they agree within a tolerance, so metrics and operators can see when
the tracepoint method and the kernel's own accounting diverge.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Mapping

from isoscope.host.cgroupfs import read_cpu_stat

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """One cgroup over one interval.

    Attributes:
        cgroup_path: the cgroup path (as in ``/proc/<pid>/cgroup``).
        cgroup_id: its v2 id (key of the sched probe's maps).
        start_mono_ns, end_mono_ns: the interval.
        kernel_ns: throttled thread time measured by the sched probe.
        cpustat_ns: throttled run-queue time from ``cpu.stat``.
        factor: ``cpustat_ns / kernel_ns`` (1.0 when both are 0; ``inf`` when only cpu.stat saw any).
        agree: ``|kernel - cpustat| <= tolerance × max(kernel, cpustat)``, or both below ``floor_ns``.
        nr_throttled: throttled periods in the interval (``cpu.stat`` ``nr_throttled`` delta).
    """

    cgroup_path: str
    cgroup_id: int
    start_mono_ns: int
    end_mono_ns: int
    kernel_ns: int
    cpustat_ns: int
    factor: float
    agree: bool
    nr_throttled: int

    @property
    def relative_error(self) -> float:
        """``|kernel - cpustat| / cpustat`` (0 when both are 0)."""
        if self.cpustat_ns == 0:
            return 0.0 if self.kernel_ns == 0 else float("inf")
        return abs(self.kernel_ns - self.cpustat_ns) / self.cpustat_ns


def compare(kernel_ns: int, cpustat_ns: int, tolerance: float = 0.05, floor_ns: int = 1_000_000) -> tuple[float, bool]:
    """Factor and agreement of two throttle figures for the same interval.

    Args:
        kernel_ns: the probe's figure.
        cpustat_ns: ``cpu.stat``'s figure.
        tolerance: allowed relative difference.
        floor_ns: below this both are noise and agree.
    """
    if kernel_ns == 0:
        factor = 1.0 if cpustat_ns == 0 else float("inf")
    else:
        factor = cpustat_ns / kernel_ns
    if max(kernel_ns, cpustat_ns) < floor_ns:
        return factor, True
    return factor, abs(kernel_ns - cpustat_ns) <= tolerance * max(kernel_ns, cpustat_ns)


def cpu_stat_dir(cgroup_path: str, v2_root: str | None, v1_cpu_root: str | None) -> str | None:
    """The directory whose ``cpu.stat`` carries bandwidth statistics for a cgroup path.

    A v1 ``cpu`` controller wins when mounted (on hybrid machines the v2 tree has
    no controllers); otherwise the v2 directory, if its ``cpu.stat`` exists.
    """
    rel = cgroup_path.lstrip("/")
    # v2 has a cpu.stat in every cgroup (usage only without the cpu controller), so
    # a mounted v1 cpu controller, where bandwidth control then lives, is asked first.
    if v1_cpu_root and os.path.isfile(os.path.join(v1_cpu_root, rel, "cpu.stat")):
        return os.path.join(v1_cpu_root, rel)
    if v2_root and os.path.isfile(os.path.join(v2_root, rel, "cpu.stat")):
        return os.path.join(v2_root, rel)
    return None


def read_cpu_stat_safe(directory: str) -> dict[str, int] | None:
    """``read_cpu_stat`` that returns None for a missing cgroup or file."""
    try:
        return read_cpu_stat(directory)
    except OSError:
        return None


@dataclass(slots=True)
class _Tracked:
    path: str
    cgroup_id: int
    directory: str
    cpustat_ns: int
    nr_throttled: int
    kernel_ns: int
    mono_ns: int


class ThrottleReconciler:
    """Tracks cgroups and reconciles the probe's throttle totals with ``cpu.stat`` per interval.

    Args:
        v2_root: cgroup2 mount point (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``), or None.
        v1_cpu_root: v1 ``cpu`` controller mount (``/sys/fs/cgroup/cpu``), or None on pure v2.
        tolerance: relative difference still counted as agreement.
        floor_ns: interval totals below this always agree (noise).
    """

    def __init__(self, v2_root: str | None, v1_cpu_root: str | None = None, tolerance: float = 0.05,
                 floor_ns: int = 1_000_000) -> None:
        self.v2_root = v2_root
        self.v1_cpu_root = v1_cpu_root if v1_cpu_root and os.path.isdir(v1_cpu_root) else None
        self.tolerance = tolerance
        self.floor_ns = floor_ns
        self._lock = threading.Lock()
        self._tracked: dict[int, _Tracked] = {}
        self.last: dict[int, Reconciliation] = {}

    def track(self, cgroup_path: str, cgroup_id: int, kernel_ns: int = 0) -> bool:
        """Start reconciling a cgroup.

        Args:
            cgroup_path: path as in ``/proc/<pid>/cgroup``.
            cgroup_id: v2 id under which the probe counts it.
            kernel_ns: the probe's current cumulative throttle ns for it (the baseline).

        Returns:
            False when the cgroup has no readable ``cpu.stat``.
        """
        directory = cpu_stat_dir(cgroup_path, self.v2_root, self.v1_cpu_root)
        stat = read_cpu_stat_safe(directory) if directory else None
        if directory is None or stat is None:
            logger.debug("no cpu.stat for %s", cgroup_path)
            return False
        with self._lock:
            self._tracked[cgroup_id] = _Tracked(cgroup_path, cgroup_id, directory, stat["throttled_ns"],
                                                stat["nr_throttled"], kernel_ns, time.monotonic_ns())
        return True

    def untrack(self, cgroup_id: int) -> None:
        """Stop reconciling a cgroup (e.g. it was removed)."""
        with self._lock:
            self._tracked.pop(cgroup_id, None)
            self.last.pop(cgroup_id, None)

    def sample(self, kernel_totals: Mapping[int, int]) -> list[Reconciliation]:
        """Close one interval for every tracked cgroup.

        Args:
            kernel_totals: cgroup id → the probe's cumulative throttle ns (from the
                sched probe's ``cgroup_totals`` map, field ``throttle_ns``), read just before.

        Returns:
            One reconciliation per tracked cgroup still present.
        """
        out: list[Reconciliation] = []
        now = time.monotonic_ns()
        with self._lock:
            for cgid, t in list(self._tracked.items()):
                stat = read_cpu_stat_safe(t.directory)
                if stat is None:  # cgroup removed
                    self._tracked.pop(cgid, None)
                    self.last.pop(cgid, None)
                    continue
                k_total = int(kernel_totals.get(cgid, t.kernel_ns))
                d_kernel = max(0, k_total - t.kernel_ns)
                d_stat = max(0, stat["throttled_ns"] - t.cpustat_ns)
                factor, agree = compare(d_kernel, d_stat, self.tolerance, self.floor_ns)
                rec = Reconciliation(t.path, cgid, t.mono_ns, now, d_kernel, d_stat, factor, agree,
                                     max(0, stat["nr_throttled"] - t.nr_throttled))
                if not agree:
                    logger.info("throttle accounting differs for %s: probe %.1f ms, cpu.stat %.1f ms",
                                t.path, d_kernel / 1e6, d_stat / 1e6)
                t.cpustat_ns, t.nr_throttled, t.kernel_ns, t.mono_ns = (stat["throttled_ns"], stat["nr_throttled"],
                                                                        k_total, now)
                self.last[cgid] = rec
                out.append(rec)
        return out


def kernel_throttle_totals(cgroup_totals_map: object) -> dict[int, int]:
    """cgroup id → throttle ns from the sched probe's ``cgroup_totals`` bcc table."""
    out: dict[int, int] = {}
    for k, v in cgroup_totals_map.items():  # type: ignore[attr-defined]
        out[int(k.value)] = int(v.throttle_ns)
    return out
