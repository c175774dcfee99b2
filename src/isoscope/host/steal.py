"""Per-CPU steal clock sampled from ``/proc/stat``, laid over threads' on-CPU segments.

A guest's vCPU is "stolen" while the hypervisor runs something else on the
physical CPU. The kernel keeps a nanosecond steal clock per CPU (paravirt
steal time) but exports it only as the 8th column of the ``cpuN`` lines of
``/proc/stat``, in USER_HZ ticks (10 ms with the usual USER_HZ of 100): that is
the resolution available to any observer inside the guest. Sampling it finely
(default every 10 ms) bounds *when* each tick of steal happened to one
sampling interval; steal is assumed uniform inside that interval (linear
interpolation), and a thread is charged the steal of the CPU it ran on, over
the part of the interval it was on that CPU (its :class:`RunSegment`).

Sampling is adaptive. Two samples with the same counter prove that no steal
happened between them, however far apart they are: a flat counter is exact at
any period. Fine samples only matter while the counter moves, to place each tick
within one period. So the sampler takes fine samples (``interval_s``) while any
CPU's steal moved within the last ``hot_hold_s`` and coarse ones
(``idle_interval_s``) while every counter is flat, or while no thread is watched
(nothing to charge steal to). The cost: the ticks of the first interval of an
episode after a flat spell are spread over up to ``idle_interval_s`` instead of
``interval_s`` (at most the one or two ticks that started the episode); every
later tick of the episode is placed as before. The counter is read with one
``pread`` of a kept-open ``/proc/stat`` and one precompiled regex (no per-line
Python split), as the sampler runs 100 times a second on a busy node.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from typing import Callable, Iterable

from isoscope.model import RunSegment

logger = logging.getLogger(__name__)

Clock = Callable[[], int]


def user_hz() -> int:
    """Ticks per second of ``/proc/stat`` counters (``sysconf(_SC_CLK_TCK)``)."""
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError):  # pragma: no cover - every Linux libc has it
        return 100


_CPU_LINE = re.compile(rb"^cpu(\d+)((?:[ \t]+\d+){0,8})", re.M)
"""A ``cpuN`` line of ``/proc/stat``: the CPU number and its first 8 counters (steal is the 8th)."""


def parse_steal_ticks(data: bytes) -> dict[int, int]:
    """Per-CPU cumulative steal ticks from the bytes of a ``/proc/stat`` (see :func:`read_steal_ticks`)."""
    out: dict[int, int] = {}
    for cpu, cols in _CPU_LINE.findall(data):
        fields = cols.split()
        out[int(cpu)] = int(fields[7]) if len(fields) > 7 else 0
    return out


def read_steal_ticks(proc_root: str = "/proc") -> dict[int, int]:
    """Per-CPU cumulative steal in USER_HZ ticks from ``<proc_root>/stat``.

    CPUs that are offline have no ``cpuN`` line and are absent from the result.
    Kernels older than 2.6.11 have no steal column; they report 0.
    """
    with open(os.path.join(proc_root, "stat"), "rb") as fh:
        return parse_steal_ticks(fh.read())


class StealSampler:
    """Samples per-CPU steal into bounded per-CPU rings and answers interval queries.

    Each ring holds (CLOCK_MONOTONIC ns, cumulative steal ns) points; runs of
    unchanged values are collapsed to their first and last sample, so memory
    grows with steal *changes*, not with time, and is capped by ``max_points``.

    Args:
        proc_root: where procfs is mounted.
        interval_s: sampling period while steal moves.
        max_points: ring size per CPU (oldest points are dropped first).
        clock: CLOCK_MONOTONIC source in ns (injectable for replaying recorded samples).
        idle_interval_s: sampling period while every CPU's steal counter is flat (or nothing is
            watched); at most ``interval_s`` makes sampling fixed-rate.
        hot_hold_s: fine sampling goes on this long after the last change of any counter.
        watching: returns whether any thread is watched (whose on-CPU time steal could be laid
            over); None counts as always.
    """

    def __init__(self, proc_root: str = "/proc", interval_s: float = 0.01, max_points: int = 8192,
                 clock: Clock = time.monotonic_ns, idle_interval_s: float = 0.1, hot_hold_s: float = 1.0,
                 watching: Callable[[], bool] | None = None) -> None:
        self.proc_root = proc_root
        self.interval_s = interval_s
        self.idle_interval_s = max(interval_s, idle_interval_s)
        self._hot_hold_ns = int(hot_hold_s * 1e9)
        self._watching = watching
        self._max_points = max_points
        self._clock = clock
        self._tick_ns = 1_000_000_000 // user_hz()
        self._lock = threading.Lock()
        self._rings: dict[int, deque[tuple[int, int]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._last_change_ns: int | None = None
        self.samples = 0
        self.errors = 0

    @property
    def resolution_ns(self) -> int:
        """Granularity of the steal counter as exported (one USER_HZ tick)."""
        return self._tick_ns

    # -- sampling -------------------------------------------------------------

    def _read(self) -> dict[int, int]:
        # One pread of a kept-open file: no open/close per sample; reopened after any error.
        if self._fd is None:
            self._fd = os.open(os.path.join(self.proc_root, "stat"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(self._fd, 1 << 16, 0)
            while len(data) % (1 << 16) == 0 and data:  # a node with thousands of IRQ lines
                more = os.pread(self._fd, 1 << 16, len(data))
                if not more:
                    break
                data += more
        except OSError:
            self._close()
            raise
        return parse_steal_ticks(data)

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def sample(self) -> None:
        """Take one sample now (the background thread calls this every ``interval_s``)."""
        ticks = self._read()
        now = self._clock()
        tick_ns = self._tick_ns
        changed = False
        with self._lock:
            rings = self._rings
            for cpu, t in ticks.items():
                value = t * tick_ns
                ring = rings.get(cpu)
                if ring is None:
                    ring = rings[cpu] = deque(maxlen=self._max_points)
                    ring.append((now, value))
                    continue
                last = ring[-1][1]
                if value == last and len(ring) >= 2 and ring[-2][1] == value:
                    ring[-1] = (now, value)  # extend a flat run instead of growing the ring
                    continue
                if value < last:
                    # A counter that went backwards (CPU hot-unplugged and back): restart its ring.
                    ring.clear()
                elif value != last:
                    changed = True
                ring.append((now, value))
            self.samples += 1
        if changed:
            self._last_change_ns = now

    def next_interval_s(self) -> float:
        """How long the background thread waits before the next sample (see the module docstring)."""
        if self._watching is not None:
            try:
                if not self._watching():
                    return self.idle_interval_s
            except Exception:  # a failing hook must not stop sampling: sample finely
                logger.debug("steal sampler: watching() failed", exc_info=True)
                return self.interval_s
        last = self._last_change_ns
        if last is not None and self._clock() - last <= self._hot_hold_ns:
            return self.interval_s
        return self.idle_interval_s

    def start(self) -> None:
        """Sample in a background thread until :meth:`shutdown`."""
        if self._thread is not None:
            return
        self.sample()

        def _run() -> None:
            while not self._stop.wait(self.next_interval_s()):
                try:
                    self.sample()
                except OSError:
                    self.errors += 1
                    if self.errors <= 3:
                        logger.warning("cannot read %s/stat", self.proc_root, exc_info=True)

        self._thread = threading.Thread(target=_run, name="isoscope-steal", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        self._close()

    # -- queries --------------------------------------------------------------

    def cpus(self) -> list[int]:
        """CPUs seen so far."""
        with self._lock:
            return sorted(self._rings)

    def _cum_at(self, ring: deque[tuple[int, int]], t: int) -> float:
        # Linear interpolation between the samples around t; clamped at both ends
        # (before the first sample nothing is known, after the last nothing yet).
        if t <= ring[0][0]:
            return float(ring[0][1])
        if t >= ring[-1][0]:
            return float(ring[-1][1])
        lo, hi = 0, len(ring) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ring[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (t0, v0), (t1, v1) = ring[lo], ring[hi]
        if t1 == t0:
            return float(v1)
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    def steal_ns(self, cpu: int, start_mono_ns: int, end_mono_ns: int) -> float:
        """Steal on ``cpu`` between two CLOCK_MONOTONIC instants (interpolated).

        Returns:
            ns of steal, 0.0 for an unknown CPU or an empty interval.
        """
        if end_mono_ns <= start_mono_ns:
            return 0.0
        with self._lock:
            ring = self._rings.get(cpu)
            if not ring:
                return 0.0
            return max(0.0, self._cum_at(ring, end_mono_ns) - self._cum_at(ring, start_mono_ns))

    def node_steal_ns(self, start_mono_ns: int, end_mono_ns: int) -> float:
        """Steal summed over every CPU between two CLOCK_MONOTONIC instants (interpolated)."""
        if end_mono_ns <= start_mono_ns:
            return 0.0
        with self._lock:
            rings = list(self._rings.values())
            return sum(max(0.0, self._cum_at(r, end_mono_ns) - self._cum_at(r, start_mono_ns)) for r in rings if r)

    def totals(self) -> dict[int, float]:
        """Cumulative steal per CPU in seconds as of the last sample (``steal_seconds_total{cpu}``)."""
        with self._lock:
            return {cpu: ring[-1][1] / 1e9 for cpu, ring in self._rings.items() if ring}

    def last_sample_mono_ns(self) -> int:
        """When the most recent sample was taken (0 before the first)."""
        with self._lock:
            return max((ring[-1][0] for ring in self._rings.values() if ring), default=0)

    def overlay(self, segments: Iterable[RunSegment], start_mono_ns: int, end_mono_ns: int) -> int:
        """Steal that landed on the given on-CPU segments inside a window.

        Args:
            segments: on-CPU intervals of the threads of interest (any order, any CPUs).
            start_mono_ns: window start.
            end_mono_ns: window end.

        Returns:
            ns of steal, rounded: for each segment, the steal of its CPU over its
            part inside the window.
        """
        # steal_ns per segment, under one lock acquisition (a span's window holds many segments).
        total = 0.0
        cum_at = self._cum_at
        with self._lock:
            rings = self._rings
            for seg in segments:
                a = seg.start_mono_ns if seg.start_mono_ns > start_mono_ns else start_mono_ns
                b = seg.end_mono_ns if seg.end_mono_ns < end_mono_ns else end_mono_ns
                if b > a:
                    ring = rings.get(seg.cpu)
                    if ring:
                        d = cum_at(ring, b) - cum_at(ring, a)
                        if d > 0:
                            total += d
        return int(round(total))
