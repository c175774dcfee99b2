"""Where the threads of sandbox runtimes spend CPU time: the user side of the ``sandbox`` probe.

The runtime libraries of WASM runtimes export only the embedder API
(``wasmtime_func_call`` …), not the trampolines between guest code and host
functions, so uprobes cannot bracket host calls. Instead the ``sandbox`` probe
samples the CPU every millisecond and classifies each sample of a registered
process by its instruction pointer against the code ranges this module writes
into the probe's ``sandbox_code`` map:

* *guest*: a WASM module's JIT code (anonymous, read-only executable mappings);
* *runtime*: the runtime library or the runtime's executable — WASI and other
  host calls, trampolines, the runtime's machinery: the L-4 ``sandbox``
  component;
* *other*: the embedding application, libc, the kernel on its behalf.

In a process that *is* the runtime (a WASM runtime's own executable, or
gVisor's Sentry, ``runsc-sandbox``, whose threads do nothing but run the
sandbox), every non-guest sample is the runtime's. Runtime samples reach spans
as ``sandbox`` stalls of one sample period, so a span matched to the process
(or, for gVisor, to the pod's cgroup) gets its sandbox time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

from isoscope.host.stack import gvisor_role
from isoscope.host.wasm import RUNTIME_LIB_PREFIXES, WASM_RUNTIMES

logger = logging.getLogger(__name__)

__all__ = ["MAX_RANGES", "PARTS", "CodeRanges", "SandboxSplit", "SandboxTracker", "code_ranges", "find_sentries"]

MAX_RANGES = 16
"""Code ranges per kind the probe checks (``ISO_SBX_MAX_RANGES`` in ``bpf/include/isoscope.h``)."""
PARTS: tuple[str, ...] = ("guest", "runtime", "other")
"""Sample classes, indexed by ``ISO_SBX_GUEST`` / ``ISO_SBX_RUNTIME`` / ``ISO_SBX_OTHER``."""
_SPECIAL_MAPPINGS = ("[vdso]", "[vsyscall]", "[uprobes]")


@dataclass(frozen=True)
class CodeRanges:
    """Executable ranges of a runtime process, as the ``sandbox`` probe classifies samples with them.

    Attributes:
        guest: ``(start, end)`` of anonymous, read-only executable mappings: JIT-compiled module code.
        runtime: ``(start, end)`` of the runtime library's (or executable's) executable mappings.
        runtime_is_process: the process is the runtime, so every non-guest sample is the runtime's.
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


SENTRY = CodeRanges((), (), True)
"""gVisor's Sentry: no guest code of its own (the sandboxed application runs in other processes),
every sample is sandbox time."""


def code_ranges(pid: int, proc_root: str = "/proc") -> CodeRanges | None:
    """Read a WASM runtime's ``/proc/<pid>/maps`` into guest and runtime code ranges; None if it is gone."""
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
                elif os.path.basename(path).startswith(RUNTIME_LIB_PREFIXES) or (runtime_is_process and path == exe):
                    runtime.append(rng)
    except OSError:
        return None
    return CodeRanges(_merge_largest(guest, MAX_RANGES), _merge_largest(runtime, MAX_RANGES), runtime_is_process)


