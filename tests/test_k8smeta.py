"""Pod metadata from a real HTTPS Kubernetes-API-shaped server on loopback."""

from __future__ import annotations

import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from isoscope.host.cgroupfs import parse_cgroup_path
from isoscope.metadata.kubernetes import (
    CgroupOnlyPodMetadata,
    KubeAPIConfig,
    KubeConfigError,
    KubePodMetadata,
    PodMetadata,
    normalize_container_id,
)
from isoscope.model import Stats
from tests.k8s_api_server import KubeAPIServer, TLSFiles, make_pod, make_tls_files

TOKEN = "tkn-" + secrets.token_hex(8)
NODE = "node-a"


def eventually(cond: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> Any:
    """Poll ``cond`` until truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s}s: {what}")
        time.sleep(0.02)


def cid() -> str:
    return secrets.token_hex(32)


def puid() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sa_dir(tmp_path: Path, tls: TLSFiles) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(TOKEN + "\n")
    shutil.copy(tls.ca_file, d / "ca.crt")
    return d


@pytest.fixture
def server(tls: TLSFiles) -> Iterator[KubeAPIServer]:
    srv = KubeAPIServer(token=TOKEN, tls=tls)
    srv.start()
    yield srv
    srv.stop()


MetaFactory = Callable[..., KubePodMetadata]


@pytest.fixture
def make_meta(sa_dir: Path) -> Iterator[MetaFactory]:
    started: list[KubePodMetadata] = []

    def factory(srv: KubeAPIServer, **kw: Any) -> KubePodMetadata:
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(srv.port)}
        config = KubeAPIConfig.in_cluster(env=env, service_account_dir=str(sa_dir), timeout_s=2.0)
        kw.setdefault("backoff_initial_s", 0.05)
        kw.setdefault("backoff_max_s", 0.3)
        kw.setdefault("watch_timeout_s", 30)
        meta = KubePodMetadata(config, NODE, **kw)
        meta.start()
        started.append(meta)
        return meta

    yield factory
    for meta in started:
        meta.shutdown()


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

def test_in_cluster_config_reads_env_and_service_account_files(sa_dir: Path) -> None:
    cfg = KubeAPIConfig.in_cluster(
        env={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
        service_account_dir=str(sa_dir))
    assert (cfg.host, cfg.port, cfg.scheme) == ("10.96.0.1", 443, "https")
    assert cfg.token_file == str(sa_dir / "token")
    assert cfg.ca_file == str(sa_dir / "ca.crt")


def test_in_cluster_config_refuses_outside_a_pod(sa_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError):
        KubeAPIConfig.in_cluster(env={}, service_account_dir=str(sa_dir))
    with pytest.raises(KubeConfigError):
        KubeAPIConfig.in_cluster(
            env={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            service_account_dir=str(tmp_path / "missing"))


def test_node_name_is_required(sa_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    cfg = KubeAPIConfig(host="127.0.0.1", port=1, token_file=str(sa_dir / "token"))
    with pytest.raises(ValueError):
        KubePodMetadata(cfg)
    monkeypatch.setenv("NODE_NAME", "node-z")
    assert KubePodMetadata(cfg).lookup(pod_uid="x") is None


# ---------------------------------------------------------------------------
# LIST
# ---------------------------------------------------------------------------

def test_list_indexes_this_nodes_pods_by_container_uid_and_ip(
        server: KubeAPIServer, make_meta: MetaFactory) -> None:
    web_c, side_c, db_c, other_c = cid(), cid(), cid(), cid()
    web_uid, db_uid, other_uid, hn_uid = puid(), puid(), puid(), puid()
    server.add_pod(make_pod("web-7d9f8b6c5-x2x4z", namespace="shop", uid=web_uid,
                            containers=[("web", web_c), ("envoy", side_c)],
                            labels={"app": "web", "pod-template-hash": "7d9f8b6c5"},
                            owner=("ReplicaSet", "web-7d9f8b6c5"), pod_ip="10.244.1.7"))
    server.add_pod(make_pod("db-0", namespace="shop", uid=db_uid, containers=[("pg", db_c)],
                            owner=("StatefulSet", "db"), pod_ip="10.244.1.8",
                            qos_class="Guaranteed", runtime="cri-o"))
    server.add_pod(make_pod("elsewhere", node="node-b", uid=other_uid,
                            containers=[("x", other_c)], pod_ip="10.244.2.9"))
    server.add_pod(make_pod("kube-proxy-abcde", namespace="kube-system", uid=hn_uid,
                            containers=[("kube-proxy", cid())], owner=("DaemonSet", "kube-proxy"),
                            pod_ip="10.0.0.10", host_network=True, runtime="docker"))

    meta = make_meta(server)
    assert meta.wait_synced(5), meta.last_error
    assert meta.pod_count == 3

    web = meta.lookup(container_id="containerd://" + web_c)
    assert web is not None and web.source == "api"
    assert (web.namespace, web.pod, web.container, web.uid) == ("shop", "web-7d9f8b6c5-x2x4z", "web", web_uid)
    assert (web.owner_kind, web.owner_name) == ("Deployment", "web")
    assert web.labels["app"] == "web"
    assert (web.node, web.pod_ip, web.container_id, web.qos_class) == (NODE, "10.244.1.7", web_c, "burstable")
    assert meta.lookup(container_id=side_c).container == "envoy"

    db = meta.lookup(container_id="cri-o://" + db_c)
    assert (db.pod, db.container, db.owner_kind, db.owner_name, db.qos_class) == (
        "db-0", "pg", "StatefulSet", "db", "guaranteed")

    by_uid = meta.lookup(pod_uid=db_uid)
    assert by_uid.pod == "db-0" and by_uid.container == ""
    assert meta.lookup_ip("10.244.1.8").pod == "db-0"

    # Not this node: not listed. hostNetwork: found by uid, never by the shared node IP.
    assert meta.lookup(container_id=other_c) is None and meta.lookup(pod_uid=other_uid) is None
    assert meta.lookup_ip("10.244.2.9") is None
    assert meta.lookup(pod_uid=hn_uid).pod == "kube-proxy-abcde"
    assert meta.lookup_ip("10.0.0.10") is None


def test_list_follows_continue_pages(server: KubeAPIServer, make_meta: MetaFactory) -> None:
    uids = [puid() for _ in range(5)]
    for i, uid in enumerate(uids):
        server.add_pod(make_pod(f"p{i}", uid=uid, containers=[("c", cid())]))
    meta = make_meta(server, list_page_size=2)
    assert meta.wait_synced(5), meta.last_error
    assert server.requests["list"] == 3  # 2 + 2 + 1
    assert all(meta.lookup(pod_uid=u) is not None for u in uids)
    assert meta.resource_version == str(server.resource_version)


# ---------------------------------------------------------------------------
# WATCH
# ---------------------------------------------------------------------------

def test_pod_churn_is_visible_within_bounded_time(server: KubeAPIServer, make_meta: MetaFactory) -> None:
    meta = make_meta(server)
    assert meta.wait_synced(5), meta.last_error
    assert server.wait_watches(1)

    c1, uid = cid(), puid()
    server.add_pod(make_pod("api-1", namespace="team", uid=uid, containers=[("api", c1)],
                            labels={"version": "1"}, pod_ip="10.244.1.20"))
    eventually(lambda: meta.lookup(container_id=c1), 3, "ADDED pod visible")
    assert meta.lookup_ip("10.244.1.20").pod == "api-1"

    # The container restarts: new id; the old one stays resolvable (lastState).
    c2 = cid()

    def restart(pod: dict[str, Any]) -> None:
        pod["metadata"]["labels"]["version"] = "2"
        cs = pod["status"]["containerStatuses"][0]
        cs["lastState"] = {"terminated": {"containerID": cs["containerID"], "exitCode": 137,
                                          "reason": "OOMKilled"}}
        cs["containerID"] = "containerd://" + c2
        cs["restartCount"] = 1

    server.modify_pod("team", "api-1", restart)
    info = eventually(lambda: meta.lookup(container_id=c2), 3, "MODIFIED container id visible")
    assert info.container == "api" and info.labels["version"] == "2"
    assert meta.lookup(container_id=c1).labels["version"] == "2"

    server.delete_pod("team", "api-1")
    eventually(lambda: meta.lookup(container_id=c2) is None and meta.lookup(pod_uid=uid) is None,
               3, "DELETED pod gone")
    assert meta.lookup_ip("10.244.1.20") is None
    assert meta.lists == 1 and meta.healthy()
    assert meta.resource_version == str(server.resource_version)


def test_bookmark_advances_resource_version(server: KubeAPIServer, make_meta: MetaFactory) -> None:
    meta = make_meta(server)
    assert meta.wait_synced(5)
    assert server.wait_watches(1)
    listed_rv = meta.resource_version
    # Changes on another node move the version without sending this node anything.
    for i in range(3):
        server.add_pod(make_pod(f"b{i}", node="node-b", uid=puid()))
    server.send_bookmark()
    eventually(lambda: meta.resource_version == str(server.resource_version), 3, "bookmark applied")
    assert meta.resource_version != listed_rv

    # History up to the bookmark is compacted; a watch resumed from the bookmark
    # is still valid, so no relist happens.
    server.compact()
    server.close_watches()
    c = cid()
    server.wait_watches(1)
    server.add_pod(make_pod("after", uid=puid(), containers=[("c", c)]))
    eventually(lambda: meta.lookup(container_id=c), 3, "pod after resumed watch")
    assert meta.lists == 1
    assert server.requests["watch"] >= 2


def test_gone_event_in_stream_triggers_relist(server: KubeAPIServer, make_meta: MetaFactory) -> None:
    keep, drop = puid(), puid()
    server.add_pod(make_pod("keep", uid=keep, containers=[("c", cid())]))
    server.add_pod(make_pod("drop", uid=drop, containers=[("c", cid())]))
    meta = make_meta(server)
    assert meta.wait_synced(5)
    assert server.wait_watches(1)
    server.expire_watches()
    eventually(lambda: meta.lists == 2, 3, "relist after ERROR 410")
    assert meta.lookup(pod_uid=keep) is not None and meta.lookup(pod_uid=drop) is not None
    assert meta.watch_errors == 0 and meta.list_errors == 0
    assert meta.healthy()


# ---------------------------------------------------------------------------
# outages and failures
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("compacted, gone_as_http", [(False, False), (True, False), (True, True)],
                         ids=["resume-watch", "gone-event", "gone-http-410"])
def test_outage_falls_back_to_cgroup_and_resyncs(
        tls: TLSFiles, make_meta: MetaFactory, compacted: bool, gone_as_http: bool) -> None:
    server = KubeAPIServer(token=TOKEN, tls=tls, gone_as_http_status=gone_as_http)
    server.start()
    try:
        old_c, old_uid, gone_uid = cid(), puid(), puid()
        server.add_pod(make_pod("old", uid=old_uid, containers=[("app", old_c)]))
        server.add_pod(make_pod("gone", uid=gone_uid, containers=[("app", cid())]))
        meta = make_meta(server)
        assert meta.wait_synced(5)
        assert server.wait_watches(1)

        server.stop()
        eventually(lambda: not meta.healthy(), 5, "outage detected")
        eventually(lambda: meta.watch_errors > 0, 5, "watch errors counted")

        # Known pods stay resolvable from the cache.
        assert meta.lookup(container_id=old_c).pod == "old"
        # Unknown pods: what the cgroup path tells.
        new_c, new_uid = cid(), puid()
        path = ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                f"{new_uid.replace('-', '_')}.slice/cri-containerd-{new_c}.scope")
        fb = meta.lookup(cgroup_path=path)
        assert fb is not None and fb.source == "cgroup"
        assert (fb.uid, fb.container_id, fb.qos_class, fb.pod) == (new_uid, new_c, "besteffort", "")

        # While down: a pod appears, another goes.
        server.add_pod(make_pod("new", uid=new_uid, containers=[("app", new_c)], qos_class="BestEffort"))
        server.delete_pod("default", "gone")
        if compacted:
            server.compact()
        server.start()

        info = eventually(lambda: (i := meta.lookup(cgroup_path=path)) and i.source == "api" and i,
                          5, "resync after outage")
        assert (info.pod, info.container, info.qos_class) == ("new", "app", "besteffort")
        eventually(lambda: meta.lookup(pod_uid=gone_uid) is None, 3, "deleted pod gone after resync")
        eventually(meta.healthy, 3, "healthy again")
        assert meta.lists == (2 if compacted else 1)
    finally:
        server.stop()


def test_unreachable_api_from_start_counts_errors_then_syncs(
        tls: TLSFiles, make_meta: MetaFactory) -> None:
    server = KubeAPIServer(token=TOKEN, tls=tls)
    server.start()
    server.stop()  # the port is known, nothing listens on it
    stats = Stats()
    meta = make_meta(server, stats=stats)
    eventually(lambda: meta.list_errors >= 2, 5, "list errors counted")
    assert not meta.healthy()
    assert stats.counter("kubernetes_api_errors_total", ("list",)) >= 2
    c, uid = cid(), puid()
    path = f"/kubepods/burstable/pod{uid}/{c}"
    fb = meta.lookup(cgroup_path=path)
    assert (fb.source, fb.uid, fb.container_id, fb.qos_class) == ("cgroup", uid, c, "burstable")
    assert meta.lookup(container_id=cid()) is None

    server.add_pod(make_pod("late", uid=uid, containers=[("app", c)]))
    server.start()
    try:
        eventually(meta.healthy, 5, "synced once the API is up")
        assert meta.lookup(cgroup_path=path).pod == "late"
    finally:
        server.stop()


def test_wrong_token_is_counted_without_crash_and_rotation_recovers(
        server: KubeAPIServer, make_meta: MetaFactory, sa_dir: Path) -> None:
    uid = puid()
    server.add_pod(make_pod("p", uid=uid))
    (sa_dir / "token").write_text("not-the-token")
    meta = make_meta(server)
    eventually(lambda: meta.list_errors >= 2, 5, "401s counted")
    assert server.requests["unauthorized"] >= 2
    assert "401" in meta.last_error
    assert not meta.healthy() and meta.lookup(pod_uid=uid) is None
    # The kubelet rotates the projected token: the next request uses the new one.
    (sa_dir / "token").write_text(TOKEN)
    eventually(meta.healthy, 5, "recovered with the rotated token")
    assert meta.lookup(pod_uid=uid).pod == "p"


def test_untrusted_server_certificate_is_an_error(
        server: KubeAPIServer, make_meta: MetaFactory, sa_dir: Path, tmp_path: Path) -> None:
    other = make_tls_files(tmp_path / "other-ca")
    shutil.copy(other.ca_file, sa_dir / "ca.crt")
    meta = make_meta(server)
    eventually(lambda: meta.list_errors >= 1, 5, "TLS failure counted")
    assert "CERTIFICATE_VERIFY_FAILED" in meta.last_error
    assert server.requests["list"] == 0 and not meta.healthy()


def test_shutdown_breaks_an_open_watch_promptly(server: KubeAPIServer, make_meta: MetaFactory) -> None:
    meta = make_meta(server, watch_timeout_s=600)
    assert meta.wait_synced(5)
    assert server.wait_watches(1)
    worker = meta._thread
    assert worker is not None and worker.is_alive()
    t0 = time.monotonic()
    meta.shutdown()
    assert time.monotonic() - t0 < 2.0
    assert not worker.is_alive()


# ---------------------------------------------------------------------------
# identities and the cgroup fallback
# ---------------------------------------------------------------------------

def test_normalize_container_id_strips_runtime_prefixes() -> None:
    h = "ab" * 32
    for prefix in ("containerd://", "docker://", "cri-o://", ""):
        assert normalize_container_id(prefix + h.upper()) == h


UID = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b"
CID = "0123456789abcdef" * 4


@pytest.mark.parametrize("path, expected", [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope", (UID, CID, "burstable")),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope", (UID, CID, "guaranteed")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
     f"docker-{CID}.scope", (UID, CID, "besteffort")),
    (f"/kubepods/burstable/pod{UID}/{CID}", (UID, CID, "burstable")),
    (f"/kubepods/pod{UID}/{CID}", (UID, CID, "guaranteed")),
    (f"/kubepods/besteffort/pod{UID}", (UID, "", "besteffort")),
    # A plain Docker container outside Kubernetes: no pod, but the container id is known.
    (f"/system.slice/docker-{CID}.scope", ("", CID, "")),
    ("/user.slice/user-0.slice/session-1.scope", ("", "", "")),
])
def test_cgroup_fallback_answers_what_the_one_cgroup_parser_decodes(path: str, expected: tuple) -> None:
    """The cgroup-only fallback is exactly ``isoscope.host.cgroupfs.parse_cgroup_path``, no second parser."""
    info = parse_cgroup_path(path)
    assert (info.pod_uid, info.container_id, info.qos_class) == expected
    found = CgroupOnlyPodMetadata(node_name="n1").lookup(cgroup_path=path)
    if expected == ("", "", ""):
        assert found is None
    else:
        assert found is not None
        assert (found.uid, found.container_id, found.qos_class, found.source) == expected + ("cgroup",)


def test_cgroup_fallback_has_no_parser_of_its_own() -> None:
    import isoscope.metadata.kubernetes as k8s

    assert not hasattr(k8s, "parse_cgroup_identity") and not hasattr(k8s, "_parse_cgroup_minimal")
    assert "kubepods" not in open(k8s.__file__, encoding="utf-8").read()


def test_cgroup_only_metadata_answers_from_the_path() -> None:
    meta: PodMetadata = CgroupOnlyPodMetadata(node_name="n1")
    meta.start()
    info = meta.lookup(cgroup_path=f"/kubepods/burstable/pod{UID}/{CID}")
    assert (info.uid, info.container_id, info.qos_class, info.node, info.source) == (
        UID, CID, "burstable", "n1", "cgroup")
    assert meta.lookup(cgroup_path="/user.slice") is None
    assert meta.lookup_ip("10.0.0.1") is None
    assert meta.healthy() and meta.list_errors == 0
    meta.shutdown()
