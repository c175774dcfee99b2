"""``isoscope report``: per-hop × per-layer breakdown of the slowest traces in an OTLP/JSON file.

Input is what the daemon's file export writes: one OTLP/JSON
``ExportTraceServiceRequest`` per line. Output is a table per trace (one row
per hop, one column per isolation layer, the culprit named) printed with
``rich``, optionally a stacked-bar PNG (per hop, per layer) and a JSON dump.

Parsing and aggregation are pure functions over the file's content; the
rendering functions only format what those return.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from isoscope.model import COMPONENT_LAYER, COMPONENTS, KERNEL, LAYERS, component_key, layer_key
from isoscope.otlpjson import OtlpJsonError, decode_request

logger = logging.getLogger(__name__)

CHILD_SPAN_PREFIX = "isolation "
"""Child spans the daemon adds for individual stalls are named ``isolation L-3 cpu_throttle``."""

COLUMNS: tuple[str, ...] = (*LAYERS, KERNEL)


class ReportError(Exception):
    """The input cannot be reported on; the message names the file and line."""


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

def any_value(v: Any) -> Any:
    """Python value of an OTLP ``AnyValue`` protobuf message."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


@dataclass(slots=True)
class SpanRecord:
    """One span as read from the file, with its resource's attributes.

    Attributes:
        trace_id, span_id, parent_span_id: lowercase hex ("" for a root's parent).
        name: span name.
        service: the resource's ``service.name`` ("" if absent).
        start_ns, end_ns: wall-clock ns.
        attrs: span attributes.
        resource: resource attributes.
    """

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attrs: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def is_stall_child(self) -> bool:
        """True for the per-stall child spans the daemon adds (not application hops)."""
        return self.name.startswith(CHILD_SPAN_PREFIX) and "isolation.component" in self.attrs

    @property
    def enriched(self) -> bool:
        return "isolation.overhead.ratio" in self.attrs

    def component_ns(self) -> dict[str, int]:
        """Stall ns per component written by the daemon (``isolation.l3.cpu_throttle.ns`` …)."""
        out: dict[str, int] = {}
        for comp in COMPONENTS:
            layer = COMPONENT_LAYER[comp]
            key = f"isolation.{layer_key(layer)}.{comp}.ns" if layer != KERNEL else None
            val = self.attrs.get(key) if key else None
            if val:
                out[comp] = int(val)
        return out

    def layer_ns(self) -> dict[str, int]:
        """Stall ns per layer column (``L-0`` … ``L-4``, ``kernel``)."""
        out = {c: 0 for c in COLUMNS}
        for layer in LAYERS:
            out[layer] = int(self.attrs.get(f"isolation.{layer_key(layer)}.ns", 0) or 0)
        out[KERNEL] = int(self.attrs.get("isolation.kernel.ns", 0) or 0)
        if not any(out[layer] for layer in LAYERS):
            # Files written without per-layer totals: rebuild them from the components.
            for comp, ns in self.component_ns().items():
                if COMPONENT_LAYER[comp] != KERNEL:
                    out[COMPONENT_LAYER[comp]] += ns
        return out


def _spans_of_request(request: Any) -> Iterable[SpanRecord]:
    for rs in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        service = str(resource.get("service.name", "") or "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield SpanRecord(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                    name=s.name, service=service, start_ns=int(s.start_time_unix_nano),
                    end_ns=int(s.end_time_unix_nano),
                    attrs={kv.key: any_value(kv.value) for kv in s.attributes}, resource=resource)


def parse_lines(lines: Iterable[str], source: str = "<input>") -> list[SpanRecord]:
    """Spans of every request in ``lines`` (blank lines are skipped).

    Raises:
        ReportError: a line is not an OTLP/JSON trace request; names ``source:line``.
    """
    spans: list[SpanRecord] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = decode_request(line)
        except OtlpJsonError as exc:
            raise ReportError(f"{source}:{lineno}: not an OTLP/JSON trace request: {exc}") from None
        spans.extend(_spans_of_request(request))
    return spans


