"""Forwarded spans of a pod workload name it: ``k8s.*`` and ``container.id`` on their resource.

A real process in a kubelet-style pod cgroup sends OTLP/HTTP over loopback without any
Kubernetes attributes of its own; the daemon (probes on, default identity rules) finds it from
the connection, reads its pod from a real HTTPS API-server test double, and the backend receives
the spans with the pod's names — never overwriting what a sender set itself.
"""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from isoscope_lab.launcher import IsoscopeDaemon
from tests.cgroup_helpers import make_cgroup
from tests.e2e.spans import attributes
from tests.k8s_api_server import KubeAPIServer, make_pod, make_tls_files
from tests.otlp_backend import OtlpBackend

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NODE = "node-e2e"
TOKEN = "k8s-attr-" + os.urandom(6).hex()

SENDER = textwrap.dedent("""
    import os, sys, time, urllib.request
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    url, preset = sys.argv[1], sys.argv[2]
    attrs = [KeyValue(key="service.name", value=AnyValue(string_value="shop"))]
    if preset:  # a sender that names its own namespace keeps it
        attrs.append(KeyValue(key="k8s.namespace.name", value=AnyValue(string_value=preset)))
    spans = []
    for i in range(5):
        start = time.time_ns()
        sum(range(100_000))
        spans.append(Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=f"op-{i}",
                          start_time_unix_nano=start, end_time_unix_nano=time.time_ns()))
    req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(resource={"attributes": attrs},
                                                                  scope_spans=[ScopeSpans(spans=spans)])])
    r = urllib.request.Request(url, data=req.SerializeToString(), headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(r, timeout=30) as resp:
        assert resp.status == 200
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A pod in the API double and its real cgroup; yields (pod uid, container id, workdir)."""
    workdir = tmp_path_factory.mktemp("k8sattr")
    tls = make_tls_files(workdir / "tls")
    (workdir / "token").write_text(TOKEN + "\n")
    uid, cid = str(uuid.uuid4()), os.urandom(32).hex()
    with KubeAPIServer(token=TOKEN, tls=tls) as api:
        api.add_pod(make_pod("shop-7d9f", namespace="shop", node=NODE, uid=uid, containers=[("web", cid)],
                             qos_class="BestEffort"))
        with make_cgroup(f"kubepods/besteffort/pod{uid}/{cid}", v1_controllers=("cpu",)) as cg:
            cfg = {"kubernetes": {"enabled": True, "node_name": NODE, "api_url": f"https://127.0.0.1:{api.port}",
                                  "token_file": str(workdir / "token"), "ca_file": tls.ca_file},
                   "attribution": {"kubernetes_attributes": True}}
            yield api, cg, cfg


def _send(cg, daemon: IsoscopeDaemon, preset: str = "") -> None:
    script = Path(daemon.workdir) / "sender.py"
    script.write_text(SENDER)
    proc = cg.spawn([sys.executable, str(script), f"{daemon.http_url}/v1/traces", preset])
    assert proc.wait(timeout=60) == 0


def test_pod_workload_spans_carry_kubernetes_attributes(cluster) -> None:
    api, cg, cfg = cluster
    with OtlpBackend() as backend, IsoscopeDaemon(forward=[backend.grpc_url], config=cfg) as d:
        assert api.wait_watches(1, timeout_s=30), "the daemon never listed this node's pods"
        _send(cg, d)
        assert backend.wait_for_spans(5, timeout_s=60), d.log_tail()
        resources = [attributes(rs.resource.attributes) for req in backend.requests for rs in req.resource_spans]
    (res,) = [r for r in resources if r.get("service.name") == "shop"]
    uid = [p for p in cg.path.split("/") if p.startswith("pod")][0][3:]
    assert res["k8s.namespace.name"] == "shop"
    assert res["k8s.pod.name"] == "shop-7d9f"
    assert res["k8s.pod.uid"] == uid
    assert res["k8s.container.name"] == "web"
    assert res["k8s.node.name"] == NODE
    assert res["container.id"] == cg.path.rsplit("/", 1)[-1]


def test_what_the_sender_set_is_never_overwritten(cluster) -> None:
    api, cg, cfg = cluster
    with OtlpBackend() as backend, IsoscopeDaemon(forward=[backend.grpc_url], config=cfg) as d:
        assert api.wait_watches(1, timeout_s=30)
        _send(cg, d, preset="set-by-sender")
        assert backend.wait_for_spans(5, timeout_s=60), d.log_tail()
        resources = [attributes(rs.resource.attributes) for req in backend.requests for rs in req.resource_spans]
    (res,) = [r for r in resources if r.get("service.name") == "shop"]
    assert res["k8s.namespace.name"] == "set-by-sender"
    assert res["k8s.pod.name"] == "shop-7d9f"


def test_off_by_default(cluster) -> None:
    api, cg, cfg = cluster
    cfg = {**cfg, "attribution": {}}
    with OtlpBackend() as backend, IsoscopeDaemon(forward=[backend.grpc_url], config=cfg) as d:
        assert api.wait_watches(1, timeout_s=30)
        _send(cg, d)
        assert backend.wait_for_spans(5, timeout_s=60), d.log_tail()
        resources = [attributes(rs.resource.attributes) for req in backend.requests for rs in req.resource_spans]
    (res,) = [r for r in resources if r.get("service.name") == "shop"]
    assert not any(k.startswith("k8s.") or k == "container.id" for k in res), res
