"""The Linux capabilities isoscope needs, checked at start.

The DaemonSet grants exactly these (no ``privileged``): eBPF programs and maps
(``CAP_BPF``), tracepoints and perf events (``CAP_PERFMON``), locked memory for
maps on older kernels (``CAP_SYS_RESOURCE``), reading other processes'
``/proc`` entries (``CAP_SYS_PTRACE``) and files they own
(``CAP_DAC_READ_SEARCH``). Kernels before 5.8 have no CAP_BPF/CAP_PERFMON;
there ``CAP_SYS_ADMIN`` stands in for both.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39

REQUIRED: dict[str, int] = {
    "CAP_BPF": CAP_BPF,
    "CAP_PERFMON": CAP_PERFMON,
    "CAP_SYS_PTRACE": CAP_SYS_PTRACE,
    "CAP_DAC_READ_SEARCH": CAP_DAC_READ_SEARCH,
}
"""Capabilities without which isoscope cannot do its job."""

RECOMMENDED: dict[str, int] = {"CAP_SYS_RESOURCE": CAP_SYS_RESOURCE}
"""Needed only where BPF maps are charged to RLIMIT_MEMLOCK (kernels before 5.11)."""

_WHY = {
    "CAP_BPF": "load eBPF programs and maps",
    "CAP_PERFMON": "attach to tracepoints",
    "CAP_SYS_PTRACE": "read other processes' /proc entries (namespaces, maps)",
    "CAP_DAC_READ_SEARCH": "read cgroup and /proc files owned by other users",
    "CAP_SYS_RESOURCE": "raise RLIMIT_MEMLOCK for BPF maps on kernels before 5.11",
}


def effective(proc_root: str = "/proc") -> int:
    """The process's effective capability mask (``CapEff``), 0 when unreadable."""
    try:
        with open(f"{proc_root}/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def missing(mask: int | None = None, wanted: dict[str, int] | None = None) -> list[str]:
    """Names of wanted capabilities not in ``mask`` (CAP_SYS_ADMIN covers BPF and PERFMON)."""
    mask = effective() if mask is None else mask
    wanted = REQUIRED if wanted is None else wanted
    admin = bool(mask & (1 << CAP_SYS_ADMIN))
    out = []
    for name, bit in wanted.items():
        if mask & (1 << bit):
            continue
        if admin and name in ("CAP_BPF", "CAP_PERFMON"):
            continue
        out.append(name)
    return out


def explain(names: list[str]) -> str:
    """One line an operator can act on."""
    parts = [f"{n} (to {_WHY[n]})" for n in names]
    return "missing capabilities: " + ", ".join(parts) + "; grant them to the isoscope container"