def find_sentries(proc_root: str = "/proc") -> list[int]:
    """gVisor Sentry processes (``runsc-sandbox``, or ``runsc boot``) on the node, by a scan of ``comm``."""
    out = []
    try:
        pids = [e for e in os.listdir(proc_root) if e.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(os.path.join(proc_root, pid, "comm"), encoding="utf-8", errors="replace") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        # Cheap filter first: the Sentry re-executes itself as "runsc-sandbox"; "runsc" covers "runsc boot".
        if comm.startswith("runsc") and gvisor_role(pid, proc_root) == "sandbox":
            out.append(int(pid))
    return out


@dataclass(frozen=True)
class SandboxSplit:
    """Sampled CPU time of one sandbox runtime process since it was registered.

    Attributes:
        pid: the process.
        kind: ``wasm`` or ``gvisor``.
        guest_ns, runtime_ns, other_ns: samples of each part times the sample period.
    """

    pid: int
    kind: str
    guest_ns: int
    runtime_ns: int
    other_ns: int

    @property
    def total_ns(self) -> int:
        return self.guest_ns + self.runtime_ns + self.other_ns

    def as_dict(self) -> dict[str, int | str]:
        return {"pid": self.pid, "kind": self.kind, "guest_ns": self.guest_ns, "runtime_ns": self.runtime_ns,
                "other_ns": self.other_ns}


class SandboxTracker:
    """Keeps the ``sandbox`` probe's ``sandbox_code`` map in step with the processes it should sample.

    WASM runtimes are looked for among the span senders (their spans are the
    ones that need the split); gVisor Sentries are found by a scan, because
    spans from inside a gVisor sandbox come from the sandbox's own PID space
    and are matched to the pod's cgroup, where the Sentry runs.

    Not thread-safe: one caller (the daemon's housekeeping) refreshes it.

    Args:
        bpf: the loaded ``sandbox`` probe (bcc module).
        sample_ns: the probe's sample period.
        proc_root: procfs of the host.
    """

    RECHECK_S = 60.0

    def __init__(self, bpf: Any, sample_ns: int, proc_root: str = "/proc") -> None:
        self._sample_ns = sample_ns
        self._proc_root = proc_root
        self._code = bpf[b"sandbox_code"]
        self._samples = bpf[b"sandbox_samples"]
        self._registered: dict[int, tuple[str, CodeRanges]] = {}
        self._not_wasm: dict[int, float] = {}  # pid -> when it was found not to run a runtime

    @property
    def pids(self) -> list[int]:
        return sorted(self._registered)

    def _write(self, pid: int, kind: str, ranges: CodeRanges) -> None:
        if self._registered.get(pid) == (kind, ranges):
            return
        leaf = self._code.Leaf()
        leaf.n_guest, leaf.n_runtime = len(ranges.guest), len(ranges.runtime)
        leaf.runtime_is_process = int(ranges.runtime_is_process)
        for i, (start, end) in enumerate(ranges.guest):
            leaf.guest[i].start, leaf.guest[i].end = start, end
        for i, (start, end) in enumerate(ranges.runtime):
            leaf.runtime[i].start, leaf.runtime[i].end = start, end
        self._code[self._code.Key(pid)] = leaf
        self._registered[pid] = (kind, ranges)

    def register_wasm(self, pid: int) -> bool:
        """(Re)write the code ranges of a WASM runtime process; False when it is gone or runs none."""
        ranges = code_ranges(pid, self._proc_root)
        if ranges is None or not (ranges.runtime or ranges.runtime_is_process):
            if pid in self._registered:
                self.forget(pid)
            return False
        self._write(pid, "wasm", ranges)
        return True

    def register_sentry(self, pid: int) -> None:
        """Sample a gVisor Sentry: all of its CPU time is the sandbox's."""
        self._write(pid, "gvisor", SENTRY)

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

    def refresh(self, senders: Iterable[int], sentries: Iterable[int] | None = None, reread: bool = True) -> None:
        """Register the WASM runtimes among ``senders`` and the given Sentries; forget everything else.

        Args:
            senders: processes that send spans (those running a WASM runtime are sampled).
            sentries: gVisor Sentry processes (None: keep the ones registered, pruning exited ones).
            reread: re-read the code ranges of registered WASM runtimes (modules compiled since).

        A process found not to run a runtime is looked at again only after
        ``RECHECK_S`` (it may load one later), so a refresh reads few maps.
        """
        now = time.monotonic()
        wanted = set(senders)
        self._not_wasm = {p: t for p, t in self._not_wasm.items() if now - t < self.RECHECK_S}
        for pid in wanted - self._registered.keys() - self._not_wasm.keys():
            if not self.register_wasm(pid):  # one read of its maps tells runtime or not
                self._not_wasm[pid] = now
        if sentries is None:
            sentries = [p for p, (kind, _) in self._registered.items()
                        if kind == "gvisor" and os.path.exists(os.path.join(self._proc_root, str(p)))]
        sentry_set = set(sentries)
        for pid in sentry_set:
            self.register_sentry(pid)
        for pid, (kind, _) in list(self._registered.items()):
            if kind == "gvisor":
                if pid not in sentry_set:
                    self.forget(pid)
            elif pid not in wanted:
                self.forget(pid)
            elif reread:
                self.register_wasm(pid)

    def split(self, pid: int) -> SandboxSplit:
        """Sampled guest / runtime / other time of ``pid`` so far."""
        counts = [0] * len(PARTS)
        for part in range(len(PARTS)):
            try:
                counts[part] = int(self._samples[self._samples.Key(pid, part)].value)
            except KeyError:
                pass
        g, r, o = (c * self._sample_ns for c in counts)
        kind = self._registered.get(pid, ("", None))[0]
        return SandboxSplit(pid, kind, g, r, o)

    def splits(self) -> list[SandboxSplit]:
        return [self.split(pid) for pid in self.pids]
