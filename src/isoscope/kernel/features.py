"""The running kernel's eBPF features, detected without bcc.

Files (``/proc``, ``/sys``, tracefs), the kernel configuration and raw
``bpf()`` calls answer which features exist, so every probe that cannot run is
reported with an operator-actionable reason instead of a compiler or verifier
error. Struct and function lookups in the kernel's BTF go through
:class:`isoscope.kernel.btf.BTF`.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import logging
import os
import platform
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache

from isoscope.kernel.btf import BTF, BTFError
from isoscope.kernel.capabilities import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "Features", "detect_features", "running_release"]

_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
_BPF_MAP_TYPE_ARRAY, _BPF_MAP_TYPE_RINGBUF = 2, 27
_BPF_PROG_TYPE_TRACING, _BPF_TRACE_FENTRY = 26, 24
# Kernel functions present in every kernel we target; the fentry test program
# attaches to the first found and does nothing.
_FENTRY_TARGETS = ("do_nanosleep", "vfs_read", "do_sys_openat2")

FEATURES: tuple[str, ...] = ("bpf", "raw_tracepoint", "tracepoint", "ringbuf", "btf", "kprobes", "fentry")


@dataclass
class Features:
    """eBPF features of the running kernel.

    Attributes:
        bpf: this process may load tracing programs (privileges and kernel).
        raw_tracepoint: ``BPF_PROG_TYPE_RAW_TRACEPOINT`` (kernel >= 4.17).
        tracepoint: tracefs ``events/`` is reachable.
        ringbuf: ``BPF_MAP_TYPE_RINGBUF`` (kernel >= 5.8).
        btf: ``/sys/kernel/btf/vmlinux`` exists.
        kprobes: the kernel has kprobes (tracefs ``kprobe_events`` or the kprobe PMU).
        fentry: fentry/fexit programs load and attach.
        tracefs: the tracefs directory, or None.
        release: the kernel release the features were read from.
        reasons: why each absent feature is absent (operator-actionable).
    """

    bpf: bool
    raw_tracepoint: bool
    tracepoint: bool
    ringbuf: bool
    btf: bool
    kprobes: bool
    fentry: bool
    tracefs: str | None
    release: str = ""
    reasons: dict[str, str] = field(default_factory=dict)

    def has_tracepoint(self, category: str, event: str) -> bool:
        """Whether ``<tracefs>/events/<category>/<event>`` exists."""
        if not self.tracefs:
            return False
        return os.path.isdir(os.path.join(self.tracefs, "events", category, event))

    def missing_reason(self, feature: str) -> str:
        """Why ``feature`` is unavailable, as a sentence an operator can act on; ``""`` if available.

        Args:
            feature: a field name (``"kprobes"``) or ``"tracepoint:<category>:<event>"``.
        """
        if feature.startswith("tracepoint:"):
            _, cat, event = (feature.split(":") + ["", ""])[:3]
            if self.has_tracepoint(cat, event):
                return ""
            if not self.tracefs:
                return self.reasons.get("tracepoint", "tracefs is not mounted")
            return f"kernel has no tracepoint {cat}:{event} (no {self.tracefs}/events/{cat}/{event})"
        if feature not in FEATURES:
            return f"unknown kernel feature {feature!r}"
        if getattr(self, feature):
            return ""
        return self.reasons.get(feature, f"kernel feature {feature} unavailable")


def _kernel_version(release: str) -> tuple[int, ...]:
    """``"6.1.0-18-amd64"`` → ``(6, 1, 0)``."""
    return tuple(int(x) for x in re.findall(r"\d+", release.split("-")[0]))[:3]


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def _kernel_config(proc_root: str) -> dict[str, str] | None:
    raw: bytes | None = None
    try:
        with gzip.open(os.path.join(proc_root, "config.gz")) as fh:
            raw = fh.read()
    except (OSError, EOFError):
        return None
    cfg: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            cfg[key] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            cfg[line[2:-len(" is not set")]] = "n"
    return cfg


def _cap_eff(proc_root: str) -> int | None:
    text = _read_text(os.path.join(proc_root, "self", "status")) or ""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", text, re.M)
    return int(m.group(1), 16) if m else None


def _bpf_syscall(cmd: int, attr: ctypes.Array) -> tuple[int, int]:
    nr = _BPF_SYSCALL_NR.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    return int(ret), (ctypes.get_errno() if ret < 0 else 0)


def _try_map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """Create and close a map; 0 on success, else the errno."""
    attr = ctypes.create_string_buffer(struct.pack("=IIII", map_type, key_size, value_size, max_entries), 128)
    fd, err = _bpf_syscall(_BPF_MAP_CREATE, attr)
    if fd >= 0:
        os.close(fd)
        return 0
    return err


@lru_cache(maxsize=4)
def _fentry_target(btf_path: str) -> tuple[str, int] | str:
    """``(function, BTF id)`` to attach the test program to, or why there is none.

    Cached: parsing the kernel's BTF takes a few hundred milliseconds and its
    answer does not change while the kernel runs.
    """
    try:
        target = BTF(btf_path).func_id(_FENTRY_TARGETS)
    except BTFError as exc:
        return str(exc)
    return target if target is not None else f"none of {', '.join(_FENTRY_TARGETS)} found in {btf_path}"


def _try_fentry(btf_path: str) -> tuple[bool, str]:
    """Load and attach an empty fentry program; the kernel's answer is the truth."""
    target = _fentry_target(btf_path)
    if isinstance(target, str):
        return False, target
    func, btf_id = target
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 0; exit
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    log_buf = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(144)
    struct.pack_into("=IIQQIIQ", attr, 0, _BPF_PROG_TYPE_TRACING, 2, ctypes.addressof(insn_buf),
                     ctypes.addressof(license_buf), 1, ctypes.sizeof(log_buf), ctypes.addressof(log_buf))
    struct.pack_into("=16s", attr, 48, b"iso_fentry_chk")
    struct.pack_into("=I", attr, 68, _BPF_TRACE_FENTRY)
    struct.pack_into("=I", attr, 108, btf_id)
    prog_fd, err = _bpf_syscall(_BPF_PROG_LOAD, attr)
    if prog_fd < 0:
        log = log_buf.value.decode("utf-8", "replace").strip().splitlines()
        why = f": {log[-1]}" if log else ""
        return False, f"kernel refused a test fentry program on {func} ({errno.errorcode.get(err, err)}{why})"
    try:
        link_attr = ctypes.create_string_buffer(struct.pack("=QI", 0, prog_fd), 16)
        link_fd, err = _bpf_syscall(_BPF_RAW_TRACEPOINT_OPEN, link_attr)
        if link_fd < 0:
            return False, f"kernel refused to attach a test fentry program to {func} ({errno.errorcode.get(err, err)})"
        os.close(link_fd)
        return True, ""
    finally:
        os.close(prog_fd)


