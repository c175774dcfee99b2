"""Kubernetes pod metadata for the pods running on this node.

Spans and kernel stalls identify a workload by cgroup path, container id, pod
UID or pod IP; operators think in namespace / pod / container / owner. This
module keeps a cache of this node's pods, filled the way Kubernetes
controllers do it: one LIST of ``/api/v1/pods`` restricted to the node by a
field selector, then a WATCH from the list's resource version in a background
thread (bookmarks advance the resource version, ``410 Gone`` triggers a fresh
LIST). When the API server cannot be reached the cache keeps its last state,
and identities the cache does not know are answered from what the cgroup path
alone tells (pod UID, container id, QoS class).

Only the standard library is used on purpose: the official ``kubernetes``
client pulls in a large dependency tree for two HTTP requests.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

from isoscope import __version__
from isoscope.host.cgroupfs import CgroupInfo, parse_cgroup_path
from isoscope.model import Stats

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the kubelet mounts the pod's service-account token and cluster CA."""

ERRORS_COUNTER = "kubernetes_api_errors_total"
"""``Stats`` counter (label: ``operation`` = ``list`` | ``watch``) of failed API calls."""

_USER_AGENT = f"isoscope/{__version__} (k8smeta)"

_NO_CGROUP = CgroupInfo(path="")
"""What an unknown cgroup path tells: nothing."""


# ---------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PodInfo:
    """What is known about the pod (and container) behind a workload.

    Attributes:
        namespace: pod namespace ("" when only the cgroup path was known).
        pod: pod name.
        container: container name ("" for pod-level lookups such as by IP).
        uid: pod UID.
        labels: pod labels.
        owner_kind: kind of the controlling owner (``Deployment`` for pods of a
            Deployment's ReplicaSet, else the owner reference's kind).
        owner_name: name of that owner.
        node: node name.
        pod_ip: primary pod IP.
        container_id: runtime container id without the ``<runtime>://`` prefix.
        qos_class: ``guaranteed``, ``burstable``, ``besteffort`` or "".
        source: ``"api"`` when from the API server, ``"cgroup"`` when derived
            from the cgroup path only.
    """

    namespace: str = ""
    pod: str = ""
    container: str = ""
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    owner_kind: str = ""
    owner_name: str = ""
    node: str = ""
    pod_ip: str = ""
    container_id: str = ""
    qos_class: str = ""
    source: str = "api"


class PodMetadata(Protocol):
    """Source of pod metadata for this node's workloads."""

    @property
    def list_errors(self) -> int:
        """Failed LIST requests so far."""
        ...

    @property
    def watch_errors(self) -> int:
        """Failed or broken WATCH requests so far."""
        ...

    def lookup(self, container_id: str = "", pod_uid: str = "",
               cgroup_path: str = "") -> PodInfo | None:
        """Find the pod (and container) by container id, pod UID or cgroup path."""
        ...

    def lookup_ip(self, ip: str) -> PodInfo | None:
        """Find the pod that owns ``ip`` (span peers); pod-level, no container."""
        ...

    def start(self) -> None:
        """Start background synchronisation; returns immediately."""
        ...

    def shutdown(self) -> None:
        """Stop background synchronisation and wait for it to end."""
        ...

    def healthy(self) -> bool:
        """Whether the cache is synced with a reachable API server."""
        ...


class KubeConfigError(Exception):
    """The in-cluster API server configuration is missing or unusable."""


class KubeAPIError(Exception):
    """The API server answered with an error status.

    Attributes:
        status: HTTP status (or the ``code`` of a watch ``ERROR`` event).
        reason: the Kubernetes ``Status.reason`` if one was returned.
    """

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".strip())
        self.status = status
        self.reason = reason


class ResourceVersionGone(KubeAPIError):
    """``410 Gone``: the requested resource version was compacted away; relist."""


# ---------------------------------------------------------------------------
# Identity helpers
# ---------------------------------------------------------------------------

_RUNTIME_PREFIX = re.compile(r"^[a-z0-9.+-]+://")


def normalize_container_id(container_id: str) -> str:
    """``"containerd://ABC…"`` → ``"abc…"``; also strips ``docker://``, ``cri-o://``."""
    return _RUNTIME_PREFIX.sub("", container_id.strip()).lower()


