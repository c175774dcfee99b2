"""The processor between receivers and exporters: hold, join, enrich, hand on.

Spans arrive after they end, and the kernel data for their window may still be
in a ring buffer. Each batch is held until the probes have drained past the
batch's latest span end (or at most ``hold_max_ms``), then every span is
resolved to a workload, joined with the timeline and enriched.

Delivery never depends on enrichment: a span that cannot be resolved or
joined is forwarded as it came, and the failure is counted
(``enrichment_failures_total{stage}``). With a write-ahead spool, a batch is
on disk before the receiver acknowledges it and leaves the spool only once
the exporters' queues hold it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from isoscope.join.attribution import Attributor
from isoscope.kernel.clock import MonoWallClock
from isoscope.config import AttributionConfig
from isoscope.pipeline.enrich import add_attributes, child_spans, contract_attributes, isoscope_scope, workload_attributes
from isoscope.metadata.resolver import WorkloadResolver, resource_identity
from isoscope.model import Backpressure, Breakdown, Stats, TraceBatch, Workload

logger = logging.getLogger(__name__)


class SpanObserver(Protocol):
    """Receives every enriched span's breakdown (the Prometheus exporter)."""

    def observe_span(self, service: str, breakdown: Breakdown, trace_id_hex: str,
                     layers: Any = None) -> None: ...


class Spool(Protocol):
    """A durable store of serialized batches (``isoscope.exporters.queue.DiskSpool``)."""

    def put(self, payload: bytes, span_count: int) -> str: ...

    def remove(self, key: str) -> None: ...


@dataclass(slots=True)
class _Held:
    batch: TraceBatch
    need_mono_ns: int
    deadline_mono_ns: int
    spool_key: str | None
    may_conflict: bool | None  # known when the request was serialized at receipt


def _may_hold_isolation_keys(payload: bytes) -> bool:
    """Whether a serialized request may already carry ``isolation.*`` attributes.

    One look at the whole request (C speed) instead of a scan of every span's attributes.
    """
    return b"isolation." in payload


def _thread_id(span: Any) -> int | None:
    for kv in span.attributes:
        if kv.key == "thread.id":
            v = kv.value
            if v.WhichOneof("value") == "int_value":
                return v.int_value
            if v.WhichOneof("value") == "string_value" and v.string_value.isdigit():
                return int(v.string_value)
            return None
    return None


