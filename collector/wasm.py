"""WASM runtime workloads (wasmtime, WasmEdge): detection, and where their CPU time goes.

Detection reuses :mod:`collector.stack` (runtime executable, or a mapped
``libwasmtime`` / ``_libwasmtime.so`` / ``libwasmedge``).

Measurement has two levels:

* Process level, always: the runtime process's on-CPU time and run-queue wait
  from ``/proc/<pid>/task/*/schedstat`` (:func:`measure`).
* Guest / host split, with the ``wasm`` probe: the runtime library exports only
  the embedder API (``wasmtime_func_call`` …), not the trampolines between
  guest code and host functions, so uprobes cannot bracket host calls.
  Instead the probe samples the CPU every millisecond and classifies each
  sample of a registered process by its instruction pointer against the code
  ranges this module writes into the probe's ``wasm_code`` map
  (:class:`WasmTracker`): the module's JIT code (anonymous read-only
  executable mappings) is *guest*; the runtime library (or the runtime
  executable) is *runtime* — WASI and other host calls, trampolines, the
  runtime's machinery, i.e. the L-4 ``sandbox`` component; the rest (the
  embedding application, libc, the kernel on its behalf) is *other*. In a
  process whose executable is the runtime itself, that rest is the runtime's
  too. Runtime samples reach spans as ``sandbox`` stalls of one sample period.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

from collector.model import IsolationStack
from collector.stack import detect_host_stack, detect_process_stack

logger = logging.getLogger(__name__)

__all__ = ["WASM_RUNTIMES", "CodeRanges", "WasmProcess", "WasmSplit", "WasmTracker", "WasmUsage", "code_ranges",
           "find_wasm_processes", "measure", "runtime_library", "sample"]

WASM_RUNTIMES: tuple[str, ...] = ("wasmtime", "wasmedge")
_LIB_PREFIXES = ("libwasmtime", "_libwasmtime", "libwasmedge")
MAX_RANGES = 16
"""Code ranges per kind the probe checks (``ISO_WASM_MAX_RANGES`` in ``bpf/include/isoscope.h``)."""
PARTS: tuple[str, ...] = ("guest", "runtime", "other")
"""Sample classes, indexed by ``ISO_WASM_GUEST`` / ``ISO_WASM_RUNTIME`` / ``ISO_WASM_OTHER``."""
_SPECIAL_MAPPINGS = ("[vdso]", "[vsyscall]", "[uprobes]")


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
                if len(fields) == 6 and os.path.basename(fields[5]).startswith(_LIB_PREFIXES):
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


@dataclass(frozen=True)
class CodeRanges:
    """Executable ranges of a runtime process, as the ``wasm`` probe classifies samples with them.

    Attributes:
        guest: ``(start, end)`` of anonymous, read-only executable mappings: JIT-compiled module code.
        runtime: ``(start, end)`` of the runtime library's (or executable's) executable mappings.
        runtime_is_process: the executable is the runtime, so every non-guest sample is the runtime's.
    """

    guest: tuple[tuple[int, int], ...]
    runtime: tuple[tuple[int, int], ...]
    runtime_is_process: bool


def _merge_largest(ranges: list[tuple[int, int]], limit: int) -> tuple[tuple[int, int], ...]:
    """Adjacent ranges merged; above ``limit``, the largest ones (a sample outside them counts as other)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    if len(merged) > limit:
        merged = sorted(sorted(merged, key=lambda r: r[1] - r[0], reverse=True)[:limit])
    return tuple(merged)


def code_ranges(pid: int, proc_root: str = "/proc") -> CodeRanges | None:
    """Read ``/proc/<pid>/maps`` into guest and runtime code ranges; None if the process is gone."""
    exe = ""
    try:
        exe = os.readlink(os.path.join(proc_root, str(pid), "exe")).removesuffix(" (deleted)")
    except OSError:
        pass
    runtime_is_process = os.path.basename(exe).lower() in WASM_RUNTIMES
    guest: list[tuple[int, int]] = []
    runtime: list[tuple[int, int]] = []
    try:
        with open(os.path.join(proc_root, str(pid), "maps"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) < 5 or fields[1][2:3] != "x":
                    continue
                lo, _, hi = fields[0].partition("-")
                rng = (int(lo, 16), int(hi, 16))
                path = fields[5].removesuffix(" (deleted)") if len(fields) == 6 else ""
                if not path and fields[4] == "0":
                    # Writable-and-executable anonymous pages are FFI trampolines, not
                    # published JIT code (wasmtime maps module code read-only).
                    if fields[1][1] != "w":
                        guest.append(rng)
                elif path in _SPECIAL_MAPPINGS:
                    continue
                elif os.path.basename(path).startswith(_LIB_PREFIXES) or (runtime_is_process and path == exe):
                    runtime.append(rng)
    except OSError:
        return None
    return CodeRanges(_merge_largest(guest, MAX_RANGES), _merge_largest(runtime, MAX_RANGES), runtime_is_process)


@dataclass(frozen=True)
class WasmSplit:
    """Sampled CPU time of one runtime process since it was registered.

    Attributes:
        pid: the process.
        guest_ns, runtime_ns, other_ns: samples of each part times the sample period.
    """

    pid: int
    guest_ns: int
    runtime_ns: int
    other_ns: int

    @property
    def total_ns(self) -> int:
        return self.guest_ns + self.runtime_ns + self.other_ns

    def as_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "guest_ns": self.guest_ns, "runtime_ns": self.runtime_ns,
                "other_ns": self.other_ns}


