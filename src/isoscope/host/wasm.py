"""WASM runtime workloads (wasmtime, WasmEdge): detection and process-level measurement.

Detection reuses :mod:`isoscope.host.stack` (runtime executable, or a mapped
``libwasmtime`` / ``_libwasmtime.so`` / ``libwasmedge``). Measurement here is
process-level: the runtime process's on-CPU time and its run-queue wait from
``/proc/<pid>/task/*/schedstat`` (nanoseconds, kept by the scheduler), sampled
twice. The split of that CPU time into guest code and host calls comes from
the ``sandbox`` probe (:mod:`isoscope.probes.sandbox_sampler`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from isoscope.model import IsolationStack
from isoscope.host.stack import detect_host_stack, detect_process_stack

logger = logging.getLogger(__name__)

__all__ = ["RUNTIME_LIB_PREFIXES", "WASM_RUNTIMES", "WasmProcess", "WasmUsage", "find_wasm_processes", "measure",
           "runtime_library", "sample"]

WASM_RUNTIMES: tuple[str, ...] = ("wasmtime", "wasmedge")
RUNTIME_LIB_PREFIXES = ("libwasmtime", "_libwasmtime", "libwasmedge")


@dataclass(frozen=True)
class WasmProcess:
    """A process running a WASM runtime.

    Attributes:
        pid: host pid.
        runtime: ``wasmtime`` or ``wasmedge``.
        library: path of the mapped runtime library ("" when the runtime is the executable).
        stack: the process's isolation stack.
    """

    pid: int
    runtime: str
    library: str
    stack: IsolationStack


@dataclass(frozen=True)
class WasmUsage:
    """Scheduler time of a WASM runtime process over an interval.

    Attributes:
        pid: process.
        interval_ns: wall time between the two samples.
        on_cpu_ns: time its threads ran (guest code + host calls + runtime).
        runqueue_ns: time its threads waited for a CPU.
        threads: threads seen.
    """

    pid: int
    interval_ns: int
    on_cpu_ns: int
    runqueue_ns: int
    threads: int

    @property
    def cpu_share(self) -> float:
        """On-CPU time per wall time (may exceed 1 with several threads)."""
        return self.on_cpu_ns / self.interval_ns if self.interval_ns > 0 else 0.0


def runtime_library(pid: int, proc_root: str = "/proc") -> str:
    """Path of the WASM runtime library mapped by ``pid``, or ``""``."""
    try:
        with open(os.path.join(proc_root, str(pid), "maps"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5]).startswith(RUNTIME_LIB_PREFIXES):
                    return fields[5].removesuffix(" (deleted)")
    except OSError:
        return ""
    return ""


def find_wasm_processes(proc_root: str = "/proc", sys_root: str = "/sys", dev_root: str = "/dev",
                        host: IsolationStack | None = None) -> list[WasmProcess]:
    """Every process whose isolation stack names a WASM runtime as its sandbox."""
    if host is None:
        host = detect_host_stack(proc_root, sys_root, dev_root)
    out = []
    try:
        pids = sorted(int(e) for e in os.listdir(proc_root) if e.isdigit())
    except OSError:
        return out
    for pid in pids:
        if not _maybe_wasm(pid, proc_root):
            continue
        st = detect_process_stack(pid, proc_root, sys_root, dev_root, host=host)
        if st.sandbox in WASM_RUNTIMES or st.runtime in WASM_RUNTIMES:
            runtime = st.sandbox if st.sandbox in WASM_RUNTIMES else st.runtime
            out.append(WasmProcess(pid, runtime, runtime_library(pid, proc_root), st))
    return out


def _maybe_wasm(pid: int, proc_root: str) -> bool:
    """Cheap pre-filter before full stack detection: a runtime name or a runtime library."""
    try:
        with open(os.path.join(proc_root, str(pid), "comm"), encoding="utf-8", errors="replace") as fh:
            if fh.read().strip().lower() in WASM_RUNTIMES:
                return True
    except OSError:
        return False
    return bool(runtime_library(pid, proc_root))


def sample(pid: int, proc_root: str = "/proc") -> tuple[int, int, int]:
    """(on-CPU ns, run-queue wait ns, threads) summed over ``/proc/<pid>/task/*/schedstat``."""
    base = os.path.join(proc_root, str(pid), "task")
    run = wait = n = 0
    try:
        tids = os.listdir(base)
    except OSError:
        return 0, 0, 0
    for tid in tids:
        try:
            with open(os.path.join(base, tid, "schedstat"), encoding="ascii") as fh:
                parts = fh.read().split()
        except OSError:
            continue  # thread exited between listdir and open
        if len(parts) >= 2:
            run += int(parts[0])
            wait += int(parts[1])
            n += 1
    return run, wait, n


def measure(pid: int, interval_s: float = 1.0, proc_root: str = "/proc") -> WasmUsage:
    """Measure a WASM runtime process over ``interval_s`` (blocks for that long).

    Threads that exit during the interval take their time with them, so the
    figures are lower bounds for short-lived threads.
    """
    t0 = time.monotonic_ns()
    r0, w0, _ = sample(pid, proc_root)
    time.sleep(interval_s)
    r1, w1, n = sample(pid, proc_root)
    t1 = time.monotonic_ns()
    return WasmUsage(pid, t1 - t0, max(0, r1 - r0), max(0, w1 - w0), n)

