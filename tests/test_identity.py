"""Who sent a span: identity proven by the connection, claims checked against it.

Real namespaces, cgroups and sockets: a "tenant" service runs in its own
network, PID and cgroup namespaces (its v2 cgroup joined before it enters
them), reaches a receiver in the root namespace over a veth pair with
OTLP/HTTP, and the receiver resolves each request the way the daemon does
(peer socket → owner → claims checked). A second tenant is a plain process in
another container cgroup whose identity the first one tries to claim.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.host.cgroupfs import cgroup_v2_root
from isoscope.host.namespaces import NamespaceIndex
from isoscope.metadata.containers import ContainerIndex
from isoscope.metadata.identity import RelayPolicy
from isoscope.metadata.peer import PeerResolver
from isoscope.metadata.resolver import WorkloadResolver, resource_identity
from isoscope.model import LifecycleEvent, LifecycleKind, Stats
from tests.cgroup_helpers import Cgroup, make_cgroup

pytestmark = pytest.mark.kernel

REPO_ROOT = Path(__file__).resolve().parents[1]

SENDER = r'''
import http.client, json, os, sys, threading
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

host, port, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
me = {"$PID": os.getpid(), "$TID": threading.get_native_id()}
print(json.dumps({"pid": me["$PID"], "tid": me["$TID"]}), flush=True)
sys.stdin.readline()  # the test is ready
conn = http.client.HTTPConnection(host, port, timeout=30)
for i, case in enumerate(cases):
    req = ExportTraceServiceRequest()
    for res in case:
        rs = req.resource_spans.add()
        for k, v in res["resource"].items():
            v = me.get(v, v)
            kv = rs.resource.attributes.add()
            kv.key = k
            if isinstance(v, int):
                kv.value.int_value = v
            else:
                kv.value.string_value = v
        span = rs.scope_spans.add().spans.add()
        span.name = f"op-{i}"
        span.trace_id = os.urandom(16)
        span.span_id = os.urandom(8)
        span.start_time_unix_nano, span.end_time_unix_nano = 1, 2
        if "thread.id" in res:
            kv = span.attributes.add()
            kv.key = "thread.id"
            kv.value.int_value = me.get(res["thread.id"], res["thread.id"])
    body = req.SerializeToString()
    conn.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
conn.close()
print("done", flush=True)
'''


def _hex_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


class Receiver:
    """A real OTLP/HTTP endpoint resolving every request as the daemon's ingest + pipeline do."""

    def __init__(self, host: str, resolver: WorkloadResolver, peers: PeerResolver,
                 relay: bool = False) -> None:
        self.results: list[list[Any]] = []
        self.peer_pids: list[int] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                ip, port = self.client_address[:2]
                peer_pid = peers.resolve(ip, port, self.server.server_address[1])
                out = []
                for rs in req.resource_spans:
                    span = rs.scope_spans[0].spans[0]
                    tid = next((a.value.int_value for a in span.attributes if a.key == "thread.id"), None)
                    out.append(resolver.resolve(resource_identity(rs.resource), tid, peer_pid, relay=relay))
                outer.results.append(out)
                outer.peer_pids.append(peer_pid)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _run_sender(cg: Cgroup, prefix: list[str], host: str, port: int, cases: list[Any]) -> dict[str, int]:
    """Start the sender in ``cg`` (joined before any namespace is entered), let it send, wait for it."""
    proc = cg.spawn([*prefix, sys.executable, "-c", SENDER, host, str(port), json.dumps(cases)],
                    cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    first = proc.stdout.readline()
    assert first, proc.stderr.read()
    me = json.loads(first)
    # The sender's host pid: the process of the cgroup whose innermost NSpid is the one it printed.
    hosts = [p for p in cg.pids() if _nspid(p)[-1:] == [me["pid"]] and _nspid(p)[0] == p]
    assert len(hosts) == 1, (hosts, me)
    me["host_pid"] = hosts[0]
    me["host_tid"] = next(int(t) for t in os.listdir(f"/proc/{hosts[0]}/task")
                          if _nspid(f"{hosts[0]}/task/{t}")[-1] == me["tid"])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "done" in out, err[-3000:]
    return me


def _nspid(pid: int | str) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []


@pytest.fixture
def tenants() -> Iterator[dict[str, Any]]:
    """Tenant A (cgroup only; the test puts it in namespaces) and tenant B (a running process with a thread)."""
    from isoscope_lab.topology import NetNs, VethLink, free_subnet_base, lab_tag
    tag = lab_tag()
    a_id, b_id = _hex_id(), _hex_id()
    cg_a = make_cgroup(f"isoscope-test-ident-{tag}/docker-{a_id}.scope", v1_controllers=())
    cg_b = make_cgroup(f"isoscope-test-ident-{tag}/docker-{b_id}.scope", v1_controllers=())
    ns = NetNs.create(f"isoid{tag}")
    link = VethLink.create(f"iid{tag}h", f"iid{tag}c", None, ns, free_subnet_base(1))
    b = cg_b.spawn([sys.executable, "-c", "import threading, time, sys\n"
                    "t = threading.Thread(target=time.sleep, args=(60,)); t.start()\n"
                    "print(t.native_id, flush=True); time.sleep(60)"],
                   stdout=subprocess.PIPE, text=True)
    b_tid = int(b.stdout.readline())
    try:
        yield {"cg_a": cg_a, "cg_b": cg_b, "a_id": a_id, "b_id": b_id, "ns": ns, "link": link,
               "b_pid": b.pid, "b_tid": b_tid, "root": cg_a.v2_root}
    finally:
        cg_a.remove()
        cg_b.remove()
        link.delete()
        ns.delete()
        parent = os.path.join(cg_a.v2_root or "", f"isoscope-test-ident-{tag}")
        if os.path.isdir(parent):
            os.rmdir(parent)


def _resolvers(relays: RelayPolicy | None = None) -> tuple[WorkloadResolver, PeerResolver, Stats]:
    ns = NamespaceIndex()
    stats = Stats()
    return (WorkloadResolver(stats=stats, relays=relays, namespaces=ns), PeerResolver(namespaces=ns), stats)


def test_sender_in_its_own_namespaces_is_resolved_and_forgeries_are_refused(tenants: dict[str, Any]) -> None:
    resolver, peers, stats = _resolvers()
    link = tenants["link"]
    rec = Receiver(link.a_ip, resolver, peers)
    b_prefix = tenants["b_id"][:12]
    cases = [
        [{"resource": {"service.name": "a", "process.pid": "$PID"}, "thread.id": "$TID"}],   # honest
        [{"resource": {"service.name": "a", "process.pid": tenants["b_pid"]}}],              # B's host pid
        [{"resource": {"service.name": "a", "process.pid": "$PID"}, "thread.id": tenants["b_tid"]}],
        [{"resource": {"service.name": "a", "container.id": b_prefix}}],                    # B's short id
        [{"resource": {"service.name": "a", "container.id": tenants["a_id"][:12], "process.pid": "$PID"}}],
        [{"resource": {"service.name": "a", "process.pid": 1}}],                              # PID 1 of its ns
    ]
    try:
        me = _run_sender(tenants["cg_a"], ["nsenter", f"--net={tenants['ns'].path}", "--",
                                           "unshare", "--pid", "--cgroup", "--fork", "--mount-proc"],
                         link.a_ip, rec.port, cases)
    finally:
        rec.close()
    assert me["pid"] == 1, "the sender is not PID 1 of its own PID namespace"
    # Every request came from the sender's socket in its own network namespace.
    assert rec.peer_pids == [me["host_pid"]] * len(cases)
    # Found among that namespace's processes, not by a scan of every process; once per connection.
    assert peers.stats["full_fd_scans"] == 0 and peers.stats["lookups"] == 1
    honest, forged_pid, forged_tid, forged_cid, own_cid, pid_one = [r[0] for r in rec.results]
    assert honest is not None and honest.scope == "thread"
    assert (honest.pid, honest.tid) == (me["host_pid"], me["host_tid"])
    assert honest.pid != 1
    assert forged_pid is None
    assert stats.counter("identity_rejected_total", ("pid_not_in_sender_ns",)) == 1
    assert forged_tid is not None and forged_tid.scope == "process" and forged_tid.pid == me["host_pid"]
    assert stats.counter("identity_rejected_total", ("thread_not_in_process",)) == 1
    assert forged_cid is None
    assert stats.counter("identity_rejected_total", ("container_mismatch",)) == 1
    assert own_cid is not None and own_cid.pid == me["host_pid"] and own_cid.scope == "process"
    # process.pid 1 is the sender itself, never the host's PID 1.
    assert pid_one is not None and pid_one.pid == me["host_pid"]


def test_loopback_sender_claiming_another_tenant_is_refused(tenants: dict[str, Any]) -> None:
    """From loopback, in its own PID namespace or in the host's: B's pid, thread or container are not A's."""
    resolver, peers, stats = _resolvers()
    rec = Receiver("127.0.0.1", resolver, peers)
    cases = [
        [{"resource": {"process.pid": tenants["b_pid"]}}],
        [{"resource": {"process.pid": "$PID", "k8s.pod.uid": str(uuid.uuid4())}}],
        [{"resource": {"process.pid": "$PID"}, "thread.id": tenants["b_tid"]}],
    ]
    try:
        own_ns = _run_sender(tenants["cg_a"], ["unshare", "--pid", "--fork", "--mount-proc"],
                             "127.0.0.1", rec.port, cases)
        host_ns = _run_sender(tenants["cg_a"], [], "127.0.0.1", rec.port, cases)
    finally:
        rec.close()
    assert rec.peer_pids == [own_ns["host_pid"]] * 3 + [host_ns["host_pid"]] * 3
    r = [x[0] for x in rec.results]
    assert r[0] is None and r[3] is None                        # B's pid: not the sender's workload
    assert r[1] is None and r[4] is None                        # a pod the sender is not in
    assert r[2] is not None and r[2].scope == "process" and r[2].pid == own_ns["host_pid"]
    assert r[5] is not None and r[5].scope == "process" and r[5].pid == host_ns["host_pid"]
    assert stats.counter("identity_rejected_total", ("pid_not_in_sender_ns",)) == 1
    # In the host PID namespace B's pid exists, but B is another container.
    assert stats.counter("identity_rejected_total", ("container_mismatch",)) == 1
    assert stats.counter("identity_rejected_total", ("pod_mismatch",)) == 2
    assert stats.counter("identity_rejected_total", ("thread_not_in_process",)) == 2


def test_trusted_relay_names_workloads_inside_them_only(tenants: dict[str, Any]) -> None:
    """A relay (by cgroup prefix) may name B by container id; process.pid is B's own view; never itself."""
    tag = tenants["cg_a"].name.split("/")[0]
    relay_cg = make_cgroup(f"{tag}/relay", v1_controllers=())
    try:
        resolver, peers, stats = _resolvers(RelayPolicy(cgroup_prefixes=(f"/{tag}/relay",)))
        rec = Receiver("127.0.0.1", resolver, peers)
        b_id = tenants["b_id"]
        cases = [[
            {"resource": {"container.id": b_id}},
            {"resource": {"container.id": b_id, "process.pid": tenants["b_pid"]},
             "thread.id": tenants["b_tid"]},
            {"resource": {"container.id": b_id[:12]}},          # unique short prefix: allowed
            {"resource": {"container.id": b_id[:11]}},          # too short
            {"resource": {"container.id": b_id[20:32]}},        # a substring is not a prefix
            {"resource": {"process.pid": "$PID"}},              # the relay itself
            {"resource": {"container.id": b_id, "process.pid": "$PID"}},  # not a process of B
        ]]
        try:
            _run_sender(relay_cg, [], "127.0.0.1", rec.port, cases)
        finally:
            rec.close()
    finally:
        relay_cg.remove()
    by_cid, by_pid, short, too_short, substring, itself, foreign_pid = rec.results[0]
    b_cg = tenants["cg_b"].id
    assert by_cid is not None and by_cid.scope == "container" and by_cid.cgroup_id == b_cg
    assert resolver.scope_cgroups(by_cid) == (b_cg,)
    assert by_pid is not None and (by_pid.scope, by_pid.pid, by_pid.tid) == ("thread", tenants["b_pid"],
                                                                            tenants["b_tid"])
    assert short is not None and short.cgroup_id == b_cg
    assert too_short is None and substring is None
    assert itself is None
    assert foreign_pid is not None and foreign_pid.scope == "container" and foreign_pid.cgroup_id == b_cg
    assert stats.counter("identity_rejected_total", ("unknown_container",)) == 2
    assert stats.counter("identity_rejected_total", ("pid_without_workload",)) == 1
    assert stats.counter("identity_rejected_total", ("pid_not_in_workload",)) == 1


def test_pod_resolves_to_its_containers_cgroups_not_the_pod_cgroup() -> None:
    pod = str(uuid.uuid4())
    base = f"kubepods/burstable/pod{pod}"
    c1 = make_cgroup(f"{base}/{_hex_id()}", v1_controllers=())
    c2 = make_cgroup(f"{base}/{_hex_id()}", v1_controllers=())
    try:
        c1.spawn(["sleep", "30"])
        resolver = WorkloadResolver(stats=Stats())
        wl = resolver.resolve({"k8s.pod.uid": pod}, None, 0, relay=True)
        assert wl is not None and wl.scope == "container"
        pod_cg = os.stat(os.path.join(c1.v2_root or "", base)).st_ino
        assert sorted(resolver.scope_cgroups(wl)) == sorted([c1.id, c2.id])
        assert pod_cg not in resolver.scope_cgroups(wl)
    finally:
        c1.remove()
        c2.remove()
        for d in (base, "kubepods/burstable", "kubepods"):
            try:
                os.rmdir(os.path.join(c1.v2_root or "", d))
            except OSError:
                pass  # not empty (someone else's) or already gone


def test_unknown_container_ids_cost_no_walk_per_id() -> None:
    """2,000 unknown container ids in one relayed request: answered from the index (cgroup reads counted)."""
    resolver = WorkloadResolver(stats=Stats())
    idx = resolver.containers
    idx.rebuild()
    walks, dirs = idx.walks, idx.dirs_read
    tree = dirs  # one walk lists every directory once
    for _ in range(2000):
        assert resolver.resolve({"container.id": _hex_id()}, None, 0, relay=True) is None
    assert resolver.stats.counter("identity_rejected_total", ("unknown_container",)) == 2000
    # At most one rescan (rate-limited) for the whole request, never one per id.
    assert idx.walks - walks <= 1
    assert idx.dirs_read - dirs <= tree + 10


def test_cgroup_events_keep_the_index_current_without_walks() -> None:
    """mkdir/rmdir lifecycle events (paths truncated to 127 bytes like the probe's) update the index."""
    idx = ContainerIndex(cgroup_v2_root())
    idx.rebuild()
    walks = idx.walks
    pod = str(uuid.uuid4())
    cid = _hex_id()
    name = (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod.replace('-', '_')}.slice/"
            f"cri-containerd-{cid}.scope")
    cg = make_cgroup(name, v1_controllers=())
    try:
        path = "/" + name
        ev = LifecycleEvent(LifecycleKind.CGROUP_MKDIR, 0, 1, 1, cgroup_id=cg.id, flags=0, path=path[:127])
        idx.on_lifecycle(ev)
        hit = idx.container(cid)
        assert hit is not None and hit.cgroup_ids == (cg.id,) and hit.pod_uid == pod
        assert idx.pod(pod) is not None and idx.pod(pod).cgroup_ids == (cg.id,)
        assert idx.walks == walks
        idx.on_lifecycle(LifecycleEvent(LifecycleKind.CGROUP_RMDIR, 0, 1, 1, cgroup_id=cg.id, flags=0,
                                        path=path[:127]))
        idx.min_rescan_s = 1e9  # the event, not a rescan, must have removed it
        assert idx.container(cid) is None
    finally:
        cg.remove()
        root = cg.v2_root or ""
        for d in (os.path.dirname(name), "kubepods.slice/kubepods-burstable.slice", "kubepods.slice"):
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass


def test_unproven_sender_claims_nothing() -> None:
    """No socket owner on this node (peer 0): no claim is trusted, by default."""
    stats = Stats()
    resolver = WorkloadResolver(stats=stats)
    assert resolver.resolve({"process.pid": 1}, None, 0) is None
    assert resolver.resolve({"process.pid": os.getpid()}, None, 0) is None
    assert stats.counter("identity_rejected_total", ("unproven_sender",)) == 2


def test_peer_cache_dropped_when_owner_exits() -> None:
    import socket
    ns = NamespaceIndex()
    peers = PeerResolver(namespaces=ns, ttl_s=3600, verify_after_s=3600)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    child = subprocess.Popen([sys.executable, "-c", "import socket,sys,time\n"
                              f"s=socket.create_connection(('127.0.0.1',{srv.getsockname()[1]}))\n"
                              "print(s.getsockname()[1],flush=True); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        cport = int(child.stdout.readline())
        acc, _ = srv.accept()
        assert peers.resolve("127.0.0.1", cport, srv.getsockname()[1]) == child.pid
        assert peers.cache_size() == 1
        ns.on_lifecycle(LifecycleEvent(LifecycleKind.EXIT, 0, child.pid, child.pid))
        assert peers.cache_size() == 0
        acc.close()
    finally:
        child.kill()
        child.wait()
        srv.close()


def test_first_connection_from_a_namespace_made_after_the_index_resolves() -> None:
    """A pod's namespace and address appear after the address index was built: its first connection resolves.

    Full rebuilds are off (``address_refresh_s`` of an hour) so only the namespace
    change can find it; unknown addresses afterwards cost no re-read at all.
    """
    import socket
    from isoscope_lab.topology import NetNs, VethLink, free_subnet_base, lab_tag
    ns = NamespaceIndex(refresh_s=3600, min_rescan_s=3600)
    peers = PeerResolver(namespaces=ns, address_refresh_s=3600, changed_settle_s=0)
    assert peers.resolve("192.0.2.7", 40000, 4318) == 0  # builds the index (and misses)
    assert peers.stats["address_rebuilds"] == 1
    tag = lab_tag()
    netns = NetNs.create(f"isoaf{tag}")
    link = VethLink.create(f"iaf{tag}h", f"iaf{tag}c", None, netns, free_subnet_base(1))
    srv = socket.socket()
    child = None
    try:
        srv.bind((link.a_ip, 0))
        srv.listen()
        child = subprocess.Popen(["nsenter", f"--net={netns.path}", "--", sys.executable, "-c",
                                  "import socket,sys\n"
                                  f"s=socket.create_connection(({link.a_ip!r},{srv.getsockname()[1]}))\n"
                                  "print(s.getsockname()[1],flush=True); sys.stdin.readline()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        cport = int(child.stdout.readline())
        acc, (peer_ip, _) = srv.accept()
        assert peer_ip == link.b_ip
        # Before the daemon has read the sender's namespace event, the index cannot know it.
        assert peers.resolve(peer_ip, cport, srv.getsockname()[1]) == 0
        # The kernel's setns record of the sender entering its namespace (as the router applies it):
        # the cached miss is retried at once and only that namespace is read.
        ns.on_lifecycle(LifecycleEvent(LifecycleKind.SETNS, 0, child.pid, child.pid, flags=0x40000000))
        assert peers.resolve(peer_ip, cport, srv.getsockname()[1]) == child.pid
        assert peers.stats["address_rebuilds"] == 1
        rereads = peers.stats["address_rereads"]
        assert rereads >= 1
        # A sender from many unknown addresses: no rebuild, no re-read (nothing changed since).
        for i in range(50):
            assert peers.resolve(f"198.51.100.{i + 1}", 1000 + i, srv.getsockname()[1]) == 0
        assert peers.stats["address_rebuilds"] == 1 and peers.stats["address_rereads"] == rereads
        acc.close()
    finally:
        if child is not None:
            child.kill()
            child.wait()
        srv.close()
        link.delete()
        netns.delete()


def test_sender_that_exited_is_resolved_for_its_last_spans() -> None:
    """Spans held for their kernel data are resolved after their sender exited, within the grace time only."""
    ns = NamespaceIndex(refresh_s=3600, min_rescan_s=3600)
    stats = Stats()
    resolver = WorkloadResolver(stats=stats, namespaces=ns)
    child = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                              "import sys, threading\n"
                              "t = threading.Thread(target=sys.stdin.readline); t.start()\n"
                              "print(t.native_id, flush=True); t.join()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ns_tid = int(child.stdout.readline())
        host_pid = int(Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()[0])
        host_tid = next(int(t) for t in os.listdir(f"/proc/{host_pid}/task")
                        if _nspid(f"{host_pid}/task/{t}")[-1] == ns_tid)
        ns.rebuild()
        alive = resolver.resolve({"process.pid": 1}, ns_tid, host_pid)
        assert alive is not None and (alive.scope, alive.pid, alive.tid) == ("thread", host_pid, host_tid)
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=30)
        assert not os.path.exists(f"/proc/{host_pid}")
        for ev in (LifecycleEvent(LifecycleKind.EXIT, 0, host_pid, host_tid),
                   LifecycleEvent(LifecycleKind.EXIT, 0, host_pid, host_pid)):
            resolver.on_lifecycle(ev)
        gone = resolver.resolve({"process.pid": 1}, ns_tid, host_pid)
        assert gone is not None and (gone.scope, gone.pid, gone.tid) == ("thread", host_pid, host_tid)
        assert stats.counter("identity_rejected_total", ("unproven_sender",)) == 0
        ns.exit_grace_s = 0  # past the grace time: the sender is unproven again
        assert resolver.resolve({"process.pid": 1}, ns_tid, host_pid) is None
        assert stats.counter("identity_rejected_total", ("unproven_sender",)) == 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
