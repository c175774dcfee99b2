"""Exit-reason tables, classification and decoding of KVM exits.

Records are built in the exact binary layout of the running kernel's
``kvm:kvm_exit`` format file and as ``struct iso_stall_event`` records, and go
through the same decode path the daemon uses.
"""

from __future__ import annotations

import ctypes
import os

import pytest

from isoscope.probes import kvm_reasons as kr
from isoscope.model import Stall
from isoscope.probes import decode

TRACEFS = "/sys/kernel/tracing"


@pytest.fixture(scope="module")
def exit_format() -> kr.TracepointFormat:
    path = os.path.join(TRACEFS, "events", "kvm", "kvm_exit", "format")
    assert os.path.exists(path), f"{path} missing: mount tracefs and load the kvm module"
    return kr.TracepointFormat.read("kvm", "kvm_exit", TRACEFS)


# Published codes, transcribed independently of the module's tables:
# Intel SDM Vol. 3 Appendix C Table C-1, AMD APM Vol. 2 Appendix C Table C-1.
SDM = {0: "EXCEPTION_NMI", 1: "EXTERNAL_INTERRUPT", 10: "CPUID", 12: "HLT", 18: "VMCALL", 28: "CR_ACCESS",
       30: "IO_INSTRUCTION", 31: "MSR_READ", 32: "MSR_WRITE", 40: "PAUSE_INSTRUCTION", 44: "APIC_ACCESS",
       48: "EPT_VIOLATION", 49: "EPT_MISCONFIG", 52: "PREEMPTION_TIMER", 55: "XSETBV", 62: "PML_FULL",
       74: "BUS_LOCK", 75: "NOTIFY", 77: "TDCALL"}
APM = {0x000: "read_cr0", 0x013: "write_cr3", 0x04E: "PF excp", 0x060: "interrupt", 0x061: "nmi",
       0x072: "cpuid", 0x078: "hlt", 0x07B: "io", 0x07C: "msr", 0x081: "hypercall", 0x400: "npf",
       0x403: "vmgexit"}


def test_tables_match_published_codes():
    for code, name in SDM.items():
        assert kr.VMX_EXIT_REASONS[code] == name, code
    for code, name in APM.items():
        assert kr.SVM_EXIT_REASONS[code] == name, hex(code)
    # codes the SDM leaves unused have no entry
    for unused in (35, 38, 42):
        assert unused not in kr.VMX_EXIT_REASONS


def test_tables_agree_with_running_kernel(exit_format):
    """The kernel prints exit reasons from its uapi tables; ours must name every one the same."""
    vmx, svm = exit_format.symbol_tables()[:2]
    assert len(vmx) > 50 and len(svm) > 100, "could not parse the kernel's symbol tables"
    assert {c: kr.VMX_EXIT_REASONS.get(c) for c in vmx} == vmx
    assert {c: kr.SVM_EXIT_REASONS.get(c) for c in svm} == svm


def test_default_classification_layers():
    c = kr.load_classification()
    vmx, svm = kr.ISA_VMX, kr.ISA_SVM
    assert c.component(vmx, 48) == "ept" and c.component(vmx, 49) == "ept"
    assert c.component(svm, 0x400) == "ept"
    for code in (10, 31, 32, 1, 52, 44):
        assert c.component(vmx, code) == "vm_exit", code
    for code in (30, 18):
        assert c.component(vmx, code) == "pv_exit", code
    assert c.component(svm, 0x7B) == "pv_exit" and c.component(svm, 0x81) == "pv_exit"
    assert c.is_idle(vmx, 12) and c.component(vmx, 12) == "vm_exit"
    assert c.is_idle(svm, 0x78)
    # a virtio kick on Intel: EPT_MISCONFIG resolved by fast MMIO
    fast = decode.header_constants()["ISO_KVM_PV_FAST_MMIO"]
    assert c.component(vmx, 49, pv_marks=fast) == "pv_exit"
    # unknown codes default to vm_exit; failed-entry bit is ignored for the table
    assert c.component(vmx, 99) == "vm_exit"
    assert c.component(vmx, kr.VMX_FAILED_ENTRY | 33) == "vm_exit"


