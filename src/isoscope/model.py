"""Domain model shared by every stage of isoscope.

Plain data only: no I/O, no threads started, no kernel access. Every stage
(probes, timeline, attribution, receivers, exporters) passes these types, and
exporters import nothing else from the collector.

Time conventions:
    * ``*_mono_ns`` fields are CLOCK_MONOTONIC nanoseconds (what
      ``bpf_ktime_get_ns()`` returns and what the timeline stores).
    * ``*_unix_ns`` fields are wall-clock nanoseconds since the epoch (what
      OTLP spans carry).
"""

from __future__ import annotations

import enum
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol

# ---------------------------------------------------------------------------
# The layer model (docs/architecture.md §1)
# ---------------------------------------------------------------------------

LAYERS: tuple[str, ...] = ("L-0", "L-1", "L-2", "L-3", "L-4")
"""Isolation layers, spelled exactly as metric labels and child-span names use them."""

KERNEL = "kernel"
"""Pseudo-layer for ordinary blocked-in-syscall time (a baseline, not an overhead)."""

COMPONENT_LAYER: Mapping[str, str] = {
    "ept": "L-0",
    "steal": "L-1",
    "vm_exit": "L-1",
    "virtio_io": "L-2",
    "pv_exit": "L-2",
    "cpu_throttle": "L-3",
    "runqueue": "L-3",
    "memory_reclaim": "L-3",
    "netns": "L-3",
    "sandbox": "L-4",
    "syscall": KERNEL,
}
"""Every component isoscope measures and the layer it belongs to."""

COMPONENTS: tuple[str, ...] = tuple(COMPONENT_LAYER)

RUNTIMES: tuple[str, ...] = (
    "containerd", "docker", "podman", "cri-o", "gvisor", "firecracker",
    "wasmtime", "wasmedge", "systemd", "none",
)
HYPERVISORS: tuple[str, ...] = (
    "kvm", "firecracker", "xen", "hyperv", "vmware", "amazon", "google", "other", "none",
)


def layer_key(layer: str) -> str:
    """Attribute-key spelling of a layer: ``"L-3"`` → ``"l3"``, ``"kernel"`` → ``"kernel"``."""
    if layer == KERNEL:
        return KERNEL
    return "l" + layer[2:]


def component_key(component: str) -> str:
    """``"cpu_throttle"`` → ``"l3.cpu_throttle"``: the form used in ``isolation.blame``."""
    return f"{layer_key(COMPONENT_LAYER[component])}.{component}"


# ---------------------------------------------------------------------------
# Kernel-side domain events (decoded in one place: collector/probes/decode.py)
# ---------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Stall:
    """An interval during which a layer held a thread back.

    Attributes:
        component: one of ``COMPONENTS``.
        start_mono_ns: start of the stall (CLOCK_MONOTONIC ns).
        end_mono_ns: end of the stall (CLOCK_MONOTONIC ns), ``>= start_mono_ns``.
        tid: kernel thread id (host PID namespace) that was held back.
        pid: thread-group id (host PID namespace).
        cgroup_id: cgroup v2 id of the thread (``bpf_get_current_cgroup_id``), 0 if unknown.
        cpu: CPU the stall happened on, -1 if not tied to one.
        details: component-specific details, e.g. ``{"kvm.exit_reason": "HLT"}``.
    """

    component: str
    start_mono_ns: int
    end_mono_ns: int
    tid: int
    pid: int
    cgroup_id: int = 0
    cpu: int = -1
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> str:
        return COMPONENT_LAYER[self.component]

    @property
    def duration_ns(self) -> int:
        return self.end_mono_ns - self.start_mono_ns


NEIGHBORS_DETAIL = "runqueue.neighbors"
"""Key, in a ``runqueue`` :class:`Stall`'s details, of its :class:`RunqueueNeighbors` (watched threads only)."""


@dataclass(slots=True, frozen=True)
class RunqueueNeighbors:
    """Who ran on the CPU while a thread waited in its run queue (one ``runqueue`` stall's split).

    Kept in the stall's ``details`` under :data:`NEIGHBORS_DETAIL` rather than as a field of
    :class:`Stall`: the timeline stores records column-wise and already carries each record's
    details through storage and queries, while a field would cost a column for every record
    of every component. Child-span writers skip it as a non-scalar detail.

    Attributes:
        self_ns: threads of the waiting thread's own cgroup ran (the workload's own contention).
        kernel_ns: the root cgroup (kworkers, ksoftirqd, unconfined tasks) or the idle task ran.
        other_ns: other cgroups beyond ``top``.
        unseen_ns: older than the CPU's slice history: not attributed.
        top: ``(cgroup_id, ns)`` of the other cgroups that ran longest, longest first.
    """

    self_ns: int = 0
    kernel_ns: int = 0
    other_ns: int = 0
    unseen_ns: int = 0
    top: tuple[tuple[int, int], ...] = ()

    @property
    def total_ns(self) -> int:
        return self.self_ns + self.kernel_ns + self.other_ns + self.unseen_ns + sum(ns for _, ns in self.top)