def load_spans(path: str) -> list[SpanRecord]:
    """Every span in an OTLP/JSON-lines file.

    Raises:
        ReportError: the file cannot be read or a line is malformed.
    """
    try:
        with open(path, encoding="utf-8", errors="strict") as fh:
            return parse_lines(fh, path)
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ReportError(f"{path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class HopRow:
    """One hop (application span) of a trace with its per-layer stall time."""

    service: str
    name: str
    span_id: str
    start_ns: int
    duration_ns: int
    layer_ns: dict[str, int]
    component_ns: dict[str, int]
    overhead_ratio: float | None
    blame: str
    scope: str
    neighbor: str = ""
    """Who held the CPU longest while this hop waited in the run queue (``isolation.l3.runqueue.neighbor``)."""

    @property
    def dominant(self) -> tuple[str, int] | None:
        """(``l3.cpu_throttle``, ns) of the largest isolation component on this hop."""
        best = max(((c, ns) for c, ns in self.component_ns.items() if COMPONENT_LAYER[c] != KERNEL),
                   key=lambda x: x[1], default=None)
        return (component_key(best[0]), best[1]) if best and best[1] > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"service": self.service, "name": self.name, "span_id": self.span_id,
                "duration_ms": self.duration_ns / 1e6,
                "layer_ms": {k: v / 1e6 for k, v in self.layer_ns.items()},
                "component_ms": {component_key(k): v / 1e6 for k, v in self.component_ns.items()},
                "overhead_ratio": self.overhead_ratio, "blame": self.blame, "scope": self.scope,
                "neighbor": self.neighbor}


@dataclass(slots=True)
class TraceReport:
    """One trace: its hops in start order and the culprit (hop, component, ns)."""

    trace_id: str
    duration_ns: int
    hops: list[HopRow]
    culprit_service: str = ""
    culprit_component: str = ""
    culprit_ns: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "duration_ms": self.duration_ns / 1e6,
                "culprit": ({"service": self.culprit_service, "component": self.culprit_component,
                             "ms": self.culprit_ns / 1e6} if self.culprit_component else None),
                "hops": [h.to_dict() for h in self.hops]}


def _hop_row(s: SpanRecord) -> HopRow:
    ratio = s.attrs.get("isolation.overhead.ratio")
    return HopRow(service=s.service or "?", name=s.name, span_id=s.span_id, start_ns=s.start_ns,
                  duration_ns=s.duration_ns, layer_ns=s.layer_ns(), component_ns=s.component_ns(),
                  overhead_ratio=float(ratio) if ratio is not None else None,
                  blame=str(s.attrs.get("isolation.blame", "") or ""),
                  scope=str(s.attrs.get("isolation.scope", "") or ""),
                  neighbor=str(s.attrs.get("isolation.l3.runqueue.neighbor", "") or ""))


def build_traces(spans: Iterable[SpanRecord]) -> list[TraceReport]:
    """Group spans into traces, slowest first.

    A trace's duration is the span of time its application spans cover (root to
    last end). The culprit is the hop whose largest isolation component holds the
    most time; a stall counted on a parent hop and on the child hop it waited for
    is attributed to where the kernel saw it, the child, because parent windows
    only hold their own thread's stalls.
    """
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        if not s.is_stall_child:
            by_trace[s.trace_id].append(s)
    out: list[TraceReport] = []
    for trace_id, group in by_trace.items():
        group.sort(key=lambda s: (s.start_ns, -s.duration_ns))
        hops = [_hop_row(s) for s in group]
        start = min(s.start_ns for s in group)
        end = max(s.end_ns for s in group)
        rep = TraceReport(trace_id=trace_id, duration_ns=max(0, end - start), hops=hops)
        best: tuple[int, str, str] | None = None
        for h in hops:
            d = h.dominant
            if d and (best is None or d[1] > best[0]):
                best = (d[1], h.service, d[0])
        if best:
            rep.culprit_ns, rep.culprit_service, rep.culprit_component = best
        out.append(rep)
    out.sort(key=lambda t: t.duration_ns, reverse=True)
    return out


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}" if ns else "·"


def render_tables(traces: Sequence[TraceReport], console: Any) -> None:
    """Print one per-hop × per-layer table per trace on a ``rich`` console."""
    from rich.table import Table

    for t in traces:
        title = f"trace {t.trace_id[:16]} · {t.duration_ns / 1e6:.1f} ms · stall ms per layer"
        if t.culprit_component:
            share = t.culprit_ns / t.duration_ns if t.duration_ns else 0.0
            caption = (f"culprit: [bold red]{t.culprit_service}[/] · [bold]{t.culprit_component}[/] "
                       f"{t.culprit_ns / 1e6:.1f} ms ({share:.0%} of the trace)")
        else:
            caption = "culprit: none (no isolation stall recorded)"
        table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
        table.add_column("hop", no_wrap=True)
        table.add_column("span ms", justify="right")
        for col in COLUMNS:
            table.add_column(col, justify="right")
        table.add_column("ovh", justify="right")
        table.add_column("blame", no_wrap=True)
        table.add_column("scope")
        # Named where it explains the hop's time: the hop was blamed on waiting for a CPU.
        neighbors = any(h.neighbor and h.blame == "l3.runqueue" for h in t.hops)
        if neighbors:
            table.add_column("CPU held by", overflow="fold")
        for h in t.hops:
            culprit_hop = h.service == t.culprit_service and t.culprit_component
            cells = []
            for col in COLUMNS:
                cell = _ms(h.layer_ns.get(col, 0))
                if culprit_hop and col == COMPONENT_LAYER.get(t.culprit_component.split(".", 1)[1]):
                    cell = f"[bold red]{cell}[/]"
                cells.append(cell)
            row = [f"[bold]{h.service}[/]" if culprit_hop else h.service, f"{h.duration_ns / 1e6:.1f}",
                   *cells, "-" if h.overhead_ratio is None else f"{h.overhead_ratio:.0%}",
                   h.blame or "·", h.scope or "-"]
            if neighbors:
                row.append(h.neighbor if h.neighbor and h.blame == "l3.runqueue" else "·")
            table.add_row(*row)
        console.print(table)