def test_overrides():
    c = kr.load_classification({"vmx:HLT": "vm_exit", "npf": "pv_exit", "svm:0x4ff": "ept", "cpuid": "sandbox"})
    assert not c.is_idle(kr.ISA_VMX, 12)
    assert c.is_idle(kr.ISA_SVM, 0x78)  # only the VMX HLT was overridden
    assert c.component(kr.ISA_SVM, 0x400) == "pv_exit"
    assert c.component(kr.ISA_SVM, 0x4FF) == "ept"
    assert c.component(kr.ISA_VMX, 10) == "sandbox" and c.component(kr.ISA_SVM, 0x72) == "sandbox"
    with pytest.raises(ValueError):
        kr.load_classification({"HLT": "l1"})
    with pytest.raises(ValueError):
        kr.load_classification({"NOT_A_REASON": "vm_exit"})


def test_kernel_values_follow_slots():
    c = kr.load_classification({"vmx:MSR_READ": "ept"})
    codes = decode.COMPONENT_CODE
    vals = c.kernel_values()
    assert vals[48] == codes["ept"]
    assert vals[31] == codes["ept"]
    assert vals[12] == codes["vm_exit"] | kr.CLASS_IDLE_FLAG
    assert vals[128 + 0x7B] == codes["pv_exit"]
    assert vals[384] == codes["ept"]  # svm npf 0x400
    assert all(0 <= s < kr.CLASS_SLOTS for s in vals)
    assert kr.class_slot(kr.ISA_SVM, 0x8000_0001) is None
    assert kr.class_slot(kr.ISA_VMX, kr.VMX_FAILED_ENTRY | 33) == 33


@pytest.mark.parametrize("isa,reason,marks,component,name", [
    (1, 48, 0, "ept", "EPT_VIOLATION"),
    (1, 32, 0, "vm_exit", "MSR_WRITE"),
    (1, 30, 1, "pv_exit", "IO_INSTRUCTION"),
    (1, 49, 4, "pv_exit", "EPT_MISCONFIG"),
    (2, 0x400, 0, "ept", "npf"),
    (2, 0x7C, 0, "vm_exit", "msr"),
    (2, 0x81, 8, "pv_exit", "hypercall"),
])
def test_tracepoint_record_in_kernel_layout(exit_format, isa, reason, marks, component, name):
    for fld, typ in (("exit_reason", 4), ("isa", 4), ("vcpu_id", 4)):
        assert exit_format.fields[fld][1] == typ, f"{fld} changed size: update kvm.bpf.c"
    raw = exit_format.encode({"exit_reason": reason, "isa": isa, "vcpu_id": 3, "guest_rip": 0xFFFF_FFFF_8100_0000,
                              "info1": 0xDEAD, "requests": 1})
    ex = kr.decode_exit_record(exit_format, raw, kr.load_classification(), marks)
    assert (ex.isa, ex.reason, ex.name, ex.vcpu, ex.component) == (isa, reason, name, 3, component)


def _stall_record(component: str, reason: int, isa: int, marks: int, vcpu: int) -> bytes:
    c = decode.header_constants()
    r = decode.StallRecord(kind=c["ISO_EV_STALL"], component=decode.COMPONENT_CODE[component],
                           start_ns=1_000_000, end_ns=3_500_000, cgroup_id=4242, pid=900, tid=901, cpu=1,
                           detail=reason, detail2=isa | (marks << 8) | (vcpu << 32))
    return bytes(r)