class WasmTracker:
    """Keeps the ``wasm`` probe's ``wasm_code`` map in step with the runtime processes it should sample.

    Not thread-safe: one caller (the daemon's housekeeping) refreshes it.

    Args:
        bpf: the loaded ``wasm`` probe (bcc module).
        sample_ns: the probe's sample period.
        proc_root: procfs of the host.
    """

    RECHECK_S = 60.0

    def __init__(self, bpf: Any, sample_ns: int, proc_root: str = "/proc") -> None:
        self._bpf = bpf
        self._sample_ns = sample_ns
        self._proc_root = proc_root
        self._code = bpf[b"wasm_code"]
        self._samples = bpf[b"wasm_samples"]
        self._registered: dict[int, CodeRanges] = {}
        self._not_wasm: dict[int, float] = {}  # pid -> when it was found not to run a runtime

    @property
    def pids(self) -> list[int]:
        return sorted(self._registered)

    def register(self, pid: int) -> bool:
        """(Re)write the code ranges of ``pid``; False when it is gone or runs no WASM runtime."""
        ranges = code_ranges(pid, self._proc_root)
        if ranges is None or not (ranges.runtime or ranges.runtime_is_process):
            self.forget(pid)
            return False
        if self._registered.get(pid) == ranges:
            return True
        leaf = self._code.Leaf()
        leaf.n_guest, leaf.n_runtime = len(ranges.guest), len(ranges.runtime)
        leaf.runtime_is_process = int(ranges.runtime_is_process)
        for i, (start, end) in enumerate(ranges.guest):
            leaf.guest[i].start, leaf.guest[i].end = start, end
        for i, (start, end) in enumerate(ranges.runtime):
            leaf.runtime[i].start, leaf.runtime[i].end = start, end
        self._code[self._code.Key(pid)] = leaf
        self._registered[pid] = ranges
        return True

    def forget(self, pid: int) -> None:
        """Stop sampling ``pid`` and drop its counts."""
        self._registered.pop(pid, None)
        for table, keys in ((self._code, [self._code.Key(pid)]),
                            (self._samples, [self._samples.Key(pid, part) for part in range(len(PARTS))])):
            for key in keys:
                try:
                    del table[key]
                except KeyError:
                    pass

    def refresh(self, candidates: Iterable[int], reread: bool = True) -> None:
        """Register the WASM runtimes among ``candidates``; forget the ones no longer among them.

        Args:
            candidates: processes that may run a runtime (the span senders).
            reread: also re-read the code ranges of registered processes (modules
                compiled since), which drops the ones that exited.

        A process found not to run a runtime is looked at again only after
        ``RECHECK_S`` (it may load one later), so a refresh reads few maps.
        """
        now = time.monotonic()
        wanted = set(candidates)
        self._not_wasm = {p: t for p, t in self._not_wasm.items() if now - t < self.RECHECK_S}
        for pid in wanted - self._registered.keys() - self._not_wasm.keys():
            if not _maybe_wasm(pid, self._proc_root) or not self.register(pid):
                self._not_wasm[pid] = now
        for pid in list(self._registered):
            if pid not in wanted:
                self.forget(pid)
            elif reread:
                self.register(pid)

    def split(self, pid: int) -> WasmSplit:
        """Sampled guest / runtime / other time of ``pid`` so far."""
        counts = [0] * len(PARTS)
        for part in range(len(PARTS)):
            try:
                counts[part] = int(self._samples[self._samples.Key(pid, part)].value)
            except KeyError:
                pass
        g, r, o = (c * self._sample_ns for c in counts)
        return WasmSplit(pid, g, r, o)

    def splits(self) -> list[WasmSplit]:
        return [self.split(pid) for pid in self.pids]
