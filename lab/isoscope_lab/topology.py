"""Real isolation plumbing for the lab: cgroups, network namespaces and veth pairs.

Everything created here is registered in a process-wide :class:`Janitor` so it
is removed on normal exit, on an exception unwinding through a ``with`` block,
and from an ``atexit`` hook when a caller forgot to clean up. Names carry the
creating process's pid so concurrent labs on one machine never collide.

Cgroups: on a hybrid machine (v1 controllers + a controller-less v2 hierarchy)
a lab cgroup lives in both — v2 gives the kernel a distinct cgroup id
(``bpf_get_current_cgroup_id``), v1 ``cpu``/``memory`` carry the quota and the
memory limit. On a pure-v2 machine ``cpu.max`` / ``memory.max`` are used.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from isoscope_lab.cgroupctl import V1_ROOT, CgroupDirs, read_procs
from isoscope.host.cgroupfs import cgroup_v2_root

logger = logging.getLogger(__name__)

LAB_CGROUP_PARENT = "isoscope-lab"
"""Parent cgroup of every lab cgroup (shared by concurrent labs; removed when empty)."""


class LabError(RuntimeError):
    """The lab could not build or tear down part of its topology; the message says which."""


# ---------------------------------------------------------------------------
# Cleanup registry
# ---------------------------------------------------------------------------

class Janitor:
    """LIFO registry of cleanup callbacks, run once, errors logged and never raised."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, Callable[[], None]]] = []

    def register(self, what: str, fn: Callable[[], None]) -> Callable[[], None]:
        """Remember ``fn``; returns a callable that runs it now and forgets it."""
        entry = (what, fn)
        with self._lock:
            self._items.append(entry)

        def run_now() -> None:
            with self._lock:
                try:
                    self._items.remove(entry)
                except ValueError:
                    return  # already run
            _safe(what, fn)

        return run_now

    def run_all(self) -> None:
        """Run every pending callback, newest first."""
        while True:
            with self._lock:
                if not self._items:
                    return
                what, fn = self._items.pop()
            _safe(what, fn)


def _safe(what: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # cleanup must go on with the next item
        logger.warning("cleanup of %s failed: %s", what, exc)


JANITOR = Janitor()
atexit.register(JANITOR.run_all)


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short administrative command (``ip``), raising :class:`LabError` on failure."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


# ---------------------------------------------------------------------------
# Cgroups
# ---------------------------------------------------------------------------

class LabCgroup(CgroupDirs):
    """A cgroup in the v2 hierarchy and, when mounted, in the v1 ``cpu`` and ``memory`` hierarchies.

    Attributes:
        pure_v2: True when limits go to ``cpu.max`` / ``memory.max``.
    """

    def __init__(self, name: str, *, v1_root: str = V1_ROOT) -> None:
        v2 = cgroup_v2_root()
        if not v2:
            raise LabError("no cgroup2 hierarchy mounted")
        v1 = [c for c in ("cpu", "memory")
              if os.path.isfile(os.path.join(v1_root, c, "cgroup.procs"))
              and os.path.realpath(os.path.join(v1_root, c)) != os.path.realpath(v2)]
        super().__init__(name, v2, v1, v1_root)
        self.pure_v2 = not self.v1_paths
        self._cleanup = JANITOR.register(f"cgroup {self.name}", self._remove)

    def memory_usage(self) -> int:
        """Bytes charged to the cgroup now."""
        if "memory" in self.v1_paths:
            path = os.path.join(self.v1_paths["memory"], "memory.usage_in_bytes")
        else:
            path = os.path.join(self.v2_path, "memory.current")
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every process inside and wait until the cgroup is empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = set(self.pids())
            for d in self.v1_paths.values():
                pids.update(read_procs(d))
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        logger.warning("processes left in cgroup %s: %s", self.name, self.pids())

    def _remove(self) -> None:
        self.kill_all()
        self.remove_created()

    def remove(self) -> None:
        """Kill what is inside and remove the directories this object created (idempotent)."""
        self._cleanup()

    def __enter__(self) -> LabCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ---------------------------------------------------------------------------
# Network namespaces and veth pairs
# ---------------------------------------------------------------------------

SUBNET_PREFIX = "10.231"
"""All lab addresses are in 10.231.0.0/16 and only on veths the lab creates."""


@dataclass(slots=True)
class NetNs:
    """A named network namespace (``/run/netns/<name>``)."""

    name: str
    _cleanup: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @classmethod
    def create(cls, name: str) -> NetNs:
        """Create the namespace with its loopback up."""
        run(["ip", "netns", "add", name])
        ns = cls(name)
        ns._cleanup = JANITOR.register(f"netns {name}", lambda: ns._delete())
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return ns

    def _delete(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)

    def delete(self) -> None:
        """Delete the namespace (its veth ends go with it)."""
        self._cleanup()


@dataclass(slots=True)
class VethLink:
    """A veth pair joining two namespaces (``None`` = the root namespace), a /24 between them.

    Attributes:
        a_ip, b_ip: addresses of the two ends (``10.231.<subnet>.1`` / ``.2``).
    """

    a_name: str
    b_name: str
    a_ns: NetNs | None
    b_ns: NetNs | None
    a_ip: str
    b_ip: str
    _cleanup: Callable[[], None] = field(default=lambda: None, repr=False)

    @classmethod
    def create(cls, a_name: str, b_name: str, a_ns: NetNs | None, b_ns: NetNs | None, subnet: int) -> VethLink:
        """Create the pair, move each end into its namespace, address it and bring it up."""
        if not 0 <= subnet <= 255:
            raise LabError(f"subnet index {subnet} out of range")
        run(["ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name])
        link = cls(a_name, b_name, a_ns, b_ns, f"{SUBNET_PREFIX}.{subnet}.1", f"{SUBNET_PREFIX}.{subnet}.2")
        link._cleanup = JANITOR.register(f"veth {a_name}", link._delete)
        for name, ns, ip in ((a_name, a_ns, link.a_ip), (b_name, b_ns, link.b_ip)):
            if ns is not None:
                run(["ip", "link", "set", name, "netns", ns.name])
            pre = ["ip", "-n", ns.name] if ns is not None else ["ip"]
            run([*pre, "addr", "add", f"{ip}/24", "dev", name])
            run([*pre, "link", "set", name, "up"])
        return link

    def _delete(self) -> None:
        # Deleting either end removes the pair; an end inside a deleted netns is gone already.
        for name, ns in ((self.a_name, self.a_ns), (self.b_name, self.b_ns)):
            pre = ["ip", "-n", ns.name] if ns is not None else ["ip"]
            if run([*pre, "link", "del", name], check=False).returncode == 0:
                return

    def delete(self) -> None:
        """Remove the pair."""
        self._cleanup()


def lab_tag() -> str:
    """A short tag unique to this process among concurrent labs (interface names are ≤ 15 chars)."""
    return f"{os.getpid() % 0x10000:04x}"


def free_subnet_base(count: int) -> int:
    """First index ``i`` such that ``10.231.i .. i+count-1`` are unused by any interface of this namespace."""
    used = set()
    out = run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    for line in out.splitlines():
        for tok in line.split():
            if tok.startswith(SUBNET_PREFIX + "."):
                used.add(int(tok.split(".")[2]))
    # Start from a pid-derived offset so concurrent labs (whose hop-to-hop links live
    # in their own namespaces, invisible here) rarely pick the same range.
    start = (os.getpid() * 7) % 200
    for off in range(256):
        base = (start + off) % (256 - count)
        if not any(i in used for i in range(base, base + count)):
            return base
    raise LabError("no free 10.231.x.0/24 range")
