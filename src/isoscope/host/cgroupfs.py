"""Read-only helpers over cgroupfs and procfs.

Everything here takes the ``/proc`` root or the cgroup root as a parameter so
the same code runs against the live system, against a host filesystem mounted
into a container (``/host/proc``), and against fixture trees in tests.

Cgroup paths are the strings the kernel prints in ``/proc/<pid>/cgroup``: they
start with ``/`` and are relative to the root of their hierarchy. Container
runtimes encode their identity in those paths; :func:`parse_cgroup_path`
recognises the layouts written by Docker, containerd (incl. nerdctl and the
Kubernetes CRI plugin), CRI-O, Podman and systemd, with both the ``systemd`` and
the ``cgroupfs`` cgroup drivers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "CgroupInfo",
    "CgroupIdCache",
    "parse_cgroup_path",
    "read_proc_cgroups",
    "cgroup_v2_root",
    "cgroup_id",
    "cgroup_path_by_id",
    "read_cpu_stat",
    "read_cpu_quota",
    "ns_inodes",
    "nspid",
    "read_status_field",
]


# ---------------------------------------------------------------------------
# Cgroup path → runtime / container / pod
# ---------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class CgroupInfo:
    """Identity decoded from one cgroup path.

    Attributes:
        path: the cgroup path that was parsed.
        runtime: ``docker``, ``containerd``, ``cri-o``, ``podman``, ``systemd``
            (a plain systemd unit) or ``none``.
        container_id: the container id (hex) or ``""``.
        pod_uid: the Kubernetes pod UID with dashes, or ``""``.
        qos_class: ``guaranteed``, ``burstable``, ``besteffort`` or ``""``.
    """

    path: str
    runtime: str = "none"
    container_id: str = ""
    pod_uid: str = ""
    qos_class: str = ""


# Systemd-driver scope names: "<prefix>-<id>.scope". The conmon scopes of CRI-O
# and Podman hold the container monitor, not the workload, but belong to the
# same container, so they resolve to the same id.
_SCOPE_RUNTIMES: tuple[tuple[str, str], ...] = (
    ("cri-containerd-", "containerd"),
    ("crio-conmon-", "cri-o"),
    ("crio-", "cri-o"),
    ("libpod-conmon-", "podman"),
    ("libpod-", "podman"),
    ("docker-", "docker"),
    ("nerdctl-", "containerd"),
    ("containerd-", "containerd"),
)
_HEX_ID = re.compile(r"[0-9a-f]{12,64}")
_FULL_ID = re.compile(r"[0-9a-f]{64}")
# Pod UIDs are RFC 4122 UUIDs; the systemd driver writes them with "_" since
# "-" is the slice hierarchy separator in unit names.
_POD_UID = re.compile(r"pod([0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12})")
_QOS = ("burstable", "besteffort")


def _scope_component(component: str) -> tuple[str, str] | None:
    """``docker-<id>.scope`` → ``("docker", id)``; also ``crio-<id>`` (cgroupfs CRI-O)."""
    name = component[:-len(".scope")] if component.endswith(".scope") else component
    for prefix, runtime in _SCOPE_RUNTIMES:
        if name.startswith(prefix):
            ident = name[len(prefix):]
            if _HEX_ID.fullmatch(ident):
                return runtime, ident
    return None


def parse_cgroup_path(path: str) -> CgroupInfo:
    """Decode runtime, container id, pod UID and QoS class from a cgroup path.

    Recognised layouts (``<id>`` is the hex container id, ``<uid>`` the pod UID)::

        /system.slice/docker-<id>.scope                    Docker, systemd driver
        /docker/<id>                                       Docker, cgroupfs driver
        /kubepods.slice/kubepods-burstable.slice/
            kubepods-burstable-pod<uid_with_underscores>.slice/
            cri-containerd-<id>.scope                      containerd, systemd driver
            (also containerd-<id>.scope)
        /kubepods/besteffort/pod<uid>/<id>                 containerd, cgroupfs driver
        /kubepods/pod<uid>/crio-<id>                       CRI-O, cgroupfs (guaranteed QoS)
        /.../crio-<id>.scope, crio-conmon-<id>.scope       CRI-O
        /machine.slice/libpod-<id>.scope[/container]       Podman (also libpod-conmon-)
        /libpod_parent/libpod-<id>                         Podman, cgroupfs driver
        /system.slice/nginx.service                        plain systemd unit

    A pod directly under ``kubepods`` (no ``burstable``/``besteffort`` level) is
    in the Guaranteed QoS class.

    Args:
        path: a cgroup path as printed in ``/proc/<pid>/cgroup``.

    Returns:
        The decoded identity; ``runtime == "none"`` when nothing is recognised.
    """
    parts = [p for p in path.split("/") if p]
    runtime = "none"
    container_id = ""
    pod_uid = ""
    qos = ""
    in_kubepods = False
    unit = ""

    for i, comp in enumerate(parts):
        name = comp.removesuffix(".slice")
        if name == "kubepods" or name.startswith("kubepods-") or (comp == "kubepods"):
            in_kubepods = True
            # Systemd driver: "kubepods-burstable" / "kubepods-burstable-pod<uid>";
            # cgroupfs driver: "kubepods" then "burstable" as the next component.
            for q in _QOS:
                if name.startswith(f"kubepods-{q}"):
                    qos = q
        elif in_kubepods and comp in _QOS and not pod_uid:
            qos = comp
        m = _POD_UID.search(comp) if in_kubepods else None
        if m and not pod_uid:
            pod_uid = m.group(1).replace("_", "-").lower()
            if not qos:
                qos = "guaranteed"
            continue

        scoped = _scope_component(comp)
        if scoped:
            runtime, container_id = scoped
            continue
        if not container_id and _FULL_ID.fullmatch(comp):
            parent = parts[i - 1] if i else ""
            if parent == "docker":
                runtime, container_id = "docker", comp
            elif pod_uid:
                # cgroupfs driver under a pod: containerd writes the bare id
                # (CRI-O writes "crio-<id>", handled above).
                runtime, container_id = "containerd", comp
            elif parent in ("libpod_parent",):
                runtime, container_id = "podman", comp
            continue
        if comp.endswith(".service") and not container_id:
            unit = comp

    if runtime == "none" and unit and not pod_uid:
        runtime = "systemd"
    return CgroupInfo(path=path, runtime=runtime, container_id=container_id,
                      pod_uid=pod_uid, qos_class=qos if pod_uid else "")


# ---------------------------------------------------------------------------
# /proc/<pid>/cgroup and the v2 mount
# ---------------------------------------------------------------------------

def read_proc_cgroups(pid: int | str, proc_root: str = "/proc") -> dict[str, str]:
    """Cgroup membership of a process.

    Args:
        pid: process id (or ``"self"``).
        proc_root: procfs root.

    Returns:
        Controller name → cgroup path. The v2 (unified) hierarchy is under the
        key ``""``; named v1 hierarchies keep their ``name=`` prefix (e.g.
        ``"name=systemd"``); co-mounted controllers (``cpu,cpuacct``) get one
        entry each. Empty if the process is gone.
    """
    out: dict[str, str] = {}
    try:
        with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        hier, sep, rest = line.partition(":")
        controllers, sep2, cg_path = rest.partition(":")
        if not sep or not sep2:
            continue
        if hier == "0" and controllers == "":
            out[""] = cg_path
            continue
        for ctrl in controllers.split(","):
            out[ctrl] = cg_path
    return out


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_v2_root(proc_root: str = "/proc") -> str | None:
    """Where the cgroup v2 hierarchy is mounted, from ``<proc_root>/self/mountinfo``.

    Returns:
        ``/sys/fs/cgroup`` on a pure-v2 system, ``/sys/fs/cgroup/unified`` on a
        hybrid one, ``None`` if no cgroup2 filesystem is mounted. When several
        are mounted, the one exposing the hierarchy root (``/``) and the shortest
        mount point wins.
    """
    candidates: list[tuple[int, int, str]] = []
    try:
        with open(os.path.join(proc_root, "self", "mountinfo"), encoding="utf-8") as fh:
            for line in fh:
                pre, sep, post = line.partition(" - ")
                if not sep:
                    continue
                if post.split(" ", 1)[0] != "cgroup2":
                    continue
                fields = pre.split(" ")
                if len(fields) < 5:
                    continue
                root, mount_point = _unescape_mount(fields[3]), _unescape_mount(fields[4])
                candidates.append((0 if root == "/" else 1, len(mount_point), mount_point))
    except OSError:
        return None
    if not candidates:
        return None
    return min(candidates)[2]


def _v2_dir(path: str, v2_root: str) -> str:
    return os.path.join(v2_root, path.lstrip("/"))


def cgroup_id(path: str, v2_root: str) -> int:
    """The cgroup v2 id of a cgroup path.

    The id ``bpf_get_current_cgroup_id()`` returns is the kernfs node id, which
    is also the inode number of the cgroup's directory in cgroupfs.

    Args:
        path: cgroup path (``/`` for the root).
        v2_root: where cgroup2 is mounted.

    Raises:
        OSError: the cgroup does not exist.
    """
    return os.stat(_v2_dir(path, v2_root)).st_ino


class CgroupIdCache:
    """Resolve cgroup v2 ids back to paths, walking the hierarchy on a miss.

    Kernfs ids are 64-bit and never reused while the system runs, so a cached
    id → path mapping only goes stale when the cgroup is removed; a hit is
    therefore checked against the directory's current inode. Ids that could
    not be found are remembered for ``negative_ttl_s`` so that a stream of
    lookups for a vanished cgroup does not turn into a stream of full walks.

    Args:
        v2_root: where cgroup2 is mounted.
        negative_ttl_s: how long a missing id is not searched for again.
        max_dirs: bound on directories visited per walk.
    """

    def __init__(self, v2_root: str, negative_ttl_s: float = 1.0, max_dirs: int = 200_000) -> None:
        self.v2_root = v2_root
        self.negative_ttl_s = negative_ttl_s
        self.max_dirs = max_dirs
        self._lock = threading.Lock()
        self._by_id: dict[int, str] = {}
        self._missing: dict[int, float] = {}

    def lookup(self, cgid: int) -> str | None:
        """Cgroup path (``/a/b``) for a v2 id, or ``None`` if no such cgroup exists."""
        with self._lock:
            path = self._by_id.get(cgid)
            if path is not None and self._still_valid(cgid, path):
                return path
            now = time.monotonic()
            miss_at = self._missing.get(cgid)
            if miss_at is not None and now - miss_at < self.negative_ttl_s:
                return None
            self._by_id = self._walk()
            path = self._by_id.get(cgid)
            if path is None:
                if len(self._missing) > 4096:
                    self._missing.clear()
                self._missing[cgid] = now
            else:
                self._missing.pop(cgid, None)
            return path

    def _still_valid(self, cgid: int, path: str) -> bool:
        try:
            return os.stat(_v2_dir(path, self.v2_root)).st_ino == cgid
        except OSError:
            return False

    def _walk(self) -> dict[int, str]:
        out: dict[int, str] = {}
        try:
            out[os.stat(self.v2_root).st_ino] = "/"
        except OSError:
            return out
        stack = [("", self.v2_root)]
        visited = 0
        while stack and visited < self.max_dirs:
            rel, absdir = stack.pop()
            visited += 1
            try:
                entries = list(os.scandir(absdir))
            except OSError:
                continue  # removed while walking
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    child_rel = f"{rel}/{entry.name}"
                    out[entry.inode()] = child_rel
                    stack.append((child_rel, entry.path))
                except OSError:
                    continue
        if stack:
            logger.warning("cgroup walk of %s stopped after %d directories", self.v2_root, visited)
        return out


_caches: dict[str, CgroupIdCache] = {}
_caches_lock = threading.Lock()


def cgroup_path_by_id(cgid: int, v2_root: str) -> str | None:
    """Cgroup path for a v2 cgroup id (inverse of :func:`cgroup_id`).

    Uses one shared :class:`CgroupIdCache` per ``v2_root``.

    Returns:
        The path (``/`` for the root) or ``None`` if no live cgroup has that id.
    """
    with _caches_lock:
        cache = _caches.get(v2_root)
        if cache is None:
            cache = _caches[v2_root] = CgroupIdCache(v2_root)
    return cache.lookup(cgid)


# ---------------------------------------------------------------------------
# CPU controller files
# ---------------------------------------------------------------------------

def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.strip().partition(" ")
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def read_cpu_stat(cgroup_path: str, root: str | None = None) -> dict[str, int]:
    """CFS bandwidth statistics of a cgroup, normalised to nanoseconds.

    Reads ``cpu.stat`` in either format: v2 (``throttled_usec``,
    ``usage_usec``) or v1 cpu controller (``throttled_time`` in ns).

    Args:
        cgroup_path: the cgroup's directory, or a cgroup path when ``root`` is given.
        root: hierarchy mount point (v2 root or the v1 ``cpu`` mount) to join with.

    Returns:
        ``nr_periods``, ``nr_throttled``, ``throttled_ns`` (0 when the cgroup has
        no bandwidth control), plus ``usage_ns`` / ``user_ns`` / ``system_ns`` on v2
        and ``nr_bursts`` / ``burst_ns`` where the kernel reports them.

    Raises:
        OSError: no ``cpu.stat`` in that cgroup.
    """
    directory = os.path.join(root, cgroup_path.lstrip("/")) if root is not None else cgroup_path
    raw = _read_kv(os.path.join(directory, "cpu.stat"))
    out = {
        "nr_periods": raw.get("nr_periods", 0),
        "nr_throttled": raw.get("nr_throttled", 0),
        "throttled_ns": 0,
    }
    if "throttled_usec" in raw:
        out["throttled_ns"] = raw["throttled_usec"] * 1000
    elif "throttled_time" in raw:
        out["throttled_ns"] = raw["throttled_time"]
    for usec_key, ns_key in (("usage_usec", "usage_ns"), ("user_usec", "user_ns"),
                             ("system_usec", "system_ns"), ("burst_usec", "burst_ns")):
        if usec_key in raw:
            out[ns_key] = raw[usec_key] * 1000
    if "burst_time" in raw:
        out["burst_ns"] = raw["burst_time"]
    if "nr_bursts" in raw:
        out["nr_bursts"] = raw["nr_bursts"]
    return out


def read_cpu_quota(cgroup_dir: str) -> tuple[int | None, int]:
    """CFS quota of a cgroup directory: v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``.

    Returns:
        ``(quota_us, period_us)``; ``quota_us`` is ``None`` when unlimited.

    Raises:
        OSError: the directory has neither file.
    """
    try:
        with open(os.path.join(cgroup_dir, "cpu.max"), encoding="utf-8") as fh:
            fields = fh.read().split()
        quota, period = fields[0], fields[1] if len(fields) > 1 else "100000"
    except FileNotFoundError:
        with open(os.path.join(cgroup_dir, "cpu.cfs_quota_us"), encoding="utf-8") as fh:
            q = int(fh.read().strip())
        with open(os.path.join(cgroup_dir, "cpu.cfs_period_us"), encoding="utf-8") as fh:
            p = int(fh.read().strip())
        return (None if q < 0 else q), p
    return (None if quota == "max" else int(quota)), int(period)


# ---------------------------------------------------------------------------
# Namespaces
# ---------------------------------------------------------------------------

_NS_LINK = re.compile(r"^[a-z_]+:\[(\d+)\]$")


def ns_inodes(pid: int | str, proc_root: str = "/proc") -> dict[str, int]:
    """Namespace inode numbers of a process.

    Args:
        pid: process id (or ``"self"``).
        proc_root: procfs root.

    Returns:
        Namespace kind (``net``, ``pid``, ``pid_for_children``, ``mnt`` …) →
        inode, from the ``/proc/<pid>/ns/*`` links (``net:[4026531840]``).
        Links that cannot be read (process gone, no ptrace access) are omitted.
    """
    out: dict[str, int] = {}
    ns_dir = os.path.join(proc_root, str(pid), "ns")
    try:
        names = os.listdir(ns_dir)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(os.path.join(ns_dir, name))
        except OSError:
            continue
        m = _NS_LINK.match(target)
        if m:
            out[name] = int(m.group(1))
    return out


def read_status_field(pid: int | str, field_name: str, proc_root: str) -> str | None:
    """One field of ``/proc/<pid>/status`` (e.g. ``"NSpid"``, ``"Seccomp"``), stripped.

    Returns:
        The value, or ``None`` if the process or the field does not exist.
    """
    try:
        with open(os.path.join(proc_root, str(pid), "status"), encoding="utf-8") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key == field_name:
                    return value.strip()
    except OSError:
        return None
    return None


def nspid(pid: int | str, proc_root: str = "/proc") -> list[int]:
    """The ``NSpid`` line of ``/proc/<pid>/status``.

    Returns:
        The process's pid in each PID namespace, outermost (the one ``proc_root``
        belongs to) first, its own namespace last. Empty if the process is gone.
    """
    value = read_status_field(pid, "NSpid", proc_root)
    if not value:
        return []
    try:
        return [int(x) for x in value.split()]
    except ValueError:
        return []
