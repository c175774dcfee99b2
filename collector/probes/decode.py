"""Decode raw ring-buffer records into domain events: the one place that knows the binary layouts.

The ctypes structures mirror ``bpf/include/isoscope.h``; their sizes are
checked against the header's ``ISO_*_SIZE`` constants at import time, so a
layout change in one place and not the other fails loudly at start, not
silently in production.
"""

from __future__ import annotations

import ctypes
import logging
import re
from types import MappingProxyType
from pathlib import Path
from typing import Callable, Mapping

from collector.model import LifecycleEvent, LifecycleKind, RunSegment, Stall

logger = logging.getLogger(__name__)

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "isoscope.h"


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

for _struct, _const in ((StallRecord, "ISO_STALL_SIZE"), (LifecycleRecord, "ISO_LIFECYCLE_SIZE"),
                        (RunRecord, "ISO_RUN_SIZE"), (TotalRecord, "ISO_TOTAL_SIZE")):
    if ctypes.sizeof(_struct) != _C[_const]:
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes but isoscope.h says "
                          f"{_const}={_C[_const]}: the header and decode.py disagree")

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

DetailDecoder = Callable[[int, int], dict]
"""Turns a stall record's (detail, detail2) into the domain event's details."""


def _syscall_details(detail: int, detail2: int) -> dict:
    return {"syscall.class": SYSCALL_CLASSES.get(detail, "other"), "syscall.nr": detail2}


def _block_details(detail: int, detail2: int) -> dict:
    # detail is the kernel dev_t (MKDEV(major, minor) = major << 20 | minor).
    return {"block.dev": f"{detail >> 20}:{detail & 0xFFFFF}", "block.bytes": detail2}


RECLAIM_KINDS: Mapping[int, str] = {
    _C["ISO_RECLAIM_DIRECT"]: "direct",
    _C["ISO_RECLAIM_MEMCG"]: "memcg",
    _C["ISO_RECLAIM_SOFTLIMIT"]: "memcg_softlimit",
}


def _reclaim_details(detail: int, detail2: int) -> dict:
    return {"reclaim.kind": RECLAIM_KINDS.get(detail, "direct"), "reclaim.pages": detail2}


def _netns_details(detail: int, detail2: int) -> dict:
    return {"net.ifindex": detail, "net.peer_ifindex": detail2}


SCHED_THROTTLE_METHODS: Mapping[int, str] = {
    _C["ISO_SCHED_M_NONE"]: "none",
    _C["ISO_SCHED_M_TASK_FLAG"]: "task_flag",
    _C["ISO_SCHED_M_IDLE"]: "idle",
    _C["ISO_SCHED_M_KPROBE"]: "kprobe",
}


# Run-queue and throttle stalls are the most numerous records the timeline
# holds: their details are shared, immutable mappings (one per method) rather
# than a dictionary per record. detail2 (the length of the whole wait a split
# record came from) is not kept: the record's own interval is what joins use.
_SCHED_DETAILS: Mapping[int, Mapping[str, str]] = {
    code: MappingProxyType({"sched.throttle_method": name}) for code, name in SCHED_THROTTLE_METHODS.items()}


def _sched_details(detail: int, detail2: int) -> Mapping[str, str]:
    return _SCHED_DETAILS.get(detail) or _SCHED_DETAILS[_C["ISO_SCHED_M_NONE"]]


DETAIL_DECODERS: dict[str, DetailDecoder] = {
    "syscall": _syscall_details,
    "virtio_io": _block_details,
    "netns": _netns_details,
    "memory_reclaim": _reclaim_details,
    "runqueue": _sched_details,
    "cpu_throttle": _sched_details,
}
"""Per-component detail decoders; other modules (e.g. the KVM exit-reason table) register theirs here."""


def register_detail_decoder(component: str, decoder: DetailDecoder) -> None:
    """Install the decoder of a component's ``detail``/``detail2`` fields."""
    DETAIL_DECODERS[component] = decoder


class DecodeError(ValueError):
    """A record that does not match any known layout."""


def decode_record(data: bytes) -> Stall | LifecycleEvent | RunSegment:
    """Decode one ring-buffer record.

    Args:
        data: the raw record as submitted by a probe.

    Returns:
        The domain event.

    Raises:
        DecodeError: unknown kind, unknown code or short record.
    """
    if len(data) < 4:
        raise DecodeError(f"record of {len(data)} bytes is too short")
    kind = int.from_bytes(data[:4], "little")
    if kind == EV_STALL:
        if len(data) < ctypes.sizeof(StallRecord):
            raise DecodeError("short stall record")
        r = StallRecord.from_buffer_copy(data)
        comp = COMPONENT_BY_CODE.get(r.component)
        if comp is None:
            raise DecodeError(f"unknown stall component code {r.component}")
        dec = DETAIL_DECODERS.get(comp)
        details = dec(r.detail, r.detail2) if dec else {}
        return Stall(comp, r.start_ns, r.end_ns, r.tid, r.pid, r.cgroup_id, r.cpu, details)
    if kind == EV_LIFECYCLE:
        if len(data) < ctypes.sizeof(LifecycleRecord):
            raise DecodeError("short lifecycle record")
        r = LifecycleRecord.from_buffer_copy(data)
        lk = LIFECYCLE_BY_CODE.get(r.type)
        if lk is None:
            raise DecodeError(f"unknown lifecycle type {r.type}")
        return LifecycleEvent(lk, r.ts_ns, r.pid, r.tid, r.ppid, r.cgroup_id, r.flags,
                              r.comm.decode("utf-8", "replace"), r.path.decode("utf-8", "replace"))
    if kind == EV_RUN:
        if len(data) < ctypes.sizeof(RunRecord):
            raise DecodeError("short run record")
        r = RunRecord.from_buffer_copy(data)
        return RunSegment(r.tid, r.pid, r.cgroup_id, r.cpu, r.start_ns, r.end_ns)
    raise DecodeError(f"unknown record kind {kind}")
