"""Real cgroups for tests: create, populate with real processes, remove.

Usage::

    from tests.cgroup_helpers import make_cgroup

    with make_cgroup("system.slice/docker-<id>.scope", v1_controllers=("cpu",),
                     cpu_quota_us=20_000) as cg:
        proc = cg.spawn(["sleep", "5"])      # starts inside the cgroup
        cg.id                               # v2 cgroup id (inode of cg.v2_path)
        cg.add(other_pid)                   # move an existing process in
    # on exit: processes spawned here are killed, added ones moved back to the
    # root, and every directory this helper created is removed.

or as a pytest fixture (register it in a test module or conftest with
``from tests.cgroup_helpers import cgroup_factory``)::

    def test_x(cgroup_factory):
        cg = cgroup_factory("kubepods/besteffort/pod<uid>/<id>")

The v2 hierarchy is found from ``/proc/self/mountinfo`` (``/sys/fs/cgroup`` on
pure-v2 machines, ``/sys/fs/cgroup/unified`` on hybrid ones). CPU quota and
memory limit go to the v1 controllers named in ``v1_controllers`` when those are
mounted, otherwise to v2 (``cpu.max`` / ``memory.max``, enabling the controller
in every ancestor's ``cgroup.subtree_control``). Requires root.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from isoscope_lab.cgroupctl import V1_ROOT, CgroupDirs, read_procs, write_value
from isoscope.host.cgroupfs import cgroup_v2_root, read_proc_cgroups

logger = logging.getLogger(__name__)


class Cgroup(CgroupDirs):
    """One test cgroup, present in the v2 hierarchy and in selected v1 hierarchies.

    Attributes:
        procs: processes started with :meth:`spawn` (killed on :meth:`remove`).
        (and those of :class:`isoscope_lab.cgroupctl.CgroupDirs`)
    """

    def __init__(self, name: str, v2_root: str | None, v1_controllers: Sequence[str],
                 v1_root: str = V1_ROOT) -> None:
        super().__init__(name, v2_root, list(v1_controllers), v1_root)
        self.procs: list[subprocess.Popen[Any]] = []
        self._added: dict[int, dict[str, str]] = {}  # pid -> hierarchy dir -> original cgroup dir
        self._removed = False

    # -- processes ----------------------------------------------------------

    def add(self, pid: int) -> None:
        """Move an existing process into this cgroup (all of its hierarchies).

        Its previous cgroups are remembered and restored by :meth:`remove`.
        """
        if pid not in self._added:
            current = read_proc_cgroups(pid)
            origin: dict[str, str] = {}
            for directory in self.dirs():
                key = "" if directory == self.v2_path else self._controller_of(directory)
                origin[directory] = os.path.join(self._root_of(directory), current.get(key, "/").lstrip("/"))
            self._added[pid] = origin
        for directory in self.dirs():
            write_value(os.path.join(directory, "cgroup.procs"), str(pid))

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process that is inside this cgroup from its first instruction.

        The child writes itself into ``cgroup.procs`` before exec, so even a
        short-lived program is never observed outside the cgroup.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), preexec_fn=self.enter_fn(), **popen_kwargs)  # noqa: PLW1509
        self.procs.append(proc)
        return proc

    # -- teardown -----------------------------------------------------------

    def remove(self) -> None:
        """Kill spawned processes, move added ones out, remove created directories.

        Safe to call more than once; errors are logged, never raised, so it can
        run in ``finally`` blocks after a failing test.
        """
        if self._removed:
            return
        self._removed = True
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("pid %d did not die", proc.pid)
        # Added processes go back where they came from; anything else still
        # inside (their children) goes to the hierarchy root, so the
        # directories can be removed.
        for directory in self.dirs():
            root = self._root_of(directory)
            for pid in read_procs(directory):
                target = self._added.get(pid, {}).get(directory, root)
                if not os.path.isdir(target):
                    target = root
                try:
                    write_value(os.path.join(target, "cgroup.procs"), str(pid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        logger.warning("could not move pid %d out of %s: %s", pid, directory, exc)
        self.remove_created()

    def _root_of(self, directory: str) -> str:
        if self.v2_path and directory == self.v2_path:
            return self.v2_root or ""
        for ctrl, path in self.v1_paths.items():
            if path == directory:
                return os.path.join(self.v1_root, ctrl)
        raise ValueError(directory)

    def _controller_of(self, directory: str) -> str:
        for ctrl, path in self.v1_paths.items():
            if path == directory:
                return ctrl
        raise ValueError(directory)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r}, v2={bool(self.v2_path)}, v1={sorted(self.v1_paths)})"


def make_cgroup(name: str, v1_controllers: Sequence[str] = ("cpu",), cpu_quota_us: int | None = None,
                memory_limit: int | None = None, *, v2: bool = True, cpu_period_us: int = 100_000,
                v2_root: str | None = None, v1_root: str = V1_ROOT) -> Cgroup:
    """Create a real cgroup.

    Args:
        name: path below each hierarchy root, e.g. ``"system.slice/docker-<id>.scope"``.
        v1_controllers: v1 hierarchies to create it in too (those not mounted are skipped).
        cpu_quota_us: CFS quota per period, ``None`` for unlimited.
        memory_limit: memory limit in bytes, ``None`` for unlimited.
        v2: also create it in the v2 hierarchy (needed for a distinct
            ``bpf_get_current_cgroup_id``).
        cpu_period_us: CFS period.
        v2_root: v2 mount point (found from mountinfo when ``None``).
        v1_root: where v1 hierarchies are mounted.

    Returns:
        The cgroup; use it as a context manager or call :meth:`Cgroup.remove`.
    """
    root2 = (v2_root or cgroup_v2_root()) if v2 else None
    # On a pure-v2 machine <v1_root>/cpu does not exist: those controllers are skipped.
    controllers = [c for c in v1_controllers if os.path.isfile(os.path.join(v1_root, c, "cgroup.procs"))]
    if v2 and not root2:
        raise RuntimeError("no cgroup2 hierarchy mounted")
    cg = Cgroup(name, root2, controllers, v1_root)
    try:
        if cpu_quota_us is not None:
            cg.set_cpu_quota(cpu_quota_us, cpu_period_us)
        if memory_limit is not None:
            cg.set_memory_limit(memory_limit)
    except BaseException:
        cg.remove()
        raise
    return cg


@pytest.fixture
def cgroup_factory() -> Iterator[Any]:
    """Pytest fixture: a ``make_cgroup``-like callable; everything it made is removed after the test."""
    made: list[Cgroup] = []

    def factory(name: str, *args: Any, **kwargs: Any) -> Cgroup:
        cg = make_cgroup(name, *args, **kwargs)
        made.append(cg)
        return cg

    try:
        yield factory
    finally:
        for cg in reversed(made):
            cg.remove()
