"""Kernel access prepared by the daemon itself at start.

Before any bcc program is compiled, three things must be true on the node:

* tracefs is mounted where bcc looks for it (``/sys/kernel/tracing`` or
  ``/sys/kernel/debug/tracing``); bcc picks the path when it is *imported*, so
  this happens before the first ``import bcc``.
* bcc finds kernel headers. Many nodes (and the DaemonSet image) have no
  ``/lib/modules/$(uname -r)/build``; Debian's generic ``linux-headers-*``
  packages work for tracepoint programs because tracepoint argument layouts
  come from tracefs, not from the headers. Debian splits those headers into a
  ``build`` tree (generated files, ``-amd64``) and a ``source`` tree
  (``-common``). bcc only understands that split below the hard-wired
  ``/lib/modules/<release>``; through ``BCC_KERNEL_SOURCE`` it expects one
  single tree. So for any other location a *shim* directory is assembled from
  symlinks that merges both trees, and ``BCC_KERNEL_SOURCE`` points at it.
* The kernel's eBPF features are known without bcc, so every probe that
  cannot run is reported with an operator-actionable reason instead of a
  compiler or verifier error.

Everything here reads paths given as parameters (``/sys``, ``/proc``,
``/lib/modules``, ``/usr/src``) so it can run against a host mounted into a
container and be tested against prepared trees.

Run ``python -m isoscope.kernel.env`` to print the choices, ``--prepare`` to
also mount tracefs, and ``--link-modules`` to install the fallback headers as
``/lib/modules/$(uname -r)/{build,source}`` for every bcc user on the host.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gzip
import json
import logging
import os
import platform
import re
import shutil
import struct
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, MutableMapping, Sequence

logger = logging.getLogger(__name__)

DEFAULT_TRACEFS_CANDIDATES: tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BCC_MODULES_DIR = "/lib/modules"
"""Where libbcc looks for ``<release>/build`` and ``<release>/source`` (compiled into libbcc)."""
BCC_ENV = "BCC_KERNEL_SOURCE"
"""libbcc: compile inside this one directory instead of ``/lib/modules/<release>``."""
HEADERS_ENV = "ISOSCOPE_KERNEL__HEADERS_DIR"
"""Operator override for the kernel headers directory (the "configured" choice)."""
DEFAULT_SHIM_ROOT = "/var/lib/isoscope/kernel-headers"

_KCONFIG_H = os.path.join("include", "linux", "kconfig.h")
_SHIM_MARKER = ".isoscope-shim"
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x"}


# ---------------------------------------------------------------------------
# tracefs
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# kernel headers
# ---------------------------------------------------------------------------

@dataclass
class HeadersChoice:
    """Which kernel headers bcc compiles against.

    Attributes:
        path: the headers tree used (for bcc's own lookup: the ``build`` dir),
            or None when there are none.
        source: ``"host"`` (``/lib/modules/<release>``), ``"configured"``
            (operator-given directory), ``"generic"`` (distribution headers
            under ``/usr/src``), ``"kheaders"`` (the kernel's own
            ``/sys/kernel/kheaders.tar.xz``, unpacked by bcc) or ``"none"``.
        detail: one sentence for operators: where the headers come from and
            whether they match the running kernel.
        bcc_kernel_source: value for ``BCC_KERNEL_SOURCE``; None means bcc's
            default lookup must be used (the variable is removed).
        build_dir: the build (generated files) tree.
        source_dir: the source tree, when split from ``build_dir``.
        headers_release: the release the headers were generated for
            (``UTS_RELEASE``), when known.
        matches_running: whether ``headers_release`` is the running kernel.
    """

    path: str | None
    source: str
    detail: str
    bcc_kernel_source: str | None = None
    build_dir: str | None = None
    source_dir: str | None = None
    headers_release: str | None = None
    matches_running: bool = False

    def apply(self, environ: MutableMapping[str, str]) -> None:
        """Set (or remove) ``BCC_KERNEL_SOURCE`` in ``environ`` for this choice."""
        if self.bcc_kernel_source:
            environ[BCC_ENV] = self.bcc_kernel_source
        else:
            environ.pop(BCC_ENV, None)


def _has_kconfig(tree: str | None) -> bool:
    return bool(tree) and os.path.isfile(os.path.join(tree, _KCONFIG_H))


def _headers_release(build_dir: str) -> str | None:
    try:
        with open(os.path.join(build_dir, "include", "generated", "utsrelease.h"), encoding="utf-8") as fh:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', fh.read())
    except OSError:
        return None
    return m.group(1) if m else None


def _merge_trees(dst: str, layers: Sequence[str], depth: int = 0) -> None:
    """Populate ``dst`` with symlinks so it looks like ``layers`` overlaid (first wins).

    Only directories present in more than one layer become real directories;
    everything else is one symlink, so the shim stays tiny (a few dozen links
    for Debian's split headers).
    """
    names: set[str] = set()
    for layer in layers:
        names.update(os.listdir(layer))
    for name in sorted(names):
        entries = [os.path.join(layer, name) for layer in layers if os.path.lexists(os.path.join(layer, name))]
        dirs = [e for e in entries if os.path.isdir(e)]
        distinct = {os.path.realpath(d) for d in dirs}
        if len(distinct) > 1 and len(dirs) == len(entries) and depth < 8:
            sub = os.path.join(dst, name)
            os.mkdir(sub)
            _merge_trees(sub, dirs, depth + 1)
        else:
            os.symlink(os.path.abspath(entries[0]), os.path.join(dst, name))


def build_shim(build_dir: str, source_dir: str, shim_root: str) -> str:
    """Create (or reuse) a single headers tree merging a split ``build``/``source`` pair.

    Args:
        build_dir: tree with generated headers (``include/generated``, ``.config``).
        source_dir: tree with the plain headers (``include/linux`` …).
        shim_root: parent directory of the shims.

    Returns:
        The shim directory, suitable for ``BCC_KERNEL_SOURCE``.

    Raises:
        OSError: the shim cannot be written.
    """
    build_dir = os.path.abspath(build_dir)
    source_dir = os.path.abspath(source_dir)
    target = os.path.join(shim_root, os.path.basename(os.path.realpath(build_dir)) or "headers")
    marker = f"build={build_dir}\nsource={source_dir}\n"
    try:
        with open(os.path.join(target, _SHIM_MARKER), encoding="utf-8") as fh:
            if fh.read() == marker and _has_kconfig(target):
                return target
    except OSError:
        pass
    os.makedirs(shim_root, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        _merge_trees(tmp, [build_dir, source_dir])
        with open(os.path.join(tmp, _SHIM_MARKER), "w", encoding="utf-8") as fh:
            fh.write(marker)
        # Replace a stale shim without leaving a window where none exists that
        # a half-built one could be mistaken for.
        if os.path.lexists(target):
            old = f"{target}.old-{os.getpid()}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("kernel headers shim %s merges %s and %s", target, build_dir, source_dir)
    return target


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _generic_pairs(usr_src: str, arch: str) -> list[tuple[str, str | None]]:
    """Debian ``linux-headers-<abi>-<flavour>`` build dirs with their ``-common`` source dirs, newest first."""
    try:
        names = os.listdir(usr_src)
    except OSError:
        return []
    found: list[tuple[tuple, str, str | None]] = []
    pattern = re.compile(r"^linux-headers-(?P<abi>\d+\.\d+[0-9.+~a-z]*(?:-\d+)?)-(?P<flavour>(?:[a-z0-9]+-)?" + re.escape(arch) + r")$")
    for name in names:
        m = pattern.match(name)
        if not m or not os.path.isdir(os.path.join(usr_src, name, "include")):
            continue
        abi, flavour = m.group("abi"), m.group("flavour")
        prefix = flavour[: -len(arch)].rstrip("-")
        commons = ([f"linux-headers-{abi}-common-{prefix}"] if prefix else []) + [f"linux-headers-{abi}-common"]
        source = next((os.path.join(usr_src, c) for c in commons if _has_kconfig(os.path.join(usr_src, c))), None)
        build = os.path.join(usr_src, name)
        if source is None and not _has_kconfig(build):
            continue
        # Newest ABI first; at equal ABI the plain flavour beats cloud/rt.
        found.append(((_version_key(abi), prefix == ""), build, source))
    found.sort(key=lambda t: t[0], reverse=True)
    return [(b, s) for _, b, s in found]


def _describe(release: str, headers_release: str | None) -> tuple[str, bool]:
    if headers_release is None:
        return "release of the headers unknown", False
    if headers_release == release:
        return f"headers match the running kernel {release}", True
    return (f"headers are for {headers_release}, running {release}: tracepoint programs work "
            "(their argument layouts come from tracefs) but struct layouts do not match", False)


def _single_tree(build: str, source: str | None, shim_root: str, create_shim: bool) -> str:
    if _has_kconfig(build):
        return build
    if not source:
        raise OSError(errno.ENOENT, f"{build} has no {_KCONFIG_H} and no source tree")
    if not create_shim:
        return os.path.join(shim_root, os.path.basename(os.path.realpath(build)))
    return build_shim(build, source, shim_root)


def _choice(source_kind: str, where: str, build: str, source: str | None, release: str, *,
            bcc_native: bool, shim_root: str, create_shim: bool) -> HeadersChoice:
    bcc_src = None if bcc_native else _single_tree(build, source, shim_root, create_shim)
    hdr_rel = _headers_release(build)
    match_text, matches = _describe(release, hdr_rel)
    used = f"{build}" + (f" + {source}" if source else "")
    via = "bcc default lookup" if bcc_native else f"{BCC_ENV}={bcc_src}"
    return HeadersChoice(
        path=build, source=source_kind,
        detail=f"{where} kernel headers {used} ({via}); {match_text}",
        bcc_kernel_source=bcc_src, build_dir=build, source_dir=source,
        headers_release=hdr_rel, matches_running=matches)


def find_kernel_headers(release: str | None = None, configured_dir: str | None = None,
                        modules_root: str = BCC_MODULES_DIR, usr_src: str = "/usr/src",
                        shim_root: str = DEFAULT_SHIM_ROOT, *, sys_root: str = "/sys",
                        machine: str | None = None, create_shim: bool = True) -> HeadersChoice:
    """Choose the kernel headers bcc will compile against.

    Order: the host's ``<modules_root>/<release>/build`` (+ ``source``), then
    ``configured_dir``, then the newest generic Debian headers under
    ``usr_src`` (``linux-headers-*-<arch>`` as build, ``-common`` as source),
    then the kernel's built-in ``kheaders.tar.xz``.

    Args:
        release: kernel release; default the running one.
        configured_dir: operator-given headers: a single tree containing
            ``include/linux/kconfig.h``, or a directory with ``build/`` and
            ``source/`` like ``/lib/modules/<release>``.
        modules_root: host modules directory (a container may see the host's
            under another path).
        usr_src: where distribution header packages are installed.
        shim_root: where merged single-tree shims are created.
        sys_root: where ``/sys`` is mounted.
        machine: ``uname -m``; default the running one.
        create_shim: False to only report (no writes).

    Returns:
        The choice; ``source == "none"`` with an explanation when nothing fits.
    """
    release = release or platform.release()
    arch = _DEBIAN_ARCH.get(machine or platform.machine(), "amd64")
    notes: list[str] = []
    common = dict(shim_root=shim_root, create_shim=create_shim)

    kdir = os.path.join(modules_root, release)
    build, source = os.path.join(kdir, "build"), os.path.join(kdir, "source")
    source_or_none = source if os.path.isdir(source) else None
    if os.path.isdir(build) and (_has_kconfig(build) or _has_kconfig(source_or_none)):
        native = os.path.realpath(modules_root) == os.path.realpath(BCC_MODULES_DIR)
        try:
            return _choice("host", "host", build, source_or_none, release, bcc_native=native, **common)
        except OSError as exc:
            notes.append(f"host headers {kdir} unusable: {exc}")
    else:
        notes.append(f"no {build}")

    if configured_dir:
        cdir = os.path.abspath(configured_dir)
        if _has_kconfig(cdir):
            pair: tuple[str, str | None] | None = (cdir, None)
        elif os.path.isdir(os.path.join(cdir, "build")):
            csrc = os.path.join(cdir, "source")
            pair = (os.path.join(cdir, "build"), csrc if os.path.isdir(csrc) else None)
        else:
            pair = None
            notes.append(f"configured headers {cdir} have neither {_KCONFIG_H} nor build/")
        if pair:
            try:
                return _choice("configured", "configured", pair[0], pair[1], release, bcc_native=False, **common)
            except OSError as exc:
                notes.append(f"configured headers {cdir} unusable: {exc}")

    for gbuild, gsource in _generic_pairs(usr_src, arch):
        try:
            return _choice("generic", "generic", gbuild, gsource, release, bcc_native=False, **common)
        except OSError as exc:
            notes.append(f"generic headers {gbuild} unusable: {exc}")
    else:
        notes.append(f"no linux-headers-*-{arch} with -common under {usr_src}")

    kheaders = os.path.join(sys_root, "kernel", "kheaders.tar.xz")
    if os.path.exists(kheaders):
        return HeadersChoice(path=None, source="kheaders",
                             detail=f"kernel's own headers {kheaders} (bcc unpacks them); {'; '.join(notes)}",
                             headers_release=release, matches_running=True)

    return HeadersChoice(
        path=None, source="none",
        detail=("no kernel headers found (" + "; ".join(notes) + "): install linux-headers-" + arch
                + f" or point {HEADERS_ENV} / --headers-dir at a headers tree; eBPF probes cannot be compiled"))


def link_modules_dir(choice: HeadersChoice, release: str | None = None,
                     modules_root: str = BCC_MODULES_DIR) -> list[str]:
    """Install a fallback choice as ``<modules_root>/<release>/{build,source}`` symlinks.

    This makes every bcc user on the host (``*-bpfcc`` tools included) find
    the headers without ``BCC_KERNEL_SOURCE``. Existing entries are never
    replaced.

    Args:
        choice: a ``configured`` or ``generic`` choice.
        release: kernel release; default the running one.
        modules_root: the modules directory bcc reads.

    Returns:
        The symlinks created (empty when nothing was needed).
    """
    if choice.source not in ("configured", "generic") or not choice.build_dir:
        return []
    kdir = os.path.join(modules_root, release or platform.release())
    os.makedirs(kdir, exist_ok=True)
    made: list[str] = []
    links = [("build", choice.build_dir), ("source", choice.source_dir)]
    for name, target in links:
        link = os.path.join(kdir, name)
        if target and not os.path.lexists(link):
            os.symlink(target, link)
            made.append(link)
    return made


# ---------------------------------------------------------------------------
# kernel features (no bcc: files, kernel config and raw bpf() calls)
# ---------------------------------------------------------------------------

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
_BPF_SYSCALL_NR = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
_BPF_MAP_TYPE_ARRAY, _BPF_MAP_TYPE_RINGBUF = 2, 27
_BPF_PROG_TYPE_TRACING, _BPF_TRACE_FENTRY = 26, 24
_BTF_KIND_FUNC = 12
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
def _btf_func_id(btf_path: str, names: tuple[str, ...]) -> tuple[str, int] | None:
    """The BTF type id of the first of ``names`` that is a FUNC in ``btf_path``."""
    try:
        with open(btf_path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if len(data) < 24 or struct.unpack_from("<H", data, 0)[0] != 0xEB9F:
        return None
    hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<IIIII", data, 4)
    strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
    wanted: dict[int, str] = {}
    for name in names:
        idx = strings.find(b"\0" + name.encode() + b"\0")
        if idx >= 0:
            wanted[idx + 1] = name
    if not wanted:
        return None
    # Extra bytes that follow each btf_type, by kind (include/uapi/linux/btf.h).
    fixed = {1: 4, 3: 12, 14: 4, 17: 4}
    per_member = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
    found: dict[str, int] = {}
    pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
    while pos + 12 <= end:
        name_off, info = struct.unpack_from("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == _BTF_KIND_FUNC and name_off in wanted:
            found[wanted[name_off]] = type_id
        pos += 12 + fixed.get(kind, 0) + per_member.get(kind, 0) * vlen
        type_id += 1
    for name in names:
        if name in found:
            return name, found[name]
    return None


def _try_fentry(btf_path: str) -> tuple[bool, str]:
    """Load and attach an empty fentry program; the kernel's answer is the truth."""
    target = _btf_func_id(btf_path, _FENTRY_TARGETS)
    if target is None:
        return False, f"none of {', '.join(_FENTRY_TARGETS)} found in {btf_path}"
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


def _release(proc_root: str) -> str:
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
    release = _release(proc_root)
    version = _version_key(release.split("-")[0])[:3]
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


# ---------------------------------------------------------------------------
# everything at daemon start
# ---------------------------------------------------------------------------

@dataclass
class KernelEnv:
    """The kernel access prepared for this process.

    Attributes:
        tracefs: tracefs directory, or None.
        tracefs_mounted_here: whether :func:`prepare` mounted it.
        headers: the kernel headers bcc will use.
        features: the kernel's eBPF features.
        messages: what was chosen and why, one line each, for the log and ``isoscope probes``.
    """

    tracefs: str | None
    tracefs_mounted_here: bool
    headers: HeadersChoice
    features: Features
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-data form (for ``--json`` output)."""
        return asdict(self)


def prepare(headers_dir: str | None = None, tracefs_candidates: Sequence[str] = DEFAULT_TRACEFS_CANDIDATES, *,
            mount_tracefs: bool = True, modules_root: str = BCC_MODULES_DIR, usr_src: str = "/usr/src",
            shim_root: str = DEFAULT_SHIM_ROOT, sys_root: str = "/sys", proc_root: str = "/proc",
            environ: MutableMapping[str, str] | None = None, probe_kernel: bool = True) -> KernelEnv:
    """Make the kernel usable for bcc; call before the first ``import bcc``.

    Mounts tracefs if needed, chooses kernel headers (building a shim when the
    headers are split), sets or clears ``BCC_KERNEL_SOURCE`` accordingly, and
    detects the kernel's eBPF features.

    Args:
        headers_dir: operator-configured headers; default ``$ISOSCOPE_KERNEL__HEADERS_DIR``.
        tracefs_candidates: where tracefs may be / is to be mounted.
        mount_tracefs: allow mounting tracefs.
        modules_root: see :func:`find_kernel_headers`.
        usr_src: see :func:`find_kernel_headers`.
        shim_root: see :func:`find_kernel_headers`.
        sys_root: where ``/sys`` is mounted.
        proc_root: where ``/proc`` is mounted.
        environ: environment to update (default ``os.environ``; libbcc reads the process environment).
        probe_kernel: see :func:`detect_features`.

    Returns:
        What was prepared, with messages for operators.
    """
    env = os.environ if environ is None else environ
    messages: list[str] = []
    tracefs, mounted = ensure_tracefs(tracefs_candidates, mount=mount_tracefs, proc_root=proc_root)
    if tracefs:
        messages.append(f"tracefs: {tracefs}" + (" (mounted by isoscope)" if mounted else ""))
    else:
        messages.append("tracefs: not available (tried " + ", ".join(tracefs_candidates) + ")")
    if tracefs and os.path.realpath(tracefs) not in {os.path.realpath(p) for p in DEFAULT_TRACEFS_CANDIDATES}:
        # libbcc and bcc's Python module only ever look at these two paths.
        messages.append(f"warning: bcc looks for tracefs only in {' or '.join(DEFAULT_TRACEFS_CANDIDATES)}, "
                        f"not {tracefs}: tracepoints will not attach")

    configured = headers_dir or env.get(HEADERS_ENV) or None
    try:
        headers = find_kernel_headers(configured_dir=configured, modules_root=modules_root, usr_src=usr_src,
                                      shim_root=shim_root, sys_root=sys_root, release=_release(proc_root))
    except OSError as exc:
        headers = HeadersChoice(path=None, source="none", detail=f"kernel headers: cannot prepare ({exc})")
    headers.apply(env)
    messages.append(f"headers[{headers.source}]: {headers.detail}")
    if headers.source in ("generic", "configured") and not headers.matches_running:
        logger.warning("using kernel headers that do not match the running kernel: %s", headers.detail)

    features = detect_features(tracefs, sys_root=sys_root, proc_root=proc_root, probe_kernel=probe_kernel)
    present = [f for f in FEATURES if getattr(features, f)]
    messages.append(f"kernel {features.release}: " + (", ".join(present) or "no eBPF features"))
    for name in FEATURES:
        if not getattr(features, name):
            messages.append(f"{name}: {features.missing_reason(name)}")
    for line in messages:
        logger.info("%s", line)
    return KernelEnv(tracefs=tracefs, tracefs_mounted_here=mounted, headers=headers, features=features,
                     messages=messages)


def _main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isoscope.kernel.env",
                                     description="Show (and with --prepare, set up) kernel access for isoscope.")
    parser.add_argument("--prepare", action="store_true", help="mount tracefs if missing and build the headers shim")
    parser.add_argument("--link-modules", action="store_true",
                        help="install fallback headers as /lib/modules/$(uname -r)/{build,source} for all bcc users")
    parser.add_argument("--headers-dir", default=None, help=f"kernel headers to prefer (default ${HEADERS_ENV})")
    parser.add_argument("--shim-root", default=DEFAULT_SHIM_ROOT, help="where merged headers shims are created")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.prepare:
        kenv = prepare(args.headers_dir, shim_root=args.shim_root, environ={})
    else:
        tracefs, _ = ensure_tracefs(mount=False)
        headers = find_kernel_headers(configured_dir=args.headers_dir or os.environ.get(HEADERS_ENV),
                                      shim_root=args.shim_root, create_shim=False)
        features = detect_features(tracefs)
        kenv = KernelEnv(tracefs=tracefs, tracefs_mounted_here=False, headers=headers, features=features,
                         messages=[f"headers[{headers.source}]: {headers.detail}"]
                         + [f"{f}: {features.missing_reason(f)}" for f in FEATURES if not getattr(features, f)])
    linked: list[str] = []
    if args.link_modules:
        linked = link_modules_dir(kenv.headers)
        kenv.messages.extend(f"linked {path}" for path in linked)

    if args.json:
        print(json.dumps(kenv.to_dict(), indent=2, sort_keys=True))
    else:
        print(f"tracefs:  {kenv.tracefs or '-'}{' (mounted now)' if kenv.tracefs_mounted_here else ''}")
        print(f"headers:  {kenv.headers.source}: {kenv.headers.detail}")
        for name in FEATURES:
            ok = getattr(kenv.features, name)
            print(f"{name:15s} {'yes' if ok else 'no ':3s}  {'' if ok else kenv.features.missing_reason(name)}")
        for path in linked:
            print(f"linked:   {path}")
    ok = kenv.headers.source != "none" and kenv.features.bpf and kenv.features.tracepoint
    return 0 if ok else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(_main())
