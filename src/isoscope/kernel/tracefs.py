"""tracefs: find it, or mount it where bcc looks for it.

bcc picks the tracefs path when it is *imported* (``/sys/kernel/tracing`` or
``/sys/kernel/debug/tracing``), so this runs before the first ``import bcc``.
Paths are parameters so the code works against a host ``/proc`` mounted into a
container.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from typing import Sequence

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TRACEFS_CANDIDATES", "ensure_tracefs", "is_tracefs"]

DEFAULT_TRACEFS_CANDIDATES: tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _unescape_mount_field(text: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _tracefs_mountpoints(proc_root: str = "/proc") -> set[str]:
    points: set[str] = set()
    try:
        with open(os.path.join(proc_root, "self", "mounts"), encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "tracefs":
                    points.add(_unescape_mount_field(parts[1]))
    except OSError as exc:
        logger.debug("cannot read mount table: %s", exc)
    return points


def is_tracefs(path: str, proc_root: str = "/proc") -> bool:
    """Whether ``path`` is a usable tracefs mount.

    Args:
        path: candidate directory.
        proc_root: where ``/proc`` is mounted.

    Returns:
        True if the mount table lists tracefs at ``path`` or the directory has
        tracefs' ``events/`` and ``available_events`` (e.g. a bind mount seen
        through another mount namespace).
    """
    real = os.path.realpath(path)
    if real in _tracefs_mountpoints(proc_root):
        return True
    return os.path.isdir(os.path.join(path, "events")) and os.path.exists(os.path.join(path, "available_events"))


def _mount_tracefs(target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"tracefs", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t tracefs tracefs {target}: {os.strerror(err)}")


def ensure_tracefs(candidates: Sequence[str] = DEFAULT_TRACEFS_CANDIDATES, mount: bool = True,
                   proc_root: str = "/proc") -> tuple[str | None, bool]:
    """Find tracefs among ``candidates``, mounting it on the first one if none is mounted.

    Args:
        candidates: directories in order of preference.
        mount: mount tracefs when no candidate has it (needs CAP_SYS_ADMIN).
        proc_root: where ``/proc`` is mounted.

    Returns:
        ``(path, mounted_here)``: the tracefs directory or None, and whether
        this call mounted it (the caller may unmount it later).
    """
    for cand in candidates:
        if os.path.isdir(cand) and is_tracefs(cand, proc_root):
            return cand, False
    if not mount:
        return None, False
    for cand in candidates:
        # /sys/kernel/debug/tracing only exists once debugfs is mounted, and is
        # then an automount of tracefs: mounting on it ourselves is wrong.
        if not os.path.isdir(cand) or cand.rstrip("/").endswith("/debug/tracing"):
            continue
        try:
            _mount_tracefs(cand)
        except OSError as exc:
            logger.warning("cannot mount tracefs on %s: %s", cand, exc)
            continue
        if is_tracefs(cand, proc_root):
            logger.info("mounted tracefs on %s", cand)
            return cand, True
    return None, False
