"""Struct member offsets from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

The kernel headers bcc compiles against may come from another kernel build, so
their struct layouts cannot be trusted. A BPF program that truly needs a
kernel struct field gets its byte offset from the running kernel's own type
information instead, passed in as a ``-D`` define. This module reads the raw
BTF format directly (no bpftool/pahole dependency): only what is needed to
resolve ``struct.member[.member...]`` paths and to find a kernel function's
type id (what a fentry program is attached by). It is the only BTF reader in
isoscope.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Iterable

logger = logging.getLogger(__name__)

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h).
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)

# Bytes of kind-specific data that follow each 12-byte btf_type: (fixed, per vlen item).
_TRAILER: dict[int, tuple[int, int]] = {
    _INT: (4, 0), _PTR: (0, 0), _ARRAY: (12, 0), _STRUCT: (0, 12), _UNION: (0, 12), _ENUM: (0, 8),
    _FWD: (0, 0), _TYPEDEF: (0, 0), _VOLATILE: (0, 0), _CONST: (0, 0), _RESTRICT: (0, 0),
    _FUNC: (0, 0), _FUNC_PROTO: (0, 8), _VAR: (4, 0), _DATASEC: (0, 12), _FLOAT: (0, 0),
    _DECL_TAG: (4, 0), _TYPE_TAG: (0, 0), _ENUM64: (0, 12),
}
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class BTFError(LookupError):
    """The BTF file is unreadable or lacks the requested type or member."""


@dataclass(frozen=True, slots=True)
class Member:
    """A resolved struct member.

    Attributes:
        offset: byte offset from the start of the outermost struct.
        size: size in bytes of the member's type (0 when unknown).
        bit_size: bitfield width, 0 for a whole-byte member.
        bit_offset: bit offset inside the containing bytes for bitfields.
    """

    offset: int
    size: int
    bit_size: int = 0
    bit_offset: int = 0


@dataclass(slots=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    kind_flag: bool
    members: list[tuple[str, int, int]]  # (name, type id, offset field) for structs/unions


class BTF:
    """Parsed kernel BTF: struct layouts and function type ids by name.

    Args:
        path: the BTF blob, normally ``<sys_root>/kernel/btf/vmlinux``.

    Raises:
        BTFError: the file is missing or not BTF.
    """

    def __init__(self, path: str = "/sys/kernel/btf/vmlinux") -> None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BTFError(f"cannot read BTF {path}: {exc}") from exc
        if len(data) < 24:
            raise BTFError(f"{path} is too short to be BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"{path} is not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # type id 0 is void
        self._structs: dict[str, int] = {}
        self._funcs: dict[str, int] = {}
        self._parse(data[hdr_len + type_off: hdr_len + type_off + type_len])

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _parse(self, blob: bytes) -> None:
        pos = 0
        while pos + 12 <= len(blob):
            name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kind_flag = bool(info >> 31)
            if kind not in _TRAILER:
                raise BTFError(f"unknown BTF kind {kind}")
            members: list[tuple[str, int, int]] = []
            if kind in (_STRUCT, _UNION):
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", blob, pos + 12 * i)
                    members.append((self._str(m_name), m_type, m_off))
            fixed, per_item = _TRAILER[kind]
            pos += fixed + per_item * vlen
            name = self._str(name_off)
            self._types.append(_Type(kind, name, size_or_type, kind_flag, members))
            if kind == _STRUCT and name and vlen and name not in self._structs:
                self._structs[name] = len(self._types) - 1
            elif kind == _FUNC and name and name not in self._funcs:
                self._funcs[name] = len(self._types) - 1

    def _resolve(self, type_id: int) -> _Type | None:
        t = self._types[type_id] if 0 < type_id < len(self._types) else None
        while t is not None and t.kind in _MODIFIERS:
            t = self._types[t.size_or_type] if t.size_or_type else None
        return t

    def _size(self, type_id: int) -> int:
        t = self._resolve(type_id)
        if t is None:
            return 0
        if t.kind in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT):
            return t.size_or_type
        if t.kind == _PTR:
            return 8
        return 0

    def _find(self, t: _Type, name: str) -> tuple[int, int, int, int] | None:
        """(type id, bit offset, bit size) of ``name`` in ``t``, looking inside anonymous members."""
        for m_name, m_type, m_off in t.members:
            bit_off, bit_size = (m_off & 0xFFFFFF, m_off >> 24) if t.kind_flag else (m_off, 0)
            if m_name == name:
                return m_type, bit_off, bit_size, 0
            if not m_name:
                inner = self._resolve(m_type)
                if inner is not None and inner.kind in (_STRUCT, _UNION):
                    found = self._find(inner, name)
                    if found is not None:
                        return found[0], found[1] + bit_off, found[2], 0
        return None

    def func_id(self, names: Iterable[str]) -> tuple[str, int] | None:
        """The first of ``names`` that is a function (``BTF_KIND_FUNC``), with its type id.

        Args:
            names: kernel function names in order of preference.

        Returns:
            ``(name, type id)``, or None when none of them is in this BTF.
        """
        for name in names:
            type_id = self._funcs.get(name)
            if type_id is not None:
                return name, type_id
        return None

    def has_struct(self, name: str) -> bool:
        """Whether ``struct name`` is defined (with members) in this BTF."""
        return name in self._structs

    def member(self, struct_name: str, path: str) -> Member:
        """The offset of ``struct_name.path`` where ``path`` may be dotted (``se.cfs_rq``).

        Nested members are followed through embedded structs only, never
        through pointers: the offset is from the start of ``struct_name``.

        Raises:
            BTFError: the struct or a member on the path does not exist.
        """
        if struct_name not in self._structs:
            raise BTFError(f"struct {struct_name} not in BTF")
        t = self._types[self._structs[struct_name]]
        total_bits = 0
        type_id = 0
        bit_size = 0
        for part in path.split("."):
            if t is None or t.kind not in (_STRUCT, _UNION):
                raise BTFError(f"{struct_name}.{path}: {part!r} is not inside a struct")
            found = self._find(t, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path}")
            type_id, bit_off, bit_size, _ = found
            total_bits += bit_off
            t = self._resolve(type_id)
        if bit_size:
            return Member(total_bits // 8, self._size(type_id), bit_size, total_bits % 8)
        if total_bits % 8:
            raise BTFError(f"{struct_name}.{path} is not byte aligned")
        return Member(total_bits // 8, self._size(type_id))


def member_offsets(fields: dict[str, tuple[str, str]], path: str = "/sys/kernel/btf/vmlinux",
                   optional: tuple[str, ...] = ()) -> dict[str, int]:
    """Byte offsets of several struct members, ready to pass as ``-D`` defines.

    Args:
        fields: define name → (struct name, member path), e.g.
            ``{"ISO_OFF_TASK_PID": ("task_struct", "pid")}``.
        path: the BTF blob.
        optional: define names that may be absent (left out of the result).

    Returns:
        define name → byte offset.

    Raises:
        BTFError: BTF unreadable or a required member missing.
    """
    btf = BTF(path)
    out: dict[str, int] = {}
    for define, (struct_name, member_path) in fields.items():
        try:
            m = btf.member(struct_name, member_path)
        except BTFError:
            if define in optional:
                logger.info("BTF: %s.%s not present; %s left undefined", struct_name, member_path, define)
                continue
            raise
        if m.bit_size:
            raise BTFError(f"{struct_name}.{member_path} is a bitfield; not usable as a byte offset")
        out[define] = m.offset
    return out


SCHED_FIELDS: dict[str, tuple[str, str]] = {
    "ISO_OFF_TASK_PID": ("task_struct", "pid"),
    "ISO_OFF_TASK_TGID": ("task_struct", "tgid"),
    "ISO_OFF_TASK_CPU": ("task_struct", "thread_info.cpu"),
    # Task-based CFS throttling (6.18+): set while the task sits on its cfs_rq's limbo list.
    "ISO_OFF_TASK_THROTTLED": ("task_struct", "throttled"),
}
"""Kernel fields ``bpf/sched.bpf.c`` reads through task pointers."""

_SCHED_OPTIONAL = ("ISO_OFF_TASK_CPU", "ISO_OFF_TASK_THROTTLED")
_SCHED_SIZES = {"ISO_OFF_TASK_PID": 4, "ISO_OFF_TASK_TGID": 4, "ISO_OFF_TASK_CPU": 4, "ISO_OFF_TASK_THROTTLED": 1}


def sched_defines(path: str = "/sys/kernel/btf/vmlinux", throttle_method: str = "auto") -> dict[str, int]:
    """The ``-D`` defines ``bpf/sched.bpf.c`` needs, checked against the running kernel's BTF.

    Args:
        path: the BTF blob.
        throttle_method: ``"auto"`` uses the exact ``task_struct.throttled`` flag when the
            kernel has it and the idle inference otherwise; ``"idle"`` forces the inference.

    Returns:
        define name → byte offset.

    Raises:
        BTFError: BTF unreadable, ``pid``/``tgid`` missing, or a field of an unexpected size.
    """
    if throttle_method not in ("auto", "idle"):
        raise ValueError(f"unknown throttle method {throttle_method!r}")
    btf = BTF(path)
    out: dict[str, int] = {}
    for define, (struct_name, member_path) in SCHED_FIELDS.items():
        if define == "ISO_OFF_TASK_THROTTLED" and throttle_method == "idle":
            continue
        try:
            m = btf.member(struct_name, member_path)
        except BTFError:
            if define in _SCHED_OPTIONAL:
                logger.info("BTF: %s.%s absent; sched probe works without it", struct_name, member_path)
                continue
            raise
        if m.bit_size or m.size != _SCHED_SIZES[define]:
            # A changed type would make the probe read garbage: refuse rather than guess.
            if define in _SCHED_OPTIONAL:
                logger.warning("BTF: %s.%s has size %d, expected %d; not used", struct_name, member_path,
                               m.size, _SCHED_SIZES[define])
                continue
            raise BTFError(f"{struct_name}.{member_path} has size {m.size}, expected {_SCHED_SIZES[define]}")
        out[define] = m.offset
    return out


CFS_THROTTLE_FIELDS: dict[str, tuple[str, str]] = {
    "ISO_OFF_CFS_RQ_TG": ("cfs_rq", "tg"),
    "ISO_OFF_TG_CSS_CGROUP": ("task_group", "css.cgroup"),
    "ISO_OFF_CGROUP_KN": ("cgroup", "kn"),
    "ISO_OFF_KN_ID": ("kernfs_node", "id"),
}
"""Kernel fields the optional ``bpf/cfs_throttle.bpf.c`` probe (either attach method) reads (cfs_rq → cgroup id)."""


def cfs_throttle_defines(path: str = "/sys/kernel/btf/vmlinux") -> dict[str, int]:
    """The ``-D`` defines of the optional exact throttle probes (all required).

    Raises:
        BTFError: BTF unreadable or a field missing (the kernel has no CFS bandwidth control).
    """
    return member_offsets(CFS_THROTTLE_FIELDS, path)
