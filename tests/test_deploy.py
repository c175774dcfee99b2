"""Kubernetes manifests and the container image, checked without a cluster.

Every kustomization is rendered with the real ``kubectl kustomize``; every
object is validated against the published Kubernetes OpenAPI schemas
(``kubernetes-validate``, strict: unknown fields are errors). CRD kinds with no
published schema (Prometheus Operator, OpenShift SCC) are checked field by
field here. The Dockerfile is parsed and checked against the repository.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from isoscope import __version__
from isoscope.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus" / "isoscope-rules.yml"
GENERATOR = KDIR / "optional" / "generate_prometheusrule.py"
DOCKERFILE = ROOT / "deploy" / "image" / "Dockerfile"

RENDERINGS = ["base", "overlays/privileged", "overlays/gke", "overlays/openshift",
              "overlays/monitoring", "overlays/hostnetwork"]
# The oldest Kubernetes still commonly in production, and the newest schema shipped.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("security.openshift.io/v1", "SecurityContextConstraints"),
}
CAPS = {"BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH"}
# container mountPath → (host path, must be read-only)
HOST_MOUNTS = {
    "/host/proc": ("/proc", True),
    "/sys/kernel/tracing": ("/sys/kernel/tracing", False),
    "/sys/kernel/debug": ("/sys/kernel/debug", False),
    "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
    "/sys/kernel/btf": ("/sys/kernel/btf", True),
    "/lib/modules": ("/lib/modules", True),
    "/usr/src": ("/usr/src", True),
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _render_text(rel: str) -> str:
    proc = subprocess.run(["kubectl", "kustomize", str(KDIR / rel)], capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {rel} failed:\n{proc.stderr}")
    return proc.stdout


def render(rel: str) -> list[dict[str, Any]]:
    """Objects of one kustomization, as ``kubectl kustomize`` renders them."""
    return [d for d in yaml.safe_load_all(_render_text(rel)) if d]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def daemonset(rel: str) -> dict[str, Any]:
    return one(render(rel), "DaemonSet", "isoscope")


def container(ds: dict[str, Any]) -> dict[str, Any]:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["isoscope"]
    return containers[0]


def quantity(q: str | int) -> float:
    """Kubernetes quantity → float (bytes or cores)."""
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(s)


def resource_files() -> list[Path]:
    """Manifest files listed as ``resources`` by any kustomization (complete objects)."""
    out: set[Path] = set()
    for kfile in KDIR.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kfile.read_text()).get("resources", []):
            path = (kfile.parent / res).resolve()
            if path.is_file():
                out.add(path)
    return sorted(out)


def _validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            # No published schema for this CRD kind: its fields are checked by the
            # structure tests in this module instead.
            return
        raise


def _doc_ids() -> list[tuple[str, int]]:
    return [(rel, i) for rel in RENDERINGS for i in range(len(render(rel)))]


# ---------------------------------------------------------------------------
# schema validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(KDIR)))
def test_manifest_file_validates(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} is empty"
    for doc in docs:
        _validate(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("rel, index", _doc_ids(),
                         ids=[f"{r}:{d['kind']}/{d['metadata']['name']}"
                              for r in RENDERINGS for d in render(r)])
def test_rendered_object_validates(rel: str, index: int, version: str) -> None:
    _validate(render(rel)[index], version)


@pytest.mark.parametrize("rel", RENDERINGS)
def test_rendering_is_namespaced_and_labelled(rel: str) -> None:
    objs = render(rel)
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "SecurityContextConstraints"}
    for obj in objs:
        meta = obj["metadata"]
        if obj["kind"] not in cluster_scoped:
            assert meta.get("namespace") == "isoscope", f"{obj['kind']}/{meta['name']}"
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "isoscope", obj["kind"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


# ---------------------------------------------------------------------------
# the DaemonSet
# ---------------------------------------------------------------------------

UNPRIVILEGED = [r for r in RENDERINGS if r != "overlays/privileged"]


@pytest.mark.parametrize("rel", UNPRIVILEGED)
def test_daemonset_is_least_privilege(rel: str) -> None:
    ds = daemonset(rel)
    pod = ds["spec"]["template"]["spec"]
    sc = container(ds)["securityContext"]
    assert pod["hostPID"] is True
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert set(sc["capabilities"]["add"]) == CAPS and len(sc["capabilities"]["add"]) == len(CAPS)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod.get("hostIPC", False) is False
    assert pod.get("hostNetwork", False) is (rel == "overlays/hostnetwork")
    for c in pod.get("initContainers", []):
        assert not c.get("securityContext", {}).get("privileged", False)


def test_privileged_overlay_is_the_documented_opt_in() -> None:
    sc = container(daemonset("overlays/privileged"))["securityContext"]
    assert sc["privileged"] is True
    # The API server rejects privileged with allowPrivilegeEscalation: false.
    assert sc["allowPrivilegeEscalation"] is True
    assert sc["seccompProfile"]["type"] == "Unconfined"
    base = container(daemonset("base"))
    priv = container(daemonset("overlays/privileged"))
    assert base["volumeMounts"] == priv["volumeMounts"] and base["args"] == priv["args"]


@pytest.mark.parametrize("rel", RENDERINGS)
def test_daemonset_host_mounts(rel: str) -> None:
    ds = daemonset(rel)
    pod = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container(ds)["volumeMounts"]}
    expected = dict(HOST_MOUNTS)
    if rel == "overlays/gke":  # COS has no /usr/src; headers come from a node directory
        del expected["/usr/src"]
        assert "/usr/src" not in mounts
        assert "usr-src" not in volumes
        m = mounts["/opt/kernel-headers"]
        assert m["readOnly"] is True
        assert volumes[m["name"]]["hostPath"]["path"] == "/var/lib/isoscope/kernel-headers"
    for mount_path, (host_path, read_only) in expected.items():
        m = mounts[mount_path]
        assert volumes[m["name"]]["hostPath"]["path"] == host_path, mount_path
        assert m.get("readOnly", False) is read_only, mount_path
        assert m.get("mountPropagation", "None") in ("None", "HostToContainer")
    for writable in ("/var/lib/isoscope", "/tmp"):
        assert "emptyDir" in volumes[mounts[writable]["name"]], writable
        assert not mounts[writable].get("readOnly", False)
    config = mounts["/etc/isoscope"]
    assert config["readOnly"] is True and "configMap" in volumes[config["name"]]
    hostpaths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert "/" not in hostpaths and "/var/run/docker.sock" not in hostpaths
    assert not any(p.endswith(".sock") for p in hostpaths)


@pytest.mark.parametrize("rel", RENDERINGS)
def test_daemonset_scheduling_and_lifecycle(rel: str) -> None:
    ds = daemonset(rel)
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items())
    c = container(ds)
    ports = {p["name"]: p for p in c["ports"]}
    assert ports["metrics"]["containerPort"] == 9464
    for name, port in (("otlp-grpc", 4317), ("otlp-http", 4318)):
        assert ports[name]["containerPort"] == port and ports[name]["hostPort"] == port
    assert "hostPort" not in ports["metrics"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # BPF compilation (tens of seconds, minutes on a loaded node) is covered by the startup
    # probe, which passes only once the probes are attached; liveness can then be tight.
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    live = c["livenessProbe"]
    assert live.get("initialDelaySeconds", 0) <= 10
    assert live["periodSeconds"] * live["failureThreshold"] + live.get("initialDelaySeconds", 0) <= 60
    assert live["timeoutSeconds"] < live["periodSeconds"]
    # Kubelet-injected service variables of a Service named isoscope… would be ISOSCOPE_* config keys.
    assert pod["enableServiceLinks"] is False
    res = c["resources"]
    assert quantity(res["limits"]["memory"]) >= 300 * 2**20
    assert quantity(res["requests"]["cpu"]) == pytest.approx(0.1)
    assert quantity(res["requests"]["memory"]) <= quantity(res["limits"]["memory"])


@pytest.mark.parametrize("rel", RENDERINGS)
def test_daemonset_command_line_and_env(rel: str) -> None:
    c = container(daemonset(rel))
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    args = c["args"]
    assert args[0] == "run"
    flags = dict(zip(args[1::2], args[2::2]))
    assert flags["--config"] == "/etc/isoscope/config.yaml"
    assert flags["--host-proc"] == "/host/proc"
    assert flags["--metrics-listen"].endswith(":9464")
    listen_var = "NODE_IP" if rel == "overlays/hostnetwork" else "POD_IP"
    assert flags["--otlp-grpc-listen"] == f"$({listen_var}):4317"
    assert flags["--otlp-http-listen"] == f"$({listen_var}):4318"
    # Kubernetes leaves $(VAR) unexpanded when VAR is not defined in env.
    for arg in args:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{arg} references undefined {var}"
    assert c["workingDir"].startswith("/var/lib/isoscope")


@pytest.mark.parametrize("rel", RENDERINGS)
def test_configmap_is_a_valid_daemon_config(rel: str, tmp_path: Path) -> None:
    objs = render(rel)
    ds = one(objs, "DaemonSet", "isoscope")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    cm_name = volumes["config"]["configMap"]["name"]
    cm = one(objs, "ConfigMap", cm_name)  # the hashed generator name is wired through
    assert cm_name.startswith("isoscope-config-")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    # The environment the daemon sees: every ISOSCOPE_* variable is a config override.
    env = {}
    for e in container(ds)["env"]:
        if e["name"].startswith("ISOSCOPE_"):
            env[e["name"]] = e.get("value", "node-1")
    cfg = load_config(path, env=env)
    assert cfg.kubernetes.enabled is True
    assert cfg.kubernetes.node_name == "node-1"
    assert cfg.kernel.host_proc == "/host/proc"
    assert cfg.exporters.queue.persist_dir.startswith("/var/lib/isoscope/")
    assert cfg.metrics.listen.endswith(":9464")
    assert cfg.metrics.debug_status is False
    if rel == "overlays/gke":
        assert cfg.kernel.headers_dir == "/opt/kernel-headers"


@pytest.mark.parametrize("rel", RENDERINGS)
def test_rbac_is_read_only_pods(rel: str) -> None:
    objs = render(rel)
    role = one(objs, "ClusterRole", "isoscope")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = one(objs, "ClusterRoleBinding", "isoscope")
    assert binding["roleRef"]["name"] == "isoscope"
    sa = one(objs, "ServiceAccount")
    ds = one(objs, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in binding["subjects"]
    extra_roles = [o for o in objs if o["kind"] in ("Role", "ClusterRole") and o["metadata"]["name"] != "isoscope"]
    for r in extra_roles:  # only OpenShift's SCC "use" grant
        assert r["rules"] == [{"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
                               "resourceNames": ["isoscope"], "verbs": ["use"]}]


@pytest.mark.parametrize("rel", RENDERINGS)
def test_metrics_service_selects_the_daemon(rel: str) -> None:
    objs = render(rel)
    svc = one(objs, "Service", "isoscope-metrics")
    ds = one(objs, "DaemonSet")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]


@pytest.mark.parametrize("rel", RENDERINGS)
def test_recommended_labels_carry_the_package_version(rel: str) -> None:
    objs = render(rel)
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/version") == __version__, (obj["kind"], obj["metadata"]["name"])
        assert labels.get("app.kubernetes.io/part-of") == "isoscope", obj["kind"]
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", obj["kind"]
    ds = one(objs, "DaemonSet")
    template = ds["spec"]["template"]["metadata"]["labels"]
    assert template["app.kubernetes.io/version"] == __version__
    # The selector is immutable: a version in it would make every upgrade fail.
    assert "app.kubernetes.io/version" not in ds["spec"]["selector"]["matchLabels"]
    image = container(ds)["image"]
    assert image.rsplit(":", 1) == ["ghcr.io/isoscope/isoscope", __version__], image


def test_documented_image_tag_is_the_package_version() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    tags = re.findall(r"isoscope/isoscope:(\S+?)[\s`]", doc) + re.findall(r"newTag: (\S+)", doc)
    assert tags and set(tags) == {__version__}, tags


@pytest.mark.parametrize("rel", RENDERINGS)
def test_networkpolicy_limits_who_reaches_the_daemon(rel: str) -> None:
    objs = render(rel)
    policy = one(objs, "NetworkPolicy", "isoscope")
    ds = one(objs, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert all(pod_labels.get(k) == v for k, v in spec["podSelector"]["matchLabels"].items())
    assert spec["policyTypes"] == ["Ingress"]  # egress: API server and forward targets stay reachable
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits everyone"
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            by_port.setdefault(port["port"], []).extend(rule["from"])
    container_ports = {p["containerPort"] for p in container(ds)["ports"]}
    assert set(by_port) == container_ports == {9464, 4317, 4318}
    # Metrics: only the monitoring namespace, and no pod-level wildcard.
    assert by_port[9464] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # OTLP: pods of every namespace (each sends to its own node's daemon), nothing outside the cluster.
    for port in (4317, 4318):
        assert by_port[port] == [{"namespaceSelector": {}}]


def test_configmap_keeps_debug_status_off() -> None:
    cm = next(o for o in render("base") if o["kind"] == "ConfigMap")
    doc = yaml.safe_load(cm["data"]["config.yaml"])
    assert doc["metrics"]["debug_status"] is False


def test_namespace_admits_the_daemon() -> None:
    ns = one(render("base"), "Namespace", "isoscope")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# ---------------------------------------------------------------------------
# platform overlays
# ---------------------------------------------------------------------------

def test_gke_overlay_allows_critical_priority_outside_kube_system() -> None:
    quota = one(render("overlays/gke"), "ResourceQuota")
    expr = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert {"scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]} in expr
    assert int(quota["spec"]["hard"]["pods"]) >= 1


def test_hostnetwork_overlay_binds_the_node_ip() -> None:
    pod = daemonset("overlays/hostnetwork")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    # With hostNetwork the API requires hostPort == containerPort.
    for p in container({"spec": {"template": {"spec": pod}}})["ports"]:
        assert p.get("hostPort", p["containerPort"]) == p["containerPort"]


# Fields of security.openshift.io/v1 SecurityContextConstraints (openshift/api).
SCC_FIELDS = {
    "apiVersion", "kind", "metadata", "priority", "allowPrivilegedContainer", "defaultAddCapabilities",
    "requiredDropCapabilities", "allowedCapabilities", "allowHostDirVolumePlugin", "volumes",
    "allowedFlexVolumes", "allowHostNetwork", "allowHostPorts", "allowHostPID", "allowHostIPC",
    "defaultAllowPrivilegeEscalation", "allowPrivilegeEscalation", "seLinuxContext", "runAsUser",
    "supplementalGroups", "fsGroup", "readOnlyRootFilesystem", "users", "groups", "seccompProfiles",
    "allowedUnsafeSysctls", "forbiddenSysctls", "userNamespaceLevel",
}
# Pod volume source field → SCC volume type name.
SCC_VOLUME_TYPES = {"hostPath": "hostPath", "emptyDir": "emptyDir", "configMap": "configMap",
                    "secret": "secret", "projected": "projected", "downwardAPI": "downwardAPI"}


def test_openshift_scc_admits_exactly_the_daemonset() -> None:
    objs = render("overlays/openshift")
    scc = one(objs, "SecurityContextConstraints", "isoscope")
    assert scc["apiVersion"] == "security.openshift.io/v1"
    assert set(scc) <= SCC_FIELDS, set(scc) - SCC_FIELDS
    assert "namespace" not in scc["metadata"]
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    sc = c["securityContext"]
    assert scc["allowPrivilegedContainer"] is False
    assert scc["allowHostPID"] is True and pod["hostPID"] is True
    assert scc["allowHostNetwork"] is False and scc["allowHostIPC"] is False
    assert scc["allowHostPorts"] is True and any("hostPort" in p for p in c["ports"])
    assert scc["allowHostDirVolumePlugin"] is True
    assert set(scc["allowedCapabilities"]) == CAPS
    assert not set(scc["requiredDropCapabilities"]) & CAPS
    assert scc["allowPrivilegeEscalation"] is False and sc["allowPrivilegeEscalation"] is False
    assert scc["readOnlyRootFilesystem"] is True
    for strategy in ("runAsUser", "seLinuxContext", "fsGroup", "supplementalGroups"):
        assert scc[strategy]["type"] in ("RunAsAny", "MustRunAs", "MustRunAsRange", "MustRunAsNonRoot")
    assert scc["runAsUser"]["type"] == "RunAsAny"  # the daemon runs as uid 0
    assert sc["seLinuxOptions"]["type"] == "spc_t" and scc["seLinuxContext"]["type"] == "RunAsAny"
    assert sc["seccompProfile"]["type"] == "RuntimeDefault" and "runtime/default" in scc["seccompProfiles"]
    for vol in pod["volumes"]:
        source = next(k for k in vol if k != "name")
        assert SCC_VOLUME_TYPES[source] in scc["volumes"], source
    # Granted to the service account through RBAC "use".
    binding = one(objs, "RoleBinding", "isoscope-scc")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "isoscope-scc"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "isoscope", "namespace": "isoscope"}]


# ---------------------------------------------------------------------------
# Prometheus Operator objects
# ---------------------------------------------------------------------------

def test_servicemonitor_scrapes_the_metrics_service() -> None:
    objs = render("overlays/monitoring")
    sm = one(objs, "ServiceMonitor", "isoscope")
    svc = one(objs, "Service", "isoscope-metrics")
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                               "podTargetLabels", "sampleLimit", "attachMetadata"}
    labels = svc["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings",
                           "honorLabels", "scheme"}
        # isoscope's workload labels do not clash with the Operator's target labels: the target
        # labels must win, so they keep naming the isoscope pod that was scraped.
        assert ep.get("honorLabels", False) is False


def test_prometheusrule_embeds_the_rules_file() -> None:
    rule = one(render("overlays/monitoring"), "PrometheusRule", "isoscope")
    rules = yaml.safe_load(RULES.read_text())
    assert rule["spec"]["groups"] == rules["groups"]
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit", "query_offset", "labels"}
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_prometheusrule_is_in_sync_with_the_rules_file() -> None:
    proc = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"prometheusrule.yaml is stale; rerun {GENERATOR.name}\n{proc.stderr}"


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is required"
    rule = one(render("overlays/monitoring"), "PrometheusRule", "isoscope")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generator_wraps_and_rejects(tmp_path: Path) -> None:
    src = tmp_path / "rules.yml"
    out = tmp_path / "pr.yaml"
    groups = [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m",
                                        "labels": {"severity": "page"}}]}]
    src.write_text(yaml.safe_dump({"groups": groups}))
    run = [sys.executable, str(GENERATOR), "--rules", str(src), "--output", str(out)]
    assert subprocess.run(run, capture_output=True, timeout=60).returncode == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["kind"] == "PrometheusRule" and doc["spec"]["groups"] == groups
    assert subprocess.run(run + ["--check"], capture_output=True, timeout=60).returncode == 0
    src.write_text(yaml.safe_dump({"groups": groups + [{"name": "h", "rules": []}]}))
    assert subprocess.run(run + ["--check"], capture_output=True, timeout=60).returncode == 1
    src.write_text(yaml.safe_dump({"not_groups": []}))
    bad = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "groups" in bad.stderr


# ---------------------------------------------------------------------------
# the container image
# ---------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def test_dockerfile_builds_through_the_setup_script() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL", "EXPOSE",
             "ENTRYPOINT", "CMD", "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL", "ONBUILD"}
    assert all(i in known for i, _ in ins), [i for i, _ in ins if i not in known]
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"debian:(12|bookworm)(-slim)?(@sha256:[0-9a-f]{64})?", froms[0])
    runs = [a for i, a in ins if i == "RUN"]
    setup_runs = [r for r in runs if "scripts/setup.sh" in r]
    assert len(setup_runs) == 1
    words = shlex.split(setup_runs[0])
    assert words[words.index("scripts/setup.sh") + 1] == "--system"
    assert "ISOSCOPE_SKIP_KERNEL=1" in words  # the build host's kernel is not the node's
    # Run-time ISOSCOPE_* variables are config overrides: the image must set none.
    for i, a in ins:
        if i == "ENV":
            assert "ISOSCOPE_" not in a, a
    assert json.loads(next(a for i, a in ins if i == "ENTRYPOINT")) == ["isoscope"]
    assert json.loads(next(a for i, a in ins if i == "CMD")) == ["run"]
    assert [a for i, a in ins if i == "USER"] in ([], ["root"])
    exposed = {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()}
    ds_ports = {p["containerPort"] for p in container(daemonset("base"))["ports"]}
    assert exposed == ds_ports


def test_dockerfile_copies_what_the_setup_script_needs() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    copied: set[str] = set()
    for i, a in ins:
        if i == "COPY":
            *sources, _dest = shlex.split(a)
            for src in sources:
                assert not src.startswith("--"), f"unexpected COPY flag {src}"
                assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
                copied.add(src.rstrip("/"))
        assert i != "ADD", "use COPY"
    setup = ROOT / "scripts" / "setup.sh"
    assert setup.is_file(), "scripts/setup.sh is missing"
    assert "scripts" in copied
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    # The package folders (the probes' C sources are package data inside src/, compiled on the node at start).
    needed |= set(project["tool"]["setuptools"]["packages"]["find"]["where"])
    # Every repository file or directory the script names must be in the image.
    text = setup.read_text()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if re.search(rf"(?<![\w/.-]){re.escape(entry.name)}(?![\w-])", text):
            needed.add(entry.name)
    needed.discard("tests")  # only the venv mode installs test extras
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore")
    ignored = {line.strip().rstrip("/") for line in ignore.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & copied, ignored & copied
