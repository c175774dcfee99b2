"""Record layouts of ``bpf/include/isoscope.h``: ctypes mirrors and the header's codes.

The ctypes structures mirror the header; their sizes are checked against the
header's ``ISO_*_SIZE`` constants at import time, so a layout change in one
place and not the other fails loudly at start, not silently in production.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Mapping

from isoscope.model import LifecycleKind
from isoscope.probes.sources import HEADER


class StallRecord(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("component", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_int32),
        ("detail", ctypes.c_uint32),
        ("detail2", ctypes.c_uint64),
    ]


class LifecycleRecord(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("path", ctypes.c_char * 128),
    ]


class RunRecord(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
        ("end_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("cpu", ctypes.c_int32),
    ]


class NeighborRecord(ctypes.Structure):
    """``struct iso_runq_neighbor``: one cgroup that ran while a thread waited, and for how long."""

    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("ns", ctypes.c_uint64),
    ]


class RunqRecord(ctypes.Structure):
    """``struct iso_runq_event``: a watched thread's run-queue wait split by who ran meanwhile."""

    _fields_ = [
        ("stall", StallRecord),
        ("self_ns", ctypes.c_uint64),
        ("kernel_ns", ctypes.c_uint64),
        ("other_ns", ctypes.c_uint64),
        ("unseen_ns", ctypes.c_uint64),
        ("top", NeighborRecord * 3),
    ]


class NeighborKey(ctypes.Structure):
    """``struct iso_nb_key``: key of the sched probe's ``runq_neighbors`` totals."""

    _fields_ = [
        ("victim_id", ctypes.c_uint64),
        ("neighbor_id", ctypes.c_uint64),
    ]


class TotalRecord(ctypes.Structure):
    """``struct iso_total``: exact per-key count and sum kept next to the log2 histograms."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("sum_ns", ctypes.c_uint64),
    ]


def header_constants(path: Path = HEADER) -> dict[str, int]:
    """The ``#define NAME <unsigned int>`` constants of the shared header."""
    consts: dict[str, int] = {}
    for m in re.finditer(r"^#define\s+(ISO_\w+)\s+(\d+)u?\b", path.read_text(), re.M):
        consts[m.group(1)] = int(m.group(2))
    return consts


_C = header_constants()

EV_STALL = _C["ISO_EV_STALL"]
EV_LIFECYCLE = _C["ISO_EV_LIFECYCLE"]
EV_RUN = _C["ISO_EV_RUN"]
EV_RUNQ = _C["ISO_EV_RUNQ"]
ROOT_CGROUP_ID = _C["ISO_ROOT_CGROUP_ID"]

for _struct, _const in ((StallRecord, "ISO_STALL_SIZE"), (LifecycleRecord, "ISO_LIFECYCLE_SIZE"),
                        (RunRecord, "ISO_RUN_SIZE"), (TotalRecord, "ISO_TOTAL_SIZE"),
                        (RunqRecord, "ISO_RUNQ_SIZE"), (NeighborKey, "ISO_NB_KEY_SIZE")):
    if ctypes.sizeof(_struct) != _C[_const]:
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes but isoscope.h says "
                          f"{_const}={_C[_const]}: the header and decode.py disagree")
_NB_TOP = dict(RunqRecord._fields_)["top"]._length_
if _NB_TOP != _C["ISO_NB_TOP"]:
    raise ImportError(f"RunqRecord holds {_NB_TOP} neighbours but isoscope.h says ISO_NB_TOP={_C['ISO_NB_TOP']}")

COMPONENT_BY_CODE: Mapping[int, str] = {
    _C["ISO_C_RUNQUEUE"]: "runqueue",
    _C["ISO_C_CPU_THROTTLE"]: "cpu_throttle",
    _C["ISO_C_MEMORY_RECLAIM"]: "memory_reclaim",
    _C["ISO_C_SYSCALL"]: "syscall",
    _C["ISO_C_VIRTIO_IO"]: "virtio_io",
    _C["ISO_C_NETNS"]: "netns",
    _C["ISO_C_VM_EXIT"]: "vm_exit",
    _C["ISO_C_PV_EXIT"]: "pv_exit",
    _C["ISO_C_EPT"]: "ept",
    _C["ISO_C_SANDBOX"]: "sandbox",
    _C["ISO_C_STEAL"]: "steal",
}
COMPONENT_CODE: Mapping[str, int] = {v: k for k, v in COMPONENT_BY_CODE.items()}

LIFECYCLE_BY_CODE: Mapping[int, LifecycleKind] = {
    _C["ISO_LC_FORK"]: LifecycleKind.FORK,
    _C["ISO_LC_EXEC"]: LifecycleKind.EXEC,
    _C["ISO_LC_EXIT"]: LifecycleKind.EXIT,
    _C["ISO_LC_UNSHARE"]: LifecycleKind.UNSHARE,
    _C["ISO_LC_SETNS"]: LifecycleKind.SETNS,
    _C["ISO_LC_CLONE_NS"]: LifecycleKind.CLONE_NS,
    _C["ISO_LC_CGROUP_MKDIR"]: LifecycleKind.CGROUP_MKDIR,
    _C["ISO_LC_CGROUP_RMDIR"]: LifecycleKind.CGROUP_RMDIR,
    _C["ISO_LC_CGROUP_ATTACH"]: LifecycleKind.CGROUP_ATTACH,
}

SYSCALL_CLASSES: Mapping[int, str] = {
    _C["ISO_SC_OTHER"]: "other",
    _C["ISO_SC_NET"]: "net",
    _C["ISO_SC_FILE"]: "file",
    _C["ISO_SC_LOCK"]: "lock",
    _C["ISO_SC_SLEEP"]: "sleep",
}
