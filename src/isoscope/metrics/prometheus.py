"""Prometheus exporter: the ``isoscope_*`` metrics of docs/architecture.md §4.

The exporter keeps its own metric state (plain dicts under one lock) and turns
it into metric families at scrape time through a custom collector registered in
a private ``CollectorRegistry``. Owning the state, rather than using
``prometheus_client``'s metric objects, is what makes the per-metric label
cardinality cap exact and lets a workload's series be forgotten when it goes
away; it also avoids the ``_created`` series the client library would add.

Self-telemetry (spans received / enriched / exported / dropped, lost kernel
events, probe and queue gauges) is read from the shared
:class:`isoscope.model.Stats` at scrape time, so no pipeline stage needs to
import this module.

Exemplars (trace ids on ``isoscope_span_layer_seconds``) only exist in the
OpenMetrics exposition; :meth:`PrometheusExporter.render_for` renders
OpenMetrics when the scraper's ``Accept`` header asks for it and the classic
text format otherwise. Serving it over HTTP is :mod:`isoscope.metrics.admin`;
pushing the same metrics over OTLP is :mod:`isoscope.metrics.otlp_push`.
"""

from __future__ import annotations

import bisect
import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from isoscope import __version__
from isoscope.model import COMPONENT_LAYER, LAYERS, Breakdown, Stall, Stats

logger = logging.getLogger(__name__)

PREFIX = "isoscope_"
OTHER = "other"
"""Label value that replaces values beyond the cardinality cap (and unknown vocabulary)."""

DEFAULT_SPAN_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Buckets (seconds) of ``isoscope_span_layer_seconds``: stall time per span, 100 µs … 10 s."""

DEFAULT_RATIO_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
)
"""Buckets of ``isoscope_span_overhead_ratio``; they include the docs/architecture.md §1 budget edges
(1 %, 3 %, 5 %, 15 %) so a budget comparison never falls inside a bucket."""

DEFAULT_LOG2_LE_EXPONENTS: tuple[int, ...] = tuple(range(10, 35, 2))
"""Upper bounds, as powers of two nanoseconds (2^10 ns ≈ 1 µs … 2^34 ns ≈ 17 s), of the
buckets kernel log2 histograms are re-binned into. A fixed set keeps the bucket layout
stable across scrapes, which ``histogram_quantile`` over ``rate`` needs."""


class MetricSink(Protocol):
    """Receives every recorded increment/observation (after the cardinality cap).

    Used to mirror the metrics into another system (see
    :class:`isoscope.metrics.otlp_push.OtlpMetricsExporter`).
    Called outside the exporter's lock; names are the Prometheus family names.
    """

    def histogram(self, name: str, value: float, attributes: Mapping[str, str]) -> None:
        """One histogram observation."""
        ...

    def counter(self, name: str, value: float, attributes: Mapping[str, str]) -> None:
        """One counter increment."""
        ...


# ---------------------------------------------------------------------------
# Metric definitions
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MetricSpec:
    """Static description of one exported metric.

    Attributes:
        name: full name without the ``_total`` suffix for counters.
        kind: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        help: HELP text.
        labels: label names, in order.
        free: labels whose values are open-ended (folded to ``other`` past the cap);
            the remaining labels come from a fixed vocabulary.
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    free: frozenset[str] = frozenset()


WORKLOAD_LABELS: tuple[str, str, str] = ("workload_namespace", "workload_pod", "workload_container")
"""Label names of the measured workload (Kubernetes namespace, pod, container).

Prefixed because ``namespace``, ``pod``, ``container``, ``service``, ``endpoint``,
``job`` and ``instance`` are the target labels the Prometheus Operator (and most
Kubernetes service discovery configs) attach to every scraped series: without
``honorLabels`` Prometheus would rename ours to ``exported_*`` and a query on
``pod`` would read isoscope's own pod instead of the workload's."""

SERVICE_LABEL = "workload_service"
"""Label name of the span's ``service.name`` (prefixed for the same reason)."""

_WORKLOAD = WORKLOAD_LABELS

