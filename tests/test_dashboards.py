"""Grafana dashboards and alert rules against a real Prometheus scraping real isoscope metrics.

Every PromQL expression in ``dashboards/*.json`` and ``deploy/prometheus/isoscope-rules.yml``
is sent to a real Prometheus (``tests/promserver.py``): each must parse, and each dashboard
panel query, with its template variables replaced by values Prometheus really has, must
return data.

Prometheus scrapes the way the Prometheus Operator configures it: every series gets the
target labels ``namespace``, ``pod``, ``container``, ``service``, ``endpoint`` and ``job`` of
the isoscope pod, without ``honorLabels``. The workload labels isoscope writes must survive
that (no ``exported_*`` renames), and every query must read the workload's namespace, pod
and service, never the isoscope pod's.

What Prometheus scrapes is chosen by ``METRICS_TARGET`` (environment variable
``ISOSCOPE_METRICS_TARGET``):

* ``"exporter"`` — ``isoscope.metrics.prometheus.PrometheusExporter`` fed through its API with
  values measured on this machine (``/proc/stat`` steal, timer-wakeup latencies); every
  panel must return data;
* ``"daemon"``   — the real ``isoscope run`` daemon, fed OTLP spans over HTTP, with Kubernetes
  pod metadata from a real HTTPS API-shaped server (``tests/k8s_api_server.py``) and a "pod"
  made of real processes in a real kubelet-style cgroup under a CPU quota; a panel may be empty
  only when the daemon exports no sample of its metric on this machine (no VM runs here, so
  there are no KVM exits, for instance);
* ``"auto"``     — both, the daemon only when ``isoscope.daemon`` and ``.venv/bin/isoscope``
  exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from isoscope.model import Breakdown, Stall, Stats
from isoscope.metrics.admin import AdminServer
from isoscope.metrics.prometheus import WORKLOAD_LABELS, PrometheusExporter
from tests.cgroup_helpers import make_cgroup
from tests.k8s_api_server import KubeAPIServer, make_pod, make_tls_files
from tests.promserver import PrometheusServer, PromQLError, free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "isoscope-rules.yml"
ISOSCOPE_BIN = ROOT / ".venv" / "bin" / "isoscope"

METRICS_TARGET = os.environ.get("ISOSCOPE_METRICS_TARGET", "auto")

GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

OPERATOR_TARGET_LABELS = {
    "namespace": "isoscope", "pod": "isoscope-x7k2p", "container": "isoscope",
    "service": "isoscope-metrics", "endpoint": "metrics", "job": "isoscope-metrics",
}
"""What the Prometheus Operator's ServiceMonitor relabeling attaches to every series it scrapes
from the isoscope DaemonSet pod (``honorLabels`` off, its default)."""

SERVICE_LABEL = "workload_service"
WORKLOAD_LABEL_NAMES = (*WORKLOAD_LABELS, SERVICE_LABEL)

K8S_NODE = "node-a"
K8S_TOKEN = "dash-" + os.urandom(8).hex()
DAEMON_WORKLOAD = {"namespace": "shop", "pod": "cart-5d8f7b-q2x9z", "container": "app"}
DAEMON_SERVICE = "dash-test"


@dataclass
class MetricsTarget:
    """A running metrics endpoint Prometheus can scrape, and the workloads it reports."""

    address: str  # host:port
    kind: str  # "exporter" or "daemon"
    namespaces: frozenset[str] = frozenset()
    pods: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()
    other_values: str = "other"  # regex: further workload label values the target legitimately reports


# ---------------------------------------------------------------------------
# The two kinds of targets
# ---------------------------------------------------------------------------

def daemon_available() -> bool:
    return importlib.util.find_spec("isoscope.daemon") is not None and ISOSCOPE_BIN.exists()


def _cpu_steal_seconds() -> dict[int, float]:
    """Per-CPU steal from /proc/stat (8th value, USER_HZ ticks)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+)\s+(.*)", line)
        if m:
            out[int(m.group(1))] = int(m.group(2).split()[7]) / hz
    return out


