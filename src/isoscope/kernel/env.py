"""Kernel access prepared by the daemon itself at start.

Before any bcc program is compiled, three things must be true on the node:

* tracefs is mounted where bcc looks for it (:mod:`isoscope.kernel.tracefs`);
  bcc picks the path when it is *imported*, so :func:`prepare` runs before the
  first ``import bcc``.
* bcc finds kernel headers, through a merged shim when they are split
  (:mod:`isoscope.kernel.headers`).
* The kernel's eBPF features are known without bcc, so every probe that
  cannot run is reported with an operator-actionable reason
  (:mod:`isoscope.kernel.features`).

Run ``python -m isoscope.kernel.env`` to print the choices, ``--prepare`` to
also mount tracefs, and ``--link-modules`` to install the fallback headers as
``/lib/modules/$(uname -r)/{build,source}`` for every bcc user on the host.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, MutableMapping, Sequence

from isoscope.kernel.features import FEATURES, Features, detect_features, running_release
from isoscope.kernel.headers import (BCC_MODULES_DIR, DEFAULT_SHIM_ROOT, HEADERS_ENV, HeadersChoice,
                                     find_kernel_headers, link_modules_dir)
from isoscope.kernel.tracefs import DEFAULT_TRACEFS_CANDIDATES, ensure_tracefs

logger = logging.getLogger(__name__)

__all__ = ["KernelEnv", "prepare"]


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
                                      shim_root=shim_root, sys_root=sys_root, release=running_release(proc_root))
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
