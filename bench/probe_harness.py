"""Pieces the kernel benchmarks share: a probe loaded and drained exactly as the daemon does it, and
the small C load generators they time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping


def import_bcc() -> None:
    """Make Debian's bcc importable from the venv when the bridge is not in place."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        sys.path.append("/usr/lib/python3/dist-packages")


def build_c(workdir: str, name: str, source: str, opt: str = "-O2") -> str:
    """Compile a one-file C program into ``workdir``; returns the executable's path."""
    src, exe = os.path.join(workdir, f"{name}.c"), os.path.join(workdir, name)
    Path(src).write_text(source)
    subprocess.run(["gcc", opt, "-o", exe, src], check=True)
    return exe


class AttachedProbe:
    """``with AttachedProbe(spec) as p:`` — ``p.manager`` is the loader, ``p.bpf`` the bcc module.

    Args:
        spec: the probe (a ``isoscope.probes.catalog`` entry).
        defines: extra ``-D`` definitions, as the daemon passes them.
        sink: receives decoded events (default: dropped).
        poll_interval_s: ring-buffer drain interval of the background thread.
    """

    def __init__(self, spec: Any, *, defines: Mapping[str, int | str] | None = None,
                 sink: Callable[[Any], None] | None = None, poll_interval_s: float = 0.02) -> None:
        self.spec = spec
        self.defines = dict(defines or {})
        self.sink = sink or (lambda _ev: None)
        self.poll_interval_s = poll_interval_s

    def __enter__(self) -> "AttachedProbe":
        import_bcc()
        from isoscope.kernel.env import prepare
        from isoscope.model import Stats
        from isoscope.probes.loader import ProbeManager

        self.manager = ProbeManager([self.spec], prepare().features, self.sink, Stats(), defines=self.defines)
        (status,) = self.manager.load()
        if not status.attached:
            raise RuntimeError(f"probe {self.spec.name} did not attach: {status.reason}")
        self.bpf = self.manager.bpf(self.spec.name)
        self.manager.start(poll_interval_s=self.poll_interval_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.manager.shutdown()
