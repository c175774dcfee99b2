"""Which kernel headers bcc compiles against, and the shim that makes split headers usable.

Many nodes (and the DaemonSet image) have no ``/lib/modules/$(uname -r)/build``;
Debian's generic ``linux-headers-*`` packages work for tracepoint programs
because tracepoint argument layouts come from tracefs, not from the headers.
Debian splits those headers into a ``build`` tree (generated files, ``-amd64``)
and a ``source`` tree (``-common``). bcc only understands that split below the
hard-wired ``/lib/modules/<release>``; through ``BCC_KERNEL_SOURCE`` it expects
one single tree. So for any other location a *shim* directory is assembled from
symlinks that merges both trees, and ``BCC_KERNEL_SOURCE`` points at it.

Every directory (``/lib/modules``, ``/usr/src``, ``/sys``) is a parameter so
the choice can be made against a host mounted into a container and tested
against prepared trees.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import shutil
from dataclasses import dataclass
from typing import MutableMapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "BCC_ENV", "BCC_MODULES_DIR", "DEFAULT_SHIM_ROOT", "HEADERS_ENV", "HeadersChoice", "build_shim",
    "find_kernel_headers", "link_modules_dir",
]

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
