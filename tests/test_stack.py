"""Isolation-stack discovery on this machine (real cgroups, namespaces, processes)
and on fixture trees of platforms that cannot run here."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from isoscope.model import HYPERVISORS, RUNTIMES
from isoscope.host.stack import detect_host_stack, detect_process_stack
from tests.cgroup_helpers import cgroup_factory  # noqa: F401 - pytest fixture
from tests.fixtures import systrees

PY = sys.executable


def _cid() -> str:
    return secrets.token_hex(32)


def _wait_children(pid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                kids = [int(x) for x in fh.read().split()]
        except OSError:
            kids = []
        if kids:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} has no children after {timeout}s")


def _wait_exec(pid: int, comm: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never became {comm}")


# ---------------------------------------------------------------------------
# This machine
# ---------------------------------------------------------------------------

def test_this_machine_is_a_kvm_guest_with_virtio_block():
    stack = detect_host_stack()
    assert stack.hypervisor == "kvm"
    assert "L-1" in stack.layers and "L-2" in stack.layers
    assert "cpu flag hypervisor" in stack.evidence["L-1"]
    # /dev/vda is virtio-blk here.
    assert any(f.startswith("virtio block") for f in stack.evidence["L-2"])
    assert "L-3" not in stack.layers and "L-4" not in stack.layers
    assert stack.runtime == "none"


def test_plain_process_has_only_host_layers():
    host = detect_host_stack()
    proc = subprocess.Popen(["sleep", "10"])
    try:
        _wait_exec(proc.pid, "sleep")
        stack = detect_process_stack(proc.pid, host=host)
        assert stack.layers == host.layers
        assert stack.runtime == "none" and stack.sandbox == "" and stack.container_id == ""
        assert stack.namespaces == []
        assert stack.hypervisor == "kvm"
    finally:
        proc.kill()
        proc.wait()


def test_vanished_process_gives_host_stack_with_note():
    proc = subprocess.Popen(["true"])
    proc.wait()
    stack = detect_process_stack(proc.pid)
    assert stack.layers == detect_host_stack().layers
    assert any(str(proc.pid) in n for n in stack.evidence["notes"])


POD = str(uuid.uuid4())
POD_US = POD.replace("-", "_")


def _layouts():
    """(cgroup name, v1 controllers, runtime, has container id, pod uid, qos) per runtime layout."""
    c = "{cid}"
    return [
        ("docker-systemd", f"system.slice/docker-{c}.scope", "docker", True, "", ""),
        ("docker-cgroupfs", f"docker/{c}", "docker", True, "", ""),
        ("containerd-k8s-systemd-burstable",
         f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/cri-containerd-{c}.scope",
         "containerd", True, POD, "burstable"),
        ("containerd-k8s-systemd-guaranteed",
         f"kubepods.slice/kubepods-pod{POD_US}.slice/cri-containerd-{c}.scope",
         "containerd", True, POD, "guaranteed"),
        ("containerd-k8s-cgroupfs-besteffort", f"kubepods/besteffort/pod{POD}/{c}",
         "containerd", True, POD, "besteffort"),
        ("crio-k8s-systemd", f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_US}.slice/crio-{c}.scope",
         "cri-o", True, POD, "besteffort"),
        ("crio-conmon", f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/crio-conmon-{c}.scope",
         "cri-o", True, POD, "burstable"),
        ("crio-k8s-cgroupfs-guaranteed", f"kubepods/pod{POD}/crio-{c}", "cri-o", True, POD, "guaranteed"),
        ("podman-systemd", f"machine.slice/libpod-{c}.scope/container", "podman", True, "", ""),
        ("podman-conmon", f"machine.slice/libpod-conmon-{c}.scope", "podman", True, "", ""),
        ("podman-cgroupfs", f"libpod_parent/libpod-{c}", "podman", True, "", ""),
        ("systemd-service", "system.slice/isoscope-test-nginx.service", "systemd", False, "", ""),
    ]


@pytest.mark.parametrize("label,template,runtime,has_id,pod_uid,qos", _layouts(), ids=[x[0] for x in _layouts()])
def test_runtime_cgroup_layouts_on_real_cgroups(cgroup_factory, label, template, runtime, has_id, pod_uid, qos):
    cid = _cid()
    name = template.format(cid=cid)
    cg = cgroup_factory(name, v1_controllers=("cpu", "memory"))
    proc = cg.spawn(["sleep", "10"])
    _wait_exec(proc.pid, "sleep")
    # The kernel's own view of the placement, not the helper's.
    assert f"0::/{name}\n" in Path(f"/proc/{proc.pid}/cgroup").read_text()

    stack = detect_process_stack(proc.pid)

    assert stack.runtime == runtime
    assert stack.runtime in RUNTIMES
    assert stack.container_id == (cid if has_id else "")
    assert stack.pod_uid == pod_uid
    assert stack.qos_class == qos
    assert stack.cgroup_path == "/" + name
    assert ("L-3" in stack.layers) == has_id
    assert stack.hypervisor == "kvm" and "L-1" in stack.layers


def test_v1_only_placement_is_found_through_cpu_controller(cgroup_factory):
    cid = _cid()
    cg = cgroup_factory(f"system.slice/docker-{cid}.scope", v1_controllers=("cpu",), v2=False)
    proc = cg.spawn(["sleep", "10"])
    _wait_exec(proc.pid, "sleep")
    stack = detect_process_stack(proc.pid)
    assert stack.runtime == "docker" and stack.container_id == cid
    assert stack.cgroup_path == f"/system.slice/docker-{cid}.scope"


def test_unshared_namespaces_are_reported():
    outer = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount", "--uts", "sleep", "10"])
    try:
        (child,) = _wait_children(outer.pid)
        _wait_exec(child, "sleep")
        stack = detect_process_stack(child)
        assert set(stack.namespaces) == {"net", "pid", "mnt", "uts"}
        assert "L-3" in stack.layers
        assert any("net, pid" in f or "mnt, net, pid, uts" in f for f in stack.evidence["L-3"])
        assert stack.runtime == "none" and stack.container_id == ""
        # unshare itself stays in the old PID namespace (only its children move).
        parent = detect_process_stack(outer.pid)
        assert "pid" not in parent.namespaces and "net" in parent.namespaces
    finally:
        outer.kill()
        outer.wait()


WASM_LOOP = r"""
import sys, wasmtime
store = wasmtime.Store()
module = wasmtime.Module(store.engine, '''
(module (func (export "spin") (param i32) (result i32) (local i32)
  (loop $l (local.set 1 (i32.add (local.get 1) (i32.const 1)))
           (br_if $l (i32.lt_s (local.get 1) (local.get 0))))
  (local.get 1)))''')
