"""Per-probe map setup: what user space writes into a probe's maps, and keeps writing.

Each probe that needs user-space knowledge in its maps (syscall classes, the
node's virtio disks and veth interfaces, the KVM exit classification and VMMs,
the code ranges of sandbox runtimes) declares a ``setup`` hook on its
:class:`~isoscope.probes.spec.ProbeSpec`. The hook runs once after the probe
attached and returns a :class:`ProbeRuntime` that the kernel side refreshes
every housekeeping tick. The daemon knows none of this: it only wires.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from isoscope.host.blockdev import virtio_dev_ts
from isoscope.host.netdevs import veth_names
from isoscope.host.vms import VmRegistry
from isoscope.probes import kvm_reasons
from isoscope.probes.syscall_classes import fill_class_map

logger = logging.getLogger(__name__)

KvmExitSink = Callable[[str, str, str, int, float], None]
"""Receives ``(reason, layer, vm, count, seconds)`` deltas of the KVM exit counters."""


class ProbeRuntime(Protocol):
    """What a probe's setup hook leaves running."""

    def refresh(self, tick: int) -> None:
        """Called once per housekeeping tick (1 s) from the housekeeping thread."""

    def status(self) -> Any:
        """What ``/debug/status`` shows of it (None for nothing)."""


@dataclass(frozen=True)
class ProbeContext:
    """What a probe's setup hook may use: the host roots and the collaborators it writes to.

    Attributes:
        host_proc: procfs root (``/host/proc`` in a pod).
        host_sys: sysfs root.
        watched_tgids: the watched processes now (sandbox runtimes among the span senders).
        netns_changed: set by the kernel-event router when namespaces changed (new veths likely).
        vms: the node's VM registry (VMMs and their pods).
        set_sampling: opens or closes a probe's perf events (filled in by the kernel side).
        kvm_classification: the configured KVM exit classification overrides.
        kvm_exits: the KVM exit counter sink (None without metrics).
        sandbox_sample_ns: the sandbox probe's sampling period.
    """

    host_proc: str
    host_sys: str
    watched_tgids: Callable[[], set[int]]
    netns_changed: threading.Event
    vms: VmRegistry
    set_sampling: Callable[[str, bool], bool] = lambda name, on: False
    kvm_classification: dict[str, str] = field(default_factory=dict)
    kvm_exits: KvmExitSink | None = None
    sandbox_sample_ns: int = 1_000_000


ProbeSetup = Callable[[Any, ProbeContext], ProbeRuntime]
"""A probe's setup hook: ``(bcc module, context) -> runtime``."""


class _Static:
    """A runtime for maps written once."""

    def __init__(self, what: Any = None) -> None:
        self._what = what

    def refresh(self, tick: int) -> None:
        return None

    def status(self) -> Any:
        return self._what


def fill_u32_set(bpf: Any, table: str, values: Iterable[int]) -> int:
    """Write ``values`` as keys (value 1) of a u32 → u8 hash; returns how many were written."""
    t = bpf[table.encode()]
    n = 0
    for v in values:
        t[ctypes.c_uint32(v)] = ctypes.c_uint8(1)
        n += 1
    return n


def setup_syscalls(bpf: Any, ctx: ProbeContext) -> ProbeRuntime:
    """The syscall number → class table (net, file, lock, sleep, other)."""
    return _Static({"classified_syscalls": fill_class_map(bpf[b"syscall_class"])})


def setup_block(bpf: Any, ctx: ProbeContext) -> ProbeRuntime:
    """The node's virtio disks: only their requests are ``virtio_io``."""
    devs = sorted(virtio_dev_ts(ctx.host_sys))
    fill_u32_set(bpf, "virtio_devs", devs)
    return _Static({"virtio_devs": len(devs)})


class VethTable:
    """The veth interface names whose crossings are ``netns`` time; pods bring and take them.

    Refreshed when the router saw namespaces change (a pod starting) and every 10 s.
    """

    def __init__(self, bpf: Any, ctx: ProbeContext) -> None:
        self._table = bpf[b"veth_ifaces"]
        self._ctx = ctx
        self._names: set[str] = set()
        self._ids: dict[str, int] = {}
        self._sync()

    def _key(self, name: str) -> Any:
        key = self._table.Key()
        key.name = name.encode()
        return key

    def _sync(self) -> None:
        names = veth_names(self._ctx.host_proc, self._ctx.host_sys)
        for name in names - self._names:
            self._ids[name] = self._ids.get(name) or len(self._ids) + 1
            self._table[self._key(name)] = ctypes.c_uint32(self._ids[name])
        for name in self._names - names:
            try:
                del self._table[self._key(name)]
            except KeyError:
                pass
        self._names = names

    def refresh(self, tick: int) -> None:
        if self._ctx.netns_changed.is_set() or tick % 10 == 0:
            self._ctx.netns_changed.clear()
            self._sync()

    def status(self) -> Any:
        return {"veths": len(self._names)}


class KvmRuntime:
    """Host side of VMs: the exit classification in the kernel, VMM identity for the exit counters,
    and which VMMs are microVM sandboxes (their exits are ``l4.sandbox``)."""

    def __init__(self, bpf: Any, ctx: ProbeContext) -> None:
        self._bpf = bpf
        self._vms = ctx.vms
        try:
            classification = kvm_reasons.load_classification(ctx.kvm_classification or None)
        except ValueError as exc:
            logger.error("kvm.classification: %s; using the default classification", exc)
            classification = kvm_reasons.load_classification(None)
        kvm_reasons.fill_kernel_classification(bpf, classification)
        self._counter = (kvm_reasons.KvmExitCounter(ctx.kvm_exits, ctx.vms.vm_label)
                         if ctx.kvm_exits is not None else None)
        self.refresh(0)  # tick 0: VMMs found at once

    def refresh(self, tick: int) -> None:
        # Finding VMMs walks /proc: every few seconds is soon enough for a VM that just started
        # (its exits are counted from the start either way; only their VM label waits).
        if tick % 5 == 0:
            kvm_reasons.sync_sandbox_vmms(self._bpf, self._vms.refresh())
        if self._counter is not None:
            self._counter.update(kvm_reasons.read_exit_totals(self._bpf))

    def status(self) -> Any:
        return None


class SandboxRuntime:
    """Sandbox runtimes (WASM among the span senders, gVisor Sentries) get their CPU samples split.

    Sampling is off until there is something to sample: a timer interrupt per CPU
    per millisecond costs far more in a VM than the program does.
    """

    def __init__(self, bpf: Any, ctx: ProbeContext) -> None:
        from isoscope.probes.sandbox_sampler import SandboxTracker
        self._ctx = ctx
        self._tracker = SandboxTracker(bpf, ctx.sandbox_sample_ns, ctx.host_proc)
        self._splits: list[dict[str, int | str]] = []
        ctx.set_sampling("sandbox", False)

    def refresh(self, tick: int) -> None:
        from isoscope.probes.sandbox_sampler import find_sentries
        # New senders every second (their spans get sandbox time from then on); known runtimes'
        # code ranges (newly compiled modules) every few seconds; Sentries by a /proc scan less often.
        sentries = find_sentries(self._ctx.host_proc) if tick % 10 == 1 else None
        self._tracker.refresh(self._ctx.watched_tgids(), sentries, reread=tick % 5 == 0)
        self._ctx.set_sampling("sandbox", bool(self._tracker.pids))
        self._splits = [s.as_dict() for s in self._tracker.splits()]

    def status(self) -> Any:
        return self._splits
