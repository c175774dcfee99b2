#!/usr/bin/env python3
"""Generate isoscope's Grafana dashboards (classic dashboard JSON model).

The JSON files next to this script are generated output and committed:

    python dashboards/generate.py           # rewrite them
    python dashboards/generate.py --check   # exit 1 if any committed file is stale

Data sources are template variables (``${datasource}``: Prometheus, ``${traces}``:
Tempo by default, ``--traces-type jaeger`` for Jaeger), never fixed UIDs, so the
dashboards import into any Grafana. The same run writes
``provisioning/datasources.example.yaml``: a Prometheus data source whose
``exemplarTraceIdDestinations`` turn the ``trace_id`` exemplars into trace links.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
"""Classic dashboard JSON model version written (Grafana 10.4 / 11 era)."""

PROM = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
INSTANCE = 'instance=~"$instance"'
POD_LEGEND = "{{workload_namespace}}/{{workload_pod}}"
# Workload labels are prefixed (workload_namespace, workload_pod, workload_container,
# workload_service): the unprefixed names are the scrape target's own labels, which the
# Prometheus Operator attaches to every series (they say which isoscope pod was scraped).
WORKLOAD = 'instance=~"$instance", workload_namespace=~"$namespace", workload_pod=~"$pod"'
# isoscope_runqueue_neighbor_seconds_total names two workloads: the one that waited (victim_*)
# and the one that ran meanwhile (neighbor_*; "self" and "kernel" in neighbor_container for
# the victim's own threads and the root cgroup / idle, "other" past the cardinality cap).
VICTIM = 'instance=~"$instance", victim_namespace=~"$namespace", victim_pod=~"$pod"'
PAIR = ("victim_namespace, victim_pod, victim_container, "
        "neighbor_namespace, neighbor_pod, neighbor_container")


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------

def datasource_var(name: str, plugin: str, label: str) -> dict[str, Any]:
    """A data-source template variable (lets the user pick any instance of ``plugin``)."""
    return {"name": name, "label": label, "type": "datasource", "query": plugin,
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "skipUrlSync": False}


def query_var(name: str, label: str, metric_selector: str, label_name: str, *, multi: bool = True) -> dict[str, Any]:
    """A Prometheus ``label_values`` query variable (multi-value, with All = ``.*``)."""
    definition = f"label_values({metric_selector}, {label_name})"
    return {
        "name": name, "label": label, "type": "query", "datasource": PROM,
        "definition": definition,
        "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi, "allValue": ".*" if multi else None,
        "current": {}, "hide": 0, "regex": "", "options": [], "skipUrlSync": False,
    }


def target(expr: str, legend: str = "", *, ref: str = "A", exemplar: bool = False, instant: bool = False,
           fmt: str = "time_series") -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend or "__auto",
            "range": not instant, "instant": instant, "exemplar": exemplar, "format": fmt,
            "editorMode": "code"}


@dataclass
class Panel:
    """A panel before layout: type, title, queries and options."""

    title: str
    kind: str
    targets: list[dict[str, Any]]
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    stacked: bool = False
    links: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    extra_defaults: dict[str, Any] = field(default_factory=dict)
    transformations: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {"unit": self.unit, "links": self.links, **self.extra_defaults}
        options = dict(self.options)
        if self.kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 40 if self.stacked else 10,
                "showPoints": "never", "spanNulls": False,
                "stacking": {"mode": "normal" if self.stacked else "none", "group": "A"},
            }
            options.setdefault("legend", {"displayMode": "table", "placement": "right", "showLegend": True,
                                          "calcs": ["mean", "max"]})
            options.setdefault("tooltip", {"mode": "multi", "sort": "desc"})
        refs = "ABCDEFGH"
        targets = [dict(t, refId=refs[i]) for i, t in enumerate(self.targets)]
        return {
            "id": panel_id, "type": self.kind, "title": self.title, "description": self.description,
            "datasource": PROM, "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options, "transformations": self.transformations,
        }


def row(title: str) -> dict[str, Any]:
    """Marker for a collapsible row header in the layout."""
    return {"type": "row", "title": title}


def layout(items: list[Panel | dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right on Grafana's 24-column grid, rows on their own line."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    line_height = 0
    for item in items:
        pid = len(panels) + 1
        if isinstance(item, dict):
            if x:
                y += line_height
            panels.append({"id": pid, "type": "row", "title": item["title"], "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
            x = line_height = 0
            continue
        if x + item.width > 24:
            y += line_height
            x = line_height = 0
        panels.append(item.to_json(pid, x, y))
        x += item.width
        line_height = max(line_height, item.height)
    return panels


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]],
              items: list[Panel | dict[str, Any]], links: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A complete dashboard in the classic JSON model."""
    return {
        "uid": uid, "title": title, "description": description, "tags": ["isoscope"],
        "id": None, "version": 1, "schemaVersion": SCHEMA_VERSION, "editable": True,
        "graphTooltip": 1, "timezone": "browser", "fiscalYearStartMonth": 0, "weekStart": "",
        "liveNow": False, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "timepicker": {}, "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}]},
        "links": [{"title": "isoscope", "type": "dashboards", "tags": ["isoscope"], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}] + (links or []),
        "templating": {"list": variables},
        "panels": layout(items),
    }