LAYER_COLORS: dict[str, str] = {"L-0": "#6a3d9a", "L-1": "#e31a1c", "L-2": "#ff7f00", "L-3": "#1f78b4",
                                "L-4": "#33a02c", KERNEL: "#b2b2b2", "other": "#eeeeee"}


def render_png(traces: Sequence[TraceReport], path: str) -> None:
    """Stacked horizontal bars: one bar per hop, one segment per layer, one panel per trace."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--png needs matplotlib: pip install 'isoscope[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not traces:
        raise ReportError("no traces to draw")
    heights = [max(1, len(t.hops)) * 0.45 + 0.9 for t in traces]
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    segments = [*COLUMNS, "other"]
    for ax, t in zip(axes[:, 0], traces):
        labels = [h.service for h in t.hops]
        y = list(range(len(t.hops)))
        left = [0.0] * len(t.hops)
        for seg in segments:
            if seg == "other":
                vals = [max(0.0, h.duration_ns / 1e6 - sum(h.layer_ns.values()) / 1e6) for h in t.hops]
            else:
                vals = [h.layer_ns.get(seg, 0) / 1e6 for h in t.hops]
            ax.barh(y, vals, left=left, color=LAYER_COLORS[seg], edgecolor="white", linewidth=0.5,
                    label=seg if seg != "other" else "not stalled")
            left = [a + b for a, b in zip(left, vals)]
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        culprit = (f" — culprit {t.culprit_service} {t.culprit_component} {t.culprit_ns / 1e6:.1f} ms"
                   if t.culprit_component else "")
        ax.set_title(f"trace {t.trace_id[:16]} ({t.duration_ns / 1e6:.1f} ms){culprit}", fontsize=9, loc="left")
        ax.set_xlabel("ms")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=len(segments), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isoscope report",
                                description="Per-hop × per-layer breakdown of the slowest traces in an "
                                            "OTLP/JSON-lines file written by the isoscope file export.")
    p.add_argument("file", help="OTLP/JSON lines (e.g. ./isoscope-data/traces.jsonl)")
    p.add_argument("--png", metavar="PATH", help="also draw the breakdown as stacked bars into PATH")
    p.add_argument("--top", type=int, default=5, metavar="N", help="how many of the slowest traces (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def make_console() -> Any:
    """A rich console for tables: the terminal's width, or 120 columns when output is piped."""
    from rich.console import Console

    c = Console()
    # Piped output would be cut to 80 columns; the table needs about 120.
    return c if c.is_terminal else Console(width=120)


def report(path: str, *, top: int = 5, png: str | None = None, as_json: bool = False,
           console: Any = None) -> int:
    """Run the report; returns the process exit code (0 ok or nothing to show, 2 bad input)."""
    out = console or make_console()
    if top < 1:
        print("isoscope report: --top must be ≥ 1", file=sys.stderr)
        return 2
    try:
        spans = load_spans(path)
    except ReportError as exc:
        # Plain stderr, never wrapped: the message names file:line for editors and scripts.
        print(f"isoscope report: {exc}", file=sys.stderr)
        return 2
    traces = build_traces(spans)[:top]
    if as_json:
        out.print_json(json.dumps({"file": path, "traces": [t.to_dict() for t in traces]}))
    elif not traces:
        out.print(f"no traces in {path}", markup=False, highlight=False)
    else:
        enriched = sum(1 for s in spans if s.enriched and not s.is_stall_child)
        total = sum(1 for s in spans if not s.is_stall_child)
        out.print(f"{path}: {total} spans, {enriched} enriched; the {len(traces)} slowest traces:",
                  markup=False, highlight=False)
        render_tables(traces, out)
    if png and traces:
        render_png(traces, png)
        if not as_json:
            out.print(f"picture written to {png}", markup=False, highlight=False)
    return 0


def main_report(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``isoscope report FILE [--png PATH] [--top N] [--json]``."""
    args = build_parser().parse_args(argv)
    return report(args.file, top=args.top, png=args.png, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main_report())
