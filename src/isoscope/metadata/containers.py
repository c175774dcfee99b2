"""Cgroup id ↔ container id ↔ pod UID, from one walk of the cgroup v2 tree kept current by events.

The index answers "which cgroups hold the threads of container X / pod Y"
without walking the cgroup tree per question. It is built by one walk of the
v2 hierarchy, then maintained from the kernel's ``cgroup_mkdir`` /
``cgroup_rmdir`` lifecycle events (v2 hierarchy only). A name that is not in
the index triggers at most one rescan per ``min_rescan_s`` (events can be lost,
or the lifecycle probe may be unavailable) and is then remembered as unknown
(bounded), so a request naming thousands of unknown containers costs lookups
in a dict, not thousands of walks.

Matching rule for ``container.id``: lower-case hex, either the full id (64 hex
digits for Docker, containerd, CRI-O and Podman) or a prefix of at least
:data:`MIN_PREFIX` (12, Docker's short form) hex digits that matches exactly
one indexed container. Anything shorter, non-hex or ambiguous matches nothing.
``k8s.pod.uid`` matches exactly (case-insensitive; ``_`` as written by the
systemd cgroup driver is read as ``-``).

A container resolves to the cgroups carrying its id that hold its threads
(conmon monitor scopes excluded); a pod resolves to the cgroups of all of its
containers — the pod-level cgroup itself holds no threads.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from isoscope.host import cgroupfs
from isoscope.model import LifecycleEvent, LifecycleKind

logger = logging.getLogger(__name__)

__all__ = ["ContainerIndex", "ContainerMatch", "MIN_PREFIX", "normalize_container_id", "normalize_pod_uid"]

MIN_PREFIX = 12
"""Shortest ``container.id`` prefix that may name a container (Docker's short id)."""

_HEX = re.compile(r"[0-9a-f]{12,64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_V2_HIERARCHY = 0  # cgroup_mkdir/rmdir "root" (hierarchy id) of the v2 hierarchy
_EVENT_PATH_MAX = 127  # lifecycle records carry at most this much of the path


def normalize_container_id(claim: object) -> str:
    """A claimed ``container.id`` as lower-case hex, or ``""`` when it cannot name a container."""
    text = str(claim or "").strip().lower()
    return text if _HEX.fullmatch(text) else ""


def normalize_pod_uid(claim: object) -> str:
    """A claimed ``k8s.pod.uid`` in canonical form, or ``""`` when it is not a UUID."""
    text = str(claim or "").strip().lower().replace("_", "-")
    return text if _UUID.fullmatch(text) else ""


def container_id_matches(claim: str, actual: str) -> bool:
    """Whether a normalized claim names ``actual`` (equal, or a prefix of at least :data:`MIN_PREFIX`)."""
    return bool(claim) and bool(actual) and len(claim) >= MIN_PREFIX and actual.startswith(claim)


@dataclass(slots=True, frozen=True)
class ContainerMatch:
    """What a container or pod name resolved to.

    Attributes:
        container_id: the full container id ("" for a pod).
        pod_uid: the pod UID ("" when the container is not in a pod).
        cgroup_ids: v2 ids of the cgroups that hold the workload's threads.
        paths: their cgroup paths, same order.
        pod_cgroup_id: the pod-level cgroup's id (0 when not a pod or unknown).
    """

    container_id: str
    pod_uid: str
    cgroup_ids: tuple[int, ...]
    paths: tuple[str, ...]
    pod_cgroup_id: int = 0


class ContainerIndex:
    """Index of container and pod cgroups in the v2 hierarchy.

    Args:
        v2_root: where cgroup2 is mounted (None: the index stays empty).
        min_rescan_s: minimum interval between rescans triggered by unknown names.
        max_negative: bound on remembered unknown names.
        negative_ttl_s: how long an unknown name stays unknown without a rescan.

    Attributes:
        walks: full walks of the tree so far.
        dirs_read: cgroup directories listed so far (walks and event handling).
    """

    def __init__(self, v2_root: str | None, *, min_rescan_s: float = 5.0, max_negative: int = 8192,
                 negative_ttl_s: float = 30.0) -> None:
        self.v2_root = v2_root
        self.min_rescan_s = min_rescan_s
        self.negative_ttl_s = negative_ttl_s
        self._max_negative = max_negative
        self.walks = 0
        self.dirs_read = 0
        self._lock = threading.RLock()
        self._paths: dict[int, str] = {}                 # cgid -> path
        self._info: dict[int, cgroupfs.CgroupInfo] = {}  # cgid -> parsed identity
        self._by_container: dict[str, set[int]] = {}
        self._by_pod: dict[str, set[int]] = {}           # container cgroups of the pod
        self._pod_cgroup: dict[str, int] = {}
        self._sorted_ids: list[str] = []
        self._sorted_dirty = False
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._built = False
        self._walked_at = -1e18

    # -- building -----------------------------------------------------------------

    def rebuild(self) -> None:
        """Walk the whole v2 tree once and replace the index."""
        if not self.v2_root:
            return
        found: dict[int, str] = {}
        stack = [("", self.v2_root)]
        while stack:
            rel, absdir = stack.pop()
            self.dirs_read += 1
            try:
                entries = list(os.scandir(absdir))
            except OSError:
                continue  # removed while walking
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        child = f"{rel}/{entry.name}"
                        found[entry.inode()] = child
                        stack.append((child, entry.path))
                except OSError:
                    continue
        with self._lock:
            self._paths.clear()
            self._info.clear()
            self._by_container.clear()
            self._by_pod.clear()
            self._pod_cgroup.clear()
            for cgid, path in found.items():
                self._add(cgid, path)
            self._negative.clear()
            self._built = True
            self._walked_at = time.monotonic()
            self.walks += 1

    def _ensure(self) -> None:
        if not self._built:
            self.rebuild()

    def _add(self, cgid: int, path: str) -> None:
        info = cgroupfs.parse_cgroup_path(path)
        if not info.container_id and not info.pod_uid:
            return
        self._paths[cgid] = path
        self._info[cgid] = info
        leaf = path.rstrip("/").rsplit("/", 1)[-1]
        if info.container_id:
            if "conmon" in leaf:
                return  # the runtime's monitor, not the workload
            self._by_container.setdefault(info.container_id, set()).add(cgid)
            self._sorted_dirty = True
            if info.pod_uid:
                self._by_pod.setdefault(info.pod_uid, set()).add(cgid)
        elif info.pod_uid and "pod" in leaf:
            # The pod-level cgroup (its parent slices carry no UID).
            self._pod_cgroup[info.pod_uid] = cgid

    def _remove(self, cgid: int) -> None:
        info = self._info.pop(cgid, None)
        self._paths.pop(cgid, None)
        if info is None:
            return
        for idx, key in ((self._by_container, info.container_id), (self._by_pod, info.pod_uid)):
            members = idx.get(key)
            if members is not None:
                members.discard(cgid)
                if not members:
                    del idx[key]
                    self._sorted_dirty = True
        if info.pod_uid and self._pod_cgroup.get(info.pod_uid) == cgid:
            del self._pod_cgroup[info.pod_uid]

    def on_lifecycle(self, ev: LifecycleEvent) -> None:
        """Apply a ``cgroup_mkdir`` / ``cgroup_rmdir`` event of the v2 hierarchy."""
        if ev.flags != _V2_HIERARCHY or not ev.cgroup_id:
            return
        if ev.kind is LifecycleKind.CGROUP_RMDIR:
            with self._lock:
                self._remove(ev.cgroup_id)
        elif ev.kind is LifecycleKind.CGROUP_MKDIR and self._built:
            path = self._locate(ev.cgroup_id, ev.path)
            if path is not None:
                with self._lock:
                    self._add(ev.cgroup_id, path)
                    self._negative.clear()  # a new container may be one asked about before

    def _locate(self, cgid: int, hint: str) -> str | None:
        """Full path of a new cgroup: the event's path, or (truncated) a bounded search below its complete part."""
        if not self.v2_root or not hint.startswith("/"):
            return None
        if len(hint) < _EVENT_PATH_MAX:
            try:
                if os.stat(os.path.join(self.v2_root, hint.lstrip("/"))).st_ino == cgid:
                    return hint
            except OSError:
                return None
        # Truncated: every component before the last "/" is complete. The new cgroup is
        # a few levels below it at most (pod slice, container scope).
        base = hint.rsplit("/", 1)[0]
        prefix = hint
        frontier = [base]
        for _depth in range(4):
            nxt: list[str] = []
            for rel in frontier:
                self.dirs_read += 1
                try:
                    entries = list(os.scandir(os.path.join(self.v2_root, rel.lstrip("/"))))
                except OSError:
                    continue
                for entry in entries:
                    child = f"{rel}/{entry.name}"
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        if entry.inode() == cgid:
                            return child
                    except OSError:
                        continue
                    # Only descend along the truncated path's known characters.
                    if child.startswith(prefix) or prefix.startswith(child):
                        nxt.append(child)
            frontier = nxt
            if not frontier:
                break
        return None

    # -- queries ------------------------------------------------------------------

    def _maybe_rescan(self) -> bool:
        with self._lock:
            if time.monotonic() - self._walked_at < self.min_rescan_s:
                return False
        self.rebuild()
        return True

    def _negative_hit(self, key: str) -> bool:
        with self._lock:
            at = self._negative.get(key)
            return at is not None and time.monotonic() - at < self.negative_ttl_s

    def _remember_unknown(self, key: str) -> None:
        with self._lock:
            self._negative[key] = time.monotonic()
            self._negative.move_to_end(key)
            while len(self._negative) > self._max_negative:
                self._negative.popitem(last=False)

    def _container_ids_with_prefix(self, prefix: str) -> list[str]:
        if self._sorted_dirty:
            self._sorted_ids = sorted(self._by_container)
            self._sorted_dirty = False
        i = bisect.bisect_left(self._sorted_ids, prefix)
        out = []
        while i < len(self._sorted_ids) and self._sorted_ids[i].startswith(prefix) and len(out) < 2:
            out.append(self._sorted_ids[i])
            i += 1
        return out

    def _container_once(self, cid: str) -> ContainerMatch | None:
        with self._lock:
            ids = [cid] if cid in self._by_container else self._container_ids_with_prefix(cid)
            if len(ids) != 1:
                return None
            full = ids[0]
            cgids = tuple(sorted(self._by_container[full]))
            pod = next((self._info[c].pod_uid for c in cgids if self._info[c].pod_uid), "")
            return ContainerMatch(full, pod, cgids, tuple(self._paths[c] for c in cgids),
                                  self._pod_cgroup.get(pod, 0) if pod else 0)

    def container(self, claim: object) -> ContainerMatch | None:
        """The container a ``container.id`` names (see the module's matching rule), or None."""
        cid = normalize_container_id(claim)
        if not cid or not self.v2_root:
            return None
        self._ensure()
        hit = self._container_once(cid)
        if hit is not None:
            return hit
        key = "c:" + cid
        if self._negative_hit(key):
            return None
        if self._maybe_rescan():
            hit = self._container_once(cid)
            if hit is not None:
                return hit
        self._remember_unknown(key)
        return None

    def _pod_once(self, uid: str) -> ContainerMatch | None:
        with self._lock:
            cgids = tuple(sorted(self._by_pod.get(uid, ())))
            pod_cg = self._pod_cgroup.get(uid, 0)
            if not cgids and not pod_cg:
                return None
            return ContainerMatch("", uid, cgids, tuple(self._paths[c] for c in cgids), pod_cg)

    def pod(self, claim: object) -> ContainerMatch | None:
        """The pod a ``k8s.pod.uid`` names: every container cgroup of it, or None."""
        uid = normalize_pod_uid(claim)
        if not uid or not self.v2_root:
            return None
        self._ensure()
        hit = self._pod_once(uid)
        if hit is not None:
            return hit
        key = "p:" + uid
        if self._negative_hit(key):
            return None
        if self._maybe_rescan():
            hit = self._pod_once(uid)
            if hit is not None:
                return hit
        self._remember_unknown(key)
        return None

    def path(self, cgid: int) -> str | None:
        """Indexed path of a container or pod cgroup id."""
        with self._lock:
            return self._paths.get(cgid)

    def size(self) -> dict[str, int]:
        """Counts for ``/debug/status``."""
        with self._lock:
            return {"containers": len(self._by_container), "pods": len(self._by_pod) + len(
                set(self._pod_cgroup) - set(self._by_pod)), "negative": len(self._negative), "walks": self.walks}
