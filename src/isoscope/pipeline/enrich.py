"""Write a breakdown onto an OTLP span: the attributes and child spans of the output contract.

Pure functions over protobuf messages (no I/O). Existing attributes are never
overwritten: an application that already set ``isolation.*`` keeps its values.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from isoscope import __version__
from isoscope.join.neighbors import SPECIAL_NAMES, merge_neighbors, stall_neighbors, window_neighbors
from isoscope.model import (COMPONENT_LAYER, KERNEL, LAYERS, NEIGHBORS_DETAIL, Breakdown, Stall, Workload,
                            component_key, layer_key)

SCOPE_NAME = "isoscope"
SCOPE_VERSION = __version__
DETAIL_PREFIX = "isolation."
"""Prefix of a child span's details (``isolation.cpu``, ``isolation.kvm.exit_reason``, ``isolation.cgroup.path`` …)."""
_LAYER_NS_KEYS = {layer: f"isolation.{layer_key(layer)}.ns" for layer in LAYERS}
_COMPONENT_NS_KEYS = {c: f"isolation.{layer_key(COMPONENT_LAYER[c])}.{c}.ns" for c in COMPONENT_LAYER
                      if COMPONENT_LAYER[c] != KERNEL}

NEIGHBORS_KEY = "isolation.l3.runqueue.neighbors"
"""string[]: who ran on the CPU while the thread waited in the run queue, longest first, each
``<name>=<time>`` (``shop/web-7d9f/web=12.3ms``, ``self=4.10ms``, ``kernel=0.210ms``, ``other=…``)."""
NEIGHBORS_NS_KEY = "isolation.l3.runqueue.neighbors.ns"
"""int[]: the exact ns of each :data:`NEIGHBORS_KEY` entry, in the same order."""
NEIGHBOR_KEY = "isolation.l3.runqueue.neighbor"
"""string: the other workload that ran longest while the thread waited (exact-match searchable)."""
THROTTLE_CAUSE_KEY = "isolation.l3.cpu_throttle.cause"
"""string: why CFS throttling held the thread back; always ``own_quota`` (the workload's own, or its
pod's, CPU limit: no neighbour takes part in it)."""
THROTTLE_CAUSE = "own_quota"


def _kv_str(key: str, value: str) -> KeyValue:
    kv = KeyValue(key=key)
    kv.value.string_value = value
    return kv


def _kv_int(key: str, value: int) -> KeyValue:
    kv = KeyValue(key=key)
    kv.value.int_value = value
    return kv


def _kv_double(key: str, value: float) -> KeyValue:
    kv = KeyValue(key=key)
    kv.value.double_value = value
    return kv


def _kv_str_array(key: str, values: list[str]) -> KeyValue:
    kv = KeyValue(key=key)
    arr = kv.value.array_value
    for v in values:
        arr.values.add().string_value = v
    return kv


def format_ms(ns: int) -> str:
    """``12300000`` → ``"12.3ms"``: three significant digits, in ms."""
    ms = ns / 1e6
    if ms >= 100:
        return f"{ms:.0f}ms"
    if ms >= 10:
        return f"{ms:.1f}ms"
    if ms >= 1:
        return f"{ms:.2f}ms"
    return f"{ms:.3f}ms"


def neighbor_attributes(entries: list[tuple[str, int]]) -> list[KeyValue]:
    """The run-queue neighbour attributes for ``(name, ns)`` entries, longest first.

    Written as ``isolation.l3.runqueue.neighbors`` (``name=time`` strings: readable as they are in
    Jaeger and Tempo, matched with a regex in TraceQL), ``isolation.l3.runqueue.neighbors.ns``
    (exact ns, same order) and ``isolation.l3.runqueue.neighbor`` (the other workload that ran
    longest, a plain string any backend can search by equality). Nothing when ``entries`` is empty.
    """
    if not entries:
        return []
    attrs = [_kv_str_array(NEIGHBORS_KEY, [f"{name}={format_ms(ns)}" for name, ns in entries])]
    kv = KeyValue(key=NEIGHBORS_NS_KEY)
    for _, ns in entries:
        kv.value.array_value.values.add().int_value = ns
    attrs.append(kv)
    top = next((name for name, _ in entries if name not in SPECIAL_NAMES), None)
    if top is not None:
        attrs.append(_kv_str(NEIGHBOR_KEY, top))
    return attrs


