"""CLOCK_MONOTONIC ↔ wall-clock conversion, re-measured periodically and on clock steps.

Kernel timestamps (``bpf_ktime_get_ns``) are CLOCK_MONOTONIC; OTLP spans carry
wall-clock time. The offset between the two changes when the wall clock is
stepped (NTP, an operator, a VM resume), so it is re-measured on a timer and
every step is counted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)

STEP_THRESHOLD_NS = 1_000_000
"""A change of the offset larger than this is a clock step, not drift."""


def measure_offset(samples: int = 5, wall: Callable[[], int] = time.time_ns,
                   mono: Callable[[], int] = time.monotonic_ns) -> int:
    """``wall - monotonic`` in ns, from the sample with the tightest bracket."""
    best_gap = None
    best = 0
    for _ in range(samples):
        m0 = mono()
        w = wall()
        m1 = mono()
        gap = m1 - m0
        if best_gap is None or gap < best_gap:
            best_gap = gap
            best = w - (m0 + gap // 2)
    return best


class MonoWallClock:
    """Converts between CLOCK_MONOTONIC and wall-clock ns with an offset kept up to date.

    Args:
        interval_s: how often the offset is re-measured by :meth:`start`'s thread.
        on_step: called with the offset change (ns) when a step is detected.
    """

    def __init__(self, interval_s: float = 1.0, on_step: Callable[[int], None] | None = None) -> None:
        self.interval_s = interval_s
        self._on_step = on_step
        self.offset_ns = measure_offset()
        self.steps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def remeasure(self) -> int:
        """Measure the offset again; returns the change (ns)."""
        new = measure_offset()
        delta = new - self.offset_ns
        self.offset_ns = new
        if abs(delta) > STEP_THRESHOLD_NS:
            self.steps += 1
            logger.warning("wall clock stepped by %.3f ms; offset re-measured", delta / 1e6)
            if self._on_step:
                self._on_step(delta)
        return delta

    def to_mono(self, unix_ns: int) -> int:
        return unix_ns - self.offset_ns

    def to_unix(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def start(self) -> None:
        def _run() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.remeasure()
                except Exception:  # pragma: no cover - defensive: never let the thread die
                    logger.exception("clock offset measurement failed")

        self._thread = threading.Thread(target=_run, name="isoscope-clock", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
