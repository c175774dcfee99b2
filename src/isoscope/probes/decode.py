"""Decode raw ring-buffer records into domain events: the one place that knows the binary layouts.

The layouts themselves (ctypes mirrors of ``bpf/include/isoscope.h`` and its
codes) are in :mod:`isoscope.probes.layout`; the per-component detail decoders
are one static table here.
"""

from __future__ import annotations

import ctypes
import logging
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
    "vm_exit": _kvm_details,
    "pv_exit": _kvm_details,
    "ept": _kvm_details,
    "sandbox": _sandbox_details,
}
"""Per-component decoders of a stall record's ``detail``/``detail2`` fields."""


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
    if kind == EV_RUNQ:
        if len(data) < ctypes.sizeof(RunqRecord):
            raise DecodeError("short run-queue record")
        q = RunqRecord.from_buffer_copy(data)
        r = q.stall
        if COMPONENT_BY_CODE.get(r.component) != "runqueue":
            raise DecodeError(f"run-queue record with component code {r.component}")
        details = dict(_sched_details(r.detail, r.detail2))
        details[NEIGHBORS_DETAIL] = RunqueueNeighbors(
            q.self_ns, q.kernel_ns, q.other_ns, q.unseen_ns,
            tuple((n.cgroup_id, n.ns) for n in q.top if n.ns))
        return Stall("runqueue", r.start_ns, r.end_ns, r.tid, r.pid, r.cgroup_id, r.cpu, details)
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