def span_neighbor_attributes(stalls: list[Stall], start: int, end: int,
                             name_of: Callable[[int], str]) -> list[KeyValue]:
    """:func:`neighbor_attributes` of the run-queue stalls of a span window (empty when none carries a split)."""
    tally = window_neighbors(stalls, start, end)
    return neighbor_attributes(tally.named(name_of)) if tally else []


def wire_attributes(attrs: list[KeyValue]) -> bytes:
    """``attrs`` as a run of serialized ``Span.attributes`` fields (to append with ``MergeFromString``)."""
    return b"".join(b"\x4a" + _varint(kv.ByteSize()) + kv.SerializeToString() for kv in attrs)


def workload_attributes(wl: Workload) -> list[KeyValue]:
    """The attributes that depend only on the workload (the same for all its spans)."""
    stack = wl.stack
    return [
        _kv_str_array("isolation.stack", list(stack.layers) if stack else []),
        _kv_str("isolation.runtime", stack.runtime if stack else "none"),
        _kv_str("isolation.hypervisor", stack.hypervisor if stack else "none"),
        _kv_str("isolation.scope", wl.scope),
    ]


def contract_attributes(bd: Breakdown, wl: Workload, blame_threshold: float,
                        workload_attrs: list[KeyValue] | None = None) -> list[KeyValue]:
    """The ``isolation.*`` attributes of docs/architecture.md §4 for one span.

    Args:
        bd: the span's breakdown.
        wl: the workload it was matched to.
        blame_threshold: ``isolation.blame`` is set only at or above this overhead ratio.
        workload_attrs: :func:`workload_attributes` of ``wl``, when the caller caches them.
    """
    attrs = list(workload_attrs) if workload_attrs is not None else workload_attributes(wl)
    layer_ns = bd.layer_ns()
    for layer in LAYERS:
        attrs.append(_kv_int(_LAYER_NS_KEYS[layer], layer_ns[layer]))
    for comp, ns in bd.component_ns.items():
        key = _COMPONENT_NS_KEYS.get(comp)
        if key and ns:
            attrs.append(_kv_int(key, ns))
    attrs.append(_kv_int("isolation.kernel.ns", layer_ns[KERNEL]))
    ratio = bd.overhead_ratio()
    attrs.append(_kv_double("isolation.overhead.ratio", round(ratio, 6)))
    dominant = bd.dominant()
    if dominant and ratio >= blame_threshold and ratio > 0:
        attrs.append(_kv_str("isolation.blame", component_key(dominant)))
    if bd.component_ns.get("cpu_throttle"):
        attrs.append(_kv_str(THROTTLE_CAUSE_KEY, THROTTLE_CAUSE))
    attrs.append(_kv_double("isolation.coverage", round(bd.coverage, 4)))
    return attrs


# -- the same attributes, written as serialized bytes --------------------------------------
# Building a dozen KeyValue messages per span is most of the cost of writing a
# breakdown; appending their wire form with one MergeFromString is a fraction of it.
# Span.attributes is field 9 (length-delimited), KeyValue.key 1, KeyValue.value 2,
# AnyValue.string_value 1, .int_value 3 (varint), .double_value 4 (fixed64).

_DOUBLE = struct.Struct("<d")


def _varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    if v < 0x80:
        return bytes((v,))
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_KEY_FIELDS: dict[str, bytes] = {}
"""Attribute key → its encoded ``KeyValue.key`` field and the ``value`` tag (keys come from fixed vocabularies)."""


def _wire_attr(key: str, any_value: bytes) -> bytes:
    k = _KEY_FIELDS.get(key)
    if k is None:
        kb = key.encode()
        k = b"\x0a" + _varint(len(kb)) + kb + b"\x12"
        if len(_KEY_FIELDS) < 4096:
            _KEY_FIELDS[key] = k
    n = len(any_value)
    kv = k + (bytes((n,)) if n < 0x80 else _varint(n)) + any_value
    n = len(kv)
    return (b"\x4a" + bytes((n,)) if n < 0x80 else b"\x4a" + _varint(n)) + kv


def _wire_int(key: str, value: int) -> bytes:
    return _wire_attr(key, b"\x18" + _varint(value))


