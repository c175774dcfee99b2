"""Refuse new spans, retryably, before the daemon's memory limit is reached.

When the backend is down the queues fill; without a guard the daemon would
keep acknowledging until the kernel's OOM killer ends it and everything held
in memory is lost. The guard compares the daemon's resident anonymous memory
with its limit (configured, or read from its own cgroup) and makes the
receivers answer "retry later" above a high-water mark.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

_UNLIMITED = 1 << 60  # cgroup v1 writes a page-rounded LONG_MAX for "no limit"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit in bytes (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``), or None."""
    limits = []
    for line in _read(f"{proc_root}/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            for root in (cgroup_root, os.path.join(cgroup_root, "unified")):
                v = _read(os.path.join(root, rel, "memory.max"))
                if v and v != "max" and v.isdigit():
                    limits.append(int(v))
                    break
        elif "memory" in controllers.split(","):
            v = _read(os.path.join(cgroup_root, "memory", rel, "memory.limit_in_bytes"))
            if v.isdigit() and int(v) < _UNLIMITED:
                limits.append(int(v))
    return min(limits) if limits else None


def resident_anon_bytes(proc_root: str = "/proc") -> int:
    """Resident anonymous memory of this process (what a queue backlog grows)."""
    for line in _read(f"{proc_root}/self/status").splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryGuard:
    """Says when the daemon is too close to its memory limit to accept more.

    Args:
        limit_bytes: the limit; None disables the guard.
        high_fraction: refuse above this share of the limit.
        check_interval_s: how long a reading is reused (the check is on the receive path).
    """

    def __init__(self, limit_bytes: int | None, high_fraction: float = 0.8, check_interval_s: float = 0.1,
                 proc_root: str = "/proc") -> None:
        self.limit_bytes = limit_bytes
        self.high_bytes = int(limit_bytes * high_fraction) if limit_bytes else None
        self._interval = check_interval_s
        self._proc_root = proc_root
        self._checked = 0.0
        self._over = False

    def over(self) -> bool:
        """True while resident memory is above the high-water mark."""
        if self.high_bytes is None:
            return False
        now = time.monotonic()
        if now - self._checked >= self._interval:
            self._checked = now
            was = self._over
            self._over = resident_anon_bytes(self._proc_root) > self.high_bytes
            if self._over and not was:
                logger.warning("memory above %d MiB of a %d MiB limit: refusing new spans until it drains",
                               self.high_bytes >> 20, self.limit_bytes >> 20)  # type: ignore[operator]
        return self._over