LAYER_STALL = MetricSpec(
    PREFIX + "layer_stall_seconds", "counter",
    "Time threads were held back by an isolation layer component, per workload.",
    ("layer", "component") + _WORKLOAD, frozenset(_WORKLOAD))
SPAN_LAYER = MetricSpec(
    PREFIX + "span_layer_seconds", "histogram",
    "Stall time per span and component (observed for spans that had any), with trace-id exemplars.",
    (SERVICE_LABEL, "layer", "component"), frozenset({SERVICE_LABEL}))
SPAN_OVERHEAD = MetricSpec(
    PREFIX + "span_overhead_ratio", "histogram",
    "Share of a span's duration stolen by one isolation layer (observed for every span, zeros included).",
    (SERVICE_LABEL, "layer"), frozenset({SERVICE_LABEL}))
KVM_EXITS = MetricSpec(
    PREFIX + "kvm_exits", "counter", "KVM exits seen on this host, by exit reason and VM.",
    ("reason", "layer", "vm"), frozenset({"reason", "vm"}))
KVM_EXIT_SECONDS = MetricSpec(
    PREFIX + "kvm_exit_seconds", "counter", "Time vCPUs spent outside the guest handling KVM exits.",
    ("reason", "layer", "vm"), frozenset({"reason", "vm"}))
STEAL = MetricSpec(
    PREFIX + "steal_seconds", "counter", "Time the hypervisor ran something else while this vCPU wanted to run.",
    ("cpu",), frozenset({"cpu"}))
RUNQUEUE = MetricSpec(
    PREFIX + "runqueue_latency_seconds", "histogram",
    "Time runnable threads waited for a CPU (from the kernel log2 histogram).",
    _WORKLOAD, frozenset(_WORKLOAD))
SYSCALL = MetricSpec(
    PREFIX + "syscall_latency_seconds", "histogram",
    "Time threads were blocked in syscalls, by class (from the kernel log2 histogram).",
    ("class",) + _WORKLOAD, frozenset(_WORKLOAD))
VICTIM_LABELS: tuple[str, str, str] = ("victim_namespace", "victim_pod", "victim_container")
"""The workload that waited for a CPU (same meaning as :data:`WORKLOAD_LABELS`)."""
NEIGHBOR_LABELS: tuple[str, str, str] = ("neighbor_namespace", "neighbor_pod", "neighbor_container")
"""Who ran on that CPU meanwhile: a workload, or (empty namespace and pod) ``self`` (the victim's own
threads), ``kernel`` (root cgroup, idle); ``other`` in all three for the rest."""

RUNQ_NEIGHBOR = MetricSpec(
    PREFIX + "runqueue_neighbor_seconds", "counter",
    "Time threads of a watched workload (victim_*) waited for a CPU while another workload (neighbor_*) ran on it.",
    VICTIM_LABELS + NEIGHBOR_LABELS, frozenset(VICTIM_LABELS + NEIGHBOR_LABELS))
LABEL_OVERFLOW = MetricSpec(
    PREFIX + "label_overflow", "counter",
    "Observations whose label values were folded into 'other' by the cardinality cap.",
    ("metric",))

LOG2_HISTOGRAMS: Mapping[str, MetricSpec] = {RUNQUEUE.name: RUNQUEUE, SYSCALL.name: SYSCALL}

SYSCALL_CLASSES: frozenset[str] = frozenset({"net", "file", "lock", "sleep", OTHER})