_ZERO_LAYERS = {layer: _wire_int(_LAYER_NS_KEYS[layer], 0) for layer in LAYERS}
_KERNEL_ZERO = _wire_int("isolation.kernel.ns", 0)
_BLAME = {c: _wire_attr("isolation.blame", b"\x0a" + _varint(len(component_key(c))) + component_key(c).encode())
          for c in COMPONENT_LAYER if COMPONENT_LAYER[c] != KERNEL}
_RATIO_ZERO = _wire_attr("isolation.overhead.ratio", b"\x21" + _DOUBLE.pack(0.0))
_COVERAGE_ONE = _wire_attr("isolation.coverage", b"\x21" + _DOUBLE.pack(1.0))
_THROTTLE_CAUSE = _wire_attr(THROTTLE_CAUSE_KEY, b"\x0a" + _varint(len(THROTTLE_CAUSE)) + THROTTLE_CAUSE.encode())


def workload_attributes_wire(wl: Workload) -> bytes:
    """:func:`workload_attributes` in wire form (a run of ``Span.attributes`` fields)."""
    return b"".join(b"\x4a" + _varint(kv.ByteSize()) + kv.SerializeToString() for kv in workload_attributes(wl))


def contract_attributes_wire(bd: Breakdown, blame_threshold: float, workload_wire: bytes) -> bytes:
    """:func:`contract_attributes` in wire form, to append with ``span.MergeFromString``.

    Args:
        bd: the span's breakdown.
        blame_threshold: ``isolation.blame`` is set only at or above this overhead ratio.
        workload_wire: :func:`workload_attributes_wire` of the span's workload.
    """
    # One pass over the components gives the layer sums, the overhead and the dominant
    # component (what Breakdown.layer_ns / overhead_ratio / dominant compute one by one).
    layer_ns = dict.fromkeys(LAYERS, 0)
    kernel = 0
    overhead = 0
    dominant = None
    dominant_ns = 0
    comp_parts = []
    for comp, ns in bd.component_ns.items():
        layer = COMPONENT_LAYER[comp]
        if layer == KERNEL:
            kernel += ns
            continue
        layer_ns[layer] += ns
        overhead += ns
        if ns > dominant_ns:
            dominant, dominant_ns = comp, ns
        if ns:
            comp_parts.append(_wire_int(_COMPONENT_NS_KEYS[comp], ns))
    parts = [workload_wire]
    for layer in LAYERS:
        ns = layer_ns[layer]
        parts.append(_wire_int(_LAYER_NS_KEYS[layer], ns) if ns else _ZERO_LAYERS[layer])
    parts += comp_parts
    parts.append(_wire_int("isolation.kernel.ns", kernel) if kernel else _KERNEL_ZERO)
    duration = bd.duration_ns
    ratio = overhead / duration if duration > 0 else 0.0
    r = round(ratio, 6)
    parts.append(_wire_attr("isolation.overhead.ratio", b"\x21" + _DOUBLE.pack(r)) if r else _RATIO_ZERO)
    if dominant and ratio >= blame_threshold and ratio > 0:
        parts.append(_BLAME[dominant])
    if bd.component_ns.get("cpu_throttle"):
        parts.append(_THROTTLE_CAUSE)
    cov = round(bd.coverage, 4)
    parts.append(_COVERAGE_ONE if cov == 1.0 else _wire_attr("isolation.coverage", b"\x21" + _DOUBLE.pack(cov)))
    return b"".join(parts)


def add_attributes(span: Span, attrs: list[KeyValue], may_conflict: bool = True) -> int:
    """Append ``attrs`` to ``span`` except keys it already has; returns how many were added.

    Args:
        span: the span to enrich.
        attrs: the attributes to add.
        may_conflict: False when the caller knows no ``isolation.*`` key is present
            (e.g. the whole request was checked at once), which skips the per-span scan.
    """
    existing = None
    if may_conflict:
        for kv in span.attributes:
            if kv.key.startswith("isolation."):
                existing = {kv.key for kv in span.attributes}
                break
    if existing is None:
        span.attributes.extend(attrs)
        return len(attrs)
    added = [kv for kv in attrs if kv.key not in existing]
    span.attributes.extend(added)
    return len(added)


TOUCHING_GAP_NS = 50_000
"""Stalls of one component and thread this close together become one child span."""

