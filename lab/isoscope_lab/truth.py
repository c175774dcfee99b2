"""Per-request kernel truth: what the kernel itself says happened to the handling thread.

A lab service reads these counters right after its span starts and right
before it ends, and writes the deltas onto the span as ``test.truth.*``
attributes, so every enriched span carries its own oracle.

Sources and the oracle's assumptions:

* ``/proc/thread-self/schedstat`` — field 1 on-CPU ns, field 2 ``run_delay``
  ns (time runnable but not running: waiting in a run queue *or* in a
  throttled CFS group).
* the service cgroup's ``cpu.stat`` — ``nr_throttled`` and
  ``throttled_time`` (v1, ns) / ``throttled_usec`` (v2). When the group was
  throttled during the request, the thread's run delay is split:
  ``throttle_ns = min(run_delay, Δthrottled_time)``, the rest is run-queue
  wait. This assumes the handling thread is the group's only runnable thread
  (true for the lab services, which handle one request at a time), so the
  group's throttled time is time this thread was held back.
* ``/proc/stat`` steal of the CPU the thread was on at the start and end of
  the request (``USER_HZ`` ticks, so a 10 ms granularity), counted only when
  the thread stayed on one CPU; otherwise the sum over the CPUs seen.
* I/O time: the service times each ``O_DIRECT`` read itself (monotonic clock
  around ``pread``) minus the run-queue wait across the call (its thread's
  ``schedstat`` run delay: waiting for a CPU after the wake-up is run-queue
  time); the caller passes the sum. Beside it, the disk's own figure: the
  read time its ``stat`` file accounts over the request (the sum of its read
  requests' times from creation to completion, ms resolution), kept only when
  the disk completed exactly the request's reads meanwhile (no other reader).
  The daemon's ``l2.virtio_io`` must lie between the two: at least what the
  disk itself accounted, at most what the reads took the thread.
* memory stall: the ``some`` total of the service cgroup's v2
  ``memory.pressure`` (PSI). With one runnable thread in the group, "some
  task stalled on memory" is that thread's time in reclaim (and in waiting
  for refaults of recently evicted working-set pages, which PSI also counts
  as memory stall). PSI is not a plain sum over CPUs, though: it weights each
  CPU's stall time by that CPU's non-idle time, so a thread that ran on two
  CPUs during the request is reported at roughly half its stall. The oracle
  is exact only for a hop pinned to one CPU, which is how the lab runs its
  reclaim fault.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_USER_HZ = os.sysconf("SC_CLK_TCK")
_NS_PER_TICK = 1_000_000_000 // _USER_HZ

TRUTH_PREFIX = "test.truth."
RUNQUEUE = TRUTH_PREFIX + "runqueue_ns"
THROTTLE = TRUTH_PREFIX + "throttle_ns"
IO = TRUTH_PREFIX + "io_ns"
STEAL = TRUTH_PREFIX + "steal_ns"
RUN_DELAY = TRUTH_PREFIX + "run_delay_ns"
ONCPU = TRUTH_PREFIX + "oncpu_ns"
FAULT = TRUTH_PREFIX + "fault"
NR_THROTTLED = TRUTH_PREFIX + "nr_throttled"
RECLAIM = TRUTH_PREFIX + "reclaim_ns"
DEVICE_READ = TRUTH_PREFIX + "device_read_ns"
"""The disk's read time over the request (present only where the request had the disk to itself)."""

TRUTH_COMPONENT = {RUNQUEUE: "runqueue", THROTTLE: "cpu_throttle", IO: "virtio_io", STEAL: "steal",
                   RECLAIM: "memory_reclaim"}
"""Truth attribute → the isoscope component it is the oracle for."""


def read_thread_schedstat() -> tuple[int, int]:
    """(on-CPU ns, run-delay ns) of the calling thread."""
    with open("/proc/thread-self/schedstat", encoding="ascii") as fh:
        fields = fh.read().split()
    return int(fields[0]), int(fields[1])


def read_thread_cpu() -> int:
    """CPU the calling thread last ran on (field 39 of ``/proc/thread-self/stat``)."""
    with open("/proc/thread-self/stat", encoding="ascii") as fh:
        data = fh.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return int(rest[39 - 3])


def read_steal_ticks(proc_stat: str = "/proc/stat") -> dict[int, int]:
    """Per-CPU steal, in ``USER_HZ`` ticks."""
    out: dict[int, int] = {}
    with open(proc_stat, encoding="ascii") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                out[int(parts[0][3:])] = int(parts[8]) if len(parts) > 8 else 0
    return out


