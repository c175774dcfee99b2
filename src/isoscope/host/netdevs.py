"""Which network interfaces are veth ends, in every network namespace of the node.

The netns probe pairs a packet queued on one veth end with its arrival on the
peer. Tracepoints only give interface names, so user space lists the names of
veth ends: in the host namespace from sysfs (a veth's ``iflink`` names its
peer, not itself), and in the other namespaces from ``/proc/<pid>/net/dev`` of
one process per namespace (pod-side ends such as ``eth0``).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def host_veth_names(sys_root: str = "/sys") -> set[str]:
    """Veth (and other peer-linked) interfaces of the namespace ``sys_root`` belongs to."""
    out = set()
    base = os.path.join(sys_root, "class", "net")
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        d = os.path.join(base, name)
        ifindex, iflink = _read(os.path.join(d, "ifindex")), _read(os.path.join(d, "iflink"))
        if "DEVTYPE=veth" in _read(os.path.join(d, "uevent")) or (ifindex and iflink and ifindex != iflink
                                                                   and not os.path.exists(os.path.join(d, "device"))):
            out.add(name)
    return out


def namespace_interface_names(proc_root: str = "/proc", limit: int = 100_000) -> set[str]:
    """Interface names (``lo`` excluded) of every network namespace other than ``proc_root``'s init one."""
    init_ns = None
    for pid in (1, 2):  # init, else kthreadd: both live in the initial namespaces
        try:
            init_ns = os.stat(f"{proc_root}/{pid}/ns/net").st_ino
            break
        except OSError:
            continue
    seen_ns: set[int] = set()
    names: set[str] = set()
    try:
        pids = [p for p in os.listdir(proc_root) if p.isdigit()][:limit]
    except OSError:
        return names
    for pid in pids:
        try:
            ns = os.stat(f"{proc_root}/{pid}/ns/net").st_ino
        except OSError:
            continue
        if ns == init_ns or ns in seen_ns:
            continue
        seen_ns.add(ns)
        try:
            with open(f"{proc_root}/{pid}/net/dev") as f:
                lines = f.readlines()[2:]
        except OSError:
            continue
        for line in lines:
            name = line.split(":", 1)[0].strip()
            if name and name != "lo":
                names.add(name)
    return names


def veth_names(proc_root: str = "/proc", sys_root: str = "/sys") -> set[str]:
    """Every name the netns probe should treat as a veth end (kernel interface names are ≤ 15 bytes)."""
    return {n for n in host_veth_names(sys_root) | namespace_interface_names(proc_root) if len(n.encode()) <= 15}