SAMPLED_GAP_NS: dict[str, int] = {"sandbox": 10_000_000}
"""Components measured by sampling arrive as one-period stalls interleaved with samples of other
code (a host call's own syscalls, say): their stalls up to this far apart form one child, whose
``merged.ns`` is the sampled time and whose interval shows where it fell."""


def _merged(group: list[Stall]) -> Stall:
    first = min(s.start_mono_ns for s in group)
    last = max(s.end_mono_ns for s in group)
    # A member that is itself a merged run counts what it merged, not its whole interval.
    total = sum(int((s.details or {}).get("merged.ns", s.duration_ns)) for s in group)
    details: dict[str, Any] = {"merged.ns": total}
    nb = merge_neighbors(n for n in map(stall_neighbors, group) if n is not None)
    if nb is not None:
        details[NEIGHBORS_DETAIL] = nb
    return Stall(group[0].component, first, last, group[0].tid, group[0].pid, group[0].cgroup_id, -1, details)


def _coalesce_touching(stalls: list[Stall]) -> list[tuple[Stall, int]]:
    """Runs of touching stalls of one component and thread, each as (stall, how many it merges)."""
    out: list[tuple[Stall, int]] = []
    run: list[Stall] = []
    run_end = 0
    for s in sorted(stalls, key=lambda s: (s.component, s.tid, s.start_mono_ns)):
        gap = SAMPLED_GAP_NS.get(s.component, TOUCHING_GAP_NS)
        if run and (s.component, s.tid) == (run[-1].component, run[-1].tid) and s.start_mono_ns <= run_end + gap:
            run.append(s)
            run_end = max(run_end, s.end_mono_ns)
            continue
        if run:
            out.append((run[0], 1) if len(run) == 1 else (_merged(run), len(run)))
        run, run_end = [s], s.end_mono_ns
    if run:
        out.append((run[0], 1) if len(run) == 1 else (_merged(run), len(run)))
    return out


def _merge_for_children(stalls: list[Stall], min_stall_ns: int, max_children: int) -> list[tuple[Stall, int]]:
    """Pick the stalls that become child spans; merge touching ones, and the rest per component.

    Returns (stall, merged_count) pairs; merged entries span from the first
    merged stall's start to the last one's end.
    """
    # The kernel baseline is an attribute, not a "held back" interval: no child spans for it.
    runs = _coalesce_touching([s for s in stalls if COMPONENT_LAYER[s.component] != KERNEL])
    long = [(s, n) for s, n in runs if s.duration_ns >= min_stall_ns]
    if len(long) <= max_children:
        return sorted(long, key=lambda p: p[0].start_mono_ns)
    long.sort(key=lambda p: p[0].duration_ns, reverse=True)
    # Reserve one merged child per component present in the tail.
    keep_n = max_children
    while keep_n > 0:
        tail_components = {s.component for s, _ in long[keep_n:]}
        if keep_n + len(tail_components) <= max_children:
            break
        keep_n -= 1
    kept = long[:keep_n]
    groups: dict[str, list[tuple[Stall, int]]] = {}
    for s, n in long[keep_n:]:
        groups.setdefault(s.component, []).append((s, n))
    for group in groups.values():
        kept.append((_merged([s for s, _ in group]), sum(n for _, n in group)))
    kept = kept[:max_children]
    kept.sort(key=lambda p: p[0].start_mono_ns)
    return kept


def _child_plan(bd: Breakdown, min_stall_ns: int, max_children: int,
                window: tuple[int, int]) -> list[tuple[Stall, int, int, int]]:
    """The child spans of a breakdown as ``(stall, merged_count, start, end)``, clipped to ``window``."""
    lo, hi = window
    out = []
    for stall, merged in _merge_for_children(bd.stalls, min_stall_ns, max_children):
        s0, s1 = stall.start_mono_ns, stall.end_mono_ns
        a = s0 if s0 > lo else lo
        b = s1 if s1 < hi else hi
        if b > a:
            out.append((stall, merged, a, b))
    return out