spin = wasmtime.Instance(store, module, []).exports(store)["spin"]
assert spin(store, 1000) == 1000
print("ready", flush=True)
sys.stdin.read()
"""


def test_wasmtime_process_is_l4_wasmtime():
    proc = subprocess.Popen([PY, "-c", WASM_LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        stack = detect_process_stack(proc.pid)
        assert stack.sandbox == "wasmtime" and stack.runtime == "wasmtime"
        assert "L-4" in stack.layers
        assert any("libwasmtime" in f for f in stack.evidence["L-4"])
    finally:
        proc.kill()
        proc.wait()


def test_python_without_wasmtime_is_not_wasm():
    proc = subprocess.Popen([PY, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        stack = detect_process_stack(proc.pid)
        assert "L-4" not in stack.layers and stack.sandbox == ""
    finally:
        proc.kill()
        proc.wait()


SECCOMP_ALLOW_ALL = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
prog_insns = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0x7fff0000))   # BPF_RET|BPF_K, SECCOMP_RET_ALLOW
prog = SockFprog(1, prog_insns)
assert libc.prctl(38, 1, 0, 0, 0) == 0                                 # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
print("ready", flush=True)
sys.stdin.read()
"""


def test_seccomp_filtered_process_is_l4_seccomp():
    proc = subprocess.Popen([PY, "-c", SECCOMP_ALLOW_ALL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        stack = detect_process_stack(proc.pid)
        assert stack.sandbox == "seccomp" and "L-4" in stack.layers
        assert stack.runtime == "none"  # a filter is not a runtime
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------
# Fixture trees: hypervisors
# ---------------------------------------------------------------------------

HOSTS = [
    # builder, hypervisor, layers
    (systrees.xen_hvm, "xen", ["L-1", "L-2"]),
    (systrees.ec2_xen, "amazon", ["L-1", "L-2"]),
    (systrees.ec2_nitro, "amazon", ["L-1"]),
    (systrees.gce, "google", ["L-1", "L-2"]),
    (systrees.hyperv, "hyperv", ["L-1", "L-2"]),
    (systrees.vmware, "vmware", ["L-1"]),
    (systrees.qemu_kvm, "kvm", ["L-1", "L-2"]),
    (systrees.firecracker_guest, "firecracker", ["L-1", "L-2"]),
    (systrees.firecracker_acpi_guest, "firecracker", ["L-1", "L-2"]),
    (systrees.ec2_metal, "none", ["L-0"]),
    (systrees.bare_metal_kvm_host, "none", ["L-0"]),
]


@pytest.mark.parametrize("builder,hypervisor,layers", HOSTS, ids=[h[0].__name__ for h in HOSTS])
def test_host_stack_on_fixture_platforms(tmp_path, builder, hypervisor, layers):
    t = builder(tmp_path)
    stack = detect_host_stack(t.proc, t.sys, t.dev)
    assert stack.hypervisor == hypervisor
    assert stack.hypervisor in HYPERVISORS
    assert stack.layers == layers
    for layer in layers:
        assert stack.evidence[layer]


def test_firecracker_evidence_names_mmio(tmp_path):
    t = systrees.firecracker_guest(tmp_path)
    stack = detect_host_stack(t.proc, t.sys, t.dev)
    assert "no DMI tables" in stack.evidence["L-1"]
    assert any("virtio_mmio.device=" in f for f in stack.evidence["L-1"])
    assert "virtio block (virtio0, mmio)" in stack.evidence["L-2"]


def test_xen_pv_and_vmbus_devices_are_l2(tmp_path):
    xen = systrees.xen_hvm(tmp_path / "xen")
    assert "Xen PV device vbd-51712" in detect_host_stack(xen.proc, xen.sys, xen.dev).evidence["L-2"]
    hv = systrees.hyperv(tmp_path / "hv")
    assert "Hyper-V VMBus: 2 devices" in detect_host_stack(hv.proc, hv.sys, hv.dev).evidence["L-2"]


def test_l0_evidence(tmp_path):
    t = systrees.bare_metal_kvm_host(tmp_path)
    ev = detect_host_stack(t.proc, t.sys, t.dev).evidence["L-0"]
    for fact in ("cpu flag svm", "cpu flag sev", "cpu flag sev_es", "kvm_amd sev=Y", "TPM /dev/tpm0",
                 "TPM tpm0 in /sys/class/tpm"):
        assert fact in ev
    metal = systrees.ec2_metal(tmp_path / "metal")
    assert "/dev/kvm backed by kvm_intel" in detect_host_stack(metal.proc, metal.sys, metal.dev).evidence["L-0"]


def test_dev_kvm_without_hardware_assist_is_not_l0(tmp_path):
    t = systrees.qemu_kvm(tmp_path)
    t.write("dev/kvm", "")
    stack = detect_host_stack(t.proc, t.sys, t.dev)
    assert "L-0" not in stack.layers
    assert any("/dev/kvm" in n for n in stack.evidence["notes"])


def test_inside_gvisor_sandbox(tmp_path):
    t = systrees.gvisor_inside(tmp_path)
    stack = detect_host_stack(t.proc, t.sys, t.dev)
    assert stack.sandbox == "gvisor" and stack.runtime == "gvisor"
    assert "L-4" in stack.layers
    normal = systrees.qemu_kvm(tmp_path / "normal")
    assert "L-4" not in detect_host_stack(normal.proc, normal.sys, normal.dev).layers


# ---------------------------------------------------------------------------
# Fixture trees: sandboxes that cannot run here
# ---------------------------------------------------------------------------

def _proc_stack(t: systrees.Tree, pid: int):
    return detect_process_stack(pid, t.proc, t.sys, t.dev)


def test_gvisor_sandbox_gofer_and_sandboxed_app(tmp_path):
    t = systrees.qemu_kvm(tmp_path)
    cid = _cid()
    cg = f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_US}.slice/cri-containerd-{cid}.scope\n"
    # runsc re-executes itself with argv[0] set to the role name.
    t.process(100, "exe", ["runsc-sandbox", "--root=/run/containerd/runsc/k8s.io", "boot", "--bundle=/x", cid],
              exe="/usr/local/bin/runsc", cgroup=cg, seccomp=2)
    t.process(101, "exe", ["runsc-gofer", "--root=/run/containerd/runsc/k8s.io", "gofer", "--bundle=/x"],
              exe="/usr/local/bin/runsc", cgroup=cg, seccomp=2)
    t.process(104, "runsc", ["runsc", "--root=/run/containerd/runsc/k8s.io", "list"], exe="/usr/local/bin/runsc")
    t.process(102, "exe", ["/usr/local/bin/runsc"], ppid=100, exe="/usr/local/bin/runsc", cgroup=cg)  # systrap stub
    t.process(103, "python3", ["python3", "app.py"], ppid=102, cgroup=cg)

    sandbox = _proc_stack(t, 100)
    assert sandbox.sandbox == "gvisor" and sandbox.runtime == "gvisor"
    assert sandbox.container_id == cid and sandbox.pod_uid == POD
    assert {"L-3", "L-4"} <= set(sandbox.layers)
    assert any("seccomp" in f for f in sandbox.evidence["L-4"])  # gVisor also filters itself
    assert _proc_stack(t, 101).sandbox == "gvisor"
    assert _proc_stack(t, 102).sandbox == "gvisor"  # systrap stub below the sandbox
    assert _proc_stack(t, 104).sandbox == ""  # the OCI CLI is not a sandbox
    app = _proc_stack(t, 103)
    assert app.sandbox == "gvisor" and any("descendant of gVisor sandbox pid 100" in f for f in app.evidence["L-4"])


def test_firecracker_vmm_and_jailer(tmp_path):
    t = systrees.bare_metal_kvm_host(tmp_path)
    t.process(200, "firecracker", ["/usr/bin/firecracker", "--id", "vm-7", "--api-sock", "/run/fc.sock"],
              exe="/usr/bin/firecracker", cgroup="0::/firecracker/vm-7\n", seccomp=2)
    t.process(201, "jailer", ["/usr/bin/jailer", "--id", "vm-8", "--exec-file", "/usr/bin/firecracker"],
              exe="/usr/bin/jailer")
    vmm = _proc_stack(t, 200)
    assert vmm.sandbox == "firecracker" and vmm.runtime == "firecracker"
    assert {"L-0", "L-1", "L-4"} <= set(vmm.layers)
    assert any("VMM (firecracker)" in f for f in vmm.evidence["L-1"])
    assert "Firecracker microVM id vm-7" in vmm.evidence["L-4"]
    assert _proc_stack(t, 201).sandbox == "firecracker"


def test_qemu_vmm_is_l1_boundary_not_sandbox(tmp_path):
    t = systrees.bare_metal_kvm_host(tmp_path)
    t.process(300, "qemu-system-x86", ["/usr/bin/qemu-system-x86_64", "-enable-kvm", "-m", "2048"],
              exe="/usr/bin/qemu-system-x86_64")
    stack = _proc_stack(t, 300)
    assert "L-1" in stack.layers and stack.sandbox == "" and stack.hypervisor == "none"


def test_wasmedge_by_executable_and_by_library(tmp_path):
    t = systrees.qemu_kvm(tmp_path)
    t.process(400, "wasmedge", ["wasmedge", "app.wasm"], exe="/usr/local/bin/wasmedge")
    maps = ("55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234 /usr/bin/myhost\n"
            "7f0000000000-7f0000400000 r-xp 00000000 fd:01 5678 /usr/local/lib/libwasmedge.so.0.1.0\n")
    t.process(401, "myhost", ["/usr/bin/myhost"], exe="/usr/bin/myhost", maps=maps)
    a, b = _proc_stack(t, 400), _proc_stack(t, 401)
    assert a.sandbox == b.sandbox == "wasmedge" == a.runtime == b.runtime
    assert "WASM runtime library mapped: libwasmedge.so.0.1.0" in b.evidence["L-4"]


def test_wasm_in_container_keeps_container_id(tmp_path):
    t = systrees.qemu_kvm(tmp_path)
    cid = _cid()
    t.process(500, "wasmtime", ["wasmtime", "run", "app.wasm"], exe="/usr/bin/wasmtime",
              cgroup=f"0::/system.slice/docker-{cid}.scope\n")
    stack = _proc_stack(t, 500)
    assert stack.runtime == "wasmtime" and stack.container_id == cid
    assert stack.layers == ["L-1", "L-2", "L-3", "L-4"]


def test_namespaces_compared_with_kthreadd_when_pid1_unreadable(tmp_path):
    t = systrees.qemu_kvm(tmp_path)
    for link in (tmp_path / "proc/1/ns").iterdir():
        link.unlink()
    t.process(2, "kthreadd", [], ppid=0)
    t.process(600, "nginx", ["nginx"], ns={**systrees.INIT_NS, "net": 4026532999})
    stack = _proc_stack(t, 600)
    assert stack.namespaces == ["net"]
    assert any("kthreadd" in f for f in stack.evidence["L-3"])
