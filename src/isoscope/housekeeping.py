"""A once-a-second thread for the daemon's periodic chores (eviction, refreshes, gauges)."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

Chore = Callable[[int], None]
"""Called with the tick number (1, 2, …); a chore decides itself how often it does its work."""


class Housekeeper:
    """Runs each chore every tick, isolated: one chore's failure is logged, the others still run.

    Args:
        chores: the periodic work, in order.
        interval_s: the tick.
    """

    def __init__(self, chores: Sequence[Chore], interval_s: float = 1.0) -> None:
        self._chores = tuple(chores)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="isoscope-housekeeping", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self._interval_s):
            tick += 1
            for chore in self._chores:
                try:
                    chore(tick)
                except Exception:
                    logger.exception("housekeeping: %s failed", getattr(chore, "__qualname__", chore))

    def shutdown(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