class EnrichPipeline:
    """A ``TraceConsumer`` that enriches batches and passes them to ``output``.

    Args:
        resolver: span → workload.
        attributor: workload × window → breakdown.
        clock: monotonic ↔ wall-clock conversion.
        drained_until: how far (CLOCK_MONOTONIC ns) the kernel data has been drained.
        cfg: attribution settings (thresholds, hold time, child spans).
        stats: shared counters.
        output: takes each batch after enrichment (the exporters' fan-out).
        observer: optional per-span metrics sink.
        on_workload: called for each resolved workload (e.g. to watch it in the kernel).
        enrich_enabled: when it returns False, batches pass through without holding.
        spool: optional write-ahead spool.
        memory_over: returns True while the daemon is too close to its memory limit.
    """

    def __init__(self, *, resolver: WorkloadResolver, attributor: Attributor, clock: MonoWallClock,
                 drained_until: Callable[[], int], cfg: AttributionConfig, stats: Stats,
                 output: Callable[[TraceBatch], None], observer: SpanObserver | None = None,
                 on_workload: Callable[[Workload], None] | None = None,
                 enrich_enabled: Callable[[], bool] = lambda: True, spool: Spool | None = None,
                 memory_over: Callable[[], bool] = lambda: False) -> None:
        self.resolver = resolver
        self.attributor = attributor
        self.clock = clock
        self._drained_until = drained_until
        self.cfg = cfg
        self.stats = stats
        self._output = output
        self._observer = observer
        self._on_workload = on_workload
        self._enrich_enabled = enrich_enabled
        self._spool = spool
        self._memory_over = memory_over
        self._queue: deque[_Held] = deque()
        self._held_spans = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failures_logged = 0
        self.hold_ns = int(cfg.hold_max_ms * 1e6)
        self.min_stall_ns = int(cfg.min_stall_ms * 1e6)

    # -- TraceConsumer ------------------------------------------------------------

    def consume(self, batch: TraceBatch) -> None:
        """Accept a batch from a receiver (raises ``Backpressure`` when the hold queue is full)."""
        now = time.monotonic_ns()
        if self._memory_over():
            self.stats.inc("requests_rejected_total", (batch.protocol, "memory_limit"))
            raise Backpressure("isoscope is near its memory limit", retry_after_s=2.0)
        if not batch.received_mono_ns:
            batch.received_mono_ns = now
        latest_end = 0
        for rs in batch.request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if span.end_time_unix_nano > latest_end:
                        latest_end = span.end_time_unix_nano
        # Kernel data up to the moment of receipt is what can explain these spans;
        # a sender's clock running ahead must not make us wait for the future.
        need = min(self.clock.to_mono(latest_end), now) if latest_end else now
        with self._cond:
            if self._stopping:
                raise Backpressure("isoscope is shutting down", retry_after_s=1.0)
            if self._queue and (self._held_spans + batch.span_count > self.cfg.hold_capacity_spans
                                or now - self._queue[0].deadline_mono_ns > self.hold_ns):
                # Full, or falling behind (the oldest batch waited twice the hold time):
                # a retryable refusal keeps latency bounded instead of queueing more.
                self.stats.inc("requests_rejected_total", (batch.protocol, "backpressure"))
                raise Backpressure("enrichment queue is full", retry_after_s=1.0)
        key = None
        may_conflict = None
        if self._spool is not None:
            payload = batch.request.SerializeToString()
            key = self._spool.put(payload, batch.span_count)
            may_conflict = _may_hold_isolation_keys(payload)
        with self._cond:
            self._queue.append(_Held(batch, need, now + self.hold_ns, key, may_conflict))
            self._held_spans += batch.span_count
            self.stats.set_gauge("queue_size", ("enrich",), len(self._queue))
            self._cond.notify()

    def set_config(self, cfg: AttributionConfig) -> None:
        """Switch to new attribution settings (configuration reload)."""
        self.cfg = cfg
        self.hold_ns = int(cfg.hold_max_ms * 1e6)
        self.min_stall_ns = int(cfg.min_stall_ms * 1e6)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="isoscope-enrich", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, enrich-and-forward what is held without waiting for more kernel data."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=timeout_s)

    def held(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait(0.2)
                if not self._queue and self._stopping:
                    return
                head = self._queue[0]
                now = time.monotonic_ns()
                ready = (self._stopping or not self._enrich_enabled() or now >= head.deadline_mono_ns
                         or self._drained_until() >= head.need_mono_ns)
                if not ready:
                    self._cond.wait(0.005)
                    continue
                self._queue.popleft()
                self._held_spans -= head.batch.span_count
                self.stats.set_gauge("queue_size", ("enrich",), len(self._queue))
            self._process(head)

    def _process(self, held: _Held) -> None:
        batch = held.batch
        if self._enrich_enabled():
            try:
                self.enrich(batch, self._drained_until(), held.may_conflict)
            except Exception:
                self.stats.inc("enrichment_failures_total", ("join",), batch.span_count)
                logger.exception("enrichment of a batch failed; forwarding it unenriched")
        try:
            self._output(batch)
        except Exception:
            self.stats.inc("spans_dropped_total", ("output_error",), batch.span_count)
            logger.exception("handing a batch to the exporters failed")
            return
        if held.spool_key is not None and self._spool is not None:
            self._spool.remove(held.spool_key)

    # -- the join -------------------------------------------------------------------

    def enrich(self, batch: TraceBatch, drained: int, may_conflict: bool | None = None) -> int:
        """Enrich every span of a batch in place; returns how many were enriched.

        Args:
            batch: the batch, enriched in place.
            drained: how far (CLOCK_MONOTONIC ns) the kernel data has been drained.
            may_conflict: whether the request may already hold ``isolation.*`` keys;
                None looks at the request.
        """
        cfg = self.cfg
        enriched = 0
        scope_cache: dict[int, Any] = {}
        resolved: dict[tuple[Any, int | None], Workload | None] = {}
        wl_attrs: dict[int, list[Any]] = {}
        if may_conflict is None:
            may_conflict = _may_hold_isolation_keys(batch.request.SerializeToString())
        for rs in batch.request.resource_spans:
            ident = resource_identity(rs.resource)
            service = str(ident.get("service.name") or "unknown_service")
            children: list[Any] = []
            for ss in rs.scope_spans:
                for span in ss.spans:
                    try:
                        tid = _thread_id(span)
                        key = (ident.get("process.pid"), ident.get("container.id"), ident.get("k8s.pod.uid"), tid)
                        if key in resolved:
                            wl = resolved[key]
                        else:
                            wl = resolved[key] = self.resolver.resolve(ident, tid, batch.peer_pid)
                            if wl is not None and self._on_workload is not None:
                                self._on_workload(wl)
                        if wl is None:
                            self.stats.inc("enrichment_failures_total", ("unresolved",))
                            continue
                        start = self.clock.to_mono(span.start_time_unix_nano)
                        end = self.clock.to_mono(span.end_time_unix_nano)
                        bd = self.attributor.breakdown(wl, start, end, drained)
                        prefix = wl_attrs.get(id(wl))
                        if prefix is None:
                            prefix = wl_attrs[id(wl)] = workload_attributes(wl)
                        add_attributes(span, contract_attributes(bd, wl, cfg.blame_threshold, prefix),
                                       may_conflict)
                        if cfg.max_child_spans:
                            children.extend(child_spans(span, bd, wl, self.clock.to_unix,
                                                        min_stall_ns=self.min_stall_ns,
                                                        max_children=cfg.max_child_spans, window=(start, end),
                                                        cgroup_path=wl.cgroup_path))
                        enriched += 1
                        self.stats.inc("spans_enriched_total", (wl.scope,))
                        if self._observer is not None:
                            self._observer.observe_span(service, bd, span.trace_id.hex(),
                                                        layers=wl.stack.layers if wl.stack else None)
                    except Exception:
                        self.stats.inc("enrichment_failures_total", ("join",))
                        if self._failures_logged < 5:
                            self._failures_logged += 1
                            logger.exception("enriching a span failed; it is forwarded unenriched")
            if children:
                isoscope_scope(rs, scope_cache).spans.extend(children)
                batch.span_count += len(children)
        return enriched