@dataclass(slots=True, frozen=True)
class RunSegment:
    """An on-CPU interval of a watched thread (used to lay per-CPU steal over threads).

    Attributes:
        tid, pid, cgroup_id: who ran.
        cpu: where it ran.
        start_mono_ns, end_mono_ns: when (CLOCK_MONOTONIC ns).
    """

    tid: int
    pid: int
    cgroup_id: int
    cpu: int
    start_mono_ns: int
    end_mono_ns: int


class LifecycleKind(str, enum.Enum):
    """Process, namespace and cgroup lifecycle events seen by the kernel probes."""

    FORK = "fork"
    EXEC = "exec"
    EXIT = "exit"
    UNSHARE = "unshare"
    SETNS = "setns"
    CLONE_NS = "clone_ns"
    CGROUP_MKDIR = "cgroup_mkdir"
    CGROUP_RMDIR = "cgroup_rmdir"
    CGROUP_ATTACH = "cgroup_attach"


@dataclass(slots=True, frozen=True)
class LifecycleEvent:
    """One lifecycle event.

    Attributes:
        kind: what happened.
        ts_mono_ns: when (CLOCK_MONOTONIC ns).
        pid: thread-group id (host PID namespace).
        tid: thread id.
        ppid: parent tgid for fork/clone; 0 otherwise.
        cgroup_id: cgroup v2 id involved (current, created or target).
        flags: ``CLONE_NEW*`` flags for unshare/setns/clone; exit code for exit.
        comm: task command name.
        path: cgroup path for cgroup events, file name for exec.
    """

    kind: LifecycleKind
    ts_mono_ns: int
    pid: int
    tid: int
    ppid: int = 0
    cgroup_id: int = 0
    flags: int = 0
    comm: str = ""
    path: str = ""


@dataclass(slots=True)
class ProbeStatus:
    """What happened when a probe was loaded; what ``isoscope probes`` prints.

    Attributes:
        name: probe name (e.g. ``"sched"``).
        source: BPF source file relative to the project root.
        required: whether the daemon considers itself degraded without it.
        attached: whether it is attached now.
        reason: when not attached, why, in words an operator can act on;
            when attached through a fallback, which method is used.
        attach_points: the tracepoints / probes it attaches to.
        method: the measurement method in use (e.g. ``"tracepoint"``).
        lost_events: events lost so far (ring-buffer reserve failures).
    """

    name: str
    source: str
    required: bool
    attached: bool
    reason: str = ""
    attach_points: list[str] = field(default_factory=list)
    method: str = ""
    lost_events: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "required": self.required,
            "attached": self.attached, "reason": self.reason,
            "attach_points": list(self.attach_points), "method": self.method,
            "lost_events": self.lost_events,
        }


# ---------------------------------------------------------------------------
# Isolation stack and workload identity
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class IsolationStack:
    """The isolation layers present under a process (or the host).

    Attributes:
        layers: present layers in order, e.g. ``["L-1", "L-2", "L-3"]``.
        runtime: container/sandbox runtime (one of ``RUNTIMES``).
        hypervisor: hypervisor the node runs under (one of ``HYPERVISORS``).
        sandbox: L-4 technology if any (``gvisor``, ``firecracker``, ``wasmtime``,
            ``wasmedge``, ``seccomp``) or ``""``.
        container_id: container id from the cgroup path, ``""`` if none.
        pod_uid: Kubernetes pod UID from the cgroup path, ``""`` if none.
        qos_class: Kubernetes QoS class (``guaranteed``/``burstable``/``besteffort``) or ``""``.
        cgroup_path: the process's cgroup path (v2 if present, else the cpu controller's).
        namespaces: namespace kinds that differ from PID 1's (``net``, ``pid`` …).
        evidence: per layer, the facts that made it present (for operators).
    """

    layers: list[str] = field(default_factory=list)
    runtime: str = "none"
    hypervisor: str = "none"
    sandbox: str = ""
    container_id: str = ""
    pod_uid: str = ""
    qos_class: str = ""
    cgroup_path: str = ""
    namespaces: list[str] = field(default_factory=list)
    evidence: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers), "runtime": self.runtime,
            "hypervisor": self.hypervisor, "sandbox": self.sandbox,
            "container_id": self.container_id, "pod_uid": self.pod_uid,
            "qos_class": self.qos_class, "cgroup_path": self.cgroup_path,
            "namespaces": list(self.namespaces),
            "evidence": {k: list(v) for k, v in self.evidence.items()},
        }


