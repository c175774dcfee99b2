"""Declarations of kernel probes: what each attaches to, what it needs, what it falls back to.

A probe is one ``bpf/<subsystem>.bpf.c`` compiled as its own bcc module, so a
probe that fails to compile or attach degrades alone while the others run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # the hooks know the host; a declaration does not need to
    from isoscope.probes.hooks import ProbeSetup


@dataclass(frozen=True, slots=True)
class AttachPoint:
    """One kernel hook a probe uses.

    Attributes:
        kind: ``"tracepoint"``, ``"raw_tracepoint"``, ``"kprobe"``, ``"fentry"``
            or ``"perf_event"``.
        target: ``"category:event"`` for tracepoints (raw tracepoints use the
            same spelling; the category tells where to look in tracefs), the
            kernel function for kprobes, ``"software:cpu-clock"`` for a
            software perf event (handled by the program ``on_cpu_clock``).
        required: whether the probe is useless without it. An optional attach
            point that is missing is only reported.
        sample_period: perf events: the sampling period (ns for clock events).
    """

    kind: str
    target: str
    required: bool = True
    sample_period: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def category(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def event(self) -> str:
        return self.target.split(":", 1)[-1]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A declared probe.

    Attributes:
        name: short name used in metrics labels (``probe_attached{probe=...}``) and the CLI.
        source: file name under ``bpf/``.
        summary: what the probe measures, for ``isoscope probes``.
        attach: the hooks it uses.
        features: kernel features it needs (names of ``kernelenv.Features`` fields).
        required: the daemon reports itself degraded (not failed) without it.
        fallback: what isoscope does when the probe cannot run, in operator words.
        cflags: extra ``-D`` flags for the compiler.
        ringbuf_pages: ring buffer size (pages, power of two) for the ``events`` ring.
        kernel_defines: computes ``-D`` definitions from the running kernel at load
            time (e.g. struct offsets read from BTF); an exception makes the probe
            unavailable with that exception as the reason.
        method: how the probe measures, for ``isoscope probes`` (``kernel_defines``
            may refine it through an ``ISO_METHOD`` entry, which is not passed to the compiler).
        setup: the probe's map setup, run once after it attached: writes what user space
            knows into its maps and returns the runtime refreshed every housekeeping tick
            (see :mod:`isoscope.probes.hooks`).
    """

    name: str
    source: str
    summary: str
    attach: tuple[AttachPoint, ...]
    features: tuple[str, ...] = ("bpf", "raw_tracepoint", "ringbuf")
    required: bool = True
    fallback: str = ""
    cflags: tuple[str, ...] = field(default_factory=tuple)
    ringbuf_pages: int = 64
    kernel_defines: Callable[[], Mapping[str, int | str]] | None = None
    method: str = "tracepoint"
    setup: ProbeSetup | None = None

    def attach_strings(self) -> list[str]:
        return [str(a) for a in self.attach]


def tp(target: str, required: bool = True) -> AttachPoint:
    """A tracepoint attach point (``TRACEPOINT_PROBE``)."""
    return AttachPoint("tracepoint", target, required)


def raw_tp(target: str, required: bool = True) -> AttachPoint:
    """A raw tracepoint attach point (``RAW_TRACEPOINT_PROBE``); ``target`` is ``category:event``."""
    return AttachPoint("raw_tracepoint", target, required)


def kprobe(function: str, required: bool = False) -> AttachPoint:
    """A kprobe attach point: only ever an optional extra (many kernels have no kprobes)."""
    return AttachPoint("kprobe", function, required)


def fentry(function: str, required: bool = False) -> AttachPoint:
    """An fentry (BPF trampoline) attach point: an optional extra where the kernel allows it."""
    return AttachPoint("fentry", function, required)


def perf_event(target: str, sample_period: int, required: bool = True) -> AttachPoint:
    """A sampling perf event on every CPU; ``target`` is ``software:<event>`` (e.g. ``software:cpu-clock``)."""
    return AttachPoint("perf_event", target, required, sample_period)