STATS_COUNTERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "spans_received_total": ("Spans received, by OTLP protocol.", ("protocol",)),
    "spans_enriched_total": ("Spans enriched, by matching scope.", ("scope",)),
    "spans_exported_total": ("Spans handed to an exporter, by outcome.", ("exporter", "outcome")),
    "spans_dropped_total": ("Spans dropped, by reason.", ("reason",)),
    "kernel_events_lost_total": ("Kernel events lost (ring-buffer reserve failures), by probe.", ("probe",)),
    "enrichment_failures_total": ("Enrichment failures by stage (the span is forwarded unenriched).", ("stage",)),
    "requests_rejected_total": ("Export requests rejected by a receiver.", ("protocol", "reason")),
    "queue_files_quarantined_total": ("Unreadable persisted batch files moved to quarantine, by queue.",
                                      ("queue",)),
    "clock_steps_total": ("Wall-clock steps detected (the monotonic offset was re-measured).", ()),
    "config_reloads_total": ("Configuration reloads applied (SIGHUP).", ()),
    "config_reload_failures_total": ("Configuration reloads refused (the running configuration was kept).", ()),
    "kubernetes_api_errors_total": ("Kubernetes API errors by operation.", ("operation",)),
    "identity_rejected_total": ("Span identity claims refused because the proven sender does not back them.",
                                ("reason",)),
    "child_spans_emitted_total": ("Child spans emitted under enriched spans.", ()),
    "metric_points_received_total": ("Metric data points received (forwarded unchanged), by OTLP protocol.",
                                     ("protocol",)),
    "log_records_received_total": ("Log records received (forwarded unchanged), by OTLP protocol.", ("protocol",)),
    "signals_exported_total": ("Metric data points and log records handed to an exporter, by signal and outcome.",
                               ("exporter", "signal", "outcome")),
    "signals_dropped_total": ("Metric data points and log records dropped, by signal and reason.",
                              ("signal", "reason")),
    "probe_setup_failures_total": ("Probe setup failures (the probe stays detached), by probe.", ("probe",)),
}
"""Self-telemetry counters read from :class:`Stats` (names as stages write them)."""

STATS_GAUGES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "probe_attached": ("1 when the probe is attached, 0 when not.", ("probe",)),
    "queue_size": ("Items waiting in a pipeline queue.", ("queue",)),
}
"""Self-telemetry gauges read from :class:`Stats`."""


# ---------------------------------------------------------------------------
# Cardinality cap
# ---------------------------------------------------------------------------