@dataclass(slots=True)
class Workload:
    """Who a span belongs to, as precisely as it could be resolved.

    Attributes:
        scope: ``"thread"``, ``"process"`` or ``"container"`` (see docs/architecture.md §4).
        tid: host tid when scope is thread, else 0.
        pid: host tgid when known, else 0.
        cgroup_id: cgroup v2 id when known, else 0.
        cgroup_path: cgroup path when known.
        namespace / pod / container: Kubernetes names where known ("" otherwise).
        stack: the isolation stack of the workload.
        cgroup_ids: every cgroup that holds the workload's threads (a pod: all its containers'
            cgroups, never the pod-level cgroup that holds none); empty means ``(cgroup_id,)``.
    """

    scope: str
    tid: int = 0
    pid: int = 0
    cgroup_id: int = 0
    cgroup_path: str = ""
    namespace: str = ""
    pod: str = ""
    container: str = ""
    stack: IsolationStack | None = None
    cgroup_ids: tuple[int, ...] = ()


# ---------------------------------------------------------------------------
# Attribution result
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class Breakdown:
    """The per-layer breakdown of one span window (what gets written onto the span).

    Attributes:
        component_ns: stall ns per component inside the window (only non-zero ones).
        coverage: 0..1 share of the window with complete kernel data.
        duration_ns: span duration.
        stalls: the stalls (clipped to the window, monotonic) for child spans.
    """

    component_ns: dict[str, int] = field(default_factory=dict)
    coverage: float = 0.0
    duration_ns: int = 0
    stalls: list[Stall] = field(default_factory=list)

    def layer_ns(self) -> dict[str, int]:
        """Stall ns per layer (``L-0`` … ``L-4`` and ``kernel``), zeros included for L-0..L-4."""
        out = {layer: 0 for layer in LAYERS}
        out[KERNEL] = 0
        for comp, ns in self.component_ns.items():
            out[COMPONENT_LAYER[comp]] += ns
        return out

    def overhead_ns(self) -> int:
        """Σ stall ns over the isolation layers (kernel baseline excluded)."""
        return sum(ns for comp, ns in self.component_ns.items() if COMPONENT_LAYER[comp] != KERNEL)

    def overhead_ratio(self) -> float:
        return self.overhead_ns() / self.duration_ns if self.duration_ns > 0 else 0.0

    def dominant(self) -> str | None:
        """The isolation component with the most stall time, e.g. ``"cpu_throttle"``."""
        best = None
        best_ns = 0
        for comp, ns in self.component_ns.items():
            if COMPONENT_LAYER[comp] != KERNEL and ns > best_ns:
                best, best_ns = comp, ns
        return best


# ---------------------------------------------------------------------------
# Spans in flight
# ---------------------------------------------------------------------------

class Releasable(Protocol):
    """Something held for a batch that must be given back (a memory reservation)."""

    def release(self) -> None: ...


@dataclass(slots=True)
class TraceBatch:
    """One received OTLP trace export request travelling through the pipeline.

    Attributes:
        request: an ``ExportTraceServiceRequest`` protobuf message (mutated in place by enrichment).
        protocol: ``"grpc"`` or ``"http"``.
        span_count: number of spans in ``request`` as received.
        peer_pid: host pid owning the sending socket (found in the sender's own network
            namespace), else 0.
        peer_addr: the sender's address (``ip:port``) if known.
        received_mono_ns: when it was received (CLOCK_MONOTONIC).
        peer_relay: the sender is a trusted relay (configured, or authenticated as one): its spans
            may name the workload they come from.
        memory: the share of the request's memory reservation that covers the batch while it is
            held, joined and serialized (anything with ``release()``); released once the batch
            has been handed to the exporters (:meth:`release_memory`), or when it is freed.
    """

    request: Any
    protocol: str
    span_count: int
    peer_pid: int = 0
    peer_addr: str = ""
    received_mono_ns: int = 0
    peer_relay: bool = False
    memory: Releasable | None = None

    def release_memory(self) -> None:
        """Return the batch's memory reservation, if it holds one (idempotent)."""
        memory, self.memory = self.memory, None
        if memory is not None:
            memory.release()


