"""A real HTTP(S) server speaking the Kubernetes pod LIST / WATCH API.

It implements the subset of ``kube-apiserver`` behaviour a node agent relies on,
with the wire shapes of the Kubernetes API reference:

* ``GET /api/v1/pods?fieldSelector=spec.nodeName=<n>&limit=<k>[&continue=<t>]``
  answers a ``PodList`` (``metadata.resourceVersion``, ``metadata.continue``,
  items without ``kind``/``apiVersion`` as in real lists).
* ``GET /api/v1/pods?watch=1&resourceVersion=<rv>&allowWatchBookmarks=true&timeoutSeconds=<s>``
  answers ``200`` with a chunked stream of newline-delimited watch events
  ``{"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK"|"ERROR", "object": ...}``.
  A resource version older than the compaction point gets an ``ERROR`` event
  carrying a ``Status`` with ``code: 410`` (or, if configured, an HTTP 410).
* Bearer-token authentication: anything else is ``401`` with a ``Status`` body.

State changes (pods added, modified, deleted, history compacted, bookmarks)
are driven by the test through methods, and reach open watches at once.
The server can be stopped and restarted on the same port to simulate outages.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class TLSFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it."""

    ca_file: str
    cert_file: str
    key_file: str


def make_tls_files(directory: Path) -> TLSFiles:
    """Create a throw-away CA and a server certificate for ``127.0.0.1`` with openssl."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=test-kubernetes-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=kube-apiserver")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return TLSFiles(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"))


def make_pod(name: str, *, namespace: str = "default", node: str = "node-a", uid: str,
             containers: list[tuple[str, str]] | None = None, labels: dict[str, str] | None = None,
             owner: tuple[str, str] | None = None, pod_ip: str = "", host_network: bool = False,
             qos_class: str = "Burstable", runtime: str = "containerd") -> dict[str, Any]:
    """A Pod object shaped like the API returns it for a running pod.

    Args:
        name: pod name.
        namespace: pod namespace.
        node: ``spec.nodeName``.
        uid: ``metadata.uid``.
        containers: (container name, 64-hex container id) pairs.
        labels: pod labels.
        owner: (kind, name) of the controlling owner reference.
        pod_ip: ``status.podIP`` (and ``podIPs``).
        host_network: ``spec.hostNetwork``.
        qos_class: ``status.qosClass``.
        runtime: runtime prefix of ``containerID`` (``containerd``, ``docker``, ``cri-o``).
    """
    containers = containers or []
    meta: dict[str, Any] = {
        "name": name, "namespace": namespace, "uid": uid, "resourceVersion": "0",
        "creationTimestamp": "2024-05-01T10:00:00Z", "labels": dict(labels or {}),
    }
    if owner:
        meta["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
            "uid": "0f0f0f0f-0000-4000-8000-" + uid[-12:], "controller": True,
            "blockOwnerDeletion": True,
        }]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "containers": [{"name": c, "image": f"registry.example/{c}:1"} for c, _ in containers],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
        "status": {
            "phase": "Running",
            "hostIP": "10.0.0.10",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}] if pod_ip else [],
            "qosClass": qos_class,
            "startTime": "2024-05-01T10:00:01Z",
            "containerStatuses": [{
                "name": c, "image": f"registry.example/{c}:1",
                "imageID": f"registry.example/{c}@sha256:" + "ab" * 32,
                "containerID": f"{runtime}://{cid}", "ready": True, "started": True,
                "restartCount": 0, "state": {"running": {"startedAt": "2024-05-01T10:00:02Z"}},
                "lastState": {},
            } for c, cid in containers],
        },
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class KubeAPIServer:
    """The server. Thread-safe; all state methods may be called while serving.

    Args:
        token: the bearer token accepted.
        tls: serve HTTPS with these files; ``None`` for plain HTTP.
        gone_as_http_status: answer watches from a compacted resource version
            with HTTP 410 instead of a 200 stream holding an ``ERROR`` event.
    """

    def __init__(self, token: str = "test-token", tls: TLSFiles | None = None,
                 gone_as_http_status: bool = False) -> None:
        self.token = token
        self.tls = tls
        self.gone_as_http_status = gone_as_http_status
        self.host = "127.0.0.1"
        self.port = 0
        self._cond = threading.Condition()
        self._rv = 100
        self._compacted_rv = 100
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self._bookmark_gen = 0
        self._close_gen = 0
        self._expire_gen = 0
        self._stopping = False
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.requests: dict[str, int] = {"list": 0, "watch": 0, "unauthorized": 0}
        self.active_watches = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self) -> None:
        """Listen (on the previous port after a ``stop``) and serve in a thread."""
        handler = _make_handler(self)
        httpd = ThreadingHTTPServer((self.host, self.port), handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            # Handshake in the handler thread, not in the accept loop.
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True,
                                           do_handshake_on_connect=False)
        self.port = httpd.server_address[1]
        with self._cond:
            self._stopping = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="k8s-api-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and break every open connection (an outage)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> KubeAPIServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state changes ------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _record(self, etype: str, pod: dict[str, Any]) -> int:
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, etype, copy.deepcopy(pod)))
        self._cond.notify_all()
        return self._rv

    def add_pod(self, pod: dict[str, Any]) -> int:
        """Create a pod; returns the new resource version."""
        pod = copy.deepcopy(pod)
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._cond:
            if key in self._pods:
                raise ValueError(f"pod {key} exists")
            self._pods[key] = pod
            return self._record("ADDED", pod)

    def modify_pod(self, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> int:
        """Apply ``mutate`` to a stored pod; returns the new resource version."""
        with self._cond:
            pod = self._pods[(namespace, name)]
            mutate(pod)
            return self._record("MODIFIED", pod)

    def delete_pod(self, namespace: str, name: str) -> int:
        """Delete a pod; returns the new resource version."""
        with self._cond:
            pod = self._pods.pop((namespace, name))
            return self._record("DELETED", pod)

    def compact(self) -> None:
        """Forget the event history: watches from older versions get 410 Gone."""
        with self._cond:
            self._compacted_rv = self._rv
            self._events.clear()
            self._snapshots.clear()

    def send_bookmark(self) -> None:
        """Send a BOOKMARK at the current resource version to open watches."""
        with self._cond:
            self._bookmark_gen += 1
            self._cond.notify_all()

    def close_watches(self) -> None:
        """End every open watch stream cleanly (as at ``timeoutSeconds``)."""
        with self._cond:
            self._close_gen += 1
            self._cond.notify_all()

    def expire_watches(self) -> None:
        """Compact, then send every open watch an ERROR 410 event and end it."""
        with self._cond:
            self._compacted_rv = self._rv
            self._events.clear()
            self._expire_gen += 1
            self._cond.notify_all()

    def wait_watches(self, count: int, timeout_s: float = 5.0) -> bool:
        """Wait until at least ``count`` watch streams are open."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.active_watches < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # -- request handling (called from handler threads) ---------------------

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def _pod_list(self, node: str | None, limit: int, cont: str) -> tuple[int, dict[str, Any]]:
        with self._cond:
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    snap_rv, items = self._snapshots[token["id"]]
                    start = int(token["start"])
                except (ValueError, KeyError):
                    return 410, _status(410, "Expired", "The provided continue parameter is too old")
            else:
                snap_rv = self._rv
                items = [copy.deepcopy(p) for _, p in sorted(self._pods.items())
                         if node is None or p["spec"].get("nodeName") == node]
                for item in items:  # list items carry neither kind nor apiVersion
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                start = 0
            page = items[start:start + limit] if limit > 0 else items[start:]
            meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
            end = start + len(page)
            if end < len(items):
                snap_id = f"{snap_rv}-{len(self._snapshots)}"
                self._snapshots[snap_id] = (snap_rv, items)
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"id": snap_id, "start": end}).encode()).decode()
                meta["remainingItemCount"] = len(items) - end
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page}


