"""Load, attach and drain the declared probes with bcc.

One loader for every probe: it checks each probe's features and attach points
against the running kernel, compiles the real ``bpf/<subsystem>.bpf.c`` file
with ``cflags`` (never by editing C source), attaches, opens its ``events``
ring buffer, and turns records into domain events through
:func:`isoscope.probes.decode.decode_record`. A probe that cannot load
degrades with a reason; the others keep running.

Kernel-side losses (ring-buffer reserve failures, counted by every probe in
its ``lost_events`` per-CPU array) are read periodically and reported both as
``kernel_events_lost_total{probe}`` and to a loss listener, so the timeline
can lower the coverage of the affected windows.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from isoscope.model import ProbeStatus, Stats
from isoscope.probes.decode import DecodeError, decode_record
from isoscope.probes.memory import release_compiler_pages
from isoscope.probes.sources import BPF_DIR, INCLUDE_DIR
from isoscope.probes.spec import AttachPoint, ProbeSpec

logger = logging.getLogger(__name__)



class KernelFeatures(Protocol):
    """What the loader needs to know about the running kernel (see ``isoscope.kernel.env.Features``)."""

    def has_tracepoint(self, category: str, event: str) -> bool: ...

    def missing_reason(self, feature: str) -> str: ...


EventSink = Callable[[Any], None]
"""Receives every decoded domain event (Stall, LifecycleEvent, RunSegment)."""

LossListener = Callable[[str, int, int, int], None]
"""Called as ``(probe, lost_since_last, window_start_mono_ns, window_end_mono_ns)`` when a probe lost events."""


@dataclass
class LoadedProbe:
    spec: ProbeSpec
    status: ProbeStatus
    bpf: Any = None
    lost_seen: int = 0
    decode_errors: int = 0
    budget: int = 0
    sampling: bool = False
    """Its perf events are open (see :meth:`ProbeManager.set_sampling`)."""


def _define(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).upper()


class ProbeManager:
    """Loads probes and drains their ring buffers.

    Args:
        specs: the probes to load, in order.
        features: the running kernel's features.
        sink: receives decoded events (called on the polling thread).
        stats: shared self-telemetry.
        bpf_dir: where the ``.bpf.c`` files live (``bpf/include`` is always on the include path).
        defines: extra ``-D`` definitions for every probe (e.g. ``ISO_MIN_STALL_NS``).
        on_loss: notified of kernel-side losses.
    """

    def __init__(self, specs: Sequence[ProbeSpec], features: KernelFeatures, sink: EventSink, stats: Stats, *,
                 bpf_dir: Path = BPF_DIR, defines: dict[str, int | str] | None = None,
                 on_loss: LossListener | None = None) -> None:
        self._specs = list(specs)
        self._features = features
        self._sink = sink
        self._stats = stats
        self._bpf_dir = Path(bpf_dir)
        self._defines = dict(defines or {})
        self._on_loss = on_loss
        self._probes: dict[str, LoadedProbe] = {}
        self._methods: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_loss_check = time.monotonic_ns()
        self.drained_until_mono_ns = 0
        """Every event submitted before this CLOCK_MONOTONIC time has been handed to the sink."""

    # -- loading ------------------------------------------------------------

    def _precheck(self, spec: ProbeSpec) -> tuple[str, list[str]]:
        """Return (reason it cannot load or "", -D flags: present attach points and kernel-derived defines)."""
        for feat in spec.features:
            if not getattr(self._features, feat, False):
                reason = self._features.missing_reason(feat)
                return (f"{reason}: {spec.fallback}" if spec.fallback else reason), []
        flags = []
        for ap in spec.attach:
            if ap.kind in ("tracepoint", "raw_tracepoint"):
                present = self._features.has_tracepoint(ap.category, ap.event)
            elif ap.kind == "kprobe":
                present = bool(getattr(self._features, "kprobes", False))
            elif ap.kind == "fentry":
                present = bool(getattr(self._features, "fentry", False))
            else:
                present = True
            if present:
                flags.append(f"-DISO_HAVE_{_define(ap.target)}=1")
            elif ap.required:
                reason = f"{ap.kind} {ap.target} is not present in this kernel"
                return (f"{reason}: {spec.fallback}" if spec.fallback else reason), []
            else:
                logger.info("probe %s: optional %s missing, continuing without it", spec.name, ap)
        if spec.kernel_defines is not None:
            try:
                defines = dict(spec.kernel_defines())
            except Exception as exc:  # BTF missing or a field moved: this probe cannot be built safely
                reason = f"cannot take kernel struct offsets from BTF: {exc}"
                return (f"{reason}: {spec.fallback}" if spec.fallback else reason), []
            self._methods[spec.name] = str(defines.pop("ISO_METHOD", spec.method))
            flags += [f"-D{k}={v}" for k, v in defines.items()]
        return "", flags

    def cflags_for(self, spec: ProbeSpec, have_flags: Iterable[str] = ()) -> list[str]:
        """The compiler flags a probe is built with."""
        flags = [f"-I{INCLUDE_DIR}", f"-DISO_RINGBUF_PAGES={spec.ringbuf_pages}"]
        flags += [f"-D{k}={v}" for k, v in self._defines.items()]
        flags += list(spec.cflags) + list(have_flags)
        return flags

    def load(self) -> list[ProbeStatus]:
        """Load every declared probe; never raises for a probe that cannot load."""
        for spec in self._specs:
            status = ProbeStatus(name=spec.name, source=f"bpf/{spec.source}", required=spec.required,
                                 attached=False, attach_points=spec.attach_strings())
            loaded = LoadedProbe(spec, status)
            self._probes[spec.name] = loaded
            reason, have = self._precheck(spec)
            if reason:
                status.reason = reason
                logger.warning("probe %s not attached: %s", spec.name, reason)
                if not spec.required:
                    # An optional extra this kernel cannot run is not an outage: no
                    # probe_attached series, so "probe down" alerts stay meaningful.
                    continue
            else:
                self._compile(loaded, have)
            self._stats.set_gauge("probe_attached", (spec.name,), 1.0 if status.attached else 0.0)
        self._free_llvm()
        return self.statuses()

    def _compile(self, loaded: LoadedProbe, have: list[str]) -> None:
        from bcc import BPF  # imported late: tracefs and headers must be prepared first

        spec = loaded.spec
        src = self._bpf_dir / spec.source
        try:
            bpf = BPF(src_file=str(src).encode(), cflags=self.cflags_for(spec, have))
        except Exception as exc:  # bcc raises bare Exception for compile and attach errors
            self._unavailable(loaded, f"could not compile/attach {src.name}: {str(exc).strip().splitlines()[-1]}")
            return
        try:
            loaded.sampling = self._attach_perf_events(bpf, spec)
        except Exception as exc:  # perf_event_open refused (paranoid level, no PMU access in a sandbox)
            bpf.cleanup()
            self._unavailable(loaded, f"could not open perf events: {str(exc).strip()}")
            return
        loaded.bpf = bpf
        try:
            events = bpf[b"events"]
        except KeyError:  # a probe that only aggregates in maps has no ring buffer
            events = None
        if events is not None:
            events.open_ring_buffer(self._make_callback(loaded))
        loaded.status.attached = True
        loaded.status.method = self._methods.get(spec.name, spec.method)
        logger.info("probe %s attached (%s)", spec.name, ", ".join(spec.attach_strings()))

    @staticmethod
    def _unavailable(loaded: LoadedProbe, reason: str) -> None:
        spec = loaded.spec
        loaded.status.reason = f"{reason}; {spec.fallback}" if spec.fallback else reason
        logger.warning("probe %s: %s", spec.name, loaded.status.reason)

    @staticmethod
    def _perf_events(spec: ProbeSpec) -> list[tuple[int, int, AttachPoint]]:
        """(perf type, config, attach point) of each perf event the probe declares."""
        from bcc import PerfSWConfig, PerfType

        out = []
        for ap in spec.attach:
            if ap.kind != "perf_event":
                continue
            if ap.category != "software":
                raise ValueError(f"unsupported perf event {ap.target}")
            out.append((PerfType.SOFTWARE, getattr(PerfSWConfig, ap.event.replace("-", "_").upper()), ap))
        return out

    def _attach_perf_events(self, bpf: Any, spec: ProbeSpec) -> bool:
        """Open the probe's sampling events on every CPU (bcc attaches tracepoints itself). Returns whether any."""
        events = self._perf_events(spec)
        for ev_type, config, ap in events:
            bpf.attach_perf_event(ev_type=ev_type, ev_config=config,
                                  fn_name=f"on_{ap.event.replace('-', '_')}".encode(), sample_period=ap.sample_period)
        return bool(events)

    def set_sampling(self, name: str, on: bool) -> bool:
        """Open or close a probe's perf events, returning whether they are open.

        A sampling event interrupts every CPU once per period even when there
        is nothing to sample (a timer interrupt costs far more in a VM than the
        program does), so a probe's owner closes them while it has nothing
        registered. They are opened at load, so a kernel that refuses them is
        reported at start.
        """
        with self._lock:
            p = self._probes.get(name)
            if p is None or p.bpf is None or on == p.sampling:
                return bool(p and p.sampling)
            try:
                if on:
                    p.sampling = self._attach_perf_events(p.bpf, p.spec)
                else:
                    for ev_type, config, _ap in self._perf_events(p.spec):
                        p.bpf.detach_perf_event(ev_type=ev_type, ev_config=config)
                    p.sampling = False
            except Exception:
                logger.exception("probe %s: could not %s its perf events", name, "open" if on else "close")
            return p.sampling

    @staticmethod
    def _free_llvm() -> None:
        try:
            from bcc import BPF
            BPF.free_bcc_memory(None)  # releases LLVM's heap once nothing more is compiled
        except Exception:  # pragma: no cover - older bcc without it
            logger.debug("free_bcc_memory unavailable", exc_info=True)
        release_compiler_pages()  # and its code pages

    def _make_callback(self, loaded: LoadedProbe):
        sink = self._sink
        string_at, decode = ctypes.string_at, decode_record  # closure locals: called per record

        def _on_record(_ctx, data, size):
            loaded.budget -= 1
            # A negative answer makes libbpf stop this pass (the record itself is
            # consumed, so it is handled first): under an event storm the drain
            # loop yields to loss accounting and the rest of the pipeline.
            done = -1 if loaded.budget <= 0 else 0
            try:
                event = decode(string_at(data, size))
            except DecodeError as exc:
                loaded.decode_errors += 1
                if loaded.decode_errors <= 3:
                    logger.warning("probe %s: undecodable record: %s", loaded.spec.name, exc)
                return done
            try:
                sink(event)
            except Exception:
                logger.exception("event sink failed for probe %s", loaded.spec.name)
            return done

        return _on_record

    # -- access -------------------------------------------------------------

    def statuses(self) -> list[ProbeStatus]:
        return [p.status for p in self._probes.values()]

    def bpf(self, name: str) -> Any | None:
        """The loaded bcc module of a probe (to read its maps), or None."""
        p = self._probes.get(name)
        return p.bpf if p else None

    def loaded_modules(self) -> list[Any]:
        """Every loaded bcc module (for writers of shared maps such as the watch set)."""
        return [p.bpf for p in self._probes.values() if p.bpf is not None]

    def attached(self, name: str) -> bool:
        p = self._probes.get(name)
        return bool(p and p.status.attached)

    # -- draining -----------------------------------------------------------

    def poll(self, max_events: int = 20_000) -> None:
        """Drain every ring buffer once (at most ``max_events`` records each) and advance ``drained_until_mono_ns``."""
        t0 = time.monotonic_ns()
        complete = True
        with self._lock:
            for p in self._probes.values():
                if p.bpf is not None and p.bpf._ringbuf_manager:
                    p.budget = max_events
                    p.bpf.ring_buffer_consume()
                    complete = complete and p.budget > 0
        if complete:
            # Only a pass that emptied every ring proves everything before t0 is in.
            self.drained_until_mono_ns = t0

    def check_losses(self) -> dict[str, int]:
        """Read each probe's kernel-side loss counter; report increases. Returns totals."""
        now = time.monotonic_ns()
        totals: dict[str, int] = {}
        for p in self._probes.values():
            if p.bpf is None:
                continue
            try:
                table = p.bpf[b"lost_events"]
            except KeyError:
                continue
            # Reserve failures counted by the program, plus runs the kernel skipped
            # because another tracing program was running on that CPU.
            total = int(sum(table[table.Key(0)])) + recursion_misses(p.bpf)
            totals[p.spec.name] = total
            p.status.lost_events = total
            if total > p.lost_seen:
                delta = total - p.lost_seen
                p.lost_seen = total
                self._stats.inc("kernel_events_lost_total", (p.spec.name,), delta)
                if self._on_loss:
                    self._on_loss(p.spec.name, delta, self._last_loss_check, now)
        self._last_loss_check = now
        return totals

    def start(self, poll_interval_s: float = 0.02, loss_interval_s: float = 0.5) -> None:
        """Drain in a background thread until :meth:`shutdown`."""
        def _run() -> None:
            next_loss = time.monotonic() + loss_interval_s
            while not self._stop.is_set():
                try:
                    self.poll()
                    if time.monotonic() >= next_loss:
                        self.check_losses()
                        next_loss = time.monotonic() + loss_interval_s
                except Exception:
                    logger.exception("probe polling failed")
                self._stop.wait(poll_interval_s)

        self._thread = threading.Thread(target=_run, name="isoscope-probes", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop draining and detach every probe (bcc removes its programs and maps)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            for p in self._probes.values():
                if p.bpf is not None:
                    try:
                        p.bpf.cleanup()
                    except Exception:
                        logger.debug("cleanup of %s failed", p.spec.name, exc_info=True)
                    p.bpf = None
                    p.status.attached = False


def program_fdinfo(fd: int) -> dict[str, int]:
    """The numeric fields of a loaded BPF program's ``/proc/self/fdinfo`` (``run_time_ns``, ``recursion_misses`` …)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                value = value.strip()
                if value.isdigit():
                    out[key.strip()] = int(value)
    except OSError:
        pass
    return out


def recursion_misses(bpf: Any) -> int:
    """Program runs the kernel skipped (``recursion_misses`` in each program's fdinfo)."""
    return sum(program_fdinfo(fn.fd).get("recursion_misses", 0) for fn in list(getattr(bpf, "funcs", {}).values()))