class CardinalityCap:
    """Bounds the distinct label-value sets of one metric.

    The ``limit`` slots are split in two: regular slots for label sets as given,
    and a small reserve for overflow sets. Past the regular slots, the open-ended
    labels of a new set are replaced by ``other`` while the fixed-vocabulary ones
    (layer, component, class) are kept, so the overflow stays informative; the
    last reserve slot is kept for the all-``other`` set. The number of sets
    therefore never exceeds ``limit``.

    Args:
        spec: the metric.
        limit: maximum distinct label-value sets (>= 2).
    """

    def __init__(self, spec: MetricSpec, limit: int) -> None:
        if limit < 2:
            raise ValueError("max_label_values must be >= 2")
        self.spec = spec
        self.limit = limit
        # Enough overflow sets for every layer × component combination at realistic caps.
        self.reserve = max(1, min(limit // 4, 32))
        self._regular: set[tuple[str, ...]] = set()
        self._overflow: set[tuple[str, ...]] = set()
        self._free_idx = frozenset(i for i, n in enumerate(spec.labels) if n in spec.free)
        self._all_other = (OTHER,) * len(spec.labels)

    def admit(self, values: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
        """Map ``values`` to the label set to record under.

        Returns:
            ``(label_values, overflowed)``.
        """
        if values in self._regular:
            return values, False
        if len(self._regular) < self.limit - self.reserve:
            self._regular.add(values)
            return values, False
        folded = tuple(OTHER if i in self._free_idx else v for i, v in enumerate(values))
        overflow = self._overflow
        if folded not in overflow:
            if len(overflow) < self.reserve - 1:
                overflow.add(folded)
            else:
                folded = self._all_other
                overflow.add(folded)
        return folded, True

    def forget(self, values: tuple[str, ...]) -> None:
        """Free the slot of a label set that is no longer exported."""
        self._regular.discard(values)

    def __len__(self) -> int:
        return len(self._regular) + len(self._overflow)


# ---------------------------------------------------------------------------
# Series state
# ---------------------------------------------------------------------------

_ALL_LAYERS = frozenset(LAYERS)


@dataclass(slots=True)
class _Histogram:
    """One histogram series: per-bucket (non-cumulative) counts, sum, last exemplar per bucket."""

    counts: list[int]
    sum: float = 0.0
    exemplars: list[Exemplar | None] = field(default_factory=list)


@dataclass(slots=True)
class _Log2Histogram:
    """A kernel log2 histogram mirrored as cumulative buckets."""

    cumulative: list[int]
    count: int
    sum: float | None


def log2_to_cumulative(slot_counts: Mapping[int, int], le_exponents: Sequence[int]) -> tuple[list[int], int]:
    """Re-bin a kernel log2 histogram into cumulative ``le`` buckets.

    Slot ``k`` counts values in ``[2^k, 2^(k+1))`` ns, so all of it is ``<= 2^(k+1)`` ns and
    it belongs to every bucket whose bound ``2^e`` has ``e >= k + 1``.

    Args:
        slot_counts: slot index → count.
        le_exponents: ascending exponents ``e`` of the bucket bounds ``2^e`` ns.

    Returns:
        ``(cumulative counts per bound, total count)``; the total is the ``+Inf`` bucket.
    """
    cumulative = [0] * len(le_exponents)
    total = 0
    for slot, count in slot_counts.items():
        if count <= 0:
            continue
        total += count
        # First bound that holds the whole slot: 2^e >= 2^(slot+1).
        start = bisect.bisect_left(le_exponents, slot + 1)
        for i in range(start, len(le_exponents)):
            cumulative[i] += count
    return cumulative, total


# ---------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------

class PrometheusExporter:
    """Holds isoscope's metrics and renders them for Prometheus.

    Thread-safe: pipeline threads call the ``observe_*``/``add_*``/``set_*``
    methods while the admin server renders scrapes.

    Args:
        stats: the shared self-telemetry counters, read at scrape time.
        max_label_values: cap on distinct label-value sets per metric.
        span_buckets: bucket bounds (seconds) of ``isoscope_span_layer_seconds``.
        ratio_buckets: bucket bounds of ``isoscope_span_overhead_ratio``.
        log2_le_exponents: bounds (powers of two ns) for mirrored kernel log2 histograms.
        version: reported in ``isoscope_build_info``; default ``isoscope.__version__``.
        build_labels: extra ``isoscope_build_info`` labels (e.g. ``{"commit": ...}``).
        sinks: mirrors of every increment/observation (e.g. an OTLP metrics exporter).
    """

    def __init__(
        self,
        stats: Stats,
        *,
        max_label_values: int = 1000,
        span_buckets: Sequence[float] = DEFAULT_SPAN_BUCKETS,
        ratio_buckets: Sequence[float] = DEFAULT_RATIO_BUCKETS,
        log2_le_exponents: Sequence[int] = DEFAULT_LOG2_LE_EXPONENTS,
        version: str | None = None,
        build_labels: Mapping[str, str] | None = None,
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        self._stats = stats
        self._sinks: list[MetricSink] = list(sinks)
        self._lock = threading.Lock()
        self._wanted_cache: dict[tuple[str, ...], frozenset[str]] = {}
        self._span_bounds = tuple(sorted(float(b) for b in span_buckets))
        self._ratio_bounds = tuple(sorted(float(b) for b in ratio_buckets))
        self._log2_exps = tuple(sorted(int(e) for e in log2_le_exponents))
        self._caps = {s.name: CardinalityCap(s, max_label_values)
                      for s in (LAYER_STALL, SPAN_LAYER, SPAN_OVERHEAD, KVM_EXITS, KVM_EXIT_SECONDS,
                                STEAL, RUNQUEUE, SYSCALL, RUNQ_NEIGHBOR)}
        self._counters: dict[str, dict[tuple[str, ...], float]] = {
            s.name: {} for s in (LAYER_STALL, KVM_EXITS, KVM_EXIT_SECONDS, STEAL, RUNQ_NEIGHBOR, LABEL_OVERFLOW)}
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {
            SPAN_LAYER.name: {}, SPAN_OVERHEAD.name: {}}
        self._log2: dict[str, dict[tuple[str, ...], _Log2Histogram]] = {n: {} for n in LOG2_HISTOGRAMS}
        self._build = {"version": version or __version__, "python": platform.python_version(),
                       "kernel": platform.release(), **dict(build_labels or {})}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def label_cap(self, metric: str) -> CardinalityCap:
        """The cardinality cap of one metric (full family name)."""
        return self._caps[metric]

    @property
    def span_buckets(self) -> tuple[float, ...]:
        """Bucket bounds (seconds) of ``isoscope_span_layer_seconds``."""
        return self._span_bounds

    @property
    def ratio_buckets(self) -> tuple[float, ...]:
        """Bucket bounds of ``isoscope_span_overhead_ratio``."""
        return self._ratio_bounds

    @property
    def build_labels(self) -> dict[str, str]:
        """The ``isoscope_build_info`` labels (version, python, kernel …)."""
        return dict(self._build)

    # -- recording ---------------------------------------------------------

    def _admit(self, spec: MetricSpec, values: tuple[str, ...]) -> tuple[str, ...]:
        # Caller holds the lock.
        key, overflowed = self._caps[spec.name].admit(values)
        if overflowed:
            series = self._counters[LABEL_OVERFLOW.name]
            series[(spec.name,)] = series.get((spec.name,), 0.0) + 1.0
        return key

    def _observe(self, spec: MetricSpec, bounds: tuple[float, ...], values: tuple[str, ...],
                 amount: float, exemplar: Exemplar | None) -> tuple[str, ...]:
        # Caller holds the lock; returns the label set recorded under.
        key = self._admit(spec, values)
        series = self._histograms[spec.name]
        hist = series.get(key)
        if hist is None:
            hist = _Histogram(counts=[0] * (len(bounds) + 1), exemplars=[None] * (len(bounds) + 1))
            series[key] = hist
        idx = bisect.bisect_left(bounds, amount)  # first bound >= amount: the `le` bucket
        hist.counts[idx] += 1
        hist.sum += amount
        if exemplar is not None:
            hist.exemplars[idx] = exemplar
        return key

    def add_sink(self, sink: MetricSink) -> None:
        """Mirror every later increment/observation into ``sink``."""
        self._sinks.append(sink)

    def _emit(self, kind: str, records: list[tuple[MetricSpec, tuple[str, ...], float]]) -> None:
        # Outside the lock: a sink may take its own locks (the OpenTelemetry SDK does).
        for sink in self._sinks:
            for spec, key, amount in records:
                attrs = dict(zip(spec.labels, key))
                try:
                    if kind == "histogram":
                        sink.histogram(spec.name, amount, attrs)
                    else:
                        sink.counter(spec.name, amount, attrs)
                except Exception:  # a broken mirror must not break the Prometheus path
                    logger.exception("metric sink %r failed", sink)

    def observe_span(self, service: str, breakdown: Breakdown, trace_id_hex: str,
                     layers: Iterable[str] | None = None) -> None:
        """Record one enriched span.

        Observes ``isoscope_span_layer_seconds`` once per component with stall time
        (with a ``trace_id`` exemplar) and ``isoscope_span_overhead_ratio`` once per
        isolation layer, zeros included, so ``_sum / _count`` is the mean share a
        layer takes of a request.

        Args:
            service: the span's ``service.name``.
            breakdown: the attribution result for the span.
            trace_id_hex: 32 hex digits, attached as exemplar so a bucket links to a trace.
            layers: isolation layers present under the span's workload; ratios are
                observed for these (plus any layer with stall time). ``None`` means all.
        """
        service = service or "unknown"
        duration = breakdown.duration_ns
        # Layer sums in one pass (only the isolation layers take part in the ratios).
        per_layer = dict.fromkeys(LAYERS, 0)
        stalled = []
        for comp, ns in breakdown.component_ns.items():
            layer = COMPONENT_LAYER[comp] if comp in COMPONENT_LAYER else None
            if layer in per_layer:
                per_layer[layer] += ns
            if ns > 0:
                stalled.append((layer, comp, ns))
        wanted = self._wanted_layers(layers)
        records: list[tuple[MetricSpec, tuple[str, ...], float]] | None = [] if self._sinks else None
        observe = self._observe
        with self._lock:
            if stalled:
                now = time.time()
                span_bounds = self._span_bounds
                for layer, comp, ns in stalled:
                    if layer is None:
                        layer, comp = OTHER, OTHER
                    seconds = ns / 1e9
                    ex = Exemplar({"trace_id": trace_id_hex}, seconds, now) if trace_id_hex else None
                    key = observe(SPAN_LAYER, span_bounds, (service, layer, comp), seconds, ex)
                    if records is not None:
                        records.append((SPAN_LAYER, key, seconds))
            if duration > 0:
                ratio_bounds = self._ratio_bounds
                for layer in LAYERS:
                    ns = per_layer[layer]
                    if ns > 0 or layer in wanted:
                        ratio = ns / duration
                        key = observe(SPAN_OVERHEAD, ratio_bounds, (service, layer), ratio, None)
                        if records is not None:
                            records.append((SPAN_OVERHEAD, key, ratio))
        if records:
            self._emit("histogram", records)

    def _wanted_layers(self, layers: Iterable[str] | None) -> frozenset[str]:
        # The same few layer lists (one per workload stack) come with every span: cached.
        if layers is None:
            return _ALL_LAYERS
        try:
            key = tuple(layers)
        except TypeError:
            key = None
        cache = self._wanted_cache
        hit = cache.get(key) if key is not None else None
        if hit is None:
            hit = frozenset(layer for layer in (key if key is not None else layers) if layer in LAYERS)
            if key is not None and len(cache) < 256:
                cache[key] = hit
        return hit

    def add_stall(self, stall: Stall, namespace: str, pod: str, container: str) -> None:
        """Add one stall's duration to ``isoscope_layer_stall_seconds_total``.

        Args:
            stall: the stall (its component gives layer and component labels).
            namespace: Kubernetes namespace ("" when not in a pod).
            pod: pod name ("" when not in a pod).
            container: container name ("" when not in a container).
        """
        self.add_stall_ns(stall.component, stall.duration_ns, namespace, pod, container)

    def add_stall_ns(self, component: str, ns: int, namespace: str, pod: str, container: str) -> None:
        """Add aggregated stall time of one component (e.g. a per-cgroup timeline aggregate).

        Args:
            component: one of ``isoscope.model.COMPONENTS``.
            ns: nanoseconds to add (ignored when <= 0).
            namespace: Kubernetes namespace.
            pod: pod name.
            container: container name.
        """
        if ns <= 0:
            return
        layer = COMPONENT_LAYER.get(component)
        if layer is None:
            layer, component = OTHER, OTHER
        self._inc(LAYER_STALL, (layer, component, namespace, pod, container), ns / 1e9)

    def add_runqueue_neighbor_ns(self, victim: tuple[str, str, str], neighbor: tuple[str, str, str],
                                 ns: int) -> None:
        """Add to ``isoscope_runqueue_neighbor_seconds_total``: ``victim`` waited ``ns`` while ``neighbor`` ran.

        Args:
            victim: (namespace, pod, container) of the workload that waited.
            neighbor: (namespace, pod, container) of the one that ran, or ``("", "", "self")``,
                ``("", "", "kernel")``, ``("other", "other", "other")``.
            ns: nanoseconds to add (ignored when <= 0).
        """
        if ns <= 0:
            return
        self._inc(RUNQ_NEIGHBOR, tuple(victim) + tuple(neighbor), ns / 1e9)

    def add_kvm_exits(self, reason: str, layer: str, vm: str, count: int, seconds: float) -> None:
        """Add KVM exits seen on this host.

        Args:
            reason: exit reason name (``HLT``, ``EPT_VIOLATION``, ``IO_INSTRUCTION`` …).
            layer: ``L-0`` (EPT/NPT), ``L-1`` (other non-I/O exits) or ``L-2`` (PIO/MMIO/hypercall).
            vm: VM identity (VMM process name or id).
            count: exits to add.
            seconds: exit handling time to add.
        """
        if layer not in LAYERS:
            layer = OTHER
        key = (reason, layer, vm)
        if count > 0:
            self._inc(KVM_EXITS, key, float(count))
        if seconds > 0:
            self._inc(KVM_EXIT_SECONDS, key, float(seconds))

    def set_steal_seconds(self, cpu: int, seconds_total: float) -> None:
        """Mirror a CPU's cumulative steal time (``/proc/stat``); never lowers the counter.

        Args:
            cpu: CPU number.
            seconds_total: steal seconds since boot.
        """
        with self._lock:
            key = self._admit(STEAL, (str(cpu),))
            series = self._counters[STEAL.name]
            if seconds_total > series.get(key, 0.0):
                series[key] = float(seconds_total)

    def set_log2_histogram(self, metric: str, labels: Mapping[str, str], slot_counts: Mapping[int, int],
                           sum_seconds: float | None) -> None:
        """Mirror a cumulative kernel log2 histogram (a BPF map) as a Prometheus histogram.

        Args:
            metric: ``runqueue_latency_seconds`` or ``syscall_latency_seconds`` (prefix optional).
            labels: all label values of that metric (``workload_namespace``, ``workload_pod``,
                ``workload_container`` and, for syscalls, ``class``).
            slot_counts: slot ``k`` → number of values in ``[2^k, 2^(k+1))`` ns, since start.
            sum_seconds: exact sum of the values if the kernel keeps it; ``None`` omits ``_sum``
                and ``_count`` (the ``+Inf`` bucket still counts).

        Raises:
            ValueError: unknown metric or missing labels.
        """
        name = metric if metric.startswith(PREFIX) else PREFIX + metric
        spec = LOG2_HISTOGRAMS.get(name)
        if spec is None:
            raise ValueError(f"not a log2 histogram metric: {metric!r}")
        try:
            values = tuple(str(labels[n]) for n in spec.labels)
        except KeyError as exc:
            raise ValueError(f"{name} needs labels {spec.labels}, missing {exc}") from None
        if spec is SYSCALL and values[0] not in SYSCALL_CLASSES:
            values = (OTHER,) + values[1:]
        cumulative, total = log2_to_cumulative(slot_counts, self._log2_exps)
        with self._lock:
            key = self._admit(spec, values)
            series = self._log2[name]
            if key != values and key in series:
                # Folded into `other`: several sources share it, so their counts add up.
                prev = series[key]
                cumulative = [a + b for a, b in zip(prev.cumulative, cumulative)]
                total += prev.count
                sum_seconds = None if prev.sum is None or sum_seconds is None else prev.sum + sum_seconds
            series[key] = _Log2Histogram(cumulative, total, sum_seconds)

    def forget_workload(self, namespace: str, pod: str, container: str) -> int:
        """Drop every series of a workload that went away, freeing its cardinality slots.

        Args:
            namespace: Kubernetes namespace.
            pod: pod name.
            container: container name.

        Returns:
            The number of series removed.
        """
        removed = 0
        target = (namespace, pod, container)
        with self._lock:
            for spec, store in ((LAYER_STALL, self._counters[LAYER_STALL.name]),
                                (RUNQUEUE, self._log2[RUNQUEUE.name]),
                                (SYSCALL, self._log2[SYSCALL.name])):
                for key in [k for k in store if k[-3:] == target]:
                    del store[key]
                    self._caps[spec.name].forget(key)
                    removed += 1
            # A pair goes when either side does.
            store = self._counters[RUNQ_NEIGHBOR.name]
            for key in [k for k in store if k[:3] == target or k[3:] == target]:
                del store[key]
                self._caps[RUNQ_NEIGHBOR.name].forget(key)
                removed += 1
        return removed

    def _inc(self, spec: MetricSpec, values: tuple[str, ...], amount: float) -> None:
        with self._lock:
            key = self._admit(spec, values)
            series = self._counters[spec.name]
            series[key] = series.get(key, 0.0) + amount
        if self._sinks:
            self._emit("counter", [(spec, key, amount)])

    def counter_values(self, metric: str) -> dict[tuple[str, ...], float]:
        """A copy of one counter's current values by label set (full family name)."""
        with self._lock:
            return dict(self._counters[metric])

    def series_count(self, metric: str) -> int:
        """Distinct label-value sets currently held for ``metric`` (full name)."""
        with self._lock:
            for store in (self._counters, self._histograms, self._log2):
                if metric in store:
                    return len(store[metric])
        raise KeyError(metric)

    # -- exposition --------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """Build every metric family from the current state (called at scrape time)."""
        with self._lock:
            counters = {n: dict(s) for n, s in self._counters.items()}
            histograms = {n: {k: (list(h.counts), h.sum, list(h.exemplars)) for k, h in s.items()}
                          for n, s in self._histograms.items()}
            log2 = {n: dict(s) for n, s in self._log2.items()}
        for spec in (LAYER_STALL, KVM_EXITS, KVM_EXIT_SECONDS, STEAL, RUNQ_NEIGHBOR, LABEL_OVERFLOW):
            fam = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            for key, value in sorted(counters[spec.name].items()):
                fam.add_metric(list(key), value)
            yield fam
        for spec, bounds in ((SPAN_LAYER, self._span_bounds), (SPAN_OVERHEAD, self._ratio_bounds)):
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]
            fam = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            for key, (counts, total, exemplars) in sorted(histograms[spec.name].items()):
                running = 0
                buckets: list[Any] = []
                for le, count, ex in zip(les, counts, exemplars):
                    running += count
                    buckets.append((le, running, ex) if ex is not None else (le, running))
                fam.add_metric(list(key), buckets, total)
            yield fam
        log2_les = [floatToGoString(2.0 ** e / 1e9) for e in self._log2_exps] + ["+Inf"]
        for name, spec in LOG2_HISTOGRAMS.items():
            fam = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
            for key, h in sorted(log2[name].items()):
                buckets = list(zip(log2_les, h.cumulative + [h.count]))
                # Without a kernel-kept sum both _sum and _count are left out (OpenMetrics
                # requires them together); the +Inf bucket still carries the count.
                fam.add_metric(list(key), buckets, h.sum)
            yield fam
        yield from self._collect_stats()
        info = GaugeMetricFamily(PREFIX + "build_info", "isoscope build information (value is always 1).",
                                 labels=list(self._build))
        info.add_metric(list(self._build.values()), 1.0)
        yield info

    def _collect_stats(self) -> Iterator[Metric]:
        counters, gauges = self._stats.snapshot()
        for name, (doc, labelnames) in STATS_COUNTERS.items():
            fam = CounterMetricFamily(PREFIX + name, doc, labels=labelnames)
            for key, value in sorted(counters.get(name, {}).items()):
                if len(key) == len(labelnames):
                    fam.add_metric(list(key), value)
                else:
                    logger.debug("stats counter %s has labels %r, expected %r", name, key, labelnames)
            yield fam
        for name, (doc, labelnames) in STATS_GAUGES.items():
            fam = GaugeMetricFamily(PREFIX + name, doc, labels=labelnames)
            for key, value in sorted(gauges.get(name, {}).items()):
                if len(key) == len(labelnames):
                    fam.add_metric(list(key), value)
            yield fam

    def render(self, openmetrics: bool) -> tuple[bytes, str]:
        """Render all metrics.

        Args:
            openmetrics: OpenMetrics 1.0 (with exemplars) instead of the classic text format.

        Returns:
            ``(body, content_type)``.
        """
        accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
        return self.render_for(accept)

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """Render for an HTTP ``Accept`` header (content negotiation as Prometheus expects)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _Collector:
    """Adapter registering the exporter's state with a ``CollectorRegistry``."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterable[Metric]:
        return self._exporter.collect()


__all__ = [
    "PrometheusExporter", "MetricSink", "CardinalityCap", "MetricSpec", "log2_to_cumulative",
    "DEFAULT_SPAN_BUCKETS", "DEFAULT_RATIO_BUCKETS", "DEFAULT_LOG2_LE_EXPONENTS",
    "LOG2_HISTOGRAMS", "STATS_COUNTERS", "STATS_GAUGES", "OTHER", "WORKLOAD_LABELS", "SERVICE_LABEL",
    "VICTIM_LABELS", "NEIGHBOR_LABELS", "RUNQ_NEIGHBOR",
]