# ---------------------------------------------------------------------------
# Shared variables
# ---------------------------------------------------------------------------

V_DATASOURCE = datasource_var("datasource", "prometheus", "Prometheus")
V_INSTANCE = query_var("instance", "Node", "isoscope_build_info", "instance")
V_NAMESPACE = query_var("namespace", "Namespace", f"isoscope_layer_stall_seconds_total{{{INSTANCE}}}",
                        "workload_namespace")
V_POD = query_var("pod", "Pod",
                  f'isoscope_layer_stall_seconds_total{{{INSTANCE}, workload_namespace=~"$namespace"}}', "workload_pod")
V_SERVICE = query_var("service", "Service", "isoscope_span_overhead_ratio_count", "workload_service")
V_COMPONENT = query_var("component", "Component",
                        'isoscope_span_layer_seconds_count{workload_service=~"$service"}', "component")


def traces_var(traces_type: str) -> dict[str, Any]:
    return datasource_var("traces", traces_type, "Traces")


def trace_link(traces_type: str) -> dict[str, Any]:
    """Data link from an exemplar's ``trace_id`` to the trace in Explore (``${traces}``)."""
    query: dict[str, Any] = {"refId": "A", "datasource": {"type": traces_type, "uid": "${traces}"},
                             "query": "${__data.fields.trace_id}"}
    if traces_type == "tempo":
        query["queryType"] = "traceql"
    state = {"datasource": "${traces}", "queries": [query], "range": {"from": "now-1h", "to": "now"}}
    # Grafana interpolates the ${...} parts before opening the link, so they stay unescaped.
    encoded = urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="${}:,_.-")
    return {"title": "Open trace ${__data.fields.trace_id}", "url": f"/explore?left={encoded}",
            "targetBlank": True}


def ratio(sum_metric: str, count_metric: str, selector: str, by: str) -> str:
    """Mean of a histogram per group: rate(sum)/rate(count)."""
    return (f"sum by ({by}) (rate({sum_metric}{{{selector}}}[{RATE}]))\n/\n"
            f"sum by ({by}) (rate({count_metric}{{{selector}}}[{RATE}]))")


# ---------------------------------------------------------------------------
# Dashboards
# ---------------------------------------------------------------------------

def layer_overhead() -> dict[str, Any]:
    stall = "isoscope_layer_stall_seconds_total"
    items: list[Panel | dict[str, Any]] = [
        row("Node"),
        Panel("Stall time by layer (node)", "timeseries",
              [target(f"sum by (layer) (rate({stall}{{{INSTANCE}}}[{RATE}]))", "{{layer}}")],
              unit="s", stacked=True,
              description="Seconds per second that threads on the selected nodes were held back, "
                          "stacked by isolation layer (1 s/s = one CPU's worth of waiting)."),
        Panel("Stall time by component (node)", "timeseries",
              [target(f"sum by (layer, component) (rate({stall}{{{INSTANCE}}}[{RATE}]))",
                      "{{layer}} {{component}}")],
              unit="s", stacked=True),
        Panel("Request time taken by each layer", "timeseries",
              [target(ratio("isoscope_span_overhead_ratio_sum", "isoscope_span_overhead_ratio_count",
                            INSTANCE, "layer"), "{{layer}}")],
              unit="percentunit", stacked=True, width=24,
              description="Mean share of a request's duration each layer stole (all services). "
                          "Budgets: L-1 15 %, L-2 5 %, L-3 3 %, L-4 1 %."),
        row("Pods"),
        Panel("Stall time by layer (selected pods)", "timeseries",
              [target(f"sum by (layer) (rate({stall}{{{WORKLOAD}}}[{RATE}]))", "{{layer}}")],
              unit="s", stacked=True),
        Panel("Stall time by pod and layer", "timeseries",
              [target(f"sum by (workload_namespace, workload_pod, layer) (rate({stall}{{{WORKLOAD}}}[{RATE}]))",
                      "{{workload_namespace}}/{{workload_pod}} {{layer}}")],
              unit="s", stacked=True),
    ]
    return dashboard("isoscope-layer-overhead", "isoscope / Layer overhead",
                     "Where isolation layers steal time, per node and per pod.",
                     [V_DATASOURCE, V_INSTANCE, V_NAMESPACE, V_POD], items)


