"""Pieces the kernel benchmarks share: a probe loaded and drained exactly as the daemon does it, the
whole daemon started with its default probes, the reference tools, an empty-program floor, the small C
load generators they time, and the provenance every result file records."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


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


def provenance(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Where a result came from: git commit (``+dirty`` with local changes), exact command, kernel, time."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    args = list(sys.argv if argv is None else argv)
    return {"commit": commit, "command": shlex.join([sys.executable, *args]), "kernel": os.uname().release,
            "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def provenance_lines(p: Mapping[str, str]) -> list[str]:
    """Markdown lines recording :func:`provenance`."""
    return [f"Commit `{p['commit']}`, kernel {p['kernel']}, {p['utc']} UTC. Command: `{p['command']}`"]


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


class EmptyPrograms:
    """The floor: one empty ``RAW_TRACEPOINT_PROBE`` per raw tracepoint, attached only inside ``with``.

    Compiled once; entering attaches, leaving detaches (so rounds can interleave cheaply).
    """

    def __init__(self, tracepoints: Sequence[str]) -> None:
        import_bcc()
        from bcc import BPF

        self.tracepoints = [tp.encode() for tp in tracepoints]
        self.bpf = BPF(text="\n".join(f"RAW_TRACEPOINT_PROBE({tp}) {{ return 0; }}" for tp in tracepoints))
        for tp in self.tracepoints:
            self.bpf.detach_raw_tracepoint(tp=tp)

    def __enter__(self) -> "EmptyPrograms":
        for tp in self.tracepoints:
            self.bpf.attach_raw_tracepoint(tp=tp, fn_name=b"raw_tracepoint__" + tp)
        return self

    def __exit__(self, *exc: object) -> None:
        for tp in self.tracepoints:
            self.bpf.detach_raw_tracepoint(tp=tp)

    def close(self) -> None:
        self.bpf.cleanup()


class ReferenceTool:
    """A bcc reference tool (``syscount-bpfcc -L``, ``runqlat-bpfcc``) running, attached, inside ``with``.

    Args:
        argv: the command; its first word is looked up on PATH and in /usr/sbin.
        ready_word: the tool prints a line containing it once its programs are attached.
    """

    def __init__(self, argv: Sequence[str], ready_word: str = "Tracing") -> None:
        tool = shutil.which(argv[0]) or f"/usr/sbin/{argv[0]}"
        self.argv = [tool, *argv[1:]]
        self.ready_word = ready_word

    def __enter__(self) -> "ReferenceTool":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if self.ready_word in line:
                return self
        self._stop()
        raise RuntimeError(f"{shlex.join(self.argv)} did not attach")

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __exit__(self, *exc: object) -> None:
        self._stop()


def _lab_on_path() -> None:
    lab = str(ROOT / "lab")
    if lab not in sys.path:
        sys.path.insert(0, lab)


@contextlib.contextmanager
def whole_daemon(config: Mapping[str, Any] | None = None, settle_s: float = 2.0,
                 require: Sequence[str] = ("sched", "syscalls", "lifecycle")) -> Iterator[Any]:
    """``isoscope run`` with its default probes (plus ``config``), ready, for the duration of ``with``.

    Started through the lab's launcher (``isoscope_lab.launcher.IsoscopeDaemon``): the same command line
    an operator runs, listeners on free ports, stopped (SIGTERM, then its process group) on leaving.
    Waits until the probes named in ``require`` are attached (the receivers answer before the probes
    are loaded); ``settle_s`` lets start-up work (the first /proc scans) finish before measuring.
    """
    _lab_on_path()
    from isoscope_lab.launcher import IsoscopeDaemon

    with IsoscopeDaemon(config=dict(config or {})) as daemon:
        deadline = time.monotonic() + 60
        # The receivers are ready before the probes are loaded: wait for the loader's log lines.
        while not all(f"probe {name} attached" in daemon.log_text(since_start=True) for name in require):
            if time.monotonic() > deadline or not daemon.alive():
                raise RuntimeError(f"the daemon did not attach {', '.join(require)}:\n{daemon.log_tail(30)}")
            time.sleep(0.2)
        time.sleep(settle_s)
        yield daemon


def daemon_command() -> str:
    """The daemon's command line as the launcher runs it (for result files)."""
    _lab_on_path()
    from isoscope_lab.launcher import IsoscopeDaemon

    d = IsoscopeDaemon()
    try:
        return shlex.join(d.argv())
    finally:
        d.close()