class Feeder:
    """Feeds an exporter with values measured on this machine until stopped.

    Timer-wakeup overshoot of short sleeps stands in for run-queue latency and the cost
    of real ``getppid``/pipe syscalls for syscall latency: both are real measured
    durations, binned into log2 slots exactly like the kernel histograms.
    """

    def __init__(self, exporter: PrometheusExporter, stats: Stats) -> None:
        self.exp = exporter
        self.stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)
        self._rq: dict[int, int] = {}
        self._sys: dict[int, int] = {}
        self._sys_sum = 0.0
        self._rng = random.Random(3)

    def start(self) -> "Feeder":
        self.once()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # self-stopping even if a test hangs
        while not self._stop.wait(0.2) and time.monotonic() < deadline:
            self.once()

    def once(self) -> None:
        rng = self._rng
        for _ in range(5):
            t0 = time.monotonic_ns()
            time.sleep(0.0005)
            over = max(1, time.monotonic_ns() - t0 - 500_000)
            self._rq[over.bit_length() - 1] = self._rq.get(over.bit_length() - 1, 0) + 1
            t0 = time.perf_counter_ns()
            os.getppid()
            ns = max(1, time.perf_counter_ns() - t0)
            self._sys[ns.bit_length() - 1] = self._sys.get(ns.bit_length() - 1, 0) + 1
            self._sys_sum += ns / 1e9
        wl = dict(zip(WORKLOAD_LABELS, ("shop", "cart-0", "app")))
        self.exp.set_log2_histogram("runqueue_latency_seconds", wl, self._rq, None)
        self.exp.set_log2_histogram("syscall_latency_seconds", {"class": "sleep", **wl}, self._sys, self._sys_sum)
        for cpu, seconds in _cpu_steal_seconds().items():
            self.exp.set_steal_seconds(cpu, seconds)
        for service, pod in (("checkout", "checkout-7"), ("cart", "cart-0")):
            throttle = rng.randint(1, 20) * 1_000_000
            runq = rng.randint(50, 3000) * 1_000
            bd = Breakdown(component_ns={"cpu_throttle": throttle, "runqueue": runq, "steal": 80_000,
                                         "syscall": 2_000_000}, duration_ns=60_000_000)
            self.exp.observe_span(service, bd, f"{rng.getrandbits(128):032x}", layers=["L-1", "L-3"])
            now = time.monotonic_ns()
            self.exp.add_stall(Stall("cpu_throttle", now - throttle, now, tid=1, pid=1), "shop", pod, "app")
            self.exp.add_stall(Stall("runqueue", now - runq, now, tid=1, pid=1), "shop", pod, "app")
            self.exp.add_stall(Stall("memory_reclaim", now - 200_000, now, tid=1, pid=1), "shop", pod, "app")
            # Who ran while this pod waited: the other pod, its own threads, the kernel.
            other = "cart-0" if pod == "checkout-7" else "checkout-7"
            self.exp.add_runqueue_neighbor_ns(("shop", pod, "app"), ("shop", other, "app"), runq // 2)
            self.exp.add_runqueue_neighbor_ns(("shop", pod, "app"), ("", "", "self"), runq // 3)
            self.exp.add_runqueue_neighbor_ns(("shop", pod, "app"), ("", "", "kernel"), runq // 6)
        self.exp.add_kvm_exits("EPT_VIOLATION", "L-0", "vm-a", 250, 0.0004)
        self.exp.add_kvm_exits("HLT", "L-1", "vm-a", 900, 0.003)
        self.stats.inc("spans_received_total", ("grpc",), 2)
        self.stats.inc("spans_enriched_total", ("thread",), 2)
        self.stats.inc("spans_exported_total", ("otlp-grpc", "success"), 2)
        self.stats.inc("spans_dropped_total", ("queue_full",), 1)
        self.stats.inc("kernel_events_lost_total", ("sched",), 4)
        self.stats.set_gauge("probe_attached", ("sched",), 1)
        self.stats.set_gauge("probe_attached", ("kvm",), 1)
        self.stats.set_gauge("queue_size", ("enrich",), rng.randint(0, 30))
        # More services than the cap allows: the overflow counter must move.
        for i in range(8):
            self.exp.observe_span(f"batch-{rng.getrandbits(32)}", Breakdown(component_ns={"runqueue": 10_000},
                                                                             duration_ns=1_000_000),
                                   f"{rng.getrandbits(128):032x}")


def target_kinds() -> list[str]:
    if METRICS_TARGET in ("exporter", "daemon"):
        return [METRICS_TARGET]
    return ["exporter"] + (["daemon"] if daemon_available() else [])


@pytest.fixture(scope="module", params=target_kinds())
def metrics_target(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsTarget]:
    """What Prometheus scrapes: the daemon or the exporter (see ``METRICS_TARGET``)."""
    if request.param == "daemon":
        yield from _daemon_target(tmp_path_factory.mktemp("daemon"))
    else:
        yield from _exporter_target()


def _exporter_target() -> Iterator[MetricsTarget]:
    stats = Stats()
    exp = PrometheusExporter(stats, max_label_values=40)
    admin = AdminServer("127.0.0.1", 0, metrics=exp, ready=lambda: (True, "ready"))
    host, port = admin.start()
    feeder = Feeder(exp, stats).start()
    try:
        yield MetricsTarget(f"{host}:{port}", "exporter", namespaces=frozenset({"shop"}),
                            pods=frozenset({"cart-0", "checkout-7"}), services=frozenset({"checkout", "cart"}),
                            other_values=r"other|batch-\d+")
    finally:
        feeder.stop()
        admin.shutdown()


def _daemon_target(workdir: Path) -> Iterator[MetricsTarget]:
    """The real daemon, with one Kubernetes pod on its node: real processes in a kubelet-style
    cgroup (CPU quota 20 ms / 100 ms, so they wait in the run queue and get throttled) that the
    API server names ``shop/cart-…``."""
    uid, cid = str(uuid.uuid4()), os.urandom(32).hex()
    tls = make_tls_files(workdir / "tls")
    (workdir / "token").write_text(K8S_TOKEN + "\n")
    api = KubeAPIServer(token=K8S_TOKEN, tls=tls)
    api.start()
    api.add_pod(make_pod(DAEMON_WORKLOAD["pod"], namespace=DAEMON_WORKLOAD["namespace"], node=K8S_NODE, uid=uid,
                         containers=[(DAEMON_WORKLOAD["container"], cid)], qos_class="BestEffort"))
    (workdir / "config.yaml").write_text(yaml.safe_dump({"kubernetes": {
        "enabled": True, "node_name": K8S_NODE, "api_url": f"https://127.0.0.1:{api.port}",
        "token_file": str(workdir / "token"), "ca_file": tls.ca_file}}))
    metrics, grpc, http = free_port(), free_port(), free_port()
    log = open(workdir / "daemon.log", "wb")
    proc = subprocess.Popen(
        [str(ISOSCOPE_BIN), "run", "--config", str(workdir / "config.yaml"),
         "--metrics-listen", f"127.0.0.1:{metrics}",
         "--otlp-grpc-listen", f"127.0.0.1:{grpc}", "--otlp-http-listen", f"127.0.0.1:{http}",
         "--file-export", str(workdir / "traces.jsonl")],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    log.close()
    try:
        with make_cgroup(f"kubepods/besteffort/pod{uid}/{cid}", v1_controllers=("cpu",),
                         cpu_quota_us=20_000) as pod_cgroup:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (workdir / "daemon.log").read_text(errors="replace")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "daemon not ready in 90 s"
                time.sleep(0.3)
            # A watch opens once the initial pod list is in: from then on the daemon names the pod.
            assert api.wait_watches(1, timeout_s=30), "the daemon never listed this node's pods"
            for _ in range(2):
                pod_cgroup.spawn([sys.executable, "-c", "while True: pass"])
            _send_spans(http, n=20)
            time.sleep(2)  # let the pipeline enrich and count them
            yield MetricsTarget(f"127.0.0.1:{metrics}", "daemon",
                                namespaces=frozenset({DAEMON_WORKLOAD["namespace"]}),
                                pods=frozenset({DAEMON_WORKLOAD["pod"]}), services=frozenset({DAEMON_SERVICE}))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        api.stop()


def _send_spans(http_port: int, n: int) -> None:
    """POST real OTLP/HTTP protobuf spans (this process's pid is resolvable over loopback)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    spans = []
    for i in range(n):
        start = time.time_ns()
        sum(range(200_000))  # real on-CPU work inside the span window
        spans.append(Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=f"op-{i}",
                          kind=Span.SPAN_KIND_SERVER, start_time_unix_nano=start, end_time_unix_nano=time.time_ns()))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": [KeyValue(key="service.name", value=AnyValue(string_value=DAEMON_SERVICE))]},
        scope_spans=[ScopeSpans(spans=spans)])])
    http_req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/traces", data=req.SerializeToString(),
                                      headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(http_req, timeout=10) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------------
# Expression extraction and variable substitution
# ---------------------------------------------------------------------------

@dataclass
class PanelQuery:
    dashboard: str
    panel: str
    expr: str
    exemplar: bool


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panel_queries() -> list[PanelQuery]:
    out = []
    for path in DASHBOARDS:
        board = load(path)
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                out.append(PanelQuery(path.name, panel["title"], t["expr"], bool(t.get("exemplar"))))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def substitute(expr: str, values: dict[str, str]) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"unsubstituted variable in {expr!r}"
    return expr


def resolve_variables(prom: PrometheusServer, board: dict[str, Any], target: MetricsTarget) -> dict[str, str]:
    """Run each query variable (in order, like Grafana) and pick a real value for it.

    On the daemon a variable may have no values (no span of the test had a stall of a
    given component, say): a multi-value variable then falls back to its "All" value, as
    Grafana would show it. The workload variables (namespace, pod, service) always have
    values: the daemon's node runs a pod and receives spans.
    """
    values: dict[str, str] = {}
    for var in board["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        assert var["type"] == "query", var
        m = LABEL_VALUES.match(var["definition"])
        assert m, f"unsupported variable query {var['definition']!r}"
        expr = substitute(f"group by ({m['label']}) ({m['selector']})", values)
        result = prom.query(expr)["result"]
        found = sorted(r["metric"][m["label"]] for r in result if m["label"] in r["metric"])
        if not found and target.kind == "daemon" and var.get("includeAll") \
                and var["name"] not in ("namespace", "pod", "service"):
            values[var["name"]] = var["allValue"]
            continue
        assert found, f"variable {var['name']}: {var['definition']} has no values"
        real = [v for v in found if v != "other"] or found
        # Like Grafana: a multi-value variable is regex-escaped, then backslashes doubled
        # because it lands inside a PromQL double-quoted string.
        values[var["name"]] = re.escape(real[0]).replace("\\", "\\\\") if var.get("multi") else real[0]
    return values


SELECTOR = re.compile(r"isoscope_\w+(?:\{[^}]*\})?")


def has_raw_data(prom: PrometheusServer, expr: str) -> bool:
    """Whether every series selector of ``expr`` has at least two samples in the last minute.

    On the daemon a panel may be empty only because this machine produces no such
    series (no VM, no pods …); when the raw series are there, the panel must show them.
    """
    for selector in SELECTOR.findall(expr):
        if not prom.query(f"count_over_time({selector}[1m]) >= 2")["result"]:
            return False
    return True


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prom(metrics_target: MetricsTarget) -> Iterator[PrometheusServer]:
    with PrometheusServer([metrics_target.address], rule_files=[RULES],
                          target_labels=OPERATOR_TARGET_LABELS) as server:
        # Enough scrapes for rate() over the 1m window to have two points.
        server.wait_for("count_over_time(isoscope_build_info[1m]) >= 3", timeout=30)
        # ... and for the workload's own series (the daemon mirrors kernel totals periodically).
        pods = "|".join(sorted(metrics_target.pods))
        server.wait_for(f'count_over_time(isoscope_layer_stall_seconds_total{{workload_pod=~"{pods}"}}[1m]) >= 3',
                        timeout=60)
        yield server


def test_target_is_scraped(prom: PrometheusServer, metrics_target: MetricsTarget):
    targets = prom.targets_active()
    assert len(targets) == 1 and targets[0]["health"] == "up", targets
    assert all(targets[0]["labels"].get(k) == v for k, v in OPERATOR_TARGET_LABELS.items()), targets[0]["labels"]


def test_workload_labels_survive_operator_target_labels(prom: PrometheusServer, metrics_target: MetricsTarget):
    """No isoscope label clashes with a target label: nothing is renamed ``exported_*``, the target
    labels name the isoscope pod, and the workload labels name the workload."""
    for name in (*OPERATOR_TARGET_LABELS, "instance"):
        renamed = prom.query(f'count by (__name__) ({{__name__=~"isoscope_.+", exported_{name}=~".+"}})')["result"]
        assert not renamed, f"isoscope series clash with target label {name!r}: {renamed}"
    pods = "|".join(sorted(metrics_target.pods))
    result = prom.query(f'isoscope_layer_stall_seconds_total{{workload_pod=~"{pods}"}}')["result"]
    assert result
    for series in result:
        labels = series["metric"]
        assert labels["namespace"] == OPERATOR_TARGET_LABELS["namespace"]
        assert labels["pod"] == OPERATOR_TARGET_LABELS["pod"]
        assert labels["workload_namespace"] in metrics_target.namespaces, labels
        assert labels["workload_pod"] in metrics_target.pods, labels
    services = "|".join(sorted(metrics_target.services))
    result = prom.query(f'isoscope_span_overhead_ratio_count{{workload_service=~"{services}"}}')["result"]
    assert result and all(r["metric"]["service"] == OPERATOR_TARGET_LABELS["service"] for r in result), result


def target_other(target: MetricsTarget) -> str:
    """Further workload label values the target may report besides its named workloads."""
    return target.other_values if target.kind == "exporter" else r"(?!)"


def assert_reads_the_workload(what: str, result: list[dict[str, Any]], target: MetricsTarget) -> None:
    """Every workload label in a query result names a workload of the target, never the isoscope pod."""
    expected = {"workload_namespace": target.namespaces, "workload_pod": target.pods,
                "victim_namespace": target.namespaces, "victim_pod": target.pods,
                SERVICE_LABEL: target.services}
    for series in result:
        labels = series.get("metric", {})
        assert not [k for k in labels if k.startswith("exported_")], (what, labels)
        for name, allowed in expected.items():
            value = labels.get(name)
            if value is None:
                continue
            assert value not in OPERATOR_TARGET_LABELS.values(), f"{what}: {name}={value} is the isoscope pod's"
            # The daemon also measures the host's own cgroups; the exporter is fed known workloads only.
            if target.kind == "exporter":
                assert value in allowed or re.fullmatch(target.other_values, value), f"{what}: {name}={value}"


@pytest.mark.parametrize("name,expr", rule_exprs(), ids=[n for n, _ in rule_exprs()])
def test_rule_expression_parses_in_prometheus(prom: PrometheusServer, metrics_target: MetricsTarget, name: str,
                                              expr: str):
    try:
        result = prom.query(expr)["result"]
    except PromQLError as err:
        pytest.fail(f"{name}: {err}")
    assert_reads_the_workload(name, result, metrics_target)


def test_rules_load_and_evaluate_without_errors(prom: PrometheusServer):
    deadline = time.monotonic() + 10
    while True:
        rules = [r for g in prom.rules() for r in g["rules"]]
        assert rules, "no rules loaded"
        errors = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert not errors, errors
        evaluated = {r["name"] for r in rules if r["health"] == "ok"}
        if "isoscope:span_overhead_ratio:mean5m" in evaluated and "IsoscopeSpansDropped" in evaluated:
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)


def test_recorded_overhead_is_per_workload_service(prom: PrometheusServer, metrics_target: MetricsTarget):
    """The recording rule the budget alert reads groups by the span's service, not the isoscope Service."""
    result = prom.wait_for("isoscope:span_overhead_ratio:mean5m", timeout=20)
    services = {r["metric"].get(SERVICE_LABEL) for r in result}
    assert services & metrics_target.services, result
    assert all("service" not in r["metric"] for r in result), result
    assert_reads_the_workload("isoscope:span_overhead_ratio:mean5m", result, metrics_target)


def test_dashboard_variables_pick_the_workload(prom: PrometheusServer, metrics_target: MetricsTarget):
    """The namespace, pod and service pickers offer the workloads, not the isoscope pod."""
    expected = {"namespace": metrics_target.namespaces, "pod": metrics_target.pods,
                "service": metrics_target.services}
    for path in DASHBOARDS:
        board = load(path)
        names = {v["name"] for v in board["templating"]["list"]}
        if not names & set(expected):
            continue
        values = resolve_variables(prom, board, metrics_target)
        for name, allowed in expected.items():
            if name in values:
                picked = values[name].replace("\\\\", "\\")
                assert picked not in OPERATOR_TARGET_LABELS.values(), (path.name, name, values[name])
                assert any(re.fullmatch(picked, v) for v in allowed) or re.fullmatch(
                    target_other(metrics_target), picked.replace("\\", "")), (path.name, name, values[name])


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_panel_query_parses_and_returns_data(prom: PrometheusServer, metrics_target: MetricsTarget,
                                                   path: Path):
    board = load(path)
    values = resolve_variables(prom, board, metrics_target)
    empty, errors = [], []
    for q in (q for q in panel_queries() if q.dashboard == path.name):
        expr = substitute(q.expr, values)
        try:
            result = prom.query(expr)["result"]
        except PromQLError as err:
            errors.append(f"{q.panel}: {err}")
            continue
        if not result and (metrics_target.kind == "exporter" or has_raw_data(prom, expr)):
            empty.append(f"{q.panel}: {expr}")
        assert_reads_the_workload(f"{path.name}: {q.panel}", result, metrics_target)
        if q.exemplar and metrics_target.kind == "exporter":
            now = time.time()
            series = prom.query_exemplars(expr, now - 600, now + 5)
            ids = [e["labels"].get("trace_id") for s in series for e in s["exemplars"]]
            assert ids and all(re.fullmatch(r"[0-9a-f]{32}", i or "") for i in ids), (q.panel, series)
    assert not errors, errors
    assert not empty, f"panels without data ({metrics_target.kind}): {empty}"


def test_broken_expression_is_reported(prom: PrometheusServer):
    """The parse check above can fail: Prometheus rejects a malformed expression."""
    with pytest.raises(PromQLError):
        prom.query("sum by (layer (rate(isoscope_layer_stall_seconds_total[1m]))")
    assert prom.query('isoscope_layer_stall_seconds_total{layer="L-9"}')["result"] == []


# -- the JSON model -----------------------------------------------------------

PANEL_TYPES = {"timeseries", "stat", "table", "heatmap", "row", "bargauge", "gauge", "text", "state-timeline"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_follows_grafana_json_model(path: Path):
    board = load(path)
    for key, kind in (("uid", str), ("title", str), ("schemaVersion", int), ("panels", list),
                      ("templating", dict), ("time", dict), ("tags", list), ("editable", bool)):
        assert isinstance(board.get(key), kind), key
    assert 1 <= len(board["uid"]) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", board["uid"])
    assert board["schemaVersion"] >= 36  # data-source references as {type, uid} objects
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24 and g["h"] > 0
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            used = set(re.findall(r"\$\{?(\w+)", t["expr"])) - {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables), f"{panel['title']}: undefined variables {used - set(variables)}"

    # No fixed data-source UIDs anywhere: every uid is a variable or Grafana's built-in.
    def uids(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and "uid" in ds:
                yield ds["uid"]
            for v in node.values():
                yield from uids(v)
        elif isinstance(node, list):
            for v in node:
                yield from uids(v)
    assert all(u.startswith("${") or u == "-- Grafana --" for u in uids(board)), set(uids(board))


def test_request_dashboard_links_exemplars_to_traces():
    board = load(ROOT / "dashboards" / "isoscope-requests.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["traces"]["type"] == "datasource" and variables["traces"]["query"] in {"tempo", "jaeger"}
    exemplar_panels = [p for p in board["panels"] if any(t.get("exemplar") for t in p.get("targets", []))]
    assert exemplar_panels
    for panel in exemplar_panels:
        assert "isoscope_span_layer_seconds_bucket" in panel["targets"][0]["expr"]
        links = panel["fieldConfig"]["defaults"]["links"]
        assert any("${traces}" in link["url"] and "trace_id" in link["url"] for link in links), links
    prov = yaml.safe_load((ROOT / "dashboards" / "provisioning" / "datasources.example.yaml").read_text())
    prom_ds = next(d for d in prov["datasources"] if d["type"] == "prometheus")
    dest = prom_ds["jsonData"]["exemplarTraceIdDestinations"][0]
    assert dest["name"] == "trace_id"  # the exemplar label the exporter writes
    assert dest["datasourceUid"] in {d["uid"] for d in prov["datasources"]}


def test_generated_files_are_current(tmp_path: Path):
    gen = ROOT / "dashboards" / "generate.py"
    res = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    # --check does fail on a stale file.
    subprocess.run([sys.executable, str(gen), "--out", str(tmp_path)], check=True, timeout=60, cwd=ROOT)
    stale = tmp_path / "isoscope-health.json"
    stale.write_text(stale.read_text().replace("isoscope / Health", "isoscope / Old"))
    res = subprocess.run([sys.executable, str(gen), "--check", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and "isoscope-health.json" in res.stderr