def _owner(meta: Mapping[str, Any], labels: Mapping[str, str]) -> tuple[str, str]:
    """The controlling owner; a Deployment's ReplicaSet is reported as the Deployment.

    The ReplicaSet name is ``<deployment>-<pod-template-hash>`` and the pod
    carries that hash as a label, so the Deployment name is exact, not guessed.
    """
    refs = meta.get("ownerReferences") or []
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not ref:
        return "", ""
    kind, name = str(ref.get("kind", "")), str(ref.get("name", ""))
    tmpl_hash = labels.get("pod-template-hash", "")
    if kind == "ReplicaSet" and tmpl_hash and name.endswith("-" + tmpl_hash):
        return "Deployment", name[: -len(tmpl_hash) - 1]
    return kind, name


def _container_ids(status: Mapping[str, Any]) -> dict[str, str]:
    """container id → container name, for current and just-replaced containers."""
    out: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            name = str(cs.get("name", ""))
            # Keep the previous instance too: its stalls may still be in flight.
            last = ((cs.get("lastState") or {}).get("terminated") or {}).get("containerID", "")
            for raw in (last, cs.get("containerID", "")):
                cid = normalize_container_id(str(raw or ""))
                if cid:
                    out[cid] = name
    return out


@dataclass(slots=True)
class _PodEntry:
    info: PodInfo                  # pod-level (container "")
    containers: dict[str, str]     # container id → name
    ips: tuple[str, ...]           # indexed pod IPs (none for hostNetwork pods)


def _entry_from_pod(pod: Mapping[str, Any]) -> _PodEntry | None:
    meta = pod.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    if not uid:
        return None
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    owner_kind, owner_name = _owner(meta, labels)
    ips = [str(p.get("ip", "")) for p in status.get("podIPs") or [] if p.get("ip")]
    if status.get("podIP") and status["podIP"] not in ips:
        ips.insert(0, str(status["podIP"]))
    info = PodInfo(
        namespace=str(meta.get("namespace", "")), pod=str(meta.get("name", "")), uid=uid,
        labels=labels, owner_kind=owner_kind, owner_name=owner_name,
        node=str(spec.get("nodeName", "")), pod_ip=ips[0] if ips else "",
        qos_class=str(status.get("qosClass", "")).lower(), source="api")
    # hostNetwork pods share the node's IP: indexing it would name an arbitrary pod.
    indexed = () if spec.get("hostNetwork") else tuple(ips)
    return _PodEntry(info=info, containers=_container_ids(status), ips=indexed)


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------

