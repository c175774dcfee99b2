"""The kernel side as one component: prepare kernel access, load the probes, run their hooks.

Probes are compiled in a background thread (it takes seconds) so that spans
flow from the first second: until the probes have settled, spans are forwarded
with ``isolation.coverage`` 0. Once loaded, each probe's setup hook writes what
user space knows into its maps and its runtime is refreshed every housekeeping
tick. A probe that cannot load degrades alone; an error anywhere here leaves
the daemon a pass-through, never down.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

from isoscope.kernel import env as kernelenv
from isoscope.model import ProbeStatus, Stats
from isoscope.probes import catalog
from isoscope.probes.hooks import ProbeContext, ProbeRuntime
from isoscope.probes.loader import EventSink, ProbeManager
from isoscope.probes.router import CgroupWatchPolicy
from isoscope.probes.spec import ProbeSpec
from isoscope.probes.watch import WatchSet

logger = logging.getLogger(__name__)


class CoverageSink(Protocol):
    """What the timeline needs to know of the probes: which are up, and where events were lost."""

    def set_probe_up(self, name: str, up: bool) -> None: ...

    def note_loss(self, probe: str, start_ns: int, end_ns: int) -> None: ...


@dataclass(frozen=True)
class KernelSettings:
    """The configuration the kernel side runs on.

    Attributes:
        headers_dir: kernel headers to prefer (None: detect).
        host_proc: procfs root.
        host_sys: sysfs root.
        enabled: probe names to load (None: all).
        disabled: probe names never to load.
        defines: extra ``-D`` definitions for every probe (e.g. the stall threshold).
        poll_interval_s: ring-buffer poll period.
        watch_all: follow every task on the node.
    """

    headers_dir: str | None
    host_proc: str
    host_sys: str
    enabled: Sequence[str] | None
    disabled: Sequence[str]
    defines: dict[str, int | str]
    poll_interval_s: float
    watch_all: bool


class KernelProbes:
    """Loads the declared probes in the background and keeps their maps in step with the node.

    Args:
        settings: what to load and where the host is.
        stats: self-telemetry.
        sink: receives every decoded kernel event (the router).
        coverage: the timeline's probe-up and loss bookkeeping.
        watch: the watched processes and cgroups (mirrored into every loaded probe).
        policy: which existing cgroups are watched from the start.
        context: what the probes' setup hooks may use (its ``set_sampling`` is this component's).
    """

    def __init__(self, settings: KernelSettings, stats: Stats, sink: EventSink, coverage: CoverageSink,
                 watch: WatchSet, policy: CgroupWatchPolicy, context: ProbeContext) -> None:
        self._settings = settings
        self._stats = stats
        self._sink = sink
        self._coverage = coverage
        self._watch = watch
        self._policy = policy
        self._context = replace(context, set_sampling=self.set_sampling)
        self._settled = threading.Event()
        self._lock = threading.Lock()
        self._manager: ProbeManager | None = None
        self._env: kernelenv.KernelEnv | None = None
        self._runtimes: dict[str, ProbeRuntime] = {}
        self._thread: threading.Thread | None = None

    # -- state -----------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """Every probe is attached or known unavailable (or loading failed as a whole)."""
        return self._settled.is_set()

    def wait_settled(self, timeout_s: float | None = None) -> bool:
        return self._settled.wait(timeout_s)

    def statuses(self) -> list[ProbeStatus]:
        return self._manager.statuses() if self._manager is not None else []

    def enriching(self) -> bool:
        """Whether spans can be joined with kernel data: settled with at least one probe attached."""
        return self.settled and any(s.attached for s in self.statuses())

    def drained_until(self) -> int:
        """CLOCK_MONOTONIC ns up to which every ring buffer has been read (0 before loading)."""
        return self._manager.drained_until_mono_ns if self._manager is not None else 0

    def loaded_modules(self) -> list[Any]:
        return self._manager.loaded_modules() if self._manager is not None else []

    def bpf(self, name: str) -> Any | None:
        return self._manager.bpf(name) if self._manager is not None else None

    def status(self) -> dict[str, Any]:
        """The kernel part of ``/debug/status``."""
        return {
            "kernel": self._env.to_dict() if self._env is not None else None,
            "probes": [s.to_dict() for s in self.statuses()],
            "runtimes": {name: st for name, rt in self._runtimes.items() if (st := rt.status()) is not None},
        }

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Begin loading in the background; returns at once."""
        self._thread = threading.Thread(target=self._load, name="isoscope-probe-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        s = self._settings
        try:
            self._env = kernelenv.prepare(s.headers_dir, proc_root=s.host_proc, sys_root=s.host_sys)
            for msg in self._env.messages:
                logger.info("kernel: %s", msg)
            disabled = set(s.disabled)
            specs = [spec for spec in catalog.by_name(s.enabled) if spec.name not in disabled]
            manager = ProbeManager(specs, self._env.features, self._sink, self._stats, defines=s.defines,
                                   on_loss=lambda probe, n, a, b: self._coverage.note_loss(probe, a, b))
            with self._lock:
                self._manager = manager
            for st in manager.load():  # the loader logs each outcome
                if st.attached:
                    self._coverage.set_probe_up(st.name, True)
            self._watch.mirror_into(manager.loaded_modules)
            if s.watch_all:
                self._watch.set_watch_all(True)
            for cgid in self._policy.existing():
                self._watch.add_cgroup(cgid)
            self._run_setup_hooks(manager, specs)
            manager.start(poll_interval_s=s.poll_interval_s)
        except Exception:
            logger.exception("kernel probes could not be started; spans are forwarded unenriched")
        finally:
            self._settled.set()

    def _run_setup_hooks(self, manager: ProbeManager, specs: Sequence[ProbeSpec]) -> None:
        for spec in specs:
            hook = spec.setup
            bpf = manager.bpf(spec.name)
            if hook is None or bpf is None or not manager.attached(spec.name):
                continue
            try:
                self._runtimes[spec.name] = hook(bpf, self._context)
            except Exception:
                # The probe still measures; only what its maps needed from user space is missing.
                logger.exception("probe %s: setup failed; it runs without its user-space tables", spec.name)
                self._stats.inc("probe_setup_failures_total", (spec.name,))

    def refresh(self, tick: int) -> None:
        """One housekeeping tick for every probe runtime."""
        for name, rt in list(self._runtimes.items()):
            try:
                rt.refresh(tick)
            except Exception:
                logger.exception("probe %s: refresh failed", name)

    def set_sampling(self, name: str, on: bool) -> bool:
        return self._manager.set_sampling(name, on) if self._manager is not None else False

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Detach every probe (waits for a load in progress to settle first)."""
        self._settled.wait(timeout_s)
        if self._manager is not None:
            self._manager.shutdown()