@dataclass(slots=True, frozen=True)
class CpuStat:
    """Throttling counters of one cgroup."""

    nr_throttled: int = 0
    throttled_ns: int = 0


def read_cpu_stat(cpu_dir: str | None) -> CpuStat:
    """``cpu.stat`` of a cgroup directory (v1 ``throttled_time`` ns or v2 ``throttled_usec``)."""
    if not cpu_dir:
        return CpuStat()
    try:
        with open(os.path.join(cpu_dir, "cpu.stat"), encoding="ascii") as fh:
            kv = dict(line.split()[:2] for line in fh if line.strip())
    except OSError:
        return CpuStat()
    nr = int(kv.get("nr_throttled", 0))
    if "throttled_time" in kv:
        return CpuStat(nr, int(kv["throttled_time"]))
    return CpuStat(nr, int(kv.get("throttled_usec", 0)) * 1000)


def read_memory_pressure_ns(cgroup_dir: str | None) -> int:
    """``some total`` of a cgroup's ``memory.pressure`` in ns (0 when PSI is unavailable)."""
    if not cgroup_dir:
        return 0
    try:
        with open(os.path.join(cgroup_dir, "memory.pressure"), encoding="ascii") as fh:
            for line in fh:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1]) * 1000
    except (OSError, IndexError, ValueError):
        pass
    return 0


@dataclass(slots=True, frozen=True)
class TruthSnapshot:
    """Counters at the start of a request."""

    mono_ns: int
    oncpu_ns: int
    run_delay_ns: int
    cpu: int
    steal: dict[int, int]
    cpu_stat: CpuStat
    memstall_ns: int


class TruthRecorder:
    """Takes before/after snapshots for the calling thread and turns them into span attributes.

    Args:
        cpu_dir: the service cgroup's directory holding ``cpu.stat`` (None: no throttling truth).
        fault: name of the fault injected on this hop (``"none"`` when clean).
        pressure_dir: the service cgroup's v2 directory (PSI ``memory.pressure``).
    """

    def __init__(self, cpu_dir: str | None, fault: str = "none", pressure_dir: str | None = None) -> None:
        self.cpu_dir = cpu_dir
        self.fault = fault
        self.pressure_dir = pressure_dir

    def begin(self) -> TruthSnapshot:
        """Snapshot the counters now (call right after the span starts)."""
        # Memory pressure first here and last in end(): reading the other counters
        # allocates, and under a tight memcg limit that alone can reclaim; the
        # oracle must cover that too, as the span does.
        memstall = read_memory_pressure_ns(self.pressure_dir)
        oncpu, delay = read_thread_schedstat()
        return TruthSnapshot(time.monotonic_ns(), oncpu, delay, read_thread_cpu(), read_steal_ticks(),
                             read_cpu_stat(self.cpu_dir), memstall)

    def end(self, before: TruthSnapshot, io_ns: int = 0, device_read_ns: int = -1) -> dict[str, int | str]:
        """Deltas since ``before`` as ``test.truth.*`` attributes (call right before the span ends).

        Args:
            before: :meth:`begin`'s snapshot.
            io_ns: the request's timed ``O_DIRECT`` read time (less run-queue waits).
            device_read_ns: the disk's read time over the request; negative: none (not written).
        """
        oncpu, delay = read_thread_schedstat()
        cpu_end = read_thread_cpu()
        steal = read_steal_ticks()
        cs = read_cpu_stat(self.cpu_dir)
        memstall = read_memory_pressure_ns(self.pressure_dir)
        run_delay = delay - before.run_delay_ns
        d_nr = cs.nr_throttled - before.cpu_stat.nr_throttled
        d_thr = cs.throttled_ns - before.cpu_stat.throttled_ns
        throttle = min(run_delay, d_thr) if d_nr > 0 or d_thr > 0 else 0
        cpus = {before.cpu, cpu_end}
        steal_ns = sum(steal.get(c, 0) - before.steal.get(c, 0) for c in cpus) * _NS_PER_TICK
        out: dict[str, int | str] = {
            RUN_DELAY: run_delay,
            ONCPU: oncpu - before.oncpu_ns,
            THROTTLE: throttle,
            RUNQUEUE: run_delay - throttle,
            NR_THROTTLED: d_nr,
            IO: io_ns,
            STEAL: steal_ns,
            RECLAIM: max(0, memstall - before.memstall_ns),
            FAULT: self.fault,
        }
        if device_read_ns >= 0:
            out[DEVICE_READ] = device_read_ns
        return out
