"""Create, limit, populate and remove real cgroups (the truth lab's containers and the tests' workloads).

:mod:`isoscope.host.cgroupfs` reads cgroups the daemon finds; this module makes
them. A cgroup here lives in the v2 hierarchy (which gives the kernel a distinct
cgroup id, ``bpf_get_current_cgroup_id``) and, on a hybrid machine, in the v1
hierarchies of the controllers it limits. CPU quota and memory limit go to the
v1 controller when the cgroup is placed there, otherwise to v2 ``cpu.max`` /
``memory.max`` (enabling the controller in every ancestor's
``cgroup.subtree_control``). Requires root.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

__all__ = ["V1_ROOT", "CgroupDirs", "read_procs", "remove_dir", "write_value"]

V1_ROOT = "/sys/fs/cgroup"


def write_value(path: str, value: str) -> None:
    """Write one control-file value (``cgroup.procs``, ``cpu.max`` …)."""
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def read_procs(directory: str) -> list[int]:
    """Pids in a cgroup directory's ``cgroup.procs`` (empty when it is gone)."""
    try:
        with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def _subdirs(directory: str) -> list[str]:
    try:
        return [e for e in os.listdir(directory) if os.path.isdir(os.path.join(directory, e))]
    except OSError:
        return []


def remove_dir(directory: str, attempts: int = 100) -> None:
    """Remove a cgroup directory, retrying while its last processes leave.

    Killed processes leave their cgroup asynchronously (EBUSY for a moment). A
    directory that still has child cgroups belongs, below, to someone else (a
    shared parent of concurrent labs or tests) and is left to its last owner.
    """
    for _ in range(attempts):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                logger.warning("rmdir %s: %s", directory, exc)
                return
            if _subdirs(directory):
                return
            time.sleep(0.02)
    logger.warning("cgroup %s still busy, left in place", directory)


class CgroupDirs:
    """One cgroup's directories in the v2 hierarchy and in some v1 hierarchies, created on construction.

    Attributes:
        name: path relative to each hierarchy root, without leading ``/``.
        path: the cgroup path as ``/proc/<pid>/cgroup`` prints it (``"/" + name``).
        v2_root: the v2 mount (None: not placed in v2).
        v2_path: absolute directory in the v2 hierarchy, or ``""``.
        v1_paths: v1 controller → absolute directory.

    Args:
        name: the cgroup path below each root.
        v2_root: the v2 mount, or None.
        v1_controllers: v1 controllers to place it in (their hierarchies must be mounted).
        v1_root: where the v1 hierarchies are mounted.
    """

    def __init__(self, name: str, v2_root: str | None, v1_controllers: tuple[str, ...] | list[str] = (),
                 v1_root: str = V1_ROOT) -> None:
        self.name = name.strip("/")
        self.path = "/" + self.name
        self.v2_root = v2_root
        self.v1_root = v1_root
        self.v2_path = os.path.join(v2_root, self.name) if v2_root else ""
        self.v1_paths: Mapping[str, str] = {c: os.path.join(v1_root, c, self.name) for c in v1_controllers}
        self._created: list[str] = []  # directories made here, parents first
        for directory in self.dirs():
            self._mkdirs(directory)

    def dirs(self) -> list[str]:
        """Every directory of this cgroup (v2 first)."""
        return ([self.v2_path] if self.v2_path else []) + list(self.v1_paths.values())

    def _mkdirs(self, directory: str) -> None:
        # Parents can be shared with concurrent labs or tests (kubepods.slice); a
        # parent removed under us between the check and mkdir is made again.
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            for attempt in range(5):
                try:
                    os.mkdir(d)
                    self._created.append(d)
                    break
                except FileExistsError:
                    break
                except FileNotFoundError:
                    if attempt == 4:
                        raise
                    os.makedirs(os.path.dirname(d), exist_ok=True)

    def remove_created(self) -> None:
        """Remove the directories this object made, deepest first."""
        for d in reversed(self._created):
            remove_dir(d)

    @property
    def id(self) -> int:
        """The v2 cgroup id: inode number of the v2 directory (``bpf_get_current_cgroup_id``)."""
        if not self.v2_path:
            raise ValueError(f"{self.path} is not in the v2 hierarchy")
        return os.stat(self.v2_path).st_ino

    @property
    def cpu_dir(self) -> str:
        """Directory holding this cgroup's ``cpu.stat`` with throttling counters."""
        return self.v1_paths.get("cpu", self.v2_path)

    def set_cpu_quota(self, quota_us: int | None, period_us: int = 100_000) -> None:
        """CFS bandwidth limit: ``quota_us`` of CPU time per ``period_us`` (None = unlimited)."""
        if "cpu" in self.v1_paths:
            write_value(os.path.join(self.v1_paths["cpu"], "cpu.cfs_period_us"), str(period_us))
            write_value(os.path.join(self.v1_paths["cpu"], "cpu.cfs_quota_us"),
                        str(-1 if quota_us is None else quota_us))
            return
        self._enable_v2_controller("cpu")
        write_value(os.path.join(self.v2_path, "cpu.max"), f"{'max' if quota_us is None else quota_us} {period_us}")

    def set_memory_limit(self, limit_bytes: int | None) -> None:
        """Hard memory limit (None = unlimited)."""
        if "memory" in self.v1_paths:
            write_value(os.path.join(self.v1_paths["memory"], "memory.limit_in_bytes"),
                        str(-1 if limit_bytes is None else limit_bytes))
            return
        self._enable_v2_controller("memory")
        write_value(os.path.join(self.v2_path, "memory.max"), "max" if limit_bytes is None else str(limit_bytes))

    def _enable_v2_controller(self, controller: str) -> None:
        if not self.v2_path or not self.v2_root:
            raise RuntimeError(f"no v2 placement for {self.path} to set {controller} on")
        with open(os.path.join(self.v2_root, "cgroup.controllers"), encoding="utf-8") as fh:
            if controller not in fh.read().split():
                raise RuntimeError(f"v2 controller {controller} not available in {self.v2_root}")
        parts = self.name.split("/")
        for i in range(len(parts)):
            write_value(os.path.join(self.v2_root, *parts[:i], "cgroup.subtree_control"), f"+{controller}")

    def enter_fn(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into every hierarchy before it execs.

        So even a short-lived program is never observed outside the cgroup.
        """
        targets = [os.path.join(d, "cgroup.procs") for d in self.dirs()]

        def enter() -> None:
            for t in targets:
                with open(t, "w", encoding="ascii") as fh:
                    fh.write("0")  # "0" = the writing process itself

        return enter

    def pids(self) -> list[int]:
        """Pids currently in the cgroup (v2 if placed there, else the first v1 hierarchy)."""
        return read_procs(self.v2_path or next(iter(self.v1_paths.values())))
