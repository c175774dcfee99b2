"""VM identity on a KVM host: VMM processes, their vCPU threads, and who owns them.

A KVM guest's vCPUs are threads of its VMM process (QEMU, Firecracker, Cloud
Hypervisor, crosvm); the ``kvm`` probe reports exits per vCPU thread and per
VMM tgid. This module finds the VMMs — by name and, for any other VMM, by the
``anon_inode:kvm-vm`` file descriptor every KVM user holds — names their vCPU
threads, and maps each VMM to the pod or container that owns it through its
cgroup (Kata Containers and Firecracker-based runtimes put the VMM in the
pod's cgroup). Spans from workloads inside such a VM are joined at VM scope:
every stall of the VMM's threads belongs to the VM.

Every root is a parameter so the same code runs on a host ``/proc`` mounted
into a DaemonSet pod and on fixture trees.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field

from isoscope.host import cgroupfs
from isoscope.model import IsolationStack
from isoscope.host.stack import detect_host_stack, detect_process_stack

logger = logging.getLogger(__name__)

__all__ = ["VmInfo", "VmRegistry", "find_vmms", "guest_stack", "vcpu_threads", "vm_for_tid", "vmm_kind"]

# Executable/command prefixes of known VMMs → VMM kind.
VMM_PREFIXES: tuple[tuple[str, str], ...] = (
    ("qemu-system-", "qemu"), ("qemu-kvm", "qemu"), ("firecracker", "firecracker"),
    ("cloud-hypervisor", "cloud-hypervisor"), ("crosvm", "crosvm"),
)

# vCPU thread names each VMM gives (comm, at most 15 characters):
#   QEMU "CPU <n>/KVM" (qemu_thread_create in accel/kvm), Firecracker "fc_vcpu <n>",
#   Cloud Hypervisor "vcpu<n>", crosvm "crosvm_vcpu<n>".
_VCPU_COMM = re.compile(r"^(?:CPU (\d+)/KVM|fc_vcpu ?(\d+)|vcpu(\d+)|crosvm_vcpu ?(\d+))$")
_KVM_VM_FD = "anon_inode:kvm-vm"
_KVM_VCPU_FD = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")


@dataclass
class VmInfo:
    """One VM running on this host.

    Attributes:
        pid: VMM process (host PID namespace).
        vmm: ``qemu``, ``firecracker``, ``cloud-hypervisor``, ``crosvm`` or ``kvm``
            (an unnamed process holding a KVM VM).
        vm_id: the VM's name where the VMM takes one (Firecracker ``--id``, QEMU
            ``-name``), else ``""``.
        vcpus: vCPU thread id → vCPU index (-1 when the thread is not named).
        vcpu_fds: vCPU indices the VMM holds file descriptors for.
        cgroup_path: the VMM's cgroup path.
        container_id, pod_uid, runtime: owner from the cgroup path.
        hypervisor: what spans from inside this VM report (``firecracker`` or ``kvm``).
    """

    pid: int
    vmm: str
    vm_id: str = ""
    vcpus: dict[int, int] = field(default_factory=dict)
    vcpu_fds: list[int] = field(default_factory=list)
    cgroup_path: str = ""
    container_id: str = ""
    pod_uid: str = ""
    runtime: str = "none"
    hypervisor: str = "kvm"

    @property
    def label(self) -> str:
        """The ``vm`` label of ``isoscope_kvm_exit*_total``: ``<vmm>/<id>``, ``<vmm>/pod-<uid>`` or ``<vmm>/<pid>``."""
        if self.vm_id:
            return f"{self.vmm}/{self.vm_id}"
        if self.pod_uid:
            return f"{self.vmm}/pod-{self.pod_uid}"
        return f"{self.vmm}/{self.pid}"


def _read(path: str, limit: int = 65536) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return ""


def _argv(pid: int, proc_root: str) -> list[str]:
    return [a for a in _read(os.path.join(proc_root, str(pid), "cmdline")).split("\0") if a]


def _exe(pid: int, proc_root: str) -> str:
    try:
        return os.path.basename(os.readlink(os.path.join(proc_root, str(pid), "exe"))).removesuffix(" (deleted)")
    except OSError:
        return ""


def vmm_kind(name: str) -> str | None:
    """VMM kind of an executable / argv[0] / comm name, or ``None``."""
    for prefix, kind in VMM_PREFIXES:
        if name.startswith(prefix):
            return kind
    return None


def _kvm_fds(pid: int, proc_root: str) -> tuple[bool, list[int]]:
    """(holds a KVM VM fd, vCPU indices of held vCPU fds)."""
    base = os.path.join(proc_root, str(pid), "fd")
    has_vm = False
    vcpus: list[int] = []
    try:
        names = os.listdir(base)
    except OSError:
        return False, []
    for name in names:
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if target == _KVM_VM_FD:
            has_vm = True
        else:
            m = _KVM_VCPU_FD.match(target)
            if m:
                vcpus.append(int(m.group(1)))
    return has_vm, sorted(set(vcpus))  # a VMM may hold several fds of one vCPU (dup, mmap)


def vcpu_threads(pid: int, proc_root: str = "/proc") -> dict[int, int]:
    """vCPU threads of a VMM process, from the thread names VMMs give them.

    Args:
        pid: VMM process id.
        proc_root: procfs root.

    Returns:
        thread id → vCPU index. Empty when no thread carries a vCPU name (the
        VMM's threads are then all candidates; the kernel probe tells them apart
        by where ``kvm_exit`` fires).
    """
    out: dict[int, int] = {}
    task_dir = os.path.join(proc_root, str(pid), "task")
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return out
    for tid in tids:
        if not tid.isdigit():
            continue
        m = _VCPU_COMM.match(_read(os.path.join(task_dir, tid, "comm"), 64).strip())
        if m:
            out[int(tid)] = int(next(g for g in m.groups() if g is not None))
    return out


def _vm_id(vmm: str, argv: list[str]) -> str:
    for flag in (("--id",) if vmm in ("firecracker", "cloud-hypervisor") else ("-name",)):
        for i, arg in enumerate(argv):
            value = ""
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg[len(flag) + 1:]
            if value:
                # QEMU: "-name guest=vm1,debug-threads=on" or "-name vm1"
                for part in value.split(","):
                    if part.startswith("guest="):
                        return part[len("guest="):]
                return value.split(",")[0]
    return ""


def _identify(pid: int, proc_root: str, sys_root: str, dev_root: str,
              host: IsolationStack | None) -> VmInfo | None:
    argv = _argv(pid, proc_root)
    comm = _read(os.path.join(proc_root, str(pid), "comm"), 64).strip()
    kind = None
    for name in (_exe(pid, proc_root), os.path.basename(argv[0]) if argv else "", comm):
        kind = vmm_kind(name) if name else None
        if kind:
            break
    has_vm, vcpu_fds = _kvm_fds(pid, proc_root)
    if kind is None and not has_vm:
        return None
    kind = kind or "kvm"
    stack = detect_process_stack(pid, proc_root, sys_root, dev_root, host=host)
    return VmInfo(
        pid=pid, vmm=kind, vm_id=_vm_id(kind, argv), vcpus=vcpu_threads(pid, proc_root), vcpu_fds=vcpu_fds,
        cgroup_path=stack.cgroup_path, container_id=stack.container_id, pod_uid=stack.pod_uid,
        runtime=stack.runtime, hypervisor="firecracker" if kind == "firecracker" else "kvm",
    )


def find_vmms(proc_root: str = "/proc", sys_root: str = "/sys", dev_root: str = "/dev",
              host: IsolationStack | None = None) -> list[VmInfo]:
    """Every VMM process under ``proc_root``.

    A process is a VMM when its executable, ``argv[0]`` or ``comm`` names a
    known VMM, or when it holds a KVM VM file descriptor (any other VMM,
    including test harnesses and unknown ones).

    Args:
        proc_root: procfs root.
        sys_root: sysfs root (for the host stack).
        dev_root: devtmpfs root.
        host: a previously detected host stack (detected here if ``None``).

    Returns:
        The VMs, ordered by VMM pid.
    """
    if host is None:
        host = detect_host_stack(proc_root, sys_root, dev_root)
    out = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return out
    for entry in sorted((e for e in entries if e.isdigit()), key=int):
        info = _identify(int(entry), proc_root, sys_root, dev_root, host)
        if info is not None:
            out.append(info)
    return out


def _tgid(tid: int, proc_root: str) -> int | None:
    value = cgroupfs.read_status_field(tid, "Tgid", proc_root)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def vm_for_tid(tid: int, proc_root: str = "/proc", sys_root: str = "/sys",
               dev_root: str = "/dev") -> VmInfo | None:
    """The VM a thread belongs to (any thread of a VMM process), or ``None``.

    A one-off lookup; the daemon uses :class:`VmRegistry`, which caches.
    """
    tgid = _tgid(tid, proc_root)
    if tgid is None:
        return None
    return _identify(tgid, proc_root, sys_root, dev_root, None)


def guest_stack(vm: VmInfo, host: IsolationStack) -> IsolationStack:
    """The isolation stack of a workload running inside ``vm`` (joined at VM scope).

    The guest sits on the host's hardware assist (L-0), under the VMM's
    hypervisor (L-1) with virtio devices (L-2); a Firecracker microVM is also
    the L-4 sandbox; a VMM placed in a pod adds the pod's L-3.
    """
    layers = [layer for layer in host.layers if layer == "L-0"] + ["L-1", "L-2"]
    evidence = {"L-1": [f"guest of {vm.vmm} VMM pid {vm.pid} ({vm.label})"],
                "L-2": [f"virtio devices of {vm.vmm}"]}
    if "L-0" in layers:
        evidence["L-0"] = list(host.evidence.get("L-0", []))
    sandbox = ""
    runtime = vm.runtime if vm.runtime not in ("none", "systemd") else "none"
    if vm.pod_uid or vm.container_id:
        layers.append("L-3")
        evidence["L-3"] = [f"VMM in cgroup {vm.cgroup_path}"]
    if vm.vmm == "firecracker":
        layers.append("L-4")
        evidence["L-4"] = ["Firecracker microVM"]
        sandbox = runtime = "firecracker"
    return IsolationStack(layers=layers, runtime=runtime, hypervisor=vm.hypervisor, sandbox=sandbox,
                          container_id=vm.container_id, pod_uid=vm.pod_uid, cgroup_path=vm.cgroup_path,
                          evidence=evidence)


class VmRegistry:
    """Cached VMM discovery for the daemon: tgid → ``VmInfo``, refreshed periodically.

    Args:
        proc_root, sys_root, dev_root: filesystem roots.
    """

    def __init__(self, proc_root: str = "/proc", sys_root: str = "/sys", dev_root: str = "/dev") -> None:
        self._roots = (proc_root, sys_root, dev_root)
        self._lock = threading.Lock()
        self._by_pid: dict[int, VmInfo] = {}
        self._host: IsolationStack | None = None

    def refresh(self) -> list[VmInfo]:
        """Rescan ``/proc``; returns the VMs found."""
        proc_root, sys_root, dev_root = self._roots
        if self._host is None:
            self._host = detect_host_stack(proc_root, sys_root, dev_root)
        vms = find_vmms(proc_root, sys_root, dev_root, host=self._host)
        with self._lock:
            gone = set(self._by_pid) - {v.pid for v in vms}
            self._by_pid = {v.pid: v for v in vms}
        if gone:
            logger.debug("VMMs gone: %s", sorted(gone))
        return vms

    def vm_for_pid(self, pid: int) -> VmInfo | None:
        """The VM whose VMM has tgid ``pid`` (from the last refresh)."""
        with self._lock:
            return self._by_pid.get(pid)

    def vm_for_tid(self, tid: int) -> VmInfo | None:
        """The VM a thread belongs to (``Tgid`` of the thread, then the cache)."""
        with self._lock:
            for vm in self._by_pid.values():
                if tid == vm.pid or tid in vm.vcpus:
                    return vm
        tgid = _tgid(tid, self._roots[0])
        return self.vm_for_pid(tgid) if tgid is not None else None

    def vm_for_owner(self, container_id: str = "", pod_uid: str = "") -> VmInfo | None:
        """The VM whose VMM runs in that container or pod (Kata, Firecracker-based runtimes)."""
        if not container_id and not pod_uid:
            return None
        with self._lock:
            for vm in self._by_pid.values():
                if (container_id and vm.container_id == container_id) or (pod_uid and vm.pod_uid == pod_uid):
                    return vm
        return None

    def vm_label(self, tgid: int) -> str:
        """``vm`` metric label of a VMM tgid (``unknown/<pid>`` if not (yet) discovered)."""
        vm = self.vm_for_pid(tgid)
        return vm.label if vm else f"unknown/{tgid}"
