"""Route decoded kernel events to the components that keep them.

The probes' ring buffers deliver three kinds of domain events: stalls and
on-CPU segments go to the timeline (and stalls the kernel does not total itself
to the layer metrics); lifecycle events keep the watch set and the workload
metadata in step with the node (exits forget processes, forks of watched
processes are followed from their first instruction, new cgroups that match the
watch policy are followed before they send a span, namespace changes tell the
veth table to refresh). One router serves every probe.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Iterable, Protocol

from isoscope.host import cgroupfs
from isoscope.model import LifecycleEvent, LifecycleKind, RunSegment, Stall
from isoscope.probes.watch import WatchSet

logger = logging.getLogger(__name__)


class StallStore(Protocol):
    def add_stall(self, stall: Stall) -> None: ...

    def add_run(self, seg: RunSegment) -> None: ...


class WorkloadIndex(Protocol):
    """The metadata side: labels for metrics, and forgetting removed cgroups' labels.

    (The metadata's own indexes follow processes and namespaces as a lifecycle listener.)"""

    def forget_cgroup(self, cgroup_id: int) -> tuple[str, str, str] | None: ...

    def cgroup_labels(self, cgroup_id: int) -> tuple[str, str, str]: ...


class StallMetrics(Protocol):
    def add_stall(self, stall: Stall, namespace: str, pod: str, container: str) -> None: ...

    def forget_workload(self, namespace: str, pod: str, container: str) -> int: ...


LifecycleListener = Callable[[LifecycleEvent], None]


class CgroupWatchPolicy:
    """Which cgroups are followed from creation: configured path prefixes, and optionally every container.

    Args:
        prefixes: cgroup paths (relative to the v2 root) whose subtrees are watched.
        containers: watch every cgroup that names a container or pod.
        v2_root: the cgroup v2 mount (None on a v1-only host: nothing is watched by cgroup).
    """

    def __init__(self, prefixes: Iterable[str], containers: bool, v2_root: str | None) -> None:
        self._prefixes = tuple(p.rstrip("/") for p in prefixes)
        self._containers = containers
        self.v2_root = v2_root

    @property
    def active(self) -> bool:
        return bool(self._prefixes or self._containers) and self.v2_root is not None

    def wants(self, path: str) -> bool:
        if any(path == pre or path.startswith(pre + "/") for pre in self._prefixes):
            return True
        if self._containers:
            info = cgroupfs.parse_cgroup_path(path)
            return bool(info.container_id or info.pod_uid)
        return False

    def cgroup_id(self, path: str) -> int | None:
        """The kernel's id of a cgroup path: cgroup_mkdir fires for v1 hierarchies too, and the
        kernel's cgroup id is always the v2 directory's inode."""
        if self.v2_root is None:
            return None
        try:
            return os.stat(os.path.join(self.v2_root, path.lstrip("/"))).st_ino
        except OSError:
            return None

    def existing(self) -> Iterable[int]:
        """The ids of every cgroup present now that the policy wants."""
        if not self.active:
            return
        assert self.v2_root is not None
        for dirpath, _dirs, _files in os.walk(self.v2_root):
            rel = "/" + os.path.relpath(dirpath, self.v2_root).lstrip(".")
            if rel != "/" and self.wants(rel.rstrip("/")):
                try:
                    yield os.stat(dirpath).st_ino
                except OSError:
                    continue


class KernelEventRouter:
    """The sink every probe delivers to.

    Args:
        timeline: keeps stalls and on-CPU segments.
        workloads: workload metadata (process and cgroup caches).
        watch: the watched processes and cgroups mirrored into the probes.
        policy: which new cgroups are watched from creation.
        netns_changed: set when a namespace was created or entered (new veths are likely).
        metrics: layer metrics for stalls the kernel does not total itself (None without metrics).
        mirrored: components whose node-wide totals come from kernel maps (not counted again here).
        lifecycle_listeners: further consumers of lifecycle events (e.g. namespace indexes).
    """

    def __init__(self, timeline: StallStore, workloads: WorkloadIndex, watch: WatchSet,
                 policy: CgroupWatchPolicy, netns_changed: threading.Event, *,
                 metrics: StallMetrics | None = None, mirrored: frozenset[str] = frozenset(),
                 lifecycle_listeners: Iterable[LifecycleListener] = ()) -> None:
        self._timeline = timeline
        self._workloads = workloads
        self._watch = watch
        self._policy = policy
        self._netns_changed = netns_changed
        self._metrics = metrics
        self._mirrored = mirrored
        self._listeners = tuple(lifecycle_listeners)

    def __call__(self, ev: Stall | RunSegment | LifecycleEvent) -> None:
        if isinstance(ev, Stall):
            self._timeline.add_stall(ev)
            # Components the kernel also totals are counted from those totals (every wait, not only
            # the ones above the threshold): see metrics.kernel.
            if self._metrics is not None and ev.component not in self._mirrored:
                ns, pod, container = self._workloads.cgroup_labels(ev.cgroup_id)
                self._metrics.add_stall(ev, ns, pod, container)
        elif isinstance(ev, RunSegment):
            self._timeline.add_run(ev)
        elif isinstance(ev, LifecycleEvent):
            self._lifecycle(ev)

    def _lifecycle(self, ev: LifecycleEvent) -> None:
        watch = self._watch
        kind = ev.kind
        if kind is LifecycleKind.EXIT and ev.pid == ev.tid:
            if ev.pid in watch.tgids:
                watch.remove_tgid(ev.pid)
        elif kind in (LifecycleKind.UNSHARE, LifecycleKind.SETNS, LifecycleKind.CLONE_NS):
            self._netns_changed.set()
            if kind is LifecycleKind.CLONE_NS and ev.ppid in watch.tgids:
                watch.add_tgid(ev.pid)
        elif kind is LifecycleKind.FORK:
            # Children of a watched process are followed from their first instruction.
            if ev.ppid in watch.tgids:
                watch.add_tgid(ev.pid)
        elif kind is LifecycleKind.CGROUP_MKDIR:
            if self._policy.wants(ev.path):
                cgid = self._policy.cgroup_id(ev.path)
                if cgid is not None:
                    watch.add_cgroup(cgid)
        elif kind is LifecycleKind.CGROUP_RMDIR:
            labels = self._workloads.forget_cgroup(ev.cgroup_id)
            if labels is not None and self._metrics is not None and any(labels):
                self._metrics.forget_workload(*labels)
            if ev.cgroup_id in watch.cgroups:
                watch.remove_cgroup(ev.cgroup_id)
        for listener in self._listeners:
            try:
                listener(ev)
            except Exception:
                logger.exception("lifecycle listener failed on %s", kind.name)
