"""Who sent a span, and who a kernel record belongs to.

Resolution for spans, finest first (docs/architecture.md §4 ``isolation.scope``):
``thread.id`` (OS tid) → ``process.pid`` → ``container.id`` / ``k8s.pod.uid``
→ the sending connection's owner. Every claim is checked against the identity
the connection proves (the process owning the client socket, found in the
sender's own network namespace); see :mod:`isoscope.metadata.identity` for the
rules and :mod:`isoscope.metadata.containers` for how container and pod names
match.

Per-process facts (host pid, cgroup, isolation stack) are cached and keyed by
the process start time, so a reused PID never inherits a dead process's
metadata.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from isoscope.host import cgroupfs
from isoscope.host.namespaces import NamespaceIndex, shared_index
from isoscope.host.stack import detect_process_stack
from isoscope.metadata.containers import ContainerIndex, ContainerMatch, container_id_matches
from isoscope.metadata.identity import Claims, RelayPolicy
from isoscope.model import IsolationStack, LifecycleEvent, LifecycleKind, Stats, Workload

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProcessInfo:
    pid: int
    starttime: int
    nspid: list[int]
    cgroup_path: str
    cgroup_id: int
    stack: IsolationStack
    namespace: str = ""
    pod: str = ""
    container: str = ""


RECHECK_NS = 1_000_000_000
"""How long a cached process is trusted without re-reading its start time."""


def _starttime(pid: int, proc_root: str) -> int | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields resume after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def _attr_value(kv: Any) -> Any:
    v = kv.value
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


def resource_identity(resource: Any) -> dict[str, Any]:
    """The resource attributes the resolver uses (process.pid, container.id, k8s.pod.uid, service.name)."""
    out: dict[str, Any] = {}
    for kv in resource.attributes:
        if kv.key in ("process.pid", "container.id", "k8s.pod.uid", "service.name", "host.name"):
            out[kv.key] = _attr_value(kv)
    return out


class WorkloadResolver:
    """Resolves spans and kernel records to workloads.

    Args:
        proc_root: procfs of the host (``/host/proc`` in a pod).
        sys_root: sysfs of the host.
        host_stack: the node's isolation stack (hypervisor, devices).
        pods: optional Kubernetes pod metadata (``isoscope.metadata.kubernetes``).
        max_processes: cache bound.
        vms: optional VM registry (``isoscope.host.vms.VmRegistry``): spans of a pod or
            container whose workload runs inside a VM are joined at VM scope.
        stats: where ``identity_rejected_total{reason}`` is counted (a private one by default).
        relays: which connection owners are trusted relays (none by default).
        trust_unproven: resolve claims of spans whose sender is unproven (no socket owner on
            this node) as a host pid or an exact container/pod id. Off by default: on a node
            with untrusted tenants anyone could then claim anyone's identity.
        namespaces: namespace index (the shared one of ``proc_root`` by default).
        containers: container index (built over the v2 hierarchy by default).
        thread_owner: tid → the process the kernel recorded it in (0: unknown); proves a
            ``thread.id`` claim for a thread that exited before its spans were resolved.
    """

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys", host_stack: IsolationStack | None = None,
                 pods: Any = None, max_processes: int = 20_000, vms: Any = None, *, stats: Stats | None = None,
                 relays: RelayPolicy | None = None, trust_unproven: bool = False,
                 namespaces: NamespaceIndex | None = None, containers: ContainerIndex | None = None,
                 thread_owner: Callable[[int], int] = lambda tid: 0) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.host_stack = host_stack
        self.pods = pods
        self.vms = vms
        self.v2_root = cgroupfs.cgroup_v2_root(proc_root)
        self._lock = threading.Lock()
        self._procs: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._checked: dict[int, int] = {}  # pid → when its start time was last read (monotonic ns)
        # pid → (facts, exit monotonic ns): processes that exited, for the namespace index's grace time.
        self._exited: OrderedDict[int, tuple[ProcessInfo, int]] = OrderedDict()
        self._max = max_processes
        self._cgroup_labels: OrderedDict[int, tuple[str, str, str]] = OrderedDict()
        self._scope_sets: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self.stats = stats if stats is not None else Stats()
        self._thread_owner = thread_owner
        self.relays = relays or RelayPolicy()
        self.trust_unproven = trust_unproven
        self.ns = namespaces if namespaces is not None else shared_index(proc_root)
        self.containers = containers if containers is not None else ContainerIndex(self.v2_root)

    # -- processes -------------------------------------------------------------

    def process(self, pid: int) -> ProcessInfo | None:
        """Facts about a host pid, cached while the same process lives.

        The kernel's exit events (``on_lifecycle``) retire a process as it exits; its start time is
        re-checked at most every ``RECHECK_NS`` besides, so a pid reused behind a lost exit event is
        caught within that time while a busy sender costs no ``/proc`` read per batch.

        A process that exited less than the namespace index's ``exit_grace_s`` ago (and whose
        number nobody reused) still answers with the facts it had: its last spans are resolved
        after it is gone, once the kernel data of their window is in.
        """
        now = time.monotonic_ns()
        with self._lock:
            info = self._procs.get(pid)
            if info is not None and now - self._checked.get(pid, 0) < RECHECK_NS:
                self._procs.move_to_end(pid)
                return info
        st = _starttime(pid, self.proc_root)
        if st is None:
            with self._lock:
                gone = self._exited.get(pid)
                cached = self._procs.pop(pid, None)
                self._checked.pop(pid, None)
                if gone is None and cached is not None:
                    # Gone before its exit event was read: it exited now, as far as we know.
                    gone = self._exited[pid] = (cached, now)
            if gone is not None and now - gone[1] <= int(self.ns.exit_grace_s * 1e9):
                return gone[0]
            return None
        with self._lock:
            self._exited.pop(pid, None)  # the number lives again: whatever exited under it is gone
            info = self._procs.get(pid)
            if info is not None and info.starttime == st:
                self._procs.move_to_end(pid)
                self._checked[pid] = now
                return info
        info = self._load(pid, st)
        if info is None:
            return None
        with self._lock:
            self._procs[pid] = info
            self._checked[pid] = now
            while len(self._procs) > self._max:
                old_pid, _ = self._procs.popitem(last=False)
                self._checked.pop(old_pid, None)
        return info

    def _load(self, pid: int, st: int) -> ProcessInfo | None:
        try:
            cgroups = cgroupfs.read_proc_cgroups(pid, self.proc_root)
        except OSError:
            return None
        path = cgroups.get("", "") or cgroups.get("cpu", "") or cgroups.get("cpu,cpuacct", "")
        cgid = 0
        if self.v2_root and "" in cgroups:
            try:
                cgid = cgroupfs.cgroup_id(cgroups[""], self.v2_root)
            except OSError:
                cgid = 0
        try:
            stack = detect_process_stack(pid, self.proc_root, self.sys_root, host=self.host_stack)
        except Exception:  # metadata is best effort; the span is still forwarded
            logger.debug("stack detection failed for pid %d", pid, exc_info=True)
            stack = IsolationStack(layers=list(self.host_stack.layers) if self.host_stack else [])
        ns, pod, container = self._pod_labels(stack)
        return ProcessInfo(pid, st, cgroupfs.nspid(pid, self.proc_root), path, cgid, stack, ns, pod, container)

    def _pod_labels(self, stack: IsolationStack) -> tuple[str, str, str]:
        if self.pods is not None and (stack.container_id or stack.pod_uid):
            try:
                info = self.pods.lookup(container_id=stack.container_id, pod_uid=stack.pod_uid)
            except Exception:
                info = None
            if info is not None:
                return info.namespace, info.pod, info.container
        return "", stack.pod_uid, stack.container_id[:12]

    def forget(self, pid: int) -> None:
        """Drop what is cached about a pid (it exited or its number was reused)."""
        with self._lock:
            self._procs.pop(pid, None)
            self._checked.pop(pid, None)

    def _retire(self, pid: int) -> None:
        """A process exited: keep its facts for the grace time of the namespace index, then drop them."""
        now = time.monotonic_ns()
        grace_ns = int(self.ns.exit_grace_s * 1e9)
        with self._lock:
            info = self._procs.pop(pid, None)
            self._checked.pop(pid, None)
            if info is not None and grace_ns > 0:
                self._exited[pid] = (info, now)
                self._exited.move_to_end(pid)
            while self._exited:
                old_pid, (_info, at) = next(iter(self._exited.items()))
                if now - at <= grace_ns and len(self._exited) <= 4096:
                    break
                del self._exited[old_pid]

    # -- spans -------------------------------------------------------------------

    def _reject(self, reason: str) -> None:
        self.stats.inc("identity_rejected_total", (reason,))

    def resolve(self, identity: dict[str, Any], tid_attr: int | None, peer_pid: int, *,
                relay: bool = False) -> Workload | None:
        """Resolve one span to a workload, or None when nothing ties it to the node or its claims are refused.

        Args:
            identity: :func:`resource_identity` of the span's resource.
            tid_attr: the span's ``thread.id`` (as the sending process sees it), if any.
            peer_pid: host pid owning the sending socket (0 when unproven).
            relay: the receiver authenticated the connection as a trusted relay
                (mTLS / bearer); a peer matching ``relays`` is one too.

        Claims are checked against the proven sender (module docstring of
        :mod:`isoscope.metadata.identity`); a refused claim is counted in
        ``identity_rejected_total{reason}``. A span whose pid, container or pod
        claim disagrees with the proof is not joined (None: forwarded
        unenriched); a ``thread.id`` that is no thread of the resolved process
        only lowers the scope to the process.
        """
        claims = Claims.from_span(identity, tid_attr)
        sender = self.process(peer_pid) if peer_pid else None
        if sender is not None and not relay and self.relays.matches(peer_pid, sender.cgroup_path, self.proc_root):
            relay = True
        if relay:
            return self._resolve_relayed(claims)
        if sender is not None:
            return self._resolve_direct(sender, claims)
        if self.trust_unproven:
            return self._resolve_unproven(claims)
        if claims.pid or claims.raw_container or claims.raw_pod or claims.tid:
            self._reject("unproven_sender")
        return None

    def _process_workload(self, info: ProcessInfo, tid_claim: int) -> Workload:
        wl = Workload(scope="process", pid=info.pid, cgroup_id=info.cgroup_id, cgroup_path=info.cgroup_path,
                      namespace=info.namespace, pod=info.pod, container=info.container, stack=info.stack,
                      cgroup_ids=(info.cgroup_id,) if info.cgroup_id else ())
        if tid_claim:
            tid = self.ns.thread_of(info.pid, tid_claim)
            if not tid and len(info.nspid) <= 1 and self._thread_owner(tid_claim) == info.pid:
                # Gone from /proc before its spans were resolved, but the kernel recorded it as a
                # thread of this process (host tids: the sender lives in the root PID namespace).
                tid = tid_claim
            if tid:
                wl.scope = "thread"
                wl.tid = tid
            else:
                self._reject("thread_not_in_process")
        return wl

    @staticmethod
    def _same_workload(a: cgroupfs.CgroupInfo, b: cgroupfs.CgroupInfo) -> bool:
        if a.pod_uid or b.pod_uid:
            return a.pod_uid == b.pod_uid
        return a.container_id == b.container_id

    def _resolve_direct(self, sender: ProcessInfo, claims: Claims) -> Workload | None:
        target = sender
        if claims.pid and not (sender.nspid and sender.nspid[-1] == claims.pid):
            # process.pid is the pid as the sender's PID namespace sees it: never a host pid
            # unless the sender lives in the host's PID namespace.
            _net, pidns = self.ns.namespaces_of(sender.pid)
            host = self.ns.translate(pidns, claims.pid)
            found = self.process(host) if host else None
            if found is None:
                self._reject("pid_not_in_sender_ns")
                return None
            if not self._same_workload(cgroupfs.parse_cgroup_path(sender.cgroup_path),
                                       cgroupfs.parse_cgroup_path(found.cgroup_path)):
                self._reject("container_mismatch")
                return None
            target = found
        ident = cgroupfs.parse_cgroup_path(target.cgroup_path)
        if claims.raw_container and not container_id_matches(claims.container_id, ident.container_id):
            self._reject("container_mismatch")
            return None
        if claims.raw_pod and (not claims.pod_uid or claims.pod_uid != ident.pod_uid):
            self._reject("pod_mismatch")
            return None
        return self._process_workload(target, claims.tid)

    def _resolve_relayed(self, claims: Claims) -> Workload | None:
        cmatch = pmatch = None
        if claims.raw_container:
            cmatch = self.containers.container(claims.container_id)
            if cmatch is None and not self._vm_owner(claims):
                self._reject("unknown_container")
                return None
        if claims.raw_pod:
            pmatch = self.containers.pod(claims.pod_uid)
            if pmatch is None and not self._vm_owner(claims):
                self._reject("unknown_pod")
                return None
            if cmatch is not None and cmatch.pod_uid != claims.pod_uid:
                self._reject("pod_mismatch")
                return None
        vm_wl = self._vm_workload(claims, cmatch)
        if vm_wl is not None:
            return vm_wl
        match = cmatch or pmatch
        if match is None:
            self._reject("pid_without_workload" if claims.pid else "relay_self")
            return None
        if claims.pid:
            host = self._pid_in_cgroups(claims.pid, match.paths)
            info = self.process(host) if host else None
            if info is not None:
                return self._process_workload(info, claims.tid)
            self._reject("pid_not_in_workload")
        return self._scope_workload(match)

    def _resolve_unproven(self, claims: Claims) -> Workload | None:
        # Only with trust_unproven: a host-namespace pid, or a container/pod by exact id.
        if claims.pid:
            host = self.ns.translate(self.ns.root_pidns or self.ns.namespaces_of(1)[1], claims.pid)
            info = self.process(host) if host else None
            if info is not None:
                return self._process_workload(info, claims.tid)
        if claims.raw_container or claims.raw_pod:
            return self._resolve_relayed(Claims(0, 0, claims.container_id, claims.pod_uid,
                                                claims.raw_container, claims.raw_pod))
        return None

    def _vm_owner(self, claims: Claims) -> Any:
        if self.vms is None:
            return None
        return self.vms.vm_for_owner(claims.container_id if len(claims.container_id) == 64 else "", claims.pod_uid)

    def _vm_workload(self, claims: Claims, cmatch: ContainerMatch | None) -> Workload | None:
        if self.vms is None:
            return None
        vm = self.vms.vm_for_owner(cmatch.container_id if cmatch else "", claims.pod_uid) or self._vm_owner(claims)
        if vm is None:
            return None
        # The workload runs inside a VM (Kata, Firecracker): its time is the VMM's
        # threads' time on this host, vCPU threads included.
        from isoscope.host.vms import guest_stack
        host = self.host_stack or IsolationStack()
        return Workload(scope="process", pid=vm.pid, cgroup_path=vm.cgroup_path, stack=guest_stack(vm, host))

    def _pid_in_cgroups(self, ns_pid: int, paths: tuple[str, ...]) -> int:
        """Host pid of the process of these cgroups that sees itself as ``ns_pid`` (the pod's view)."""
        if not self.v2_root:
            return 0
        for path in paths:
            try:
                with open(os.path.join(self.v2_root, path.lstrip("/"), "cgroup.procs"), encoding="ascii") as fh:
                    pids = [int(x) for x in fh.read().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                chain = cgroupfs.nspid(pid, self.proc_root)
                if chain and chain[-1] == ns_pid:
                    return pid
        return 0

    def _scope_workload(self, match: ContainerMatch) -> Workload | None:
        """Container scope over the cgroups that hold the container's (or pod's) threads."""
        if not match.cgroup_ids or not self.v2_root:
            return None  # a pod without containers yet: nothing runs there
        if len(match.cgroup_ids) == 1:
            cgid, path = match.cgroup_ids[0], match.paths[0]
        else:
            # Several containers: the pod-level cgroup names the scope; the join needs the set
            # (scope_cgroups) since the pod cgroup itself holds no threads.
            cgid = match.pod_cgroup_id or match.cgroup_ids[0]
            path = self.containers.path(cgid) or match.paths[0]
        with self._lock:
            self._scope_sets[cgid] = match.cgroup_ids
            self._scope_sets.move_to_end(cgid)
            while len(self._scope_sets) > 10_000:
                self._scope_sets.popitem(last=False)
        info_c = cgroupfs.parse_cgroup_path(match.paths[0])
        host = self.host_stack
        stack = IsolationStack(layers=sorted(set((host.layers if host else []) + ["L-3"])),
                               runtime=info_c.runtime, hypervisor=host.hypervisor if host else "none",
                               container_id=match.container_id, pod_uid=match.pod_uid or info_c.pod_uid,
                               qos_class=info_c.qos_class, cgroup_path=path)
        ns, pod, container = self._pod_labels(stack)
        # The join looks at every cgroup holding the workload's threads (a pod's containers),
        # never at the pod-level cgroup alone, which holds none.
        return Workload(scope="container", cgroup_id=cgid, cgroup_path=path, namespace=ns, pod=pod,
                        container=container, stack=stack, cgroup_ids=tuple(match.cgroup_ids))

    def scope_cgroups(self, wl: Workload) -> tuple[int, ...]:
        """Every cgroup v2 id holding the threads of a container-scope workload (its own id otherwise).

        A pod resolves to the cgroups of all of its containers; the join must
        look at each (``Workload`` carries one ``cgroup_id``).
        """
        if not wl.cgroup_id:
            return ()
        with self._lock:
            return self._scope_sets.get(wl.cgroup_id, (wl.cgroup_id,))

    # -- lifecycle -----------------------------------------------------------------

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        """Keep the namespace and container indexes (and caches) current; call for every lifecycle event."""
        try:
            self.ns.on_lifecycle(ev)
            self.containers.on_lifecycle(ev)
            if ev.kind is LifecycleKind.EXIT and ev.pid == ev.tid:
                self._retire(ev.pid)
            elif ev.kind is LifecycleKind.CGROUP_RMDIR:
                with self._lock:
                    self._scope_sets.pop(ev.cgroup_id, None)
        except Exception:  # an index update must never break the event router
            logger.debug("lifecycle update failed for %s", ev, exc_info=True)

    # -- kernel records ----------------------------------------------------------

    def forget_cgroup(self, cgroup_id: int) -> tuple[str, str, str] | None:
        """Drop a removed cgroup's cached labels; returns them (or None if never looked up)."""
        with self._lock:
            return self._cgroup_labels.pop(cgroup_id, None)

    def cgroup_labels(self, cgroup_id: int) -> tuple[str, str, str]:
        """(namespace, pod, container) metric labels for a cgroup v2 id."""
        with self._lock:
            hit = self._cgroup_labels.get(cgroup_id)
        if hit is not None:
            return hit
        labels = ("", "", "")
        if cgroup_id and self.v2_root:
            path = cgroupfs.cgroup_path_by_id(cgroup_id, self.v2_root)
            if path:
                info = cgroupfs.parse_cgroup_path(path)
                stack = IsolationStack(container_id=info.container_id, pod_uid=info.pod_uid)
                ns, pod, container = self._pod_labels(stack)
                if not container and not pod:
                    container = path.rstrip("/").rsplit("/", 1)[-1] or "/"
                labels = (ns, pod, container)
        with self._lock:
            self._cgroup_labels[cgroup_id] = labels
            while len(self._cgroup_labels) > 10_000:
                self._cgroup_labels.popitem(last=False)
        return labels
