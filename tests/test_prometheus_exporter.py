"""The Prometheus exporter over real HTTP, checked with promtool and a real Prometheus."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import time
import tracemalloc
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from isoscope import __version__
from isoscope.metrics.admin import AdminServer
from isoscope.model import Breakdown, Stall, Stats
from isoscope.metrics.prometheus import (
    DEFAULT_LOG2_LE_EXPONENTS,
    DEFAULT_SPAN_BUCKETS,
    PrometheusExporter,
    log2_to_cumulative,
)

try:
    from tests.promserver import PrometheusServer
except ImportError:  # tests/ is not a package: pytest puts it on sys.path itself
    from promserver import PrometheusServer

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TRACE_A = "0af7651916cd43dd8448eb211c80319c"
TRACE_B = "4bf92f3577b34da6a3ce929d0e0e4736"


def get(url: str, accept: str = "", encoding: str = "") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={k: v for k, v in
                                               (("Accept", accept), ("Accept-Encoding", encoding)) if v})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def samples(text: str, name: str, parser=text_families) -> dict[tuple, float]:
    """``{sorted label items: value}`` of every sample called ``name``."""
    out = {}
    for fam in parser(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def feed(exp: PrometheusExporter, stats: Stats) -> dict[str, float]:
    """Feed realistic values; returns what the scrape must show."""
    exp.observe_span("checkout", Breakdown(component_ns={"cpu_throttle": 7_300_000, "runqueue": 900_000,
                                                         "syscall": 2_000_000}, duration_ns=48_000_000),
                     TRACE_A, layers=["L-1", "L-3"])
    exp.observe_span("checkout", Breakdown(component_ns={"steal": 150_000}, duration_ns=3_000_000),
                     TRACE_B, layers=["L-1", "L-3"])
    for start, end in ((0, 1_500_000), (10_000_000, 12_250_000)):
        exp.add_stall(Stall("cpu_throttle", start, end, tid=41, pid=40, cgroup_id=7), "shop", "cart-0", "app")
    exp.add_stall(Stall("memory_reclaim", 0, 4_000_000, tid=41, pid=40), "shop", "cart-0", "app")
    exp.add_kvm_exits("EPT_VIOLATION", "L-0", "vm-a", 120, 0.0031)
    exp.add_kvm_exits("HLT", "L-1", "vm-a", 40, 0.2)
    exp.set_steal_seconds(0, 12.75)
    exp.set_steal_seconds(1, 3.5)
    exp.set_log2_histogram("runqueue_latency_seconds",
                           {"workload_namespace": "shop", "workload_pod": "cart-0", "workload_container": "app"},
                           {11: 50, 14: 7, 21: 2}, None)
    exp.set_log2_histogram("syscall_latency_seconds",
                           {"class": "net", "workload_namespace": "shop", "workload_pod": "cart-0",
                            "workload_container": "app"},
                           {16: 10, 20: 1}, 0.0021)
    stats.inc("spans_received_total", ("grpc",), 2)
    stats.inc("spans_enriched_total", ("thread",), 2)
    stats.inc("spans_exported_total", ("file", "success"), 2)
    stats.inc("spans_dropped_total", ("queue_full",), 1)
    stats.set_counter("kernel_events_lost_total", ("sched",), 3)
    stats.set_gauge("probe_attached", ("sched",), 1)
    stats.set_gauge("probe_attached", ("kvm",), 0)
    stats.set_gauge("queue_size", ("enrich",), 4)
    return {"throttle_s": 0.00375, "reclaim_s": 0.004}


@pytest.fixture
def served():
    stats = Stats()
    exp = PrometheusExporter(stats, version="9.9.9")
    state = {"ready": (False, "probes loading")}
    admin = AdminServer("127.0.0.1", 0, metrics=exp, ready=lambda: state["ready"],
                        status=lambda: {"probes": {"sched": "attached"}}, debug_status=True)
    host, port = admin.start()
    try:
        yield exp, stats, f"http://{host}:{port}", state
    finally:
        admin.shutdown()


def test_text_scrape_passes_promtool_and_has_fed_values(served):
    exp, stats, url, _ = served
    want = feed(exp, stats)
    status, headers, body = get(url + "/metrics", accept="text/plain")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        (check.stdout + check.stderr).decode()

    text = body.decode()
    stall = samples(text, "isoscope_layer_stall_seconds_total")
    key = lambda comp, layer: (("component", comp), ("layer", layer), ("workload_container", "app"),  # noqa: E731
                               ("workload_namespace", "shop"), ("workload_pod", "cart-0"))
    assert stall[key("cpu_throttle", "L-3")] == pytest.approx(want["throttle_s"])
    assert stall[key("memory_reclaim", "L-3")] == pytest.approx(want["reclaim_s"])

    exits = samples(text, "isoscope_kvm_exits_total")
    assert exits[(("layer", "L-0"), ("reason", "EPT_VIOLATION"), ("vm", "vm-a"))] == 120
    assert samples(text, "isoscope_kvm_exit_seconds_total")[
        (("layer", "L-1"), ("reason", "HLT"), ("vm", "vm-a"))] == pytest.approx(0.2)
    assert samples(text, "isoscope_steal_seconds_total") == {(("cpu", "0"),): 12.75, (("cpu", "1"),): 3.5}

    # Per-layer overhead ratio: 8.2 ms of L-3 in a 48 ms span, 0.15 ms of L-1 in 3 ms.
    ratio_sum = samples(text, "isoscope_span_overhead_ratio_sum")
    assert ratio_sum[(("layer", "L-3"), ("workload_service", "checkout"))] == pytest.approx(8.2 / 48)
    assert ratio_sum[(("layer", "L-1"), ("workload_service", "checkout"))] == pytest.approx(0.15 / 3)
    ratio_count = samples(text, "isoscope_span_overhead_ratio_count")
    assert ratio_count[(("layer", "L-3"), ("workload_service", "checkout"))] == 2  # zeros observed too
    assert (("layer", "L-4"), ("workload_service", "checkout")) not in ratio_count  # not on the stack

    throttle_buckets = {dict(k)["le"]: v for k, v in samples(text, "isoscope_span_layer_seconds_bucket").items()
                        if dict(k)["component"] == "cpu_throttle"}
    assert throttle_buckets["0.005"] == 0 and throttle_buckets["0.01"] == 1 and throttle_buckets["+Inf"] == 1

    rq = {dict(k)["le"]: v for k, v in samples(text, "isoscope_runqueue_latency_seconds_bucket").items()}
    # slot 11 = [2048, 4096) ns → first in le=2^12 ns; slot 14 → le=2^16; slot 21 → le=2^22.
    assert rq["1.024e-06"] == 0 and rq["4.096e-06"] == 50 and rq["1.6384e-05"] == 50
    assert rq["6.5536e-05"] == 57 and rq["0.004194304"] == 59 and rq["+Inf"] == 59
    assert samples(text, "isoscope_runqueue_latency_seconds_count") == {}  # no kernel sum: no _sum/_count
    assert list(samples(text, "isoscope_syscall_latency_seconds_sum").values()) == [pytest.approx(0.0021)]

    assert samples(text, "isoscope_spans_received_total") == {(("protocol", "grpc"),): 2}
    assert samples(text, "isoscope_spans_dropped_total") == {(("reason", "queue_full"),): 1}
    assert samples(text, "isoscope_kernel_events_lost_total") == {(("probe", "sched"),): 3}
    assert samples(text, "isoscope_probe_attached") == {(("probe", "kvm"),): 0, (("probe", "sched"),): 1}
    assert samples(text, "isoscope_queue_size") == {(("queue", "enrich"),): 4}
    build = samples(text, "isoscope_build_info")
    assert len(build) == 1 and dict(next(iter(build)))["version"] == "9.9.9"

    # Self-telemetry is read at scrape time: a later change shows on the next scrape.
    stats.inc("spans_received_total", ("grpc",), 5)
    _, _, body2 = get(url + "/metrics")
    assert samples(body2.decode(), "isoscope_spans_received_total") == {(("protocol", "grpc"),): 7}


def test_openmetrics_scrape_carries_trace_exemplars(served):
    exp, stats, url, _ = served
    feed(exp, stats)
    status, headers, body = get(url + "/metrics", accept=OPENMETRICS + ";q=0.9,text/plain;q=0.5")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.rstrip().endswith("# EOF")
    exemplars = {}
    for fam in text_string_to_metric_families(text):  # the strict OpenMetrics parser
        for s in fam.samples:
            if s.exemplar is not None:
                assert fam.name == "isoscope_span_layer_seconds"
                exemplars[(s.labels["component"], s.labels["le"])] = s.exemplar
    assert exemplars[("cpu_throttle", "0.01")].labels == {"trace_id": TRACE_A}
    assert exemplars[("cpu_throttle", "0.01")].value == pytest.approx(0.0073)
    assert exemplars[("steal", "0.00025")].labels == {"trace_id": TRACE_B}
    assert all(abs(float(e.timestamp) - time.time()) < 60 for e in exemplars.values())
    # The classic text format cannot carry exemplars.
    _, _, plain = get(url + "/metrics")
    assert b"trace_id" not in plain


def test_real_prometheus_ingests_metrics_and_exemplars(served):
    exp, stats, url, _ = served
    feed(exp, stats)
    # Scraped like the Prometheus Operator does: target labels namespace/pod/container/service.
    target_labels = {"namespace": "isoscope", "pod": "isoscope-abcde", "container": "isoscope",
                     "service": "isoscope-metrics", "endpoint": "metrics", "job": "isoscope-metrics"}
    with PrometheusServer([url.removeprefix("http://")], target_labels=target_labels) as prom:
        prom.wait_for('isoscope_layer_stall_seconds_total{component="cpu_throttle"}')
        targets = prom.targets_active()
        assert [t["health"] for t in targets] == ["up"], targets
        # Prometheus negotiated OpenMetrics, so the trace ids are stored as exemplars.
        deadline = time.monotonic() + 15
        found: set[str] = set()
        while time.monotonic() < deadline and found != {TRACE_A, TRACE_B}:
            now = time.time()
            for series in prom.query_exemplars("isoscope_span_layer_seconds_bucket", now - 300, now + 5):
                found |= {e["labels"]["trace_id"] for e in series["exemplars"]}
            time.sleep(0.3)
        assert found == {TRACE_A, TRACE_B}
        result = prom.query('isoscope_span_overhead_ratio_sum{layer="L-3",workload_service="checkout"}')["result"]
        assert float(result[0]["value"][1]) == pytest.approx(8.2 / 48)
        assert result[0]["metric"]["service"] == "isoscope-metrics"
        stall = prom.query('isoscope_layer_stall_seconds_total{component="cpu_throttle"}')["result"]
        assert [(r["metric"]["workload_namespace"], r["metric"]["workload_pod"], r["metric"]["workload_container"],
                 r["metric"]["namespace"], r["metric"]["pod"]) for r in stall] == \
            [("shop", "cart-0", "app", "isoscope", "isoscope-abcde")]
        for name in target_labels:
            assert not prom.query(f'{{__name__=~"isoscope_.+", exported_{name}=~".+"}}')["result"], name


def test_health_ready_and_status_endpoints(served):
    _, _, url, state = served
    assert get(url + "/healthz")[0] == 200
    status, _, body = get(url + "/readyz")
    assert status == 503 and b"probes loading" in body
    state["ready"] = (True, "receivers listening, 5/6 probes attached")
    status, _, body = get(url + "/readyz")
    assert status == 200 and b"5/6 probes" in body
    status, headers, body = get(url + "/debug/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"probes": {"sched": "attached"}}
    assert get(url + "/nope")[0] == 404


def test_broken_readiness_check_answers_503():
    def boom() -> tuple[bool, str]:
        raise RuntimeError("pipeline gone")

    admin = AdminServer("127.0.0.1", 0, metrics=PrometheusExporter(Stats()), ready=boom, debug_status=True)
    host, port = admin.start()
    try:
        status, _, body = get(f"http://{host}:{port}/readyz")
        assert status == 503 and b"pipeline gone" in body
        assert get(f"http://{host}:{port}/debug/status")[0] == 404  # no status callback given
    finally:
        admin.shutdown()
    admin.shutdown()  # idempotent


def test_build_info_version_is_the_package_version():
    text = PrometheusExporter(Stats()).render(openmetrics=False)[0].decode()
    build = samples(text, "isoscope_build_info")
    assert [dict(k)["version"] for k in build] == [__version__]


def test_gzip_when_accepted(served):
    exp, stats, url, _ = served
    feed(exp, stats)
    status, headers, body = get(url + "/metrics", encoding="gzip")
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert b"isoscope_layer_stall_seconds_total" in gzip.decompress(body)


def test_span_histogram_buckets_match_direct_count():
    rng = random.Random(7)
    exp = PrometheusExporter(Stats())
    values_ns = [rng.choice([int(b * 1e9) for b in DEFAULT_SPAN_BUCKETS])  # exact bucket edges too
                 if rng.random() < 0.2 else rng.randint(1, 12_000_000_000) for _ in range(3000)]
    for i, ns in enumerate(values_ns):
        exp.observe_span("svc", Breakdown(component_ns={"runqueue": ns}, duration_ns=ns * 4), f"{i:032x}")
    text = exp.render(False)[0].decode()
    buckets = {dict(k)["le"]: v for k, v in samples(text, "isoscope_span_layer_seconds_bucket").items()}
    for bound in DEFAULT_SPAN_BUCKETS:
        le = repr(float(bound))
        assert buckets[le] == sum(1 for ns in values_ns if ns / 1e9 <= bound), le
    assert buckets["+Inf"] == len(values_ns)
    total = samples(text, "isoscope_span_layer_seconds_sum")
    assert list(total.values())[0] == pytest.approx(sum(values_ns) / 1e9)
    ratio = samples(text, "isoscope_span_overhead_ratio_sum")[(("layer", "L-3"), ("workload_service", "svc"))]
    assert ratio == pytest.approx(0.25 * len(values_ns))


def test_log2_rebinning_matches_direct_count():
    rng = random.Random(11)
    values = [int(2 ** rng.uniform(5, 36)) for _ in range(5000)]
    slots: dict[int, int] = {}
    for v in values:
        slot = v.bit_length() - 1  # what the kernel's bpf_log2l() puts it in: [2^k, 2^(k+1))
        slots[slot] = slots.get(slot, 0) + 1
    cumulative, total = log2_to_cumulative(slots, DEFAULT_LOG2_LE_EXPONENTS)
    assert total == len(values)
    for e, got in zip(DEFAULT_LOG2_LE_EXPONENTS, cumulative):
        assert got == sum(1 for v in values if v < 2 ** e), e


def test_counters_never_go_backwards_and_unknown_vocabulary_is_folded():
    exp = PrometheusExporter(Stats())
    exp.set_steal_seconds(3, 10.0)
    exp.set_steal_seconds(3, 9.0)  # a stale read must not look like a counter reset
    exp.add_kvm_exits("HLT", "L-9", "vm", 1, 0.0)
    exp.set_log2_histogram("isoscope_syscall_latency_seconds",
                           {"class": "weird", "workload_namespace": "", "workload_pod": "", "workload_container": ""},
                           {10: 1}, None)
    with pytest.raises(ValueError):
        exp.set_log2_histogram("steal_seconds_total", {}, {}, None)
    with pytest.raises(ValueError):
        exp.set_log2_histogram("runqueue_latency_seconds", {"workload_namespace": "x"}, {}, None)
    text = exp.render(False)[0].decode()
    assert samples(text, "isoscope_steal_seconds_total") == {(("cpu", "3"),): 10.0}
    assert samples(text, "isoscope_kvm_exits_total") == {(("layer", "other"), ("reason", "HLT"), ("vm", "vm")): 1}
    assert {dict(k)["class"] for k in samples(text, "isoscope_syscall_latency_seconds_bucket")} == {"other"}


def test_cardinality_cap_with_100k_services_keeps_series_and_memory_flat():
    cap = 1000
    exp = PrometheusExporter(Stats(), max_label_values=cap)
    bd = Breakdown(component_ns={"cpu_throttle": 2_000_000}, duration_ns=10_000_000)

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            exp.observe_span(f"service-{i}", bd, f"{i:032x}", layers=["L-3"])

    run(0, 5_000)
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        run(5_000, 100_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(base, "filename"))
    # 95,000 more distinct services: memory must not track them (a series costs ~1 KiB).
    assert growth < 64 * 1024, growth

    for metric in ("isoscope_span_layer_seconds", "isoscope_span_overhead_ratio"):
        assert exp.series_count(metric) <= cap
    text = exp.render(False)[0].decode()
    counts = samples(text, "isoscope_span_layer_seconds_count")
    assert len(counts) <= cap
    assert sum(counts.values()) == 100_000  # nothing lost, only folded
    regular = cap - exp.label_cap("isoscope_span_layer_seconds").reserve
    other = counts[(("component", "cpu_throttle"), ("layer", "L-3"), ("workload_service", "other"))]
    assert other == 100_000 - regular
    services = {dict(k)["workload_service"] for k in counts}
    assert len(services) == regular + 1  # the regular ones + "other"
    overflow = samples(text, "isoscope_label_overflow_total")
    assert overflow[(("metric", "isoscope_span_layer_seconds"),)] == other
    assert overflow[(("metric", "isoscope_span_overhead_ratio"),)] == other


def test_cap_is_exact_for_workload_metrics_and_forget_frees_slots():
    cap = 10
    exp = PrometheusExporter(Stats(), max_label_values=cap)
    components = ["cpu_throttle", "runqueue", "memory_reclaim", "netns"]
    for i in range(200):
        exp.add_stall_ns(components[i % 4], 1_000_000, "ns", f"pod-{i}", "c")
    assert exp.series_count("isoscope_layer_stall_seconds") == cap
    text = exp.render(False)[0].decode()
    stall = samples(text, "isoscope_layer_stall_seconds_total")
    assert sum(stall.values()) == pytest.approx(0.2)  # 200 × 1 ms, none lost
    pods = {dict(k)["workload_pod"] for k in stall}
    assert "other" in pods and len(stall) == cap

    # The overflow keeps layer and component: the folded series still say what stalled.
    assert stall[(("component", "cpu_throttle"), ("layer", "L-3"), ("workload_container", "other"),
                  ("workload_namespace", "other"), ("workload_pod", "other"))] > 0

    key_new = (("component", "runqueue"), ("layer", "L-3"), ("workload_container", "c"),
               ("workload_namespace", "ns"), ("workload_pod", "pod-new"))
    exp.add_stall_ns("runqueue", 5_000_000, "ns", "pod-new", "c")
    assert key_new not in samples(exp.render(False)[0].decode(), "isoscope_layer_stall_seconds_total")
    assert exp.forget_workload("ns", "pod-0", "c") == 1
    exp.add_stall_ns("runqueue", 5_000_000, "ns", "pod-new", "c")
    stall = samples(exp.render(False)[0].decode(), "isoscope_layer_stall_seconds_total")
    assert stall[key_new] == pytest.approx(0.005)
    assert not any(dict(k)["workload_pod"] == "pod-0" for k in stall)
    assert exp.series_count("isoscope_layer_stall_seconds") <= cap


# -- OTLP metrics --------------------------------------------------------------

class MetricsReceiver:
    """A real OTLP metrics endpoint on loopback (gRPC and HTTP) recording what arrives."""

    def __init__(self) -> None:
        import threading
        from concurrent import futures
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

        self.requests: list = []
        self._cond = threading.Condition()
        receiver = self

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):  # noqa: N802 (gRPC naming)
                receiver._add(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = metrics_service_pb2.ExportMetricsServiceRequest()
                req.ParseFromString(body)
                receiver.paths.append(self.path)
                receiver._add(req)
                out = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.paths: list[str] = []
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def _add(self, request) -> None:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()

    def metrics(self) -> dict:
        """Latest data point per metric name and attribute set (cumulative temporality)."""
        out: dict = {}
        with self._cond:
            for req in self.requests:
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            kind = m.WhichOneof("data")
                            for dp in getattr(m, kind).data_points:
                                attrs = tuple(sorted((a.key, a.value.string_value) for a in dp.attributes))
                                out[(m.name, attrs)] = (kind, m.unit, dp)
        return out

    def resource(self) -> dict[str, str]:
        rm = self.requests[-1].resource_metrics[0]
        return {a.key: a.value.string_value for a in rm.resource.attributes}

    def stop(self) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def otlp_receiver():
    rec = MetricsReceiver()
    try:
        yield rec
    finally:
        rec.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_otlp_metrics_export_mirrors_the_metrics(otlp_receiver, protocol: str):
    from isoscope.metrics.otlp_push import OtlpMetricsExporter

    stats = Stats()
    exp = PrometheusExporter(stats, version="9.9.9")
    endpoint = (f"grpc://127.0.0.1:{otlp_receiver.grpc_port}" if protocol == "grpc"
                else f"http://127.0.0.1:{otlp_receiver.http_port}")
    otlp = OtlpMetricsExporter(exp, stats, endpoint, interval_s=3600,
                               resource_attributes={"k8s.node.name": "node-1"})
    try:
        feed(exp, stats)
        assert otlp.force_flush()
    finally:
        otlp.shutdown()
    got = otlp_receiver.metrics()
    if protocol == "http":
        assert otlp_receiver.paths and set(otlp_receiver.paths) == {"/v1/metrics"}
    res = otlp_receiver.resource()
    assert res["service.name"] == "isoscope" and res["service.version"] == "9.9.9"
    assert res["k8s.node.name"] == "node-1"

    stall_key = ("isoscope.layer_stall_seconds", (("component", "cpu_throttle"), ("layer", "L-3"),
                                                  ("workload_container", "app"), ("workload_namespace", "shop"),
                                                  ("workload_pod", "cart-0")))
    kind, unit, dp = got[stall_key]
    assert kind == "sum" and unit == "s" and dp.as_double == pytest.approx(0.00375)

    kind, unit, dp = got[("isoscope.span_layer_seconds",
                          (("component", "cpu_throttle"), ("layer", "L-3"), ("workload_service", "checkout")))]
    assert kind == "histogram" and unit == "s" and dp.count == 1 and dp.sum == pytest.approx(0.0073)
    assert list(dp.explicit_bounds) == list(DEFAULT_SPAN_BUCKETS)
    assert dp.bucket_counts[list(DEFAULT_SPAN_BUCKETS).index(0.01)] == 1  # (0.005, 0.01]

    kind, _, dp = got[("isoscope.span_overhead_ratio", (("layer", "L-3"), ("workload_service", "checkout")))]
    assert dp.count == 2 and dp.sum == pytest.approx(8.2 / 48)
    assert got[("isoscope.kvm_exits", (("layer", "L-0"), ("reason", "EPT_VIOLATION"), ("vm", "vm-a")))][2] \
        .as_double == 120
    assert got[("isoscope.steal_seconds", (("cpu", "0"),))][2].as_double == 12.75
    assert got[("isoscope.spans_received", (("protocol", "grpc"),))][2].as_double == 2
    assert got[("isoscope.spans_dropped", (("reason", "queue_full"),))][2].as_double == 1
    kind, _, dp = got[("isoscope.probe_attached", (("probe", "kvm"),))]
    assert kind == "gauge" and dp.as_double == 0
    assert got[("isoscope.queue_size", (("queue", "enrich"),))][2].as_double == 4


def test_stats_counters_are_exported_with_their_labels():
    stats = Stats()
    exp = PrometheusExporter(stats)
    stats.inc("identity_rejected_total", ("pod_mismatch",), 3)
    stats.inc("child_spans_emitted_total", (), 5)
    stats.inc("probe_setup_failures_total", ("kvm",))
    text = exp.render(False)[0].decode()
    assert samples(text, "isoscope_identity_rejected_total") == {(("reason", "pod_mismatch"),): 3}
    assert samples(text, "isoscope_child_spans_emitted_total") == {(): 5}
    assert samples(text, "isoscope_probe_setup_failures_total") == {(("probe", "kvm"),): 1}
    assert "# HELP isoscope_identity_rejected_total Span identity claims refused because the proven sender " \
           "does not back them." in text
    assert "# HELP isoscope_child_spans_emitted_total Child spans emitted under enriched spans." in text


def test_no_label_clashes_with_kubernetes_target_labels():
    """Labels the Prometheus Operator sets on every target never appear among isoscope's own."""
    from isoscope.metrics.prometheus import (KVM_EXIT_SECONDS, KVM_EXITS, LABEL_OVERFLOW, LAYER_STALL, RUNQUEUE,
                                             SPAN_LAYER, SPAN_OVERHEAD, STATS_COUNTERS, STATS_GAUGES, STEAL, SYSCALL)
    reserved = {"namespace", "pod", "container", "service", "endpoint", "job", "instance", "node"}
    names = {label for spec in (LAYER_STALL, SPAN_LAYER, SPAN_OVERHEAD, KVM_EXITS, KVM_EXIT_SECONDS, STEAL,
                                RUNQUEUE, SYSCALL, LABEL_OVERFLOW) for label in spec.labels}
    names |= {label for table in (STATS_COUNTERS, STATS_GAUGES) for _, labels in table.values() for label in labels}
    names |= set(PrometheusExporter(Stats()).build_labels)
    assert not names & reserved, names & reserved
