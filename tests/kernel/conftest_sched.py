"""Fixtures and real workloads for the sched probe tests (imported by test_sched.py / test_throttle.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from isoscope.model import RunSegment, Stall, Stats

logger = logging.getLogger(__name__)

# One CPU every workload of a scenario is pinned to: contention and throttling
# are per-CPU phenomena, and one CPU keeps the tests within their share of the box.
TEST_CPU = (os.cpu_count() or 1) - 1

BUSY_LOOP = "import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end:\n    pass\n"


def import_bcc() -> None:
    """Make bcc importable (Debian ships it outside the venv)."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")


@dataclass
class SchedProbe:
    """A loaded sched probe collecting its events."""

    manager: Any
    events: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bpf(self) -> Any:
        return self.manager.bpf("sched")

    def sink(self, ev: Any) -> None:
        with self.lock:
            self.events.append(ev)

    def drain(self) -> None:
        self.manager.poll()

    def stalls(self, tids: set[int], start: int, end: int) -> list[Stall]:
        with self.lock:
            return [e for e in self.events if isinstance(e, Stall) and e.tid in tids
                    and start < e.end_mono_ns <= end]

    def runs(self, tids: set[int]) -> list[RunSegment]:
        with self.lock:
            return [e for e in self.events if isinstance(e, RunSegment) and e.tid in tids]

    def task(self, tid: int) -> tuple[int, int]:
        """(runq_ns, throttle_ns) cumulative counters of a thread."""
        v = self.entry(tid)
        if v is None:
            raise KeyError(tid)
        return int(v.runq_ns), int(v.throttle_ns)

    def entry(self, tid: int) -> Any:
        """The probe's per-thread state of ``tid`` (keyed by task_struct address in the kernel), or None."""
        for v in self.bpf["tasks"].values():
            if int(v.tid) == tid:
                return v
        return None

    def cgroup(self, cgid: int) -> tuple[int, int, int]:
        t = self.bpf["cgroup_totals"]
        try:
            v = t[t.Key(cgid)]
        except KeyError:
            return 0, 0, 0
        return int(v.runq_ns), int(v.throttle_ns), int(v.waits)

    def hist_count(self, cgid: int) -> int:
        return sum(int(v.value) for k, v in self.bpf["runq_hist"].items() if k.cgroup_id == cgid)


def load_sched_probe(kernel_env: Any, throttle_method: str = "auto") -> Iterator[SchedProbe]:
    """Load bpf/sched.bpf.c with BTF offsets, drain it in the background, unload after."""
    import_bcc()
    from isoscope.kernel.btf import sched_defines
    from isoscope.probes.catalog import SCHED
    from isoscope.probes.loader import ProbeManager

    probe = SchedProbe(manager=None)
    pm = ProbeManager([SCHED], kernel_env.features, probe.sink, Stats(),
                      defines=sched_defines(throttle_method=throttle_method))
    probe.manager = pm
    statuses = pm.load()
    assert statuses[0].attached, statuses[0].reason
    pm.start(poll_interval_s=0.05)
    try:
        yield probe
    finally:
        pm.shutdown()


def schedstat(tid: int) -> tuple[int, int]:
    """(on-CPU ns, run_delay ns) from /proc/<tid>/schedstat: the kernel's own oracle."""
    with open(f"/proc/{tid}/schedstat", encoding="ascii") as fh:
        f = fh.read().split()
    return int(f[0]), int(f[1])


def busy_procs(cg: Any, n: int, secs: float, cpu: int = TEST_CPU) -> list[subprocess.Popen[Any]]:
    """Start n single-threaded busy loops inside cgroup ``cg``, pinned to ``cpu`` (self-stopping)."""
    procs = []
    for _ in range(n):
        p = cg.spawn([sys.executable, "-c", BUSY_LOOP.format(secs=secs)])
        os.sched_setaffinity(p.pid, {cpu})
        procs.append(p)
    return procs


def unique_name(tag: str) -> str:
    return f"isoscope-test/{tag}-{uuid.uuid4().hex[:8]}"


@dataclass
class Window:
    """Per-thread probe counters and schedstat over one measured interval."""

    start_ns: int
    end_ns: int
    probe: dict[int, tuple[int, int]]      # tid -> (runq, throttle) deltas
    run_delay: dict[int, int]              # tid -> schedstat run_delay delta
    on_cpu: dict[int, int]                 # tid -> schedstat on-CPU delta


def measure(probe: SchedProbe, tids: list[int], secs: float) -> Window:
    """Read probe counters and schedstat for ``tids`` at the start and end of ``secs``."""
    def snap() -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
        ss = {t: schedstat(t) for t in tids}
        pr = {t: probe.task(t) for t in tids}
        return ss, pr

    t0 = time.monotonic_ns()
    ss0, pr0 = snap()
    time.sleep(secs)
    ss1, pr1 = snap()
    t1 = time.monotonic_ns()
    return Window(
        t0, t1,
        {t: (pr1[t][0] - pr0[t][0], pr1[t][1] - pr0[t][1]) for t in tids},
        {t: ss1[t][1] - ss0[t][1] for t in tids},
        {t: ss1[t][0] - ss0[t][0] for t in tids},
    )