def top_pods() -> dict[str, Any]:
    stall = "isoscope_layer_stall_seconds_total"

    def top(component: str) -> str:
        return (f'topk(10, sum by (workload_namespace, workload_pod) '
                f'(rate({stall}{{{WORKLOAD}, component="{component}"}}[{RATE}])))')

    def p99(metric: str, by: str, selector: str = WORKLOAD) -> str:
        return f"histogram_quantile(0.99, sum by ({by}, le) (rate({metric}{{{selector}}}[{RATE}])))"

    table = {"showHeader": True, "sortBy": [{"displayName": "Value", "desc": True}], "cellHeight": "sm"}
    items: list[Panel | dict[str, Any]] = [
        row("Top pods"),
        Panel("Top pods by CPU throttling", "table",
              [target(top("cpu_throttle"), instant=True, fmt="table")], unit="s", options=table,
              description="Seconds per second of CFS quota throttling (L-3 cpu_throttle)."),
        Panel("Top pods by run-queue wait", "table",
              [target(top("runqueue"), instant=True, fmt="table")], unit="s", options=table,
              description="Seconds per second runnable threads waited for a CPU (L-3 runqueue)."),
        row("Over time"),
        Panel("CPU throttling by pod", "timeseries", [target(top("cpu_throttle"), POD_LEGEND)],
              unit="s"),
        Panel("Run-queue wait by pod", "timeseries", [target(top("runqueue"), POD_LEGEND)],
              unit="s"),
        Panel("Memory reclaim stalls by pod", "timeseries",
              [target(top("memory_reclaim"), POD_LEGEND)], unit="s"),
        Panel("Run-queue latency p99 by pod", "timeseries",
              [target(p99("isoscope_runqueue_latency_seconds_bucket", "workload_namespace, workload_pod"),
                      POD_LEGEND)], unit="s"),
        Panel("Syscall latency p99 by class", "timeseries",
              [target(p99("isoscope_syscall_latency_seconds_bucket", "class"), "{{class}}")], unit="s",
              width=24, description="Ordinary blocked-in-syscall time: the kernel baseline, not an overhead."),
        row("Who delays whom"),
        Panel("Who delays whom (top pairs)", "table",
              [target(f"topk(15, sum by ({PAIR}) "
                      f"(rate(isoscope_runqueue_neighbor_seconds_total{{{VICTIM}}}[{RATE}])))",
                      instant=True, fmt="table")],
              unit="s", options=table, width=24, height=10,
              transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
              description="Seconds per second the victim's threads waited for a CPU while the neighbour ran "
                          "on it (watched workloads, waits of 100 µs and more). neighbor_container "
                          "'self' is the victim's own threads, 'kernel' the root cgroup (kworkers, "
                          "ksoftirqd) and idle CPUs."),
        Panel("Run-queue wait by neighbour (selected pods)", "timeseries",
              [target(f"topk(10, sum by (neighbor_namespace, neighbor_pod, neighbor_container) "
                      f"(rate(isoscope_runqueue_neighbor_seconds_total{{{VICTIM}}}[{RATE}])))",
                      "{{neighbor_namespace}}/{{neighbor_pod}}/{{neighbor_container}}")],
              unit="s", stacked=True, width=24,
              description="Whose running made the selected pods wait for a CPU, over time."),
    ]
    return dashboard("isoscope-top-pods", "isoscope / Top pods: throttling and run-queue wait",
                     "Which pods lose the most time to container-level (L-3) isolation, and to whom.",
                     [V_DATASOURCE, V_INSTANCE, V_NAMESPACE, V_POD], items)


