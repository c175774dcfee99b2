"""x86_64 syscall number → syscall class, for the syscalls probe's ``syscall_class`` map.

The class says what a thread blocked in a syscall was waiting for: ``net``
(sockets and the readiness multiplexers servers block in), ``file`` (file
system and block I/O), ``lock`` (futexes, file locks, SysV semaphores),
``sleep`` (timed sleeps and signal waits) or ``other``. A ``read`` on a socket
is classed ``file``: the kernel side only sees the syscall number, not the fd.

Names come from bcc's syscall table (``bcc.syscall.syscalls``), so numbers
are those of the architecture bcc was built for.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Any, Mapping

from isoscope.probes.decode import SYSCALL_CLASSES

logger = logging.getLogger(__name__)

CLASS_CODE: Mapping[str, int] = {name: code for code, name in SYSCALL_CLASSES.items()}
"""Class name → ``ISO_SC_*`` code (``bpf/include/isoscope.h``)."""

MAX_NR = 512
"""Size of the probe's ``syscall_class`` array (``ISO_SC_MAX_NR``)."""

_NET = {
    "socket", "socketpair", "connect", "accept", "accept4", "bind", "listen", "shutdown",
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
    "getsockname", "getpeername", "setsockopt", "getsockopt", "sendfile",
    "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_pwait2",
}
_FILE = {
    "read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "preadv2", "pwritev2",
    "open", "openat", "openat2", "creat", "close", "close_range", "lseek",
    "stat", "fstat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
    "fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "msync",
    "truncate", "ftruncate", "fallocate", "fadvise64", "readahead",
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir",
    "link", "linkat", "symlink", "symlinkat", "readlink", "readlinkat", "getdents", "getdents64",
    "chmod", "fchmod", "fchmodat", "chown", "fchown", "lchown", "fchownat",
    "io_submit", "io_getevents", "io_pgetevents", "io_uring_enter",
    "copy_file_range", "splice", "tee", "vmsplice", "mknod", "mknodat",
    "statfs", "fstatfs", "utime", "utimes", "utimensat", "futimesat",
    "getxattr", "setxattr", "fgetxattr", "fsetxattr", "lgetxattr", "lsetxattr",
    "name_to_handle_at", "open_by_handle_at",
}
_LOCK = {
    "futex", "futex_waitv", "futex_wait", "futex_wake", "futex_requeue", "flock",
    "semop", "semtimedop", "msgrcv", "msgsnd", "mq_timedreceive", "mq_timedsend",
}
_SLEEP = {
    "nanosleep", "clock_nanosleep", "pause", "rt_sigsuspend", "rt_sigtimedwait",
    "wait4", "waitid", "sched_yield",
}
_BY_CLASS: Mapping[str, set[str]] = {"net": _NET, "file": _FILE, "lock": _LOCK, "sleep": _SLEEP}


def classify(name: str) -> str:
    """The class of a syscall given its name (``"nanosleep"`` → ``"sleep"``, unknown → ``"other"``)."""
    for cls, names in _BY_CLASS.items():
        if name in names:
            return cls
    return "other"


_UNIFIED_SINCE_424 = (
    "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_open", "clone3", "close_range", "openat2", "pidfd_getfd",
    "faccessat2", "process_madvise", "epoll_pwait2", "mount_setattr", "quotactl_fd", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self", "memfd_secret", "process_mrelease", "futex_waitv",
    "set_mempolicy_home_node", "cachestat", "fchmodat2", "map_shadow_stack", "futex_wake", "futex_wait",
    "futex_requeue", "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules",
    "mseal",
)
"""Syscalls 424 and up share one number on every architecture (asm-generic/unistd.h); older
bcc tables stop before them, so they are filled in from here."""


def syscall_names() -> dict[int, str]:
    """bcc's syscall table for this architecture (number → name), completed with the unified numbers."""
    try:
        from bcc.syscall import syscalls
    except ImportError:
        # bcc comes from the distribution, not PyPI; a venv may not see it.
        sys.path.append("/usr/lib/python3/dist-packages")
        from bcc.syscall import syscalls
    names = {int(nr): (n.decode() if isinstance(n, bytes) else str(n)) for nr, n in syscalls.items()}
    for offset, name in enumerate(_UNIFIED_SINCE_424):
        names.setdefault(424 + offset, name)
    return names


def class_table(names: Mapping[int, str] | None = None, max_nr: int = MAX_NR) -> list[int]:
    """Class codes indexed by syscall number, ``max_nr`` long (numbers beyond it stay ``other``).

    Args:
        names: number → name (default: :func:`syscall_names`).
        max_nr: length of the table (the probe's array size).
    """
    names = syscall_names() if names is None else names
    table = [CLASS_CODE["other"]] * max_nr
    for nr, name in names.items():
        if 0 <= nr < max_nr:
            table[nr] = CLASS_CODE[classify(name)]
    return table


def fill_class_map(bpf_table: Any, names: Mapping[int, str] | None = None) -> int:
    """Write the class table into a loaded probe's ``syscall_class`` array.

    Args:
        bpf_table: the bcc ``BPF_ARRAY`` (``bpf["syscall_class"]``).
        names: number → name (default: bcc's table).

    Returns:
        The number of syscall numbers given a class other than ``other``.
    """
    size = len(bpf_table)
    table = class_table(names, max_nr=size)
    for nr, code in enumerate(table):
        bpf_table[ctypes.c_int(nr)] = ctypes.c_uint8(code)
    classified = sum(1 for c in table if c != CLASS_CODE["other"])
    logger.debug("syscall classes: %d of %d numbers classified", classified, size)
    return classified