def child_spans(parent: Span, bd: Breakdown, wl: Workload, to_unix: Callable[[int], int], *,
                min_stall_ns: int, max_children: int, window: tuple[int, int],
                id_source: Callable[[int], bytes] = os.urandom,
                cgroup_path: str = "", neighbor_name: Callable[[int], str] | None = None) -> list[Span]:
    """Child spans for the stalls of a breakdown (docs/architecture.md §4): one per stall ≥ ``min_stall_ns``.

    The object form of :func:`child_spans_wire` (which the pipeline uses): both write the same spans.

    Args:
        parent: the enriched span.
        bd: its breakdown (with the stalls that overlapped its window).
        wl: the workload the span was matched to.
        to_unix: CLOCK_MONOTONIC → wall-clock conversion.
        min_stall_ns: shorter stalls get no child span.
        max_children: at most this many; the rest are merged per component.
        window: the span window (monotonic), children are clipped to it.
        neighbor_name: names a cgroup for the run-queue neighbour attributes of ``runqueue``
            children (:class:`isoscope.join.neighbors.CgroupNamer`); None leaves them out.
    """
    if max_children <= 0 or not bd.stalls:
        return []
    out = []
    for stall, merged, a, b in _child_plan(bd, min_stall_ns, max_children, window):
        layer = COMPONENT_LAYER[stall.component]
        child = Span(trace_id=parent.trace_id, span_id=id_source(8), parent_span_id=parent.span_id,
                     name=f"isolation {layer} {stall.component}", kind=Span.SPAN_KIND_INTERNAL,
                     start_time_unix_nano=to_unix(a), end_time_unix_nano=to_unix(b))
        # Every attribute isoscope writes on a child span is under `isolation.` (thread.id is the
        # semantic-convention key), so nothing collides with what a backend or processor adds.
        attrs = [_kv_str("isolation.layer", layer), _kv_str("isolation.component", stall.component),
                 _kv_int("isolation.stall.ns", b - a), _kv_int("thread.id", stall.tid)]
        if stall.cpu >= 0:
            attrs.append(_kv_int(DETAIL_PREFIX + "cpu", stall.cpu))
        if merged > 1:
            attrs.append(_kv_int("isolation.merged_count", merged))
        for k, v in (stall.details or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                continue
            if isinstance(v, str):
                attrs.append(_kv_str(DETAIL_PREFIX + k, v))
            elif isinstance(v, int):
                attrs.append(_kv_int(DETAIL_PREFIX + k, v))
            else:
                attrs.append(_kv_double(DETAIL_PREFIX + k, v))
        if cgroup_path:
            attrs.append(_kv_str(DETAIL_PREFIX + "cgroup.path", cgroup_path))
        if stall.component == "runqueue" and neighbor_name is not None:
            # Also when the list has only self: "your own threads" is the answer then.
            attrs.extend(span_neighbor_attributes([stall], a, b, neighbor_name))
        elif stall.component == "cpu_throttle":
            attrs.append(_kv_str(THROTTLE_CAUSE_KEY, THROTTLE_CAUSE))
        child.attributes.extend(attrs)
        out.append(child)
    return out


# -- child spans, written as serialized bytes ----------------------------------------------
# A child span built as a protobuf Span with eight-odd KeyValue messages costs more than
# the whole join of its parent. The wire form below writes the same fields in the same
# order as Span.SerializeToString (field-number order, proto3 defaults left out), so the
# parsed result is the object form exactly (tests/test_child_wire.py proves it).
# ScopeSpans.spans is field 2; Span: trace_id 1, span_id 2, parent_span_id 4, name 5,
# kind 6 (varint), start 7 / end 8 (fixed64), attributes 9.

_U64 = struct.Struct("<Q")
_KIND_INTERNAL = b"\x30" + _varint(Span.SPAN_KIND_INTERNAL)


def _wire_str(key: str, value: str) -> bytes:
    v = value.encode()
    return _wire_attr(key, b"\x0a" + _varint(len(v)) + v)


def _wire_double(key: str, value: float) -> bytes:
    return _wire_attr(key, b"\x21" + _DOUBLE.pack(value))


def _len_field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_CHILD_HEAD = {c: (_len_field(b"\x2a", f"isolation {COMPONENT_LAYER[c]} {c}".encode()) + _KIND_INTERNAL,
                   _wire_str("isolation.layer", COMPONENT_LAYER[c]) + _wire_str("isolation.component", c))
               for c in COMPONENT_LAYER}
"""Per component: the child's name and kind fields, and its layer/component attributes."""
_DETAIL_STR_CACHE: dict[tuple[str, str], bytes] = {}
_DETAIL_STR_CACHE_MAX = 4096


def _detail_str(key: str, value: str) -> bytes:
    # Detail strings come from small vocabularies (syscall classes, exit reasons, devices):
    # their encoded attribute is reused instead of rebuilt per child.
    hit = _DETAIL_STR_CACHE.get((key, value))
    if hit is None:
        hit = _wire_str(DETAIL_PREFIX + key, value)
        if len(_DETAIL_STR_CACHE) < _DETAIL_STR_CACHE_MAX:
            _DETAIL_STR_CACHE[(key, value)] = hit
    return hit


def neighbor_attributes_wire(entries: list[tuple[str, int]]) -> bytes:
    """:func:`neighbor_attributes` in wire form (a run of ``Span.attributes`` fields)."""
    if not entries:
        return b""
    names = b"".join(_len_field(b"\x0a", _len_field(b"\x0a", f"{name}={format_ms(ns)}".encode()))
                     for name, ns in entries)
    nss = b"".join(_len_field(b"\x0a", b"\x18" + _varint(ns)) for _, ns in entries)
    out = _wire_attr(NEIGHBORS_KEY, _len_field(b"\x2a", names)) + _wire_attr(NEIGHBORS_NS_KEY, _len_field(b"\x2a", nss))
    top = next((name for name, _ in entries if name not in SPECIAL_NAMES), None)
    if top is not None:
        out += _wire_str(NEIGHBOR_KEY, top)
    return out


def span_neighbor_attributes_wire(stalls: list[Stall], start: int, end: int, name_of: Callable[[int], str]) -> bytes:
    """:func:`span_neighbor_attributes` in wire form."""
    tally = window_neighbors(stalls, start, end)
    return neighbor_attributes_wire(tally.named(name_of)) if tally else b""


def cgroup_path_wire(cgroup_path: str) -> bytes:
    """The ``isolation.cgroup.path`` attribute of a workload's child spans, in wire form (b"" when none)."""
    return _wire_str(DETAIL_PREFIX + "cgroup.path", cgroup_path) if cgroup_path else b""


class SpanIds:
    """Random 8-byte span ids drawn from ``os.urandom`` in blocks: one syscall per 512 ids instead
    of one per child span. Same source and quality as ``os.urandom(8)``; for one thread (the
    enrich thread) at a time.
    """

    BLOCK = 4096

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def __call__(self, n: int = 8) -> bytes:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf, pos = os.urandom(max(self.BLOCK, n)), 0
        self._pos = pos + n
        return self._buf[pos:pos + n]


def child_spans_wire(parent: Span, bd: Breakdown, to_unix: Callable[[int], int], *, min_stall_ns: int,
                     max_children: int, window: tuple[int, int], id_source: Callable[[int], bytes] = os.urandom,
                     cgroup_path_attr: bytes = b"", neighbor_name: Callable[[int], str] | None = None,
                     offset_ns: int | None = None,
                     neighbor_cache: dict[tuple[Any, int, int], bytes] | None = None) -> tuple[bytes, int]:
    """:func:`child_spans` as serialized ``ScopeSpans.spans`` fields, to append with one ``MergeFromString``.

    Args:
        parent: the enriched span.
        bd: its breakdown (with the stalls that overlapped its window).
        to_unix: CLOCK_MONOTONIC → wall-clock conversion (unused when ``offset_ns`` is given).
        min_stall_ns: shorter stalls get no child span.
        max_children: at most this many; the rest are merged per component.
        window: the span window (monotonic), children are clipped to it.
        id_source: span id bytes.
        cgroup_path_attr: :func:`cgroup_path_wire` of the workload's cgroup path.
        neighbor_name: names a cgroup for ``runqueue`` children's neighbour attributes; None leaves them out.
        offset_ns: wall − monotonic, when the conversion is a plain offset (saves a call per edge).
        neighbor_cache: reuses ``runqueue`` children's neighbour attributes across the calls of one
            batch (keyed by split and the share of it inside); None computes each.

    Returns:
        The bytes and how many child spans they hold.
    """
    if max_children <= 0 or not bd.stalls:
        return b"", 0
    plan = _child_plan(bd, min_stall_ns, max_children, window)
    if not plan:
        return b"", 0
    trace_id, parent_id = parent.trace_id, parent.span_id
    head = (_len_field(b"\x0a", trace_id) if trace_id else b"")
    parent_field = _len_field(b"\x22", parent_id) if parent_id else b""
    pack = _U64.pack
    parts = []
    for stall, merged, a, b in plan:
        comp = stall.component
        name_kind, layer_comp = _CHILD_HEAD[comp]
        if offset_ns is None:
            ua, ub = to_unix(a), to_unix(b)
        else:
            ua, ub = a + offset_ns, b + offset_ns
        attrs = [layer_comp, _wire_int("isolation.stall.ns", b - a), _wire_int("thread.id", stall.tid)]
        if stall.cpu >= 0:
            attrs.append(_wire_int(DETAIL_PREFIX + "cpu", stall.cpu))
        if merged > 1:
            attrs.append(_wire_int("isolation.merged_count", merged))
        details = stall.details
        if details:
            for k, v in details.items():
                t = type(v)
                if t is str:
                    attrs.append(_detail_str(k, v))
                elif t is int:
                    attrs.append(_wire_int(DETAIL_PREFIX + k, v))
                elif t is float:
                    attrs.append(_wire_double(DETAIL_PREFIX + k, v))
                elif isinstance(v, bool) or not isinstance(v, (int, float, str)):
                    continue
                elif isinstance(v, str):  # subclasses: as the object form does
                    attrs.append(_wire_str(DETAIL_PREFIX + k, v))
                elif isinstance(v, int):
                    attrs.append(_wire_int(DETAIL_PREFIX + k, v))
                else:
                    attrs.append(_wire_double(DETAIL_PREFIX + k, v))
        if cgroup_path_attr:
            attrs.append(cgroup_path_attr)
        if comp == "runqueue" and neighbor_name is not None:
            if neighbor_cache is None:
                attrs.append(span_neighbor_attributes_wire([stall], a, b, neighbor_name))
            else:
                # One stall's list depends only on its split and the share of it inside: overlapping
                # spans of one thread in a batch see the same stalls again.
                nb = stall_neighbors(stall)
                key = (nb, b - a, stall.end_mono_ns - stall.start_mono_ns)
                hit = neighbor_cache.get(key) if nb is not None else b""
                if hit is None:
                    hit = neighbor_cache[key] = span_neighbor_attributes_wire([stall], a, b, neighbor_name)
                attrs.append(hit)
        elif comp == "cpu_throttle":
            attrs.append(_THROTTLE_CAUSE)
        span = b"".join((head, _len_field(b"\x12", id_source(8)), parent_field, name_kind,
                         (b"\x39" + pack(ua)) if ua else b"", (b"\x41" + pack(ub)) if ub else b"", *attrs))
        parts.append(_len_field(b"\x12", span))
    return b"".join(parts), len(parts)


def kubernetes_attributes(wl: Workload, node_name: str = "") -> list[KeyValue]:
    """The ``k8s.*`` / ``container.id`` resource attributes a resolved workload proves.

    A downstream ``k8sattributes`` processor matching by connection IP would see only
    isoscope's own pod; these name the sending workload instead.
    """
    stack = wl.stack
    pairs = [("k8s.namespace.name", wl.namespace), ("k8s.pod.name", wl.pod),
             ("k8s.pod.uid", stack.pod_uid if stack else ""),
             ("k8s.container.name", wl.container),
             ("container.id", stack.container_id if stack else ""),
             ("k8s.node.name", node_name if stack and stack.pod_uid else "")]
    return [_kv_str(k, v) for k, v in pairs if v]


def add_resource_attributes(resource: Any, attrs: list[KeyValue]) -> int:
    """Add attributes to a resource, never overwriting one the sender set; returns how many were added."""
    have = {kv.key for kv in resource.attributes}
    new = [kv for kv in attrs if kv.key not in have]
    resource.attributes.extend(new)
    return len(new)


def isoscope_scope(rs: ResourceSpans, cache: dict[int, Any]) -> ScopeSpans:
    """The ``isoscope`` ScopeSpans of a ResourceSpans, created on first use."""
    key = id(rs)
    ss = cache.get(key)
    if ss is None:
        ss = rs.scope_spans.add()
        ss.scope.name = SCOPE_NAME
        ss.scope.version = SCOPE_VERSION
        cache[key] = ss
    return ss
