"""Decode raw ring-buffer records into domain events: the one place that knows the binary layouts.

The layouts themselves (ctypes mirrors of ``bpf/include/isoscope.h`` and its
codes) are in :mod:`isoscope.probes.layout`; the per-component detail decoders
are one static table here.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from types import MappingProxyType
from typing import Callable, Mapping

from isoscope.probes.kvm_reasons import decode_details as _kvm_details
from isoscope.probes.kvm_reasons import decode_sandbox_details as _sandbox_details
from isoscope.probes.layout import (COMPONENT_BY_CODE, COMPONENT_CODE, EV_LIFECYCLE, EV_RUN, EV_RUNQ,  # noqa: F401
                                    EV_STALL, LIFECYCLE_BY_CODE, SYSCALL_CLASSES, LifecycleRecord, RunqRecord,
                                    RunRecord, StallRecord, TotalRecord, _C, header_constants)
from isoscope.model import NEIGHBORS_DETAIL, LifecycleEvent, LifecycleKind, RunqueueNeighbors, RunSegment, Stall

logger = logging.getLogger(__name__)

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
    **{code: MappingProxyType({"sched.throttle_method": name}) for code, name in SCHED_THROTTLE_METHODS.items()},
    # A watched thread's short waits summed into one compact interval (how many is not kept either).
    _C["ISO_SCHED_M_SUMMARY"]: MappingProxyType({"sched.summary": "short_waits"}),
}


def _sched_details(detail: int, detail2: int) -> Mapping[str, str]:
    return _SCHED_DETAILS.get(detail) or _SCHED_DETAILS[_C["ISO_SCHED_M_NONE"]]


DETAIL_DECODERS: dict[str, DetailDecoder] = {
    "syscall": _syscall_details,
    "virtio_io": _block_details,
    "netns": _netns_details,
    "memory_reclaim": _reclaim_details,
    "runqueue": _sched_details,
    "cpu_throttle": _sched_details,
    "vm_exit": _kvm_details,
    "pv_exit": _kvm_details,
    "ept": _kvm_details,
    "sandbox": _sandbox_details,
}
"""Per-component decoders of a stall record's ``detail``/``detail2`` fields."""


class DecodeError(ValueError):
    """A record that does not match any known layout."""


# The hot records (stalls, run-queue splits, on-CPU segments) are unpacked with precompiled
# structs: a ctypes Structure copy plus one attribute access per field costs several times
# more, and the probes' poll thread decodes every record the kernel sends. The formats are
# checked against the ctypes mirrors at import (same size), so a layout change cannot slip by.
_STALL = struct.Struct("<IIQQQIIiIQ")
_RUNQ = struct.Struct("<IIQQQIIiIQ" + "QQQQ" + "QQ" * 3)
_RUN = struct.Struct("<IIQQQIi")
assert _STALL.size == ctypes.sizeof(StallRecord)
assert _RUNQ.size == ctypes.sizeof(RunqRecord)
assert _RUN.size == ctypes.sizeof(RunRecord)
_RUNQ_CODE = COMPONENT_CODE["runqueue"]


def decode_record(data: bytes) -> Stall | LifecycleEvent | RunSegment:
    """Decode one ring-buffer record.

    Args:
        data: the raw record as submitted by a probe.

    Returns:
        The domain event.

    Raises:
        DecodeError: unknown kind, unknown code or short record.
    """
    n = len(data)
    if n < 4:
        raise DecodeError(f"record of {n} bytes is too short")
    kind = int.from_bytes(data[:4], "little")
    if kind == EV_STALL:
        if n < _STALL.size:
            raise DecodeError("short stall record")
        _, code, start, end, cgroup_id, pid, tid, cpu, detail, detail2 = _STALL.unpack_from(data)
        comp = COMPONENT_BY_CODE.get(code)
        if comp is None:
            raise DecodeError(f"unknown stall component code {code}")
        dec = DETAIL_DECODERS.get(comp)
        details = dec(detail, detail2) if dec else {}
        return Stall(comp, start, end, tid, pid, cgroup_id, cpu, details)
    if kind == EV_RUN:
        if n < _RUN.size:
            raise DecodeError("short run record")
        _, tid, start, end, cgroup_id, pid, cpu = _RUN.unpack_from(data)
        return RunSegment(tid, pid, cgroup_id, cpu, start, end)
    if kind == EV_RUNQ:
        if n < _RUNQ.size:
            raise DecodeError("short run-queue record")
        (_, code, start, end, cgroup_id, pid, tid, cpu, detail, detail2, self_ns, kernel_ns, other_ns, unseen_ns,
         c0, n0, c1, n1, c2, n2) = _RUNQ.unpack_from(data)
        if code != _RUNQ_CODE:
            raise DecodeError(f"run-queue record with component code {code}")
        details = dict(_sched_details(detail, detail2))
        details[NEIGHBORS_DETAIL] = RunqueueNeighbors(
            self_ns, kernel_ns, other_ns, unseen_ns, tuple((c, ns) for c, ns in ((c0, n0), (c1, n1), (c2, n2)) if ns))
        return Stall("runqueue", start, end, tid, pid, cgroup_id, cpu, details)
    if kind == EV_LIFECYCLE:
        if n < ctypes.sizeof(LifecycleRecord):
            raise DecodeError("short lifecycle record")
        r = LifecycleRecord.from_buffer_copy(data)
        lk = LIFECYCLE_BY_CODE.get(r.type)
        if lk is None:
            raise DecodeError(f"unknown lifecycle type {r.type}")
        return LifecycleEvent(lk, r.ts_ns, r.pid, r.tid, r.ppid, r.cgroup_id, r.flags,
                              r.comm.decode("utf-8", "replace"), r.path.decode("utf-8", "replace"))
    raise DecodeError(f"unknown record kind {kind}")