class PodCache:
    """Thread-safe pod cache indexed by pod UID, container id and pod IP."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, _PodEntry] = {}
        self._by_container: dict[str, str] = {}
        self._by_ip: dict[str, str] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_uid)

    def replace_all(self, pods: list[Mapping[str, Any]]) -> None:
        """Replace the whole content (after a LIST): pods gone meanwhile disappear."""
        entries = [e for e in (_entry_from_pod(p) for p in pods) if e is not None]
        by_uid = {e.info.uid: e for e in entries}
        by_container = {cid: e.info.uid for e in entries for cid in e.containers}
        by_ip = {ip: e.info.uid for e in entries for ip in e.ips}
        with self._lock:
            self._by_uid, self._by_container, self._by_ip = by_uid, by_container, by_ip

    def upsert(self, pod: Mapping[str, Any]) -> None:
        """Add or replace one pod (watch ADDED / MODIFIED)."""
        entry = _entry_from_pod(pod)
        if entry is None:
            return
        with self._lock:
            self._drop_locked(entry.info.uid)
            self._by_uid[entry.info.uid] = entry
            for cid in entry.containers:
                self._by_container[cid] = entry.info.uid
            for ip in entry.ips:
                self._by_ip[ip] = entry.info.uid

    def delete(self, pod: Mapping[str, Any]) -> None:
        """Remove one pod (watch DELETED)."""
        uid = str((pod.get("metadata") or {}).get("uid", ""))
        with self._lock:
            self._drop_locked(uid)

    def _drop_locked(self, uid: str) -> None:
        old = self._by_uid.pop(uid, None)
        if old is None:
            return
        for cid in old.containers:
            if self._by_container.get(cid) == uid:
                del self._by_container[cid]
        for ip in old.ips:
            # A recycled IP may already belong to a newer pod.
            if self._by_ip.get(ip) == uid:
                del self._by_ip[ip]

    def get(self, container_id: str = "", pod_uid: str = "") -> PodInfo | None:
        """Container-level info by container id, else pod-level info by pod UID."""
        cid = normalize_container_id(container_id) if container_id else ""
        with self._lock:
            if cid and cid in self._by_container:
                entry = self._by_uid[self._by_container[cid]]
                return dataclasses.replace(entry.info, container=entry.containers[cid],
                                           container_id=cid)
            entry = self._by_uid.get(pod_uid) if pod_uid else None
            if entry is None:
                return None
            if cid and cid not in entry.containers:
                return dataclasses.replace(entry.info, container_id=cid)
            return entry.info

    def get_ip(self, ip: str) -> PodInfo | None:
        """Pod-level info of the pod owning ``ip``."""
        with self._lock:
            uid = self._by_ip.get(ip)
            return self._by_uid[uid].info if uid else None


# ---------------------------------------------------------------------------
# API access
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KubeAPIConfig:
    """How to reach the API server.

    Attributes:
        host: API server host (IP or name).
        port: API server port.
        scheme: ``https`` (in-cluster) or ``http``.
        token_file: bearer-token file, re-read on every request because bound
            service-account tokens are rotated by the kubelet; "" for none.
        ca_file: CA bundle verifying the server certificate; "" for the system store.
        timeout_s: connect/read timeout for LIST requests.
    """

    host: str
    port: int
    scheme: str = "https"
    token_file: str = ""
    ca_file: str = ""
    timeout_s: float = 10.0

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] | None = None,
                   service_account_dir: str = SERVICE_ACCOUNT_DIR,
                   timeout_s: float = 10.0) -> KubeAPIConfig:
        """Configuration of a pod talking to its own cluster.

        Args:
            env: environment to read ``KUBERNETES_SERVICE_HOST``/``_PORT`` from
                (default ``os.environ``).
            service_account_dir: directory holding ``token`` and ``ca.crt``.
            timeout_s: see ``timeout_s``.

        Raises:
            KubeConfigError: not running in a pod (variables or files missing).
        """
        env = os.environ if env is None else env
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise KubeConfigError("KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT not set")
        token = os.path.join(service_account_dir, "token")
        ca = os.path.join(service_account_dir, "ca.crt")
        for path in (token, ca):
            if not os.path.isfile(path):
                raise KubeConfigError(f"{path} does not exist")
        try:
            port_n = int(port)
        except ValueError as exc:
            raise KubeConfigError(f"KUBERNETES_SERVICE_PORT={port!r} is not a port") from exc
        return cls(host=host, port=port_n, scheme="https", token_file=token, ca_file=ca,
                   timeout_s=timeout_s)


class KubeAPIClient:
    """The two requests isoscope makes: LIST and WATCH pods.

    Args:
        config: where and how to connect.
    """

    def __init__(self, config: KubeAPIConfig) -> None:
        self._config = config
        self._ssl: ssl.SSLContext | None = None
        if config.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=config.ca_file or None)
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        c = self._config
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(c.host, c.port, timeout=timeout_s, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(c.host, c.port, timeout=timeout_s)
        with self._lock:
            self._open.add(conn)
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if self._config.token_file:
            with open(self._config.token_file, encoding="utf-8") as fh:
                headers["Authorization"] = "Bearer " + fh.read().strip()
        return headers

    @staticmethod
    def _raise_for(resp: http.client.HTTPResponse) -> None:
        body = resp.read()
        reason, message = resp.reason, ""
        try:
            status = json.loads(body)
            reason = status.get("reason", reason)
            message = status.get("message", "")
        except (ValueError, AttributeError):
            message = body[:200].decode("utf-8", "replace")
        cls = ResourceVersionGone if resp.status == 410 else KubeAPIError
        raise cls(resp.status, reason, message)

    def list_pods(self, field_selector: str, limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """LIST all pods matching ``field_selector``, following ``continue`` pages.

        Returns:
            (items, resourceVersion of the list).

        Raises:
            KubeAPIError: error status (``ResourceVersionGone`` if a page token expired).
            OSError: connection failures.
        """
        items: list[dict[str, Any]] = []
        cont = ""
        rv = ""
        conn = self._connect(self._config.timeout_s)
        try:
            while True:
                query = {"fieldSelector": field_selector, "limit": str(limit)}
                if cont:
                    query["continue"] = cont
                conn.request("GET", "/api/v1/pods?" + urllib.parse.urlencode(query),
                             headers=self._headers())
                resp = conn.getresponse()
                if resp.status != 200:
                    self._raise_for(resp)
                doc = json.loads(resp.read())
                items.extend(doc.get("items") or [])
                meta = doc.get("metadata") or {}
                rv = rv or str(meta.get("resourceVersion", ""))
                cont = str(meta.get("continue", "") or "")
                if not cont:
                    return items, rv
        finally:
            self._release(conn)

    def watch_pods(self, field_selector: str, resource_version: str, timeout_s: int,
                   on_open: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """WATCH pods from ``resource_version``; yields decoded watch events.

        The server ends the stream after ``timeout_s``; the generator then returns.
        ``on_open`` is called once the server accepted the watch (status 200).

        Raises:
            ResourceVersionGone: the request itself was answered 410.
            KubeAPIError: other error statuses.
            OSError: connection failures, including a stalled stream.
        """
        query = {"fieldSelector": field_selector, "watch": "1",
                 "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_s)}
        # Read timeout beyond the server's own deadline: a silent, half-dead
        # connection must not hold the watch forever.
        conn = self._connect(timeout_s + 30.0)
        try:
            conn.request("GET", "/api/v1/pods?" + urllib.parse.urlencode(query),
                         headers=self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                self._raise_for(resp)
            if on_open is not None:
                on_open()
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            self._release(conn)

    def abort(self) -> None:
        """Break every open connection so blocked reads return at once."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ---------------------------------------------------------------------------