def _parse_node_selector(selector: str) -> tuple[bool, str | None]:
    """``spec.nodeName=x`` → (True, "x"); "" → (True, None); anything else → (False, None)."""
    if not selector:
        return True, None
    for op in ("==", "="):
        field_, sep, value = selector.partition(op)
        if sep and field_ == "spec.nodeName" and "," not in value:
            return True, value
    return False, None


def _make_handler(api: KubeAPIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "kube-apiserver-test"

        def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
            pass

        def setup(self) -> None:
            if isinstance(self.request, ssl.SSLSocket):
                self.request.settimeout(10)
                try:
                    self.request.do_handshake()
                except (ssl.SSLError, OSError):
                    self.request.close()
                    raise
                self.request.settimeout(None)
            api._track(self.request, True)
            super().setup()

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                api._track(self.request, False)

        def _send_json(self, code: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            if self.headers.get("Authorization", "") != "Bearer " + api.token:
                with api._cond:
                    api.requests["unauthorized"] += 1
                self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/api/v1/pods":
                self._send_json(404, _status(404, "NotFound", "the server could not find the requested resource"))
                return
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            ok, node = _parse_node_selector(q.get("fieldSelector", ""))
            if not ok:
                self._send_json(400, _status(400, "BadRequest",
                                             f"field label not supported: {q.get('fieldSelector')}"))
                return
            if q.get("watch") in ("1", "true"):
                self._watch(node, q)
            else:
                with api._cond:
                    api.requests["list"] += 1
                code, doc = api._pod_list(node, int(q.get("limit", "0") or 0), q.get("continue", ""))
                self._send_json(code, doc)

        def _watch(self, node: str | None, q: dict[str, str]) -> None:
            bookmarks = q.get("allowWatchBookmarks") in ("1", "true")
            timeout = float(q.get("timeoutSeconds", "1800") or 1800)
            deadline = time.monotonic() + timeout
            rv_param = q.get("resourceVersion", "")
            with api._cond:
                api.requests["watch"] += 1
                cursor = int(rv_param) if rv_param not in ("", "0") else api._rv
                gone = rv_param not in ("", "0") and cursor < api._compacted_rv
                initial = ([] if rv_param not in ("", "0") else
                           [("ADDED", copy.deepcopy(p)) for p in api._pods.values()])
                if gone and api.gone_as_http_status:
                    doc = _status(410, "Expired", f"too old resource version: {cursor} ({api._compacted_rv})")
                else:
                    doc = None
                gens = (api._bookmark_gen, api._close_gen, api._expire_gen)
            if doc is not None:
                self._send_json(410, doc)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            if gone:
                self._event("ERROR", _status(410, "Expired",
                                             f"too old resource version: {cursor} ({api._compacted_rv})"))
                self._chunk(b"")
                return
            for etype, pod in initial:
                if node is None or pod["spec"].get("nodeName") == node:
                    self._event(etype, pod)
            with api._cond:
                api.active_watches += 1
                api._cond.notify_all()
            try:
                self._stream(node, cursor, gens, bookmarks, deadline)
            except OSError:
                return  # client went away or the server is stopping
            finally:
                with api._cond:
                    api.active_watches -= 1
                    api._cond.notify_all()

        def _stream(self, node: str | None, cursor: int, gens: tuple[int, int, int],
                    bookmarks: bool, deadline: float) -> None:
            bm_gen, close_gen, expire_gen = gens
            while True:
                with api._cond:
                    while True:
                        pending = [e for e in api._events if e[0] > cursor]
                        if (pending or api._stopping or api._bookmark_gen != bm_gen
                                or api._close_gen != close_gen or api._expire_gen != expire_gen
                                or time.monotonic() >= deadline):
                            break
                        api._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    if api._stopping:
                        return  # connection is broken by stop(), no clean end
                    now_rv = api._rv
                    expired = api._expire_gen != expire_gen
                    closing = api._close_gen != close_gen or time.monotonic() >= deadline
                    bookmark = api._bookmark_gen != bm_gen
                    bm_gen = api._bookmark_gen
                    compacted = api._compacted_rv
                for rv, etype, pod in pending:
                    cursor = rv
                    if node is None or pod["spec"].get("nodeName") == node:
                        self._event(etype, pod)
                if expired:
                    self._event("ERROR", _status(410, "Expired",
                                                 f"too old resource version: {cursor} ({compacted})"))
                    self._chunk(b"")
                    return
                if bookmark and bookmarks:
                    cursor = max(cursor, now_rv)
                    self._event("BOOKMARK", {"kind": "Pod", "apiVersion": "v1",
                                             "metadata": {"resourceVersion": str(cursor)}})
                if closing:
                    self._chunk(b"")
                    return

        def _event(self, etype: str, obj: dict[str, Any]) -> None:
            self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

    return Handler