def running_release(proc_root: str = "/proc") -> str:
    """The running kernel's release (``uname -r``), read through ``proc_root`` when possible."""
    text = _read_text(os.path.join(proc_root, "sys", "kernel", "osrelease"))
    return text.strip() if text else platform.release()


def detect_features(tracefs: str | None, sys_root: str = "/sys", proc_root: str = "/proc", *,
                    probe_kernel: bool = True) -> Features:
    """Detect the kernel's eBPF features without bcc.

    Heuristics, in order of trust:

    * ``bpf``: the effective capabilities (``CapEff``) hold CAP_SYS_ADMIN or
      CAP_BPF + CAP_PERFMON, then a real ``BPF_MAP_CREATE``.
    * ``ringbuf``: kernel >= 5.8, confirmed by creating a ring-buffer map.
    * ``raw_tracepoint``: kernel >= 4.17 (and ``bpf``).
    * ``btf``: ``<sys>/kernel/btf/vmlinux``.
    * ``kprobes``: ``CONFIG_KPROBES`` from ``<proc>/config.gz`` when present,
      and ``<tracefs>/kprobe_events`` or the kprobe PMU.
    * ``fentry``: needs BTF, then the kernel is asked: an empty fentry program
      is loaded and attached to a common function through raw ``bpf()``
      calls. Symbols such as ``bpf_trampoline_*`` in ``/proc/kallsyms`` are
      not enough: kernels (locked-down ones among them) can have the
      trampoline code and still refuse tracing programs. Without privileges
      to ask, the kallsyms/config heuristic is used and said so.

    Args:
        tracefs: the tracefs directory (see :func:`ensure_tracefs`), or None.
        sys_root: where ``/sys`` is mounted.
        proc_root: where ``/proc`` is mounted.
        probe_kernel: False to skip the ``bpf()`` calls (file checks only).

    Returns:
        The features, with a reason for every absent one.
    """
    release = running_release(proc_root)
    version = _kernel_version(release)
    cfg = _kernel_config(proc_root)
    reasons: dict[str, str] = {}

    # --- bpf ---
    cap = _cap_eff(proc_root)
    has_caps = cap is not None and (bool(cap >> CAP_SYS_ADMIN & 1) or bool(cap >> CAP_BPF & 1 and cap >> CAP_PERFMON & 1))
    syscall_present = os.path.exists(os.path.join(proc_root, "sys", "kernel", "unprivileged_bpf_disabled"))
    if cfg is not None and cfg.get("CONFIG_BPF_SYSCALL") != "y":
        syscall_present = False
    bpf = False
    if not syscall_present:
        reasons["bpf"] = "kernel has no bpf() syscall (CONFIG_BPF_SYSCALL off)"
    elif not has_caps:
        reasons["bpf"] = ("process lacks CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN (run as root, or add BPF, PERFMON "
                          "and SYS_RESOURCE to the container's capabilities)")
    elif probe_kernel and platform.machine() in _BPF_SYSCALL_NR:
        err = _try_map_create(_BPF_MAP_TYPE_ARRAY, 4, 8, 1)
        bpf = err == 0
        if not bpf:
            reasons["bpf"] = f"bpf(BPF_MAP_CREATE) failed with {errno.errorcode.get(err, err)} (seccomp or LSM policy?)"
    else:
        bpf = True

    # --- program types and maps ---
    raw_tp = bpf and version >= (4, 17)
    if not raw_tp:
        reasons["raw_tracepoint"] = reasons.get("bpf") or f"kernel {release} is older than 4.17: no raw tracepoints"
    ringbuf = bpf and version >= (5, 8)
    if version < (5, 8):
        reasons["ringbuf"] = f"kernel {release} is older than 5.8: no BPF ring buffer"
    elif not bpf:
        reasons["ringbuf"] = reasons["bpf"]
    elif probe_kernel and platform.machine() in _BPF_SYSCALL_NR:
        err = _try_map_create(_BPF_MAP_TYPE_RINGBUF, 0, 0, 4096)
        ringbuf = err == 0
        if not ringbuf:
            reasons["ringbuf"] = f"kernel refused a BPF ring buffer ({errno.errorcode.get(err, err)})"

    # --- tracefs ---
    tracepoint = bool(tracefs) and os.path.isdir(os.path.join(tracefs or "", "events"))
    if not tracepoint:
        reasons["tracepoint"] = ("tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing, or mount the "
                                 "host's /sys/kernel/tracing into the container)") if not tracefs else \
            f"{tracefs} has no events/ directory (kernel built without CONFIG_TRACEPOINTS?)"

    # --- btf ---
    btf_path = os.path.join(sys_root, "kernel", "btf", "vmlinux")
    btf = os.path.exists(btf_path)
    if not btf:
        reasons["btf"] = (f"kernel has no BTF ({btf_path} missing, CONFIG_DEBUG_INFO_BTF off): "
                          "probes that need struct field offsets stay off")

    # --- kprobes ---
    kprobe_iface = (bool(tracefs) and os.path.exists(os.path.join(tracefs or "", "kprobe_events"))) or \
        os.path.isdir(os.path.join(sys_root, "bus", "event_source", "devices", "kprobe"))
    kprobes = kprobe_iface and (cfg is None or cfg.get("CONFIG_KPROBES") == "y")
    if not kprobes:
        if cfg is not None and cfg.get("CONFIG_KPROBES") != "y":
            reasons["kprobes"] = "kernel has no kprobes (CONFIG_KPROBES off): kprobe-based extras stay off"
        elif not kprobe_iface:
            reasons["kprobes"] = ("kernel has no kprobes (no kprobe_events in tracefs and no kprobe PMU in "
                                  f"{sys_root}/bus/event_source/devices; CONFIG_KPROBES off?)")

    # --- fentry ---
    fentry = False
    if not btf:
        reasons["fentry"] = "fentry needs kernel BTF, which this kernel lacks (CONFIG_DEBUG_INFO_BTF off)"
    elif not bpf:
        reasons["fentry"] = reasons["bpf"]
    elif probe_kernel and platform.machine() in _BPF_SYSCALL_NR:
        fentry, why = _try_fentry(btf_path)
        if not fentry:
            reasons["fentry"] = f"kernel has no usable fentry: {why}"
    else:
        kallsyms = _read_text(os.path.join(proc_root, "kallsyms")) or ""
        fentry = "bpf_trampoline_link_prog" in kallsyms and (cfg is None or cfg.get("CONFIG_FUNCTION_TRACER") == "y")
        if not fentry:
            reasons["fentry"] = "kernel has no BPF trampolines (no bpf_trampoline_link_prog in kallsyms or no ftrace)"

    return Features(bpf=bpf, raw_tracepoint=raw_tp, tracepoint=tracepoint, ringbuf=ringbuf, btf=btf,
                    kprobes=kprobes, fentry=fentry, tracefs=tracefs, release=release, reasons=reasons)