# The list/watch loop
# ---------------------------------------------------------------------------

class KubePodMetadata:
    """Pod metadata of one node, kept current by LIST + WATCH in a thread.

    Args:
        config: API server access (usually ``KubeAPIConfig.in_cluster()``).
        node_name: this node's name; default from the ``NODE_NAME`` variable.
        stats: optional shared counters (``kubernetes_api_errors_total``).
        watch_timeout_s: server-side watch duration before a re-watch.
        backoff_initial_s: first retry delay after an error.
        backoff_max_s: retry delay cap.
        list_page_size: ``limit`` of each LIST page.
        cgroup_parser: cgroup path → identity, for the fallback
            (default :func:`isoscope.host.cgroupfs.parse_cgroup_path`).

    Raises:
        ValueError: no node name (a cluster-wide pod cache would not scale).
    """

    def __init__(self, config: KubeAPIConfig, node_name: str = "", *,
                 stats: Stats | None = None, watch_timeout_s: int = 300,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 list_page_size: int = 500,
                 cgroup_parser: Callable[[str], CgroupInfo] = parse_cgroup_path) -> None:
        self._node = node_name or os.environ.get("NODE_NAME", "")
        if not self._node:
            raise ValueError("node name unknown: pass node_name or set NODE_NAME")
        self._client = KubeAPIClient(config)
        self._selector = "spec.nodeName=" + self._node
        self._stats = stats
        self._watch_timeout_s = watch_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._page_size = list_page_size
        self._parse_cgroup = cgroup_parser
        self._cache = PodCache()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._rv = ""
        self._synced = False
        self._ok = False
        self._list_errors = 0
        self._watch_errors = 0
        self._lists = 0
        self._last_error = ""

    # -- observability ------------------------------------------------------

    @property
    def list_errors(self) -> int:
        """Failed LIST requests so far."""
        with self._state_lock:
            return self._list_errors

    @property
    def watch_errors(self) -> int:
        """Failed or broken WATCH requests so far."""
        with self._state_lock:
            return self._watch_errors

    @property
    def lists(self) -> int:
        """Successful LISTs so far (1 + relists after ``410 Gone``)."""
        with self._state_lock:
            return self._lists

    @property
    def resource_version(self) -> str:
        """Resource version the next watch starts from."""
        with self._state_lock:
            return self._rv

    @property
    def last_error(self) -> str:
        """Text of the most recent error, "" if none yet."""
        with self._state_lock:
            return self._last_error

    @property
    def pod_count(self) -> int:
        """Pods in the cache."""
        return len(self._cache)

    def healthy(self) -> bool:
        """Synced once, and the last API interaction succeeded."""
        with self._state_lock:
            return self._synced and self._ok

    # -- lookups ------------------------------------------------------------

    def lookup(self, container_id: str = "", pod_uid: str = "",
               cgroup_path: str = "") -> PodInfo | None:
        """Find a workload's pod.

        Args:
            container_id: runtime container id, with or without ``<runtime>://``.
            pod_uid: pod UID.
            cgroup_path: cgroup path of the workload; supplies ids not given and
                is the fallback when the cache does not know the pod.

        Returns:
            API-derived info (``source="api"``); else, when the cgroup path names
            a pod, what it tells (``source="cgroup"``); else ``None``.
        """
        ident = self._parse_cgroup(cgroup_path) if cgroup_path else _NO_CGROUP
        container_id = container_id or ident.container_id
        pod_uid = pod_uid or ident.pod_uid
        info = self._cache.get(container_id=container_id, pod_uid=pod_uid)
        if info is not None:
            return info
        if ident.pod_uid or ident.container_id:
            return PodInfo(uid=pod_uid, container_id=normalize_container_id(container_id),
                           qos_class=ident.qos_class, node=self._node, source="cgroup")
        return None

    def lookup_ip(self, ip: str) -> PodInfo | None:
        """Pod-level info of the (non-hostNetwork) pod owning ``ip``."""
        return self._cache.get_ip(ip)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the list/watch thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="k8smeta", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the thread, breaking an open watch, and wait up to ``timeout_s``."""
        self._stop.set()
        self._client.abort()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("k8smeta thread did not stop within %.1fs", timeout_s)
            self._thread = None

    def wait_synced(self, timeout_s: float) -> bool:
        """Block until the first LIST succeeded or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return True
            time.sleep(0.02)
        return self.healthy()

    # -- internals ----------------------------------------------------------

    def _error(self, operation: str, exc: BaseException) -> None:
        with self._state_lock:
            if operation == "list":
                self._list_errors += 1
            else:
                self._watch_errors += 1
            self._ok = False
            self._last_error = f"{operation}: {exc}"
        if self._stats is not None:
            self._stats.inc(ERRORS_COUNTER, (operation,))
        logger.warning("kubernetes %s failed: %s", operation, exc)

    def _mark_ok(self) -> None:
        with self._state_lock:
            self._ok = True

    def _relist(self) -> None:
        items, rv = self._client.list_pods(self._selector, limit=self._page_size)
        self._cache.replace_all(items)
        with self._state_lock:
            self._rv = rv
            self._synced = True
            self._ok = True
            self._lists += 1
        logger.info("kubernetes: listed %d pods on %s at resourceVersion %s",
                    len(items), self._node, rv)

    def _watch(self) -> None:
        """One watch request; returns when the server ends the stream."""
        with self._state_lock:
            rv = self._rv
        for event in self._client.watch_pods(self._selector, rv, self._watch_timeout_s,
                                             on_open=self._mark_ok):
            self._apply(event)
            if self._stop.is_set():
                return

    def _apply(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = int(obj.get("code", 0) or 0)
            cls = ResourceVersionGone if code == 410 else KubeAPIError
            raise cls(code, str(obj.get("reason", "")), str(obj.get("message", "")))
        if etype in ("ADDED", "MODIFIED"):
            self._cache.upsert(obj)
        elif etype == "DELETED":
            self._cache.delete(obj)
        elif etype != "BOOKMARK":
            logger.debug("ignoring watch event type %r", etype)
            return
        rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        if rv:
            with self._state_lock:
                self._rv = rv

    def _run(self) -> None:
        backoff = self._backoff_initial_s
        need_list = True
        while not self._stop.is_set():
            operation = "list" if need_list else "watch"
            try:
                if need_list:
                    self._relist()
                    need_list = False
                    operation = "watch"
                self._watch()
                backoff = self._backoff_initial_s
                continue
            except ResourceVersionGone as exc:
                # Our resource version was compacted: only a fresh LIST is consistent.
                logger.info("kubernetes %s: resource version gone (%s); relisting", operation, exc)
                need_list = True
                if operation == "watch":
                    continue
                self._error(operation, exc)
            except (OSError, http.client.HTTPException, KubeAPIError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._error(operation, exc)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._backoff_max_s)


class CgroupOnlyPodMetadata:
    """``PodMetadata`` without an API server: answers only from cgroup paths.

    Used when Kubernetes metadata is disabled or not configured.

    Args:
        node_name: reported as ``PodInfo.node``.
        cgroup_parser: cgroup path → identity
            (default :func:`isoscope.host.cgroupfs.parse_cgroup_path`).
    """

    list_errors = 0
    watch_errors = 0

    def __init__(self, node_name: str = "",
                 cgroup_parser: Callable[[str], CgroupInfo] = parse_cgroup_path) -> None:
        self._node = node_name
        self._parse_cgroup = cgroup_parser

    def lookup(self, container_id: str = "", pod_uid: str = "",
               cgroup_path: str = "") -> PodInfo | None:
        """What the cgroup path (and given ids) tell; ``None`` if nothing."""
        ident = self._parse_cgroup(cgroup_path) if cgroup_path else _NO_CGROUP
        cid = normalize_container_id(container_id or ident.container_id)
        uid = pod_uid or ident.pod_uid
        if not (cid or uid):
            return None
        return PodInfo(uid=uid, container_id=cid, qos_class=ident.qos_class,
                       node=self._node, source="cgroup")

    def lookup_ip(self, ip: str) -> PodInfo | None:
        """Always ``None``: IPs are only known from the API."""
        return None

    def start(self) -> None:
        """Nothing to start."""

    def shutdown(self) -> None:
        """Nothing to stop."""

    def healthy(self) -> bool:
        """Always healthy: nothing can fail."""
        return True
