"""The KVM probe on the running kernel: it attaches, takes its classification, and sees real guests.

This machine runs guests only through the ``kvm_pvm`` backend, which does not
trace ``kvm_exit``/``kvm_entry`` but does trace ``kvm_pio``: a real guest's
port-I/O exits must show up as PV events the probe could not time, and no
exit totals may be invented.
"""

from __future__ import annotations

import time

import pytest

from isoscope.probes import kvm_reasons as kr
from isoscope.probes import catalog
from isoscope.probes.decode import COMPONENT_CODE, header_constants
from tests.kernel.conftest_kvm import run_guest
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel


def test_kvm_probe_attaches_with_real_features(load_probe, kernel_env):  # noqa: F811
    for ev in ("kvm_exit", "kvm_entry", "kvm_pio", "kvm_mmio", "kvm_hypercall"):
        assert kernel_env.features.has_tracepoint("kvm", ev), ev
    rp = load_probe(catalog.KVM)
    status = rp.manager.statuses()[0]
    assert status.attached and status.name == "kvm"
    assert "tracepoint:kvm:kvm_exit" in status.attach_points
    # maps have the layouts user space reads
    c = header_constants()
    bpf = rp.bpf
    assert len(bpf["kvm_class"]) == c["ISO_KVM_CLASS_SLOTS"]
    import ctypes
    assert ctypes.sizeof(bpf["kvm_totals"].Key) == c["ISO_KVM_KEY_SIZE"]
    assert ctypes.sizeof(bpf["kvm_totals"].Leaf) == c["ISO_TOTAL_SIZE"]


def test_classification_reaches_the_kernel(load_probe):  # noqa: F811
    rp = load_probe(catalog.KVM)
    cls = kr.load_classification({"vmx:CPUID": "sandbox"})
    assert kr.fill_kernel_classification(rp.bpf, cls) == kr.CLASS_SLOTS
    table = rp.bpf["kvm_class"]
    got = {i: table[table.Key(i)].value for i in range(kr.CLASS_SLOTS)}
    assert got[48] == COMPONENT_CODE["ept"]
    assert got[10] == COMPONENT_CODE["sandbox"]
    assert got[12] == COMPONENT_CODE["vm_exit"] | kr.CLASS_IDLE_FLAG
    assert got[128 + 0x7B] == COMPONENT_CODE["pv_exit"]
    assert got[384] == COMPONENT_CODE["ept"]
    assert got[500] == COMPONENT_CODE["vm_exit"]  # unlisted slot


def test_real_guest_io_is_seen(load_probe):  # noqa: F811
    rp = load_probe(catalog.KVM, defines={"ISO_MIN_STALL_NS": 0})
    kr.fill_kernel_classification(rp.bpf, kr.load_classification())
    before = kr.read_untimed_pv_events(rp.bpf)
    with run_guest(count=50, hold_s=0.5) as guest:
        res = guest.result()
    assert res["error"] == "" and res["hlt"], res
    assert res["io_exits"] == 50
    time.sleep(0.1)
    events = rp.drain()
    totals = kr.read_exit_totals(rp.bpf)
    untimed = kr.read_untimed_pv_events(rp.bpf) - before
    if totals:
        # a KVM backend that traces kvm_exit: the guest's port writes are timed PV exits
        mine = [t for t in totals if t.tgid == guest.pid]
        pv = sum(t.count for t in mine if t.component == "pv_exit")
        assert pv >= 50, mine
        assert any(getattr(e, "pid", 0) == guest.pid and e.component == "pv_exit" for e in events)
    else:
        # kvm_pvm: exits are not traced; each port write still fires kvm_pio
        assert untimed >= 50, untimed
        assert events == []


# A stand-in for a Firecracker VMM: a process under Firecracker's name with a
# vCPU thread named like Firecracker's (firecracker itself cannot run here).
FIRECRACKER = r'''
import ctypes, threading, time
ctypes.CDLL(None).prctl(15, b"firecracker", 0, 0, 0)
def vcpu():
    ctypes.CDLL(None).prctl(15, b"fc_vcpu 0", 0, 0, 0)
    time.sleep(30)
threading.Thread(target=vcpu, daemon=True).start()
print("ready", flush=True)
time.sleep(30)
'''


def test_firecracker_vmms_are_marked_as_sandboxes_and_unmarked_when_gone(load_probe):  # noqa: F811
    """Exits of a Firecracker VMM are l4.sandbox: the kernel learns which VMMs those are, and forgets them."""
    import subprocess
    import sys

    from isoscope.host.vms import VmRegistry

    rp = load_probe(catalog.KVM)
    table = rp.bpf["kvm_sandbox_vmms"]
    registry = VmRegistry()
    fc = subprocess.Popen([sys.executable, "-c", FIRECRACKER], stdout=subprocess.PIPE, text=True)
    try:
        assert fc.stdout is not None and fc.stdout.readline().strip() == "ready"
        with run_guest(count=1, hold_s=3) as guest:  # a plain KVM user: a VM, not a sandbox
            vms = {vm.pid: vm for vm in registry.refresh()}
            assert vms[fc.pid].vmm == "firecracker" and vms[guest.pid].vmm == "kvm"
            assert kr.sync_sandbox_vmms(rp.bpf, vms.values()) == 1
            assert {int(k.value) for k in table.keys()} == {fc.pid}
    finally:
        fc.kill()
        fc.wait(10)
    kr.sync_sandbox_vmms(rp.bpf, registry.refresh())
    assert len(table) == 0
