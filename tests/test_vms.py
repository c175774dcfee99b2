"""VMM discovery and VM identity: fixture /proc trees of documented VMM layouts, and a real KVM guest."""

from __future__ import annotations

import os

import pytest

from isoscope.host import stack
from isoscope.host import vms
from tests.fixtures import systrees
from tests.kernel.conftest_kvm import VCPU_THREAD_NAME, run_guest

POD = "0b5c4b8e-6c8a-4f4e-9b1c-3f2d2a1e9c77"
POD_CG = f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice\n"


def _threads(t: systrees.Tree, pid: int, names: dict[int, str]) -> None:
    for tid, comm in names.items():
        t.write(f"proc/{pid}/task/{tid}/comm", comm + "\n")
        t.write(f"proc/{tid}/status", f"Name:\t{comm}\nTgid:\t{pid}\nPid:\t{tid}\nPPid:\t1\n")


def _host(tmp_path) -> systrees.Tree:
    return systrees.bare_metal_kvm_host(tmp_path)


def test_firecracker_vmm_in_pod(tmp_path):
    t = _host(tmp_path)
    # Firecracker: threads "fc_api" and "fc_vcpu <n>" (src/vmm/src/vstate/vcpu), --id names the VM.
    t.process(300, "firecracker", ["/usr/bin/firecracker", "--id", "vm-7", "--api-sock", "/run/fc.sock"],
              exe="/usr/bin/firecracker", cgroup=POD_CG, seccomp=2)
    _threads(t, 300, {300: "firecracker", 301: "fc_api", 302: "fc_vcpu 0", 303: "fc_vcpu 1"})
    t.symlink("proc/300/fd/12", "anon_inode:kvm-vm")
    t.symlink("proc/300/fd/13", "anon_inode:kvm-vcpu:0")
    t.symlink("proc/300/fd/14", "anon_inode:kvm-vcpu:1")
    found = vms.find_vmms(t.proc, t.sys, t.dev)
    assert [v.pid for v in found] == [300]
    vm = found[0]
    assert (vm.vmm, vm.vm_id, vm.hypervisor, vm.pod_uid) == ("firecracker", "vm-7", "firecracker", POD)
    assert vm.vcpus == {302: 0, 303: 1} and vm.vcpu_fds == [0, 1]
    assert vm.label == "firecracker/vm-7"
    assert vms.vm_for_tid(303, t.proc, t.sys, t.dev).pid == 300
    g = vms.guest_stack(vm, stack.detect_host_stack(t.proc, t.sys, t.dev))
    assert g.layers == ["L-0", "L-1", "L-2", "L-3", "L-4"]
    assert (g.hypervisor, g.sandbox, g.runtime, g.pod_uid) == ("firecracker", "firecracker", "firecracker", POD)
    # the VMM process itself: isoscope stack names the sandbox (existing stack detection)
    s = stack.detect_process_stack(300, t.proc, t.sys, t.dev)
    assert s.sandbox == "firecracker" and "L-1" in s.layers and s.pod_uid == POD


def test_kata_qemu_vmm_in_pod_cgroup(tmp_path):
    t = _host(tmp_path)
    # Kata Containers runs QEMU in the pod's cgroup; QEMU names vCPU threads "CPU <n>/KVM".
    t.process(400, "qemu-system-x86", ["/opt/kata/bin/qemu-system-x86_64", "-name",
                                       "sandbox-4f1d,debug-threads=on", "-machine", "q35,accel=kvm"],
              exe="/opt/kata/bin/qemu-system-x86_64", cgroup=POD_CG)
    _threads(t, 400, {400: "qemu-system-x86", 401: "CPU 0/KVM", 402: "CPU 1/KVM", 403: "IO mon_iothread"})
    vm = vms.find_vmms(t.proc, t.sys, t.dev)[0]
    assert (vm.vmm, vm.vm_id, vm.hypervisor) == ("qemu", "sandbox-4f1d", "kvm")
    assert vm.vcpus == {401: 0, 402: 1} and vm.pod_uid == POD
    g = vms.guest_stack(vm, stack.detect_host_stack(t.proc, t.sys, t.dev))
    assert g.layers == ["L-0", "L-1", "L-2", "L-3"] and g.sandbox == "" and g.hypervisor == "kvm"


def test_cloud_hypervisor_and_crosvm_thread_names(tmp_path):
    t = _host(tmp_path)
    t.process(500, "cloud-hyperviso", ["/usr/bin/cloud-hypervisor", "--api-socket", "/run/ch.sock"],
              exe="/usr/bin/cloud-hypervisor")
    _threads(t, 500, {500: "cloud-hyperviso", 501: "vcpu0", 502: "vcpu1", 503: "vmm"})
    t.process(600, "crosvm", ["/usr/bin/crosvm", "run", "vmlinux"], exe="/usr/bin/crosvm")
    _threads(t, 600, {600: "crosvm", 601: "crosvm_vcpu0"})
    t.process(700, "bash", ["/bin/bash"], exe="/bin/bash")  # not a VMM
    found = {v.pid: v for v in vms.find_vmms(t.proc, t.sys, t.dev)}
    assert set(found) == {500, 600}
    assert found[500].vmm == "cloud-hypervisor" and found[500].vcpus == {501: 0, 502: 1}
    assert found[500].label == "cloud-hypervisor/500"
    assert found[600].vcpus == {601: 0}
    assert vms.vm_for_tid(700, t.proc, t.sys, t.dev) is None


def test_gvisor_is_a_sandbox_not_a_vm(tmp_path):
    t = _host(tmp_path)
    t.process(800, "exe", ["runsc-sandbox", "boot", "--bundle=/x", "c1"], exe="/usr/local/bin/runsc",
              cgroup=POD_CG, seccomp=2)
    assert vms.find_vmms(t.proc, t.sys, t.dev) == []
    s = stack.detect_process_stack(800, t.proc, t.sys, t.dev)
    assert s.sandbox == "gvisor" and s.runtime == "gvisor"


@pytest.mark.kernel
def test_real_kvm_guest_is_found_by_its_vm_fd():
    with run_guest(count=3, hold_s=10.0) as guest:
        reg = vms.VmRegistry()
        found = {v.pid: v for v in reg.refresh()}
        assert guest.pid in found, f"tiny VMM {guest.pid} not found among {sorted(found)}"
        vm = found[guest.pid]
        assert vm.vmm == "kvm" and vm.vcpu_fds == [0]
        assert vm.vcpus == {guest.vcpu_tid: 0}
        assert reg.vm_for_tid(guest.vcpu_tid) is vm
        assert reg.vm_label(guest.pid) == f"kvm/{guest.pid}"
        with open(f"/proc/{guest.pid}/task/{guest.vcpu_tid}/comm") as fh:
            assert fh.read().strip() == VCPU_THREAD_NAME
    assert reg.vm_for_pid(os.getpid()) is None
