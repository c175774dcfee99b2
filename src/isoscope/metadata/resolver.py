"""Who sent a span, and who a kernel record belongs to.

Resolution for spans, finest first (DESIGN §4 ``isolation.scope``):
``thread.id`` (OS tid) → ``process.pid`` (translated from the container's PID
namespace through ``NSpid``) → ``container.id`` / ``k8s.pod.uid`` → the
sending connection's peer (the loopback socket's owner).

Per-process facts (host pid, cgroup, isolation stack) are cached and keyed by
the process start time, so a reused PID never inherits a dead process's
metadata.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from isoscope.host import cgroupfs
from isoscope.model import IsolationStack, Workload
from isoscope.host.stack import detect_process_stack

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
    """

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys", host_stack: IsolationStack | None = None,
                 pods: Any = None, max_processes: int = 20_000, vms: Any = None) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.host_stack = host_stack
        self.pods = pods
        self.vms = vms
        self.v2_root = cgroupfs.cgroup_v2_root(proc_root)
        self._lock = threading.Lock()
        self._procs: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._max = max_processes
        self._tid_map: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._cgroup_labels: OrderedDict[int, tuple[str, str, str]] = OrderedDict()

    # -- processes -------------------------------------------------------------

    def process(self, pid: int) -> ProcessInfo | None:
        """Facts about a host pid, cached while the same process lives."""
        st = _starttime(pid, self.proc_root)
        if st is None:
            self.forget(pid)
            return None
        with self._lock:
            info = self._procs.get(pid)
            if info is not None and info.starttime == st:
                self._procs.move_to_end(pid)
                return info
        info = self._load(pid, st)
        if info is None:
            return None
        with self._lock:
            self._procs[pid] = info
            while len(self._procs) > self._max:
                self._procs.popitem(last=False)
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
        """Drop what is cached about a pid (it exited)."""
        with self._lock:
            self._procs.pop(pid, None)

    # -- spans -------------------------------------------------------------------

    def _host_pid(self, pid_attr: int | None, peer_pid: int) -> int:
        if peer_pid:
            chain = cgroupfs.nspid(peer_pid, self.proc_root)
            if not pid_attr or (chain and chain[-1] == pid_attr):
                return peer_pid
            # The sender is another process (an agent or a collector forwarding
            # for others): look for pid_attr in the peer's PID namespace.
            found = cgroupfs.host_pid_from_ns(pid_attr, peer_pid, self.proc_root)
            if found:
                return found
        if pid_attr:
            chain = cgroupfs.nspid(pid_attr, self.proc_root)
            if len(chain) == 1:  # a process of the host PID namespace: its pid is the host pid
                return pid_attr
        return 0

    def _host_tid(self, host_pid: int, tid_attr: int, nspid_chain: list[int]) -> int:
        if len(nspid_chain) <= 1:
            # A process of the host PID namespace reports host tids. The thread may
            # already be gone (thread-per-request servers): its stalls are still in
            # the timeline, so the tid is used as is.
            return tid_attr
        key = (host_pid, tid_attr)
        with self._lock:
            hit = self._tid_map.get(key)
        if hit is not None:
            return hit
        found = 0
        try:
            for t in os.listdir(f"{self.proc_root}/{host_pid}/task"):
                chain = cgroupfs.nspid(f"{host_pid}/task/{t}", self.proc_root)
                if chain and chain[-1] == tid_attr:
                    found = int(t)
                    break
        except OSError:
            return 0
        with self._lock:
            self._tid_map[key] = found
            while len(self._tid_map) > 50_000:
                self._tid_map.popitem(last=False)
        return found

    def resolve(self, identity: dict[str, Any], tid_attr: int | None, peer_pid: int) -> Workload | None:
        """Resolve one span to a workload, or None when nothing ties it to the node."""
        pid_attr = identity.get("process.pid")
        try:
            pid_attr = int(pid_attr) if pid_attr is not None else None
        except (TypeError, ValueError):
            pid_attr = None
        host_pid = self._host_pid(pid_attr, peer_pid)
        info = self.process(host_pid) if host_pid else None
        if info is not None:
            wl = Workload(scope="process", pid=host_pid, cgroup_id=info.cgroup_id, cgroup_path=info.cgroup_path,
                          namespace=info.namespace, pod=info.pod, container=info.container, stack=info.stack)
            if tid_attr:
                tid = self._host_tid(host_pid, int(tid_attr), info.nspid)
                if tid:
                    wl.scope = "thread"
                    wl.tid = tid
            return wl
        container_id = str(identity.get("container.id") or "")
        pod_uid = str(identity.get("k8s.pod.uid") or "")
        vm = self.vms.vm_for_owner(container_id, pod_uid) if self.vms is not None else None
        if vm is not None:
            # The workload runs inside a VM (Kata, Firecracker): its time is the VMM's
            # threads' time on this host, vCPU threads included.
            from isoscope.host.vms import guest_stack
            host = self.host_stack or IsolationStack()
            return Workload(scope="process", pid=vm.pid, cgroup_path=vm.cgroup_path, stack=guest_stack(vm, host))
        if container_id or pod_uid:
            path = self._find_cgroup(container_id or pod_uid)
            if path is not None and self.v2_root:
                try:
                    cgid = cgroupfs.cgroup_id(path, self.v2_root)
                except OSError:
                    return None
                info_c = cgroupfs.parse_cgroup_path(path)
                stack = IsolationStack(layers=sorted(set((self.host_stack.layers if self.host_stack else [])
                                                         + ["L-3"])),
                                       runtime=info_c.runtime,
                                       hypervisor=self.host_stack.hypervisor if self.host_stack else "none",
                                       container_id=info_c.container_id, pod_uid=info_c.pod_uid,
                                       qos_class=info_c.qos_class, cgroup_path=path)
                ns, pod, container = self._pod_labels(stack)
                return Workload(scope="container", cgroup_id=cgid, cgroup_path=path, namespace=ns, pod=pod,
                                container=container, stack=stack)
        return None

    def _find_cgroup(self, ident: str) -> str | None:
        if not self.v2_root:
            return None
        # The systemd cgroup driver writes pod UIDs with "_" instead of "-".
        needles = {ident, ident.replace("-", "_")}
        best = None
        for dirpath, dirnames, _files in os.walk(self.v2_root):
            base = os.path.basename(dirpath)
            if any(n in base for n in needles):
                rel = "/" + os.path.relpath(dirpath, self.v2_root)
                if best is None or len(rel) < len(best):
                    best = rel
                dirnames[:] = []
        return best

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