def virtualization() -> dict[str, Any]:
    steal = "isoscope_steal_seconds_total"
    items: list[Panel | dict[str, Any]] = [
        row("Guest view: steal"),
        Panel("Steal per node", "timeseries",
              [target(f"sum by (instance) (rate({steal}{{{INSTANCE}}}[{RATE}]))\n/\n"
                      f"count by (instance) ({steal}{{{INSTANCE}}})", "{{instance}}")],
              unit="percentunit", description="Share of wall time the vCPUs lost to the hypervisor (L-1 steal).",
              extra_defaults={"thresholds": {"mode": "absolute", "steps": [
                  {"color": "green", "value": None}, {"color": "red", "value": 0.1}]}}),
        Panel("Steal per CPU", "timeseries",
              [target(f"rate({steal}{{{INSTANCE}}}[{RATE}])", "{{instance}} cpu{{cpu}}")],
              unit="percentunit"),
        row("Host view: KVM exits"),
        Panel("VM exits by reason", "timeseries",
              [target(f"sum by (reason, layer) (rate(isoscope_kvm_exits_total{{{INSTANCE}}}[{RATE}]))",
                      "{{layer}} {{reason}}")], unit="ops", stacked=True),
        Panel("Exit handling time by VM and layer", "timeseries",
              [target(f"sum by (vm, layer) (rate(isoscope_kvm_exit_seconds_total{{{INSTANCE}}}[{RATE}]))",
                      "{{vm}} {{layer}}")], unit="s", stacked=True,
              description="vCPU-seconds per second spent outside the guest handling exits."),
        Panel("Mean exit handling time by reason", "timeseries",
              [target(ratio("isoscope_kvm_exit_seconds_total", "isoscope_kvm_exits_total", INSTANCE, "reason"),
                      "{{reason}}")], unit="s", width=24),
    ]
    return dashboard("isoscope-virtualization", "isoscope / Steal and VM exits",
                     "Hypervisor cost: steal seen from guests, VM exits seen from KVM hosts.",
                     [V_DATASOURCE, V_INSTANCE], items)


def requests(traces_type: str) -> dict[str, Any]:
    span = "isoscope_span_layer_seconds"
    sel = 'workload_service=~"$service", component=~"$component"'
    link = trace_link(traces_type)
    items: list[Panel | dict[str, Any]] = [
        row("Requests"),
        Panel("Stall per request p99 by component (exemplars link to traces)", "timeseries",
              [target(f"histogram_quantile(0.99, sum by (layer, component, le) "
                      f"(rate({span}_bucket{{{sel}}}[{RATE}])))", "{{layer}} {{component}}", exemplar=True)],
              unit="s", width=24, links=[link],
              description="Among requests that had this stall, the p99 of its time. Click an exemplar "
                          "dot to open the request's trace with its isolation child spans."),
        Panel("Stall per request distribution", "heatmap",
              [target(f"sum by (le) (rate({span}_bucket{{{sel}}}[{RATE}]))", "{{le}}", exemplar=True,
                      fmt="heatmap")],
              unit="s", links=[link],
              options={"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1,
                       "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                       "exemplars": {"color": "rgba(255,0,255,0.7)"}, "tooltip": {"show": True}}),
        Panel("Request time taken by each layer", "timeseries",
              [target(ratio("isoscope_span_overhead_ratio_sum", "isoscope_span_overhead_ratio_count",
                            'workload_service=~"$service"', "workload_service, layer"),
                      "{{workload_service}} {{layer}}")],
              unit="percentunit"),
        Panel("Requests stalled per second by component", "timeseries",
              [target(f"sum by (layer, component) (rate({span}_count{{{sel}}}[{RATE}]))",
                      "{{layer}} {{component}}", exemplar=False)], unit="reqps", stacked=True),
        Panel("Mean stall per stalled request", "timeseries",
              [target(ratio(f"{span}_sum", f"{span}_count", sel, "workload_service, component"),
                      "{{workload_service}} {{component}}")], unit="s"),
    ]
    explore_link = {"title": "Search traces", "type": "link", "icon": "external link", "targetBlank": True,
                    "tooltip": "Open the trace data source in Explore", "asDropdown": False,
                    "includeVars": False, "keepTime": True, "tags": [],
                    "url": "/explore?left=" + urllib.parse.quote(
                        json.dumps({"datasource": "${traces}"}, separators=(",", ":")), safe="${}:,_.-")}
    return dashboard("isoscope-requests", "isoscope / Request investigation",
                     "Per-request layer stalls with trace-id exemplars: from a slow bucket to the trace.",
                     [V_DATASOURCE, traces_var(traces_type), V_SERVICE, V_COMPONENT], items, [explore_link])


def health() -> dict[str, Any]:
    stat = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"}
    items: list[Panel | dict[str, Any]] = [
        row("Probes"),
        Panel("Probes attached", "stat",
              [target(f"min by (probe) (isoscope_probe_attached{{{INSTANCE}}})", "{{probe}}", instant=True)],
              width=24, height=5, options=stat,
              extra_defaults={"mappings": [{"type": "value", "options": {
                  "0": {"text": "down", "color": "red"}, "1": {"text": "attached", "color": "green"}}}],
                  "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                               {"color": "green", "value": 1}]}}),
        Panel("Kernel events lost", "timeseries",
              [target(f"sum by (instance, probe) (rate(isoscope_kernel_events_lost_total{{{INSTANCE}}}[{RATE}]))",
                      "{{instance}} {{probe}}")], unit="cps"),
        Panel("Queue size", "timeseries",
              [target(f"max by (instance, queue) (isoscope_queue_size{{{INSTANCE}}})", "{{instance}} {{queue}}")]),
        row("Spans"),
        Panel("Spans received / enriched / exported", "timeseries", [
            target(f"sum by (protocol) (rate(isoscope_spans_received_total{{{INSTANCE}}}[{RATE}]))",
                   "received {{protocol}}"),
            target(f"sum by (scope) (rate(isoscope_spans_enriched_total{{{INSTANCE}}}[{RATE}]))",
                   "enriched {{scope}}"),
            target(f"sum by (exporter, outcome) (rate(isoscope_spans_exported_total{{{INSTANCE}}}[{RATE}]))",
                   "exported {{exporter}} {{outcome}}"),
        ], unit="cps"),
        Panel("Spans dropped", "timeseries",
              [target(f"sum by (instance, reason) (rate(isoscope_spans_dropped_total{{{INSTANCE}}}[{RATE}]))",
                      "{{instance}} {{reason}}")], unit="cps"),
        Panel("Label values folded into 'other'", "timeseries",
              [target(f"sum by (metric) (rate(isoscope_label_overflow_total{{{INSTANCE}}}[{RATE}]))",
                      "{{metric}}")], unit="cps",
              description="Non-zero means a metric hit its cardinality cap; raise max_label_values "
                          "or reduce label churn."),
        Panel("Build", "table",
              [target(f"isoscope_build_info{{{INSTANCE}}}", instant=True, fmt="table")],
              transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True,
                                                                                 "__name__": True}}}]),
    ]
    return dashboard("isoscope-health", "isoscope / Health",
                     "Is isoscope itself healthy: probes, lost events, queues, drops.",
                     [V_DATASOURCE, V_INSTANCE], items)


