"""Trust rules for span identity: which senders may speak for others, and why a claim is refused.

A span's resource and attributes *claim* an identity (``process.pid``,
``thread.id``, ``container.id``, ``k8s.pod.uid``); the connection *proves* one
(the process owning the client socket, :mod:`isoscope.metadata.peer`). The
resolver joins a span with kernel data only for an identity the proof
supports:

* an ordinary sender may only name itself, another process of its own PID
  namespace and workload (same pod, or same container), and threads of that
  process;
* a *trusted relay* (an OpenTelemetry Collector agent, configured here by
  process name, executable or cgroup path prefix, or authenticated by the
  receiver through mTLS / a bearer token) may name any workload through
  ``k8s.pod.uid`` / ``container.id``; a ``process.pid`` it relays is then
  looked up inside that workload only. A relay is never itself the workload.

Every refused claim is counted as ``identity_rejected_total{reason}`` with one
of :data:`REASONS`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["REASONS", "RelayPolicy", "Claims"]

REASONS: tuple[str, ...] = (
    "unproven_sender",       # no socket owner on this node: claims cannot be checked
    "pid_not_in_sender_ns",  # process.pid is no process of the sender's PID namespace
    "pid_not_in_workload",   # a relayed process.pid is no process of the named container/pod
    "pid_without_workload",  # a relay named a process.pid but no container or pod to find it in
    "thread_not_in_process",  # thread.id is no thread of the resolved process
    "container_mismatch",    # container.id (or the named process) is not the sender's container
    "pod_mismatch",          # k8s.pod.uid is not the sender's pod (or the container's)
    "unknown_container",     # container.id names no container of this node (or too short / ambiguous)
    "unknown_pod",           # k8s.pod.uid names no pod of this node
    "relay_self",            # a relay's own spans: never attributed to the relay
)


def _as_int(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 0
    return n if n > 0 else 0


@dataclass(slots=True, frozen=True)
class Claims:
    """What a span says about who produced it (normalized; 0 / "" when absent or malformed)."""

    pid: int = 0
    tid: int = 0
    container_id: str = ""
    pod_uid: str = ""
    raw_container: bool = False  # a container.id was given (even if malformed)
    raw_pod: bool = False

    @classmethod
    def from_span(cls, identity: dict[str, Any], tid: Any) -> Claims:
        """From :func:`isoscope.metadata.resolver.resource_identity` and the span's ``thread.id``."""
        from isoscope.metadata.containers import normalize_container_id, normalize_pod_uid
        raw_c = identity.get("container.id")
        raw_p = identity.get("k8s.pod.uid")
        return cls(pid=_as_int(identity.get("process.pid")), tid=_as_int(tid),
                   container_id=normalize_container_id(raw_c), pod_uid=normalize_pod_uid(raw_p),
                   raw_container=bool(raw_c), raw_pod=bool(raw_p))


@dataclass(slots=True)
class RelayPolicy:
    """Which connection owners are trusted relays.

    Each non-empty criterion must hold (AND across kinds, OR within a kind).
    ``comm`` and ``exe`` are chosen by whoever starts the process, so on a node
    with hostile tenants pair them with ``cgroup_prefixes`` (set by the
    container runtime) or authenticate relays at the receiver instead.

    Args:
        comms: process names (``/proc/<pid>/comm``), e.g. ``otelcol-contrib``.
        exes: executable paths (``/proc/<pid>/exe``) as seen by the host.
        cgroup_prefixes: cgroup v2 path prefixes, e.g. ``/kubepods.slice/.../pod<uid>.slice``;
            a prefix matches whole path components only.
    """

    comms: tuple[str, ...] = ()
    exes: tuple[str, ...] = ()
    cgroup_prefixes: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.comms or self.exes or self.cgroup_prefixes)

    def matches(self, pid: int, cgroup_path: str, proc_root: str = "/proc") -> bool:
        """Whether process ``pid`` (with v2 cgroup ``cgroup_path``) is a trusted relay."""
        if not self.enabled or pid <= 0:
            return False
        if self.comms:
            try:
                with open(f"{proc_root}/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                    comm = fh.read().strip()
            except OSError:
                return False
            if comm not in self.comms:
                return False
        if self.exes:
            try:
                exe = os.readlink(f"{proc_root}/{pid}/exe")
            except OSError:
                return False
            if exe not in self.exes:
                return False
        if self.cgroup_prefixes:
            path = cgroup_path.rstrip("/") + "/"
            if not any(path.startswith(p.rstrip("/") + "/") for p in self.cgroup_prefixes):
                return False
        return True
