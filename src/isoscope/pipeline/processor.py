"""The processor between receivers and exporters: hold, join, enrich, hand on.

Spans arrive after they end, and the kernel data for their window may still be
in a ring buffer. Each batch is held until the probes have drained past the
batch's latest span end (or at most ``hold_max_ms``), then every span is
resolved to a workload, joined with the timeline and enriched.

Delivery never depends on enrichment: a span that cannot be resolved or
joined is forwarded as it came, and the failure is counted
(``enrichment_failures_total{stage}``); so is a batch that arrives while the
join is falling behind (``stage="overload"``). With a write-ahead spool, a batch is
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

from isoscope.host import cgroupfs
from isoscope.join.attribution import BATCH_WINDOW_MAX_NS, Attributor
from isoscope.join.neighbors import CgroupNamer
from isoscope.kernel.clock import MonoWallClock
from isoscope.config import AttributionConfig
from isoscope.pipeline.enrich import (add_attributes, add_resource_attributes, cgroup_path_wire, child_spans_wire,
                                      contract_attributes, contract_attributes_wire, isoscope_scope,
                                      kubernetes_attributes, span_neighbor_attributes,
                                      span_neighbor_attributes_wire, SpanIds, workload_attributes,
                                      workload_attributes_wire)
from isoscope.metadata.resolver import WorkloadResolver, resource_identity
from isoscope.model import Backpressure, Breakdown, Stall, Stats, TraceBatch, Workload

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


_Pending = tuple
"""A resolved span waiting for its join: ``(span, workload, start, end, slot)`` (monotonic ns; ``slot``
indexes the batch's join results). A tuple: one is made per span."""

_MISSING = object()


CHILD_MODES = ("blamed", "all", "off")
"""``attribution.child_spans``: child spans for spans whose overhead ratio reaches the blame
threshold (``blamed``), for every span a layer held back (``all``), or none (``off``)."""


def _may_hold_isolation_keys(payload: bytes) -> bool:
    """Whether a serialized request may already carry ``isolation.*`` attributes.

    One look at the whole request (C speed) instead of a scan of every span's attributes.
    """
    return b"isolation." in payload


def _thread_id(span: Any) -> int | None:
    for kv in span.attributes:
        if kv.key == "thread.id":
            v = kv.value
            which = v.WhichOneof("value")
            if which == "int_value":
                return v.int_value
            if which == "string_value" and v.string_value.isdigit():
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
        node_name: this node's name, for ``k8s.node.name`` when ``cfg.kubernetes_attributes`` is on.
    """

    def __init__(self, *, resolver: WorkloadResolver, attributor: Attributor, clock: MonoWallClock,
                 drained_until: Callable[[], int], cfg: AttributionConfig, stats: Stats,
                 output: Callable[[TraceBatch], None], observer: SpanObserver | None = None,
                 on_workload: Callable[[Workload], None] | None = None,
                 enrich_enabled: Callable[[], bool] = lambda: True, spool: Spool | None = None,
                 memory_over: Callable[[], bool] = lambda: False, node_name: str = "") -> None:
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
        self._node_name = node_name
        self._queue: deque[_Held] = deque()
        self._held_spans = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failures_logged = 0
        self._overload_logged = float("-inf")
        self.hold_ns = int(cfg.hold_max_ms * 1e6)
        self.min_stall_ns = int(cfg.min_stall_ms * 1e6)
        self._span_ids = SpanIds()  # child span ids (only the enrich thread writes children)
        self.neighbor_name = CgroupNamer(getattr(resolver, "cgroup_labels", lambda _cg: ("", "", "")),
                                         self._cgroup_path)

    def _cgroup_path(self, cgroup_id: int) -> str | None:
        v2_root = getattr(self.resolver, "v2_root", None)
        return cgroupfs.cgroup_path_by_id(cgroup_id, v2_root) if v2_root else None

    # -- TraceConsumer ------------------------------------------------------------

    def consume(self, batch: TraceBatch) -> None:
        """Accept a batch from a receiver.

        Raises ``Backpressure`` near the memory limit, while shutting down, or when the
        join is behind and the exporters' queues cannot take the batch either.
        """
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
            overloaded = bool(self._queue) and (
                self._held_spans + batch.span_count > self.cfg.hold_capacity_spans
                or now - self._queue[0].deadline_mono_ns > self.hold_ns)
        if overloaded:
            self._bypass(batch)
            return
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

    def _bypass(self, batch: TraceBatch) -> None:
        """Forward a batch unenriched because the join cannot keep up.

        The hold queue is full, or its oldest batch waited twice the hold time: the
        join is the bottleneck (a flood of spans, a busy node). Refusing would make
        every sender retry, honest ones included, for the sake of enrichment;
        instead the batch goes straight to the exporters, whose bounded queues are
        the delivery backpressure (they refuse when *they* are full), and the
        spans are counted as ``enrichment_failures_total{stage="overload"}``.
        """
        try:
            self._output(batch)
        finally:
            batch.release_memory()
        self.stats.inc("enrichment_failures_total", ("overload",), batch.span_count)
        now = time.monotonic()
        if now - self._overload_logged >= 10.0:
            self._overload_logged = now
            logger.warning("the join is falling behind (%d spans held); forwarding new batches unenriched",
                           self._held_spans)

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
        finally:
            # Serialized into the exporters' queues (bounded by their own byte limits): the parsed
            # batch is no longer the daemon's to hold, nor is its share of the request's reservation.
            batch.release_memory()
        if held.spool_key is not None and self._spool is not None:
            self._spool.remove(held.spool_key)

    # -- the join -------------------------------------------------------------------

    def child_mode(self) -> str:
        """Which spans get child spans: ``blamed`` (default), ``all`` or ``off``."""
        mode = getattr(self.cfg, "child_spans", "blamed")
        return mode if mode in CHILD_MODES else "blamed"

    def enrich(self, batch: TraceBatch, drained: int, may_conflict: bool | None = None) -> int:
        """Enrich every span of a batch in place; returns how many were enriched.

        The spans are resolved first, then joined per workload in one call each
        (one lock, one coverage snapshot), then written in their original order.

        Args:
            batch: the batch, enriched in place.
            drained: how far (CLOCK_MONOTONIC ns) the kernel data has been drained.
            may_conflict: whether the request may already hold ``isolation.*`` keys;
                None looks at the request.
        """
        cfg = self.cfg
        if may_conflict is None:
            may_conflict = _may_hold_isolation_keys(batch.request.SerializeToString())
        clock = self.clock
        # One offset for the whole batch when the conversion is the plain one (the clock's
        # remeasurement moves it by microseconds at most): no method call per span edge.
        plain = type(clock).to_mono is MonoWallClock.to_mono and type(clock).to_unix is MonoWallClock.to_unix
        offset = clock.offset_ns if plain else None
        to_mono = clock.to_mono
        resolve = self.resolver.resolve
        on_workload = self._on_workload
        peer_pid = batch.peer_pid
        # (resource, thread) → (workload, its windows, their slots in `joined`): spans of one
        # key share the resolution and the group lookup.
        resolved: dict[tuple[Any, int | None], tuple[Workload, list[tuple[int, int]], list[int]] | None] = {}
        groups: dict[int, tuple[Workload, list[tuple[int, int]], list[int]]] = {}
        order: list[tuple[Any, str, list[_Pending]]] = []
        n = 0
        unresolved = 0
        for rs in batch.request.resource_spans:
            ident = resource_identity(rs.resource)
            service = str(ident.get("service.name") or "unknown_service")
            base_key = (ident.get("process.pid"), ident.get("container.id"), ident.get("k8s.pod.uid"))
            pending: list[_Pending] = []
            order.append((rs, service, pending))
            append = pending.append
            for ss in rs.scope_spans:
                for span in ss.spans:
                    try:
                        key = (base_key, _thread_id(span))
                        entry = resolved.get(key, _MISSING)
                        if entry is _MISSING:
                            wl = resolve(ident, key[1], peer_pid)
                            entry = None if wl is None else groups.get(id(wl))
                            if wl is not None and entry is None:
                                entry = groups[id(wl)] = (wl, [], [])
                            resolved[key] = entry
                            if wl is not None and on_workload is not None:
                                on_workload(wl)
                        if entry is None:
                            unresolved += 1
                            continue
                        if offset is not None:
                            start = span.start_time_unix_nano - offset
                            end = span.end_time_unix_nano - offset
                        else:
                            start = to_mono(span.start_time_unix_nano)
                            end = to_mono(span.end_time_unix_nano)
                    except Exception:
                        self._failed("join")
                        continue
                    entry[1].append((start, end))
                    entry[2].append(n)
                    append((span, entry[0], start, end, n))
                    n += 1
        if unresolved:
            self.stats.inc("enrichment_failures_total", ("unresolved",), unresolved)
        joined: list[tuple[Breakdown, int] | None] = [None] * n
        # Per thread, the interval holding its (not overly long) windows: its stalls are then read
        # once for the batch's neighbour lists and child spans.
        bounds: dict[int, tuple[int, int]] = {}
        for wl, windows, slots in groups.values():
            try:
                out = self.attributor.join_many(wl, windows, drained)
            except Exception:
                self._failed("join", len(windows))
                continue
            for i, r, (start, end) in zip(slots, out, windows):
                joined[i] = r
                tid = r[1]
                if tid and end - start <= BATCH_WINDOW_MAX_NS:
                    b = bounds.get(tid)
                    bounds[tid] = (start, end) if b is None else (min(b[0], start), max(b[1], end))
        return self._write(batch, order, joined, cfg, may_conflict, offset, self.attributor.batch_stalls(bounds))

    def _write(self, batch: TraceBatch, order: list[tuple[Any, str, list[_Pending]]],
               joined: list[tuple[Breakdown, int] | None], cfg: AttributionConfig, may_conflict: bool,
               offset: int | None, stalls_of: Callable[[int, int, int], list[Stall]]) -> int:
        """Write the joined breakdowns (and child spans) onto the spans, in their order.

        ``stalls_of(tid, start, end)`` reads a thread's stalls in a window (the batch's
        :class:`~isoscope.join.attribution.BatchStalls`).
        """
        mode = self.child_mode()
        max_children = cfg.max_child_spans if mode != "off" else 0
        blame = cfg.blame_threshold
        min_stall_ns = self.min_stall_ns
        to_unix = self.clock.to_unix
        neighbor_name = self.neighbor_name
        observer = self._observer
        wants_children = self._wants_children
        scope_cache: dict[int, Any] = {}
        neighbor_cache: dict[tuple[Any, int, int], bytes] = {}  # for this batch only: names may change
        wl_attrs: dict[int, list[Any]] = {}
        wl_wire: dict[int, tuple[bytes, bytes, Any]] = {}
        enriched: dict[str, int] = {}
        emitted = 0
        for rs, service, pending in order:
            if self.cfg.kubernetes_attributes and pending:
                self._label_resource(rs, pending)
            children: list[bytes] = []
            n_children = 0
            for span, wl, start, end, slot in pending:
                j = joined[slot]
                if j is None:
                    continue
                bd, tid = j
                try:
                    stalls = None
                    cached = wl_wire.get(id(wl))
                    if cached is None:
                        cached = wl_wire[id(wl)] = (workload_attributes_wire(wl), cgroup_path_wire(wl.cgroup_path),
                                                    wl.stack.layers if wl.stack else None)
                    wire, cgroup_attr, layers = cached
                    if may_conflict:
                        # Some span may hold isolation.* keys already: add only the missing ones.
                        neighbors = []
                        if tid and bd.component_ns.get("runqueue"):
                            stalls = stalls_of(tid, start, end)
                            neighbors = span_neighbor_attributes(stalls, start, end, neighbor_name)
                        prefix = wl_attrs.get(id(wl))
                        if prefix is None:
                            prefix = wl_attrs[id(wl)] = workload_attributes(wl)
                        add_attributes(span, contract_attributes(bd, wl, blame, prefix) + neighbors, True)
                    else:
                        attrs = contract_attributes_wire(bd, blame, wire)
                        if tid and bd.component_ns.get("runqueue"):
                            # Who ran while the thread waited: the splits its run-queue stalls carry.
                            stalls = stalls_of(tid, start, end)
                            attrs += span_neighbor_attributes_wire(stalls, start, end, neighbor_name)
                        span.MergeFromString(attrs)
                    if max_children and tid and wants_children(bd, mode, blame):
                        bd.stalls = stalls if stalls is not None else stalls_of(tid, start, end)
                        kids, k = child_spans_wire(span, bd, to_unix, min_stall_ns=min_stall_ns,
                                                   max_children=max_children, window=(start, end),
                                                   id_source=self._span_ids, cgroup_path_attr=cgroup_attr,
                                                   neighbor_name=neighbor_name, offset_ns=offset,
                                                   neighbor_cache=neighbor_cache)
                        if k:
                            children.append(kids)
                            n_children += k
                    enriched[wl.scope] = enriched.get(wl.scope, 0) + 1
                    if observer is not None:
                        observer.observe_span(service, bd, span.trace_id.hex(), layers=layers)
                except Exception:
                    self._failed("join")
            if n_children:
                # One parse for all the resource's children, appended after any already there.
                isoscope_scope(rs, scope_cache).MergeFromString(b"".join(children))
                batch.span_count += n_children
                emitted += n_children
        for scope, n in enriched.items():
            self.stats.inc("spans_enriched_total", (scope,), n)
        if emitted:
            self.stats.inc("child_spans_emitted_total", (), emitted)
        return sum(enriched.values())

    def _label_resource(self, rs: Any, pending: list[_Pending]) -> None:
        """``k8s.*`` attributes on a resource whose spans all resolved to one container or pod."""
        first = pending[0][1]

        def labels(wl: Workload) -> tuple[str, ...]:
            return (wl.namespace, wl.pod, wl.container, wl.stack.pod_uid if wl.stack else "",
                    wl.stack.container_id if wl.stack else "")

        key = labels(first)
        if not any(key) or any(p[1] is not first and labels(p[1]) != key for p in pending[1:]):
            return
        add_resource_attributes(rs.resource, kubernetes_attributes(first, self._node_name))

    @staticmethod
    def _wants_children(bd: Breakdown, mode: str, blame_threshold: float) -> bool:
        """Whether a span's children would explain something (decided before its stalls are read)."""
        overhead = bd.overhead_ns()
        if not overhead:
            return False  # no layer held the thread back: the kernel baseline gets no children
        if mode == "all":
            return True
        ratio = bd.overhead_ratio()
        return ratio >= blame_threshold and ratio > 0

    def _failed(self, stage: str, n: int = 1) -> None:
        self.stats.inc("enrichment_failures_total", (stage,), n)
        if self._failures_logged < 5:
            self._failures_logged += 1
            logger.exception("enriching a span failed; it is forwarded unenriched")