def datasource_provisioning(traces_type: str) -> str:
    """Example Grafana provisioning that links ``trace_id`` exemplars to the trace data source."""
    return f"""\
# Example Grafana data-source provisioning for the isoscope dashboards (generated by
# dashboards/generate.py). Adjust URLs; keep the exemplar destination: it turns the
# trace_id exemplars of isoscope_span_layer_seconds into links to the trace.
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    uid: prometheus
    access: proxy
    url: http://prometheus:9090
    jsonData:
      exemplarTraceIdDestinations:
        - name: trace_id
          datasourceUid: traces
          urlDisplayLabel: "Trace: $${{__value.raw}}"
  - name: Traces
    type: {traces_type}
    uid: traces
    access: proxy
    url: {"http://tempo:3200" if traces_type == "tempo" else "http://jaeger-query:16686"}
"""


def render_all(traces_type: str = "tempo") -> dict[str, str]:
    """Every generated file: relative path → content."""
    boards = {
        "isoscope-layer-overhead.json": layer_overhead(),
        "isoscope-top-pods.json": top_pods(),
        "isoscope-virtualization.json": virtualization(),
        "isoscope-requests.json": requests(traces_type),
        "isoscope-health.json": health(),
    }
    out = {name: json.dumps(board, indent=2, sort_keys=False) + "\n" for name, board in boards.items()}
    out["provisioning/datasources.example.yaml"] = datasource_provisioning(traces_type)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    parser.add_argument("--traces-type", choices=("tempo", "jaeger"), default="tempo",
                        help="plugin type of the ${traces} data-source variable")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale = []
    for rel, content in render_all(args.traces_type).items():
        path = args.out / rel
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        if args.check:
            stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            logger.info("wrote %s", path)
    if stale:
        logger.error("stale generated dashboards (run python dashboards/generate.py): %s", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