class TraceConsumer(Protocol):
    """Anything that takes trace batches: the pipeline, an exporter, a queue."""

    def consume(self, batch: TraceBatch) -> None:
        """Take ownership of ``batch`` (and of its memory reservation: :meth:`TraceBatch.release_memory`
        once the parsed batch is no longer held). Raise ``Backpressure`` when full."""
        ...


class Backpressure(Exception):
    """Raised by a consumer that cannot take a batch now; receivers answer 429/UNAVAILABLE.

    Attributes:
        retry_after_s: suggested delay before retrying.
    """

    def __init__(self, message: str = "pipeline is full", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ExportResult(str, enum.Enum):
    """Outcome of one export attempt, as exporters report it to the shared retry queue."""

    SUCCESS = "success"
    RETRYABLE = "retryable"
    FAILED = "failed"  # non-retryable: never retried


@dataclass(slots=True)
class ExportOutcome:
    """What an exporter's ``export`` returned.

    Attributes:
        result: success, retryable or failed.
        retry_after_s: server-suggested delay (``Retry-After`` / ``RetryInfo``), if any.
        message: detail for logs.
        rejected_spans: items (spans, data points or log records) the backend refused in a partial success.
    """

    result: ExportResult
    retry_after_s: float | None = None
    message: str = ""
    rejected_spans: int = 0


class SpanExporter(Protocol):
    """An exporter's transport: one attempt, no retries (retries belong to the shared queue)."""

    name: str

    def export(self, payload: bytes, span_count: int, signal: str = "traces") -> ExportOutcome:
        """Send one serialized OTLP export request of ``signal`` (``traces``, ``metrics`` or ``logs``;
        protobuf bytes); ``span_count`` is the number of items it holds."""
        ...

    def shutdown(self) -> None:
        ...


# ---------------------------------------------------------------------------
# Self-telemetry
# ---------------------------------------------------------------------------

LabelValues = tuple[str, ...]


class Stats:
    """Thread-safe counters and gauges every stage writes to and exporters read.

    The Prometheus exporter turns these into the ``isoscope_*`` self-telemetry
    metrics of docs/architecture.md §4, so no stage needs to import an exporter.

    Counter names used (labels in brackets):
        ``spans_received_total`` [protocol], ``spans_enriched_total`` [scope],
        ``spans_exported_total`` [exporter, outcome], ``spans_dropped_total`` [reason],
        ``kernel_events_lost_total`` [probe], ``enrichment_failures_total`` [stage],
        ``requests_rejected_total`` [protocol, reason], ``queue_files_quarantined_total`` [queue],
        ``clock_steps_total`` [], ``identity_rejected_total`` [reason] (a span's claim that its proven
        sender does not back), ``child_spans_emitted_total`` [], ``probe_setup_failures_total`` [probe],
        ``metric_points_received_total`` [protocol], ``log_records_received_total`` [protocol],
        ``signals_exported_total`` [exporter, signal, outcome], ``signals_dropped_total`` [signal, reason]
        (metrics and logs are forwarded unchanged, never enriched).
    Gauges: ``probe_attached`` [probe], ``queue_size`` [queue].
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[LabelValues, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[LabelValues, float]] = defaultdict(dict)

    def inc(self, name: str, labels: LabelValues = (), value: float = 1.0) -> None:
        with self._lock:
            series = self._counters[name]
            series[labels] = series.get(labels, 0.0) + value

    def set_counter(self, name: str, labels: LabelValues, value: float) -> None:
        """Set a counter mirrored from elsewhere (e.g. a BPF map); never lowers it."""
        with self._lock:
            series = self._counters[name]
            if value > series.get(labels, 0.0):
                series[labels] = value

    def set_gauge(self, name: str, labels: LabelValues, value: float) -> None:
        with self._lock:
            self._gauges[name][labels] = value

    def counter(self, name: str, labels: LabelValues = ()) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(labels, 0.0)

    def counter_total(self, name: str) -> float:
        with self._lock:
            return sum(self._counters.get(name, {}).values())

    def gauge(self, name: str, labels: LabelValues = ()) -> float:
        with self._lock:
            return self._gauges.get(name, {}).get(labels, 0.0)

    def snapshot(self) -> tuple[dict[str, dict[LabelValues, float]], dict[str, dict[LabelValues, float]]]:
        """Copies of (counters, gauges)."""
        with self._lock:
            return ({k: dict(v) for k, v in self._counters.items()},
                    {k: dict(v) for k, v in self._gauges.items()})


def iter_spans(request: Any) -> Iterable[Any]:
    """Yield every span of an ``ExportTraceServiceRequest``."""
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            yield from ss.spans
