"""Isolation-stack discovery: which of the layers L-0 … L-4 sit under the node or a process.

The host stack (L-0 hardware assist, L-1 hypervisor, L-2 paravirtual devices)
comes from ``/proc/cpuinfo``, ``/sys`` (DMI, ``/sys/hypervisor``, the virtio,
Xen and VMBus buses, clocksources) and ``/dev``. A process adds L-3 (container
runtime from its cgroup path, namespaces that differ from the initial ones)
and L-4 (gVisor, Firecracker, WASM runtimes, seccomp filters), read from
``/proc/<pid>``.

Every root is a parameter so the same code runs against a host filesystem
mounted into a DaemonSet pod and against fixture trees.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from isoscope.host import cgroupfs
from isoscope.model import HYPERVISORS, LAYERS, IsolationStack

logger = logging.getLogger(__name__)

__all__ = [
    "VIRTIO_DEVICE_NAMES",
    "detect_host_stack",
    "detect_process_stack",
    "gvisor_role",
]

NOTES = "notes"
"""Evidence key for observations that do not by themselves make a layer present."""

# Device ids from the virtio specification (1.3, section 5 "Device Types").
VIRTIO_DEVICE_NAMES: dict[int, str] = {
    1: "net", 2: "block", 3: "console", 4: "rng", 5: "balloon", 6: "iomem",
    7: "rpmsg", 8: "scsi", 9: "9p", 10: "mac80211-wlan", 11: "rproc-serial",
    12: "caif", 13: "balloon", 16: "gpu", 17: "clock", 18: "input",
    19: "vsock", 20: "crypto", 21: "signal-dist", 22: "pstore", 23: "iommu",
    24: "mem", 25: "sound", 26: "fs", 27: "pmem", 28: "rpmb",
    29: "mac80211-hwsim", 30: "video-encoder", 31: "video-decoder", 32: "scmi",
    33: "nitro-sec-mod", 34: "i2c", 35: "watchdog", 36: "can", 38: "param-server",
    39: "audio-policy", 40: "bluetooth", 41: "gpio", 42: "rdma",
}

# Processes that run guests: each is the L-1 boundary for the guest it hosts.
_VMM_NAMES = ("qemu-system-", "qemu-kvm", "firecracker", "cloud-hypervisor", "crosvm")
_WASM_RUNTIMES = {"wasmtime": "wasmtime", "wasmedge": "wasmedge"}
_WASM_LIBS = (("libwasmtime", "wasmtime"), ("_libwasmtime", "wasmtime"), ("libwasmedge", "wasmedge"))
# Sandboxes in order of precedence when several apply (innermost/strongest first).
_SANDBOX_ORDER = ("gvisor", "firecracker", "wasmedge", "wasmtime", "seccomp")
_NS_KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
_GVISOR_VERSION = re.compile(r"^Linux version \S+ #\d+ SMP \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \w+ \d{4}\s*$")
_ANCESTOR_DEPTH = 32


@dataclass
class _Builder:
    """Accumulates layers and evidence before producing an ``IsolationStack``."""

    stack: IsolationStack = field(default_factory=IsolationStack)

    def add(self, layer: str, fact: str) -> None:
        if layer not in self.stack.layers:
            self.stack.layers.append(layer)
        self.note(layer, fact)

    def note(self, key: str, fact: str) -> None:
        facts = self.stack.evidence.setdefault(key, [])
        if fact not in facts:
            facts.append(fact)

    def build(self) -> IsolationStack:
        self.stack.layers.sort(key=LAYERS.index)
        return self.stack


# ---------------------------------------------------------------------------
# Small readers
# ---------------------------------------------------------------------------

def _read(path: str, limit: int = 1 << 20) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return None


def _read_strip(path: str) -> str:
    return (_read(path, 4096) or "").strip()


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _cpu_flags(proc_root: str) -> set[str]:
    text = _read(os.path.join(proc_root, "cpuinfo")) or ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return set(value.split())
    return set()


def _dmi(sys_root: str) -> dict[str, str]:
    base = os.path.join(sys_root, "class", "dmi", "id")
    out = {}
    for name in ("sys_vendor", "product_name", "product_version", "bios_vendor",
                 "bios_version", "board_vendor", "chassis_asset_tag"):
        value = _read_strip(os.path.join(base, name))
        if value:
            out[name] = value
    return out


# ---------------------------------------------------------------------------
# Host: L-0, L-1, L-2
# ---------------------------------------------------------------------------

def _detect_l0(b: _Builder, flags: set[str], sys_root: str, dev_root: str) -> None:
    assist = sorted(flags & {"vmx", "svm", "sev", "sev_es", "sev_snp", "tdx_guest"})
    for flag in assist:
        b.add("L-0", f"cpu flag {flag}")
    sev = _read_strip(os.path.join(sys_root, "module", "kvm_amd", "parameters", "sev"))
    if sev in ("Y", "1"):
        b.add("L-0", "kvm_amd sev=Y")
    tpms = _listdir(os.path.join(sys_root, "class", "tpm"))
    if os.path.exists(os.path.join(dev_root, "tpm0")):
        b.add("L-0", "TPM /dev/tpm0")
    for tpm in tpms:
        b.add("L-0", f"TPM {tpm} in /sys/class/tpm")
    if os.path.exists(os.path.join(dev_root, "kvm")):
        hw_modules = [m for m in ("kvm_intel", "kvm_amd")
                      if os.path.isdir(os.path.join(sys_root, "module", m))]
        if hw_modules:
            b.add("L-0", f"/dev/kvm backed by {','.join(hw_modules)}")
        elif assist:
            b.add("L-0", "/dev/kvm present")
        else:
            # KVM without VT-x/AMD-V (e.g. the kvm_pvm software backend) can host
            # guests but gives them no hardware assist.
            b.note(NOTES, "/dev/kvm present without VMX/SVM (no hardware assist)")


def _virtio_transport(dev_dir: str, sys_root: str) -> str:
    """``pci``/``mmio``/``ccw`` from where the device sits in the sysfs device tree."""
    try:
        real = os.path.relpath(os.path.realpath(dev_dir), os.path.realpath(sys_root))
    except (OSError, ValueError):
        return "?"
    real = "/" + real
    if "virtio_mmio" in real or "virtio-mmio" in real or "LNRO0005" in real:
        return "mmio"
    if "/pci" in real:
        return "pci"
    if "/ccw" in real or "/css" in real:
        return "ccw"
    return "?"


def _virtio_devices(sys_root: str) -> list[tuple[str, str, str]]:
    """(device name, type name, transport) for each device on the virtio bus."""
    base = os.path.join(sys_root, "bus", "virtio", "devices")
    out = []
    for name in _listdir(base):
        raw = _read_strip(os.path.join(base, name, "device"))
        try:
            dev_id = int(raw, 16)
            kind = VIRTIO_DEVICE_NAMES.get(dev_id, f"id {dev_id}")
        except ValueError:
            kind = "unknown"
        out.append((name, kind, _virtio_transport(os.path.join(base, name), sys_root)))
    return out


def _mmio_in_cmdline(cmdline: str) -> list[str]:
    return [tok for tok in cmdline.split() if tok.startswith("virtio_mmio.device=")]


def _detect_l2(b: _Builder, sys_root: str, virtio: list[tuple[str, str, str]]) -> None:
    for name, kind, transport in virtio:
        b.add("L-2", f"virtio {kind} ({name}, {transport})")
    xen = _listdir(os.path.join(sys_root, "bus", "xen", "devices"))
    for dev in xen:
        b.add("L-2", f"Xen PV device {dev}")
    vmbus = _listdir(os.path.join(sys_root, "bus", "vmbus", "devices"))
    if vmbus:
        b.add("L-2", f"Hyper-V VMBus: {len(vmbus)} devices")


def _classify_hypervisor(flags: set[str], sys_root: str, proc_root: str,
                         virtio: list[tuple[str, str, str]], b: _Builder) -> str:
    """Name the hypervisor (one of ``HYPERVISORS``) and record L-1 evidence."""
    xen_type = _read_strip(os.path.join(sys_root, "hypervisor", "type"))
    guest = "hypervisor" in flags or bool(xen_type)
    dmi = _dmi(sys_root)
    clocksources = _read_strip(os.path.join(
        sys_root, "devices", "system", "clocksource", "clocksource0", "available_clocksource")).split()
    cmdline = _read_strip(os.path.join(proc_root, "cmdline"))
    platform = _listdir(os.path.join(sys_root, "bus", "platform", "devices"))

    if not guest:
        if dmi.get("sys_vendor"):
            b.note(NOTES, f"bare metal: DMI sys_vendor {dmi['sys_vendor']!r}")
        return "none"

    if "hypervisor" in flags:
        b.add("L-1", "cpu flag hypervisor")
    if xen_type:
        b.add("L-1", f"/sys/hypervisor/type = {xen_type}")
    for key in ("sys_vendor", "product_name", "bios_vendor", "board_vendor"):
        if key in dmi:
            b.add("L-1", f"DMI {key} = {dmi[key]!r}")
    dmi_text = " ".join(dmi.values()).lower()

    # Clouds first: EC2 (Nitro is KVM-based, older generations Xen) and GCE
    # (KVM-based) are named after the cloud because that is what an operator
    # compares against, and their steal/exit behaviour is the cloud's.
    if "amazon ec2" in dmi_text or "amazon" in dmi.get("bios_version", "").lower():
        return "amazon"
    if "google" in dmi_text:
        return "google"
    if "microsoft corporation" in dmi_text and "virtual machine" in dmi_text:
        return "hyperv"
    if "vmware" in dmi_text:
        return "vmware"
    if xen_type == "xen" or dmi.get("sys_vendor", "").lower() == "xen" or "xen" in clocksources:
        return "xen"
    if any(cs.startswith("hyperv") for cs in clocksources):
        b.add("L-1", "clocksource hyperv")
        return "hyperv"

    mmio_cmdline = _mmio_in_cmdline(cmdline)
    mmio_devices = [name for name, _, transport in virtio if transport == "mmio"]
    if not dmi and (mmio_cmdline or mmio_devices):
        # Firecracker exposes no SMBIOS/DMI and attaches its devices over
        # virtio-mmio, announced on the kernel command line (or in ACPI DSDT as
        # LNRO0005 on newer releases).
        b.add("L-1", "no DMI tables")
        if mmio_cmdline:
            b.add("L-1", f"kernel cmdline {mmio_cmdline[0]}")
        if mmio_devices:
            b.add("L-1", f"virtio-mmio devices: {', '.join(mmio_devices)}")
        return "firecracker"

    if "kvm-clock" in clocksources:
        b.add("L-1", "clocksource kvm-clock")
        if not dmi:
            b.add("L-1", "no DMI tables")
            fc_acpi = sorted(set(platform) & {"AMZNC10C:00", "VMGENCTR:00", "ACPI0013:00"})
            if fc_acpi:
                # Firecracker's DSDT (VMClock, VMGenID, GED) with virtio on PCI:
                # the VMM is probably Firecracker; the hypervisor is KVM either way.
                b.note(NOTES, f"VMM looks like Firecracker (ACPI {', '.join(fc_acpi)}, virtio over PCI)")
        return "kvm"
    kvm_words = ("qemu", "kvm", "openstack", "red hat", "seabios", "bochs", "cloud hypervisor")
    if any(w in dmi_text for w in kvm_words):
        return "kvm"
    b.add("L-1", "hypervisor not identified")
    return "none"


def _gvisor_guest_evidence(proc_root: str) -> list[str]:
    """Signs that ``proc_root`` is the procfs of a gVisor sandbox (the Sentry's own)."""
    facts = []
    version = _read(os.path.join(proc_root, "version"), 4096) or ""
    # The Sentry prints "<sysname> version <release> <version>" without the
    # "(builder@host) (compiler)" part every Linux kernel build has.
    if _GVISOR_VERSION.match(version) and "(" not in version:
        facts.append(f"/proc/version without build host: {version.strip()!r}")
    if "gvisor" in version.lower():
        facts.append("/proc/version mentions gVisor")
    return facts


def detect_host_stack(proc_root: str = "/proc", sys_root: str = "/sys",
                      dev_root: str = "/dev") -> IsolationStack:
    """Discover the layers under the node itself (L-0, L-1, L-2; L-4 inside gVisor).

    Args:
        proc_root: procfs root (``/host/proc`` in a DaemonSet).
        sys_root: sysfs root.
        dev_root: devtmpfs root.

    Returns:
        The host stack: ``hypervisor`` is one of ``model.HYPERVISORS``; details
        that do not fit it (DMI strings, clocksources, VMM hints) are in
        ``evidence`` (per layer, plus ``"notes"``).
    """
    b = _Builder()
    flags = _cpu_flags(proc_root)
    _detect_l0(b, flags, sys_root, dev_root)
    virtio = _virtio_devices(sys_root)
    hypervisor = _classify_hypervisor(flags, sys_root, proc_root, virtio, b)
    if hypervisor not in HYPERVISORS:  # pragma: no cover - guarded by construction
        hypervisor = "none"
    b.stack.hypervisor = hypervisor
    _detect_l2(b, sys_root, virtio)
    gvisor = _gvisor_guest_evidence(proc_root)
    if gvisor:
        for fact in gvisor:
            b.add("L-4", fact)
        b.stack.sandbox = "gvisor"
        b.stack.runtime = "gvisor"
    return b.build()


# ---------------------------------------------------------------------------
# Process: L-3, L-4 (and L-1 for VMM processes)
# ---------------------------------------------------------------------------

def _cmdline(pid: int | str, proc_root: str) -> list[str]:
    raw = _read(os.path.join(proc_root, str(pid), "cmdline"), 65536) or ""
    return [a for a in raw.split("\0") if a]


def _comm(pid: int | str, proc_root: str) -> str:
    return _read_strip(os.path.join(proc_root, str(pid), "comm"))


def _exe_name(pid: int | str, proc_root: str) -> str:
    try:
        return os.path.basename(os.readlink(os.path.join(proc_root, str(pid), "exe"))).removesuffix(" (deleted)")
    except OSError:
        return ""


def _ppid(pid: int | str, proc_root: str) -> int:
    try:
        return int(cgroupfs.read_status_field(pid, "PPid", proc_root) or 0)
    except ValueError:
        return 0


def _flag_value(argv: list[str], flag: str) -> str:
    """Value of ``--flag value`` or ``--flag=value`` in an argument vector."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return ""


def _names(pid: int | str, proc_root: str) -> tuple[str, str, list[str]]:
    argv = _cmdline(pid, proc_root)
    argv0 = os.path.basename(argv[0]) if argv else ""
    return _comm(pid, proc_root), argv0, argv


def _gvisor_role(comm: str, argv0: str, argv: list[str], exe: str) -> str | None:
    """``sandbox`` or ``gofer`` when the process is one of gVisor's long-running processes."""
    for name in (argv0, comm):
        if name in ("runsc-sandbox", "runsc-gofer"):
            return name.removeprefix("runsc-")
    if "runsc" in (argv0, comm, exe):
        # Other subcommands (create, start, list …) are the short-lived OCI CLI,
        # not a sandbox.
        for sub in ("boot", "gofer"):
            if sub in argv[1:]:
                return "sandbox" if sub == "boot" else "gofer"
    return None


def gvisor_role(pid: int | str, proc_root: str = "/proc") -> str | None:
    """``sandbox`` (the Sentry) or ``gofer`` when ``pid`` is one of gVisor's long-running processes."""
    comm, argv0, argv = _names(pid, proc_root)
    return _gvisor_role(comm, argv0, argv, _exe_name(pid, proc_root))


def _vmm_name(comm: str, argv0: str, exe: str) -> str | None:
    for name in (exe, argv0, comm):
        if name and any(name.startswith(v) for v in _VMM_NAMES):
            return name
    return None


def _wasm_from_maps(pid: int | str, proc_root: str) -> tuple[str, str] | None:
    try:
        with open(os.path.join(proc_root, str(pid), "maps"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "wasm" not in line:
                    continue
                # address perms offset dev inode pathname (pathname may hold spaces)
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) < 6:
                    continue
                lib = os.path.basename(fields[5].removesuffix(" (deleted)"))
                for prefix, runtime in _WASM_LIBS:
                    if lib.startswith(prefix):
                        return runtime, lib
    except OSError:
        return None
    return None


def _reference_ns(proc_root: str) -> tuple[dict[str, int], str]:
    """Namespaces of the initial process, for comparison.

    PID 1's links can be unreadable (ptrace access checks against a
    non-dumpable init); kthreadd (pid 2, parent 0) always lives in the initial
    namespaces, so it is the fallback.
    """
    ref = cgroupfs.ns_inodes(1, proc_root)
    if ref:
        return ref, "pid 1"
    if _comm(2, proc_root) == "kthreadd" and _ppid(2, proc_root) == 0:
        ref = cgroupfs.ns_inodes(2, proc_root)
        if ref:
            return ref, "kthreadd"
    return {}, ""


def _choose_cgroup(cgroups: dict[str, str], v2_available: bool) -> tuple[str, cgroupfs.CgroupInfo]:
    """The cgroup path that identifies the workload best.

    The v2 path is preferred (it is what the kernel probes see); on hybrid
    systems a runtime may have placed the process only in v1 hierarchies, so
    the first path that names a container wins, then one naming a systemd unit.
    """
    order = []
    if "" in cgroups and v2_available:
        order.append(cgroups[""])
    for ctrl in ("cpu", "memory", "name=systemd", "pids", "cpuacct", "blkio"):
        if ctrl in cgroups:
            order.append(cgroups[ctrl])
    order.extend(p for c, p in sorted(cgroups.items()) if p not in order)
    primary = order[0] if order else ""
    infos = [cgroupfs.parse_cgroup_path(p) for p in order]
    for info in infos:
        if info.container_id or info.pod_uid:
            return primary, info
    for info in infos:
        if info.runtime != "none":
            return primary, info
    return primary, cgroupfs.CgroupInfo(path=primary)


def detect_process_stack(pid: int, proc_root: str = "/proc", sys_root: str = "/sys",
                         dev_root: str = "/dev", host: IsolationStack | None = None) -> IsolationStack:
    """Discover the layers under one process.

    Starts from the host stack and adds:

    * L-3 when the cgroup path names a container (Docker, containerd, CRI-O,
      Podman, Kubernetes pod) or the process's namespaces differ from the
      initial ones;
    * L-4 for gVisor (``runsc`` processes and their descendants), a Firecracker
      VMM, WASM runtimes (executable name or a mapped ``libwasmtime`` /
      ``libwasmedge``) and seccomp filter mode;
    * L-1 when the process is itself a VMM (QEMU, Firecracker, Cloud
      Hypervisor, crosvm): the guest it runs is accounted to it.

    ``runtime`` is the innermost runtime: a WASM runtime or sandbox inside a
    container wins over the container runtime; the container id is kept.

    Args:
        pid: process id in ``proc_root``'s PID namespace.
        proc_root: procfs root.
        sys_root: sysfs root.
        dev_root: devtmpfs root.
        host: a previously detected host stack (detected here if ``None``).

    Returns:
        The process stack. A vanished process yields the host stack with a note.
    """
    if host is None:
        host = detect_host_stack(proc_root, sys_root, dev_root)
    b = _Builder(IsolationStack(
        layers=list(host.layers), runtime=host.runtime, hypervisor=host.hypervisor,
        sandbox=host.sandbox, evidence={k: list(v) for k, v in host.evidence.items()},
    ))
    if not os.path.isdir(os.path.join(proc_root, str(pid))):
        b.note(NOTES, f"process {pid} not found")
        return b.build()

    _detect_l3(b, pid, proc_root)
    sandboxes = _detect_l4(b, pid, proc_root)
    if sandboxes:
        best = min(sandboxes, key=_SANDBOX_ORDER.index)
        b.stack.sandbox = best
        if best != "seccomp":
            b.stack.runtime = best
    return b.build()


def _detect_l3(b: _Builder, pid: int, proc_root: str) -> None:
    cgroups = cgroupfs.read_proc_cgroups(pid, proc_root)
    v2_available = "" in cgroups and (cgroups[""] != "/" or len(cgroups) == 1)
    primary, info = _choose_cgroup(cgroups, v2_available)
    b.stack.cgroup_path = primary
    if info.runtime != "none":
        b.stack.runtime = info.runtime
    b.stack.container_id = info.container_id
    b.stack.pod_uid = info.pod_uid
    b.stack.qos_class = info.qos_class
    if info.container_id or info.pod_uid:
        what = f"{info.runtime} container {info.container_id[:12]}" if info.container_id else "pod"
        if info.pod_uid:
            what += f" in pod {info.pod_uid} ({info.qos_class})"
        b.add("L-3", f"cgroup {info.path}: {what}")
    elif info.runtime == "systemd":
        b.note(NOTES, f"systemd unit cgroup {info.path}")

    ref, ref_name = _reference_ns(proc_root)
    mine = cgroupfs.ns_inodes(pid, proc_root)
    if not ref or not mine:
        b.note(NOTES, "namespaces not comparable (no access to /proc/<pid>/ns)")
        return
    differing = [k for k in _NS_KINDS if k in ref and k in mine and ref[k] != mine[k]]
    b.stack.namespaces = differing
    if differing:
        b.add("L-3", f"namespaces differ from {ref_name}: {', '.join(differing)}")


def _detect_l4(b: _Builder, pid: int, proc_root: str) -> set[str]:
    found: set[str] = set()
    comm, argv0, argv = _names(pid, proc_root)
    exe = _exe_name(pid, proc_root)

    role = _gvisor_role(comm, argv0, argv, exe)
    if role:
        b.add("L-4", f"gVisor {role} process ({argv0 or comm})")
        found.add("gvisor")
    else:
        # Application processes of a systrap/ptrace sandbox are children of runsc-sandbox.
        ancestor = _ppid(pid, proc_root)
        for _ in range(_ANCESTOR_DEPTH):
            if ancestor <= 1:
                break
            a_comm, a_argv0, a_argv = _names(ancestor, proc_root)
            if _gvisor_role(a_comm, a_argv0, a_argv, _exe_name(ancestor, proc_root)) == "sandbox":
                b.add("L-4", f"descendant of gVisor sandbox pid {ancestor}")
                found.add("gvisor")
                break
            ancestor = _ppid(ancestor, proc_root)

    vmm = _vmm_name(comm, argv0, exe)
    if vmm:
        b.add("L-1", f"process is a VMM ({vmm}): its guest's vCPU time and exits are accounted to it")
        if vmm.startswith("firecracker"):
            b.add("L-4", "Firecracker microVM")
            found.add("firecracker")
            vm_id = _flag_value(argv, "--id")
            if vm_id:
                b.note("L-4", f"Firecracker microVM id {vm_id}")
    if comm == "jailer" or argv0 == "jailer":
        b.add("L-4", "Firecracker jailer")
        found.add("firecracker")

    for name in (exe, argv0, comm):
        runtime = _WASM_RUNTIMES.get(name.lower()) if name else None
        if runtime:
            b.add("L-4", f"WASM runtime executable {name}")
            found.add(runtime)
            break
    mapped = _wasm_from_maps(pid, proc_root)
    if mapped:
        b.add("L-4", f"WASM runtime library mapped: {mapped[1]}")
        found.add(mapped[0])

    seccomp = cgroupfs.read_status_field(pid, "Seccomp", proc_root)
    if seccomp == "2":
        filters = cgroupfs.read_status_field(pid, "Seccomp_filters", proc_root)
        b.add("L-4", f"seccomp filter mode ({filters or '?'} filters)")
        found.add("seccomp")
    elif seccomp == "1":
        b.add("L-4", "seccomp strict mode")
        found.add("seccomp")
    return found