def test_stall_record_decodes_with_kvm_details():
    raw = _stall_record("pv_exit", 30, kr.ISA_VMX, 1, 2)
    assert len(raw) == decode.header_constants()["ISO_STALL_SIZE"]
    ev = decode.decode_record(raw)
    assert isinstance(ev, Stall)
    assert (ev.component, ev.layer, ev.pid, ev.tid, ev.duration_ns) == ("pv_exit", "L-2", 900, 901, 2_500_000)
    assert ev.details == {"kvm.exit_reason": "IO_INSTRUCTION", "kvm.exit_code": 30, "kvm.isa": "vmx",
                          "kvm.vcpu": 2, "kvm.pv": "pio"}
    ev = decode.decode_record(_stall_record("ept", 0x400, kr.ISA_SVM, 0, 7))
    assert ev.layer == "L-0" and ev.details["kvm.exit_reason"] == "npf" and ev.details["kvm.isa"] == "svm"
    ev = decode.decode_record(_stall_record("vm_exit", kr.VMX_FAILED_ENTRY | 33, kr.ISA_VMX, 0, 0))
    assert ev.details["kvm.exit_reason"] == "INVALID_STATE" and ev.details["kvm.failed_entry"] is True


def test_sandbox_stalls_decode_by_origin():
    """A microVM sandbox's exit keeps its KVM details; a sandbox runtime's CPU sample says where it was taken."""
    ev = decode.decode_record(_stall_record("sandbox", 10, kr.ISA_VMX, 0, 1))
    assert (ev.component, ev.layer) == ("sandbox", "L-4")
    assert ev.details["kvm.exit_reason"] == "CPUID" and ev.details["kvm.vcpu"] == 1
    r = decode.StallRecord(kind=decode.header_constants()["ISO_EV_STALL"], component=decode.COMPONENT_CODE["sandbox"],
                           start_ns=1_000_000, end_ns=2_000_000, pid=7, tid=8, cpu=0, detail=1, detail2=0)
    ev = decode.decode_record(bytes(r))
    assert ev.layer == "L-4" and ev.details == {"sandbox.sampled_in_kernel": True}


class _K(ctypes.Structure):
    _fields_ = kr._KvmKey._fields_


class _V(ctypes.Structure):
    _fields_ = decode.TotalRecord._fields_


def test_exit_counter_feeds_deltas():
    idle_vm = decode.COMPONENT_CODE["vm_exit"] | kr.CLASS_IDLE_FLAG
    items = [(_K(10, 48, 1, decode.COMPONENT_CODE["ept"]), _V(5, 50_000)),
             (_K(10, 12, 1, idle_vm), _V(2, 4_000_000))]
    got = []
    counter = kr.KvmExitCounter(lambda *a: got.append(a), lambda tgid: f"qemu/{tgid}")
    assert counter.update(kr.totals_from_items(items)) == 7
    assert ("EPT_VIOLATION", "L-0", "qemu/10", 5, 5e-05) in got
    assert ("HLT", "L-1", "qemu/10", 2, 0.004) in got
    got.clear()
    items[0] = (_K(10, 48, 1, decode.COMPONENT_CODE["ept"]), _V(8, 80_000))
    assert counter.update(kr.totals_from_items(items)) == 3
    assert got == [("EPT_VIOLATION", "L-0", "qemu/10", 3, 3e-05)]
    # A Firecracker microVM's exits (the kernel marks them sandbox) are counted under L-4.
    got.clear()
    items = [(_K(11, 30, 1, decode.COMPONENT_CODE["sandbox"]), _V(4, 8_000))]
    counter.update(kr.totals_from_items(items))
    assert got == [("IO_INSTRUCTION", "L-4", "qemu/11", 4, 8e-06)]


def test_vendor_isa(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert kr.vendor_isa(str(tmp_path)) == kr.ISA_VMX
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert kr.vendor_isa(str(tmp_path)) == kr.ISA_SVM
    assert kr.vendor_isa("/proc") in (kr.ISA_VMX, kr.ISA_SVM, None)
