"""Fixtures for the syscall, reclaim, block, lifecycle and netns probe tests.

Import the fixtures from a test module with
``from tests.kernel.conftest_sysprobes import loaded_probe  # noqa: F401``.
Probes are compiled from the real ``bpf/*.bpf.c`` files by the real
:class:`isoscope.probes.loader.ProbeManager` and detached after the test.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from isoscope.model import Stats
from isoscope.probes.loader import ProbeManager, recursion_misses
from isoscope.probes.spec import ProbeSpec
from isoscope.probes.watch import WatchSet

logger = logging.getLogger(__name__)

DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def ensure_bcc() -> None:
    """Make Debian's bcc importable (it is not a PyPI package)."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        if DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)
        import bcc  # noqa: F401


@dataclass
class RunningProbe:
    """One probe loaded for a test, with everything it produced."""

    manager: ProbeManager
    watch: WatchSet
    stats: Stats
    events: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bpf(self) -> Any:
        return self.manager.loaded_modules()[0]

    def recursion_misses(self) -> int:
        """Runs of this probe's programs the kernel skipped (``recursion_misses`` in fdinfo).

        A tracepoint program is not run when it fires while another kprobe or
        tracepoint program is running on the same CPU (e.g. an I/O-completion
        interrupt arriving during one): those events are lost without a ring
        buffer reserve ever failing.
        """
        return recursion_misses(self.bpf)

    def drain(self) -> list[Any]:
        """Poll the ring buffer once and return a copy of every event so far."""
        self.manager.poll()
        with self.lock:
            return list(self.events)

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout_s: float = 5.0) -> list[Any]:
        """Poll until ``predicate(events)`` holds or the timeout passes; return the events."""
        deadline = time.monotonic() + timeout_s
        while True:
            evs = self.drain()
            if predicate(evs) or time.monotonic() >= deadline:
                return evs
            time.sleep(0.02)


@pytest.fixture
def load_probe(kernel_env: Any) -> Iterator[Callable[..., RunningProbe]]:
    """A callable ``(spec, defines=None) -> RunningProbe``; every probe is detached after the test."""
    ensure_bcc()
    made: list[RunningProbe] = []

    def factory(spec: ProbeSpec, defines: dict[str, int | str] | None = None) -> RunningProbe:
        stats = Stats()
        events: list[Any] = []
        lock = threading.Lock()

        def sink(ev: Any) -> None:
            with lock:
                events.append(ev)

        pm = ProbeManager([spec], kernel_env.features, sink, stats, defines=defines)
        statuses = pm.load()
        assert statuses[0].attached, f"probe {spec.name} did not attach: {statuses[0].reason}"
        ws = WatchSet(pm.loaded_modules)
        rp = RunningProbe(pm, ws, stats, events, lock)
        made.append(rp)
        return rp

    try:
        yield factory
    finally:
        for rp in made:
            rp.manager.shutdown()
