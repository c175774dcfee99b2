"""KVM exit reasons as data, their classification into isolation layers, and decoding.

Two tables, written down from the vendors' manuals (sources and the full
rationale in ``docs/kvm.md``):

* ``VMX_EXIT_REASONS`` — Intel SDM Vol. 3, Appendix C "VMX Basic Exit Reasons"
  (basic exit reason = bits 15:0 of the exit-reason field).
* ``SVM_EXIT_REASONS`` — AMD APM Vol. 2, Appendix C "SVM Intercept Exit Codes"
  (the VMCB ``EXITCODE``), plus the SEV-ES GHCB exit codes KVM traces.

Names are the kernel's (``arch/x86/include/uapi/asm/{vmx,svm}.h``, as printed
by the ``kvm:kvm_exit`` tracepoint and by ``perf kvm stat``), so a reason here
reads the same as in those tools.

The classification maps each reason to a component: EPT/NPT faults → ``ept``
(L-0), port/MMIO I/O and hypercalls → ``pv_exit`` (L-2), everything else →
``vm_exit`` (L-1). ``idle`` marks exits that are the guest's own idle time
(HLT): counted in ``isoscope_kvm_exit*`` metrics under L-1, never emitted as
stalls, since a halted vCPU had nothing to run. Operators override entries
from config (:func:`load_classification`); the kernel probe gets the result as
its ``kvm_class`` array (:func:`fill_kernel_classification`).

It holds the detail decoder of the ``vm_exit``,
``pv_exit`` and ``ept`` stall records in :mod:`isoscope.probes.decode`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from isoscope.model import COMPONENT_LAYER
from isoscope.probes import layout

logger = logging.getLogger(__name__)

__all__ = [
    "ISA_SVM", "ISA_VMX", "IDLE", "SVM_EXIT_REASONS", "VMX_EXIT_REASONS", "DEFAULT_CLASSIFICATION",
    "Classification", "ExitTotal", "KvmExitCounter", "TracepointFormat", "class_slot", "decode_details",
    "exit_reason_name", "fill_kernel_classification", "load_classification", "read_exit_totals",
    "vendor_isa",
]

_C = layout.header_constants()
ISA_VMX: int = _C["ISO_KVM_ISA_VMX"]
ISA_SVM: int = _C["ISO_KVM_ISA_SVM"]
CLASS_SLOTS: int = _C["ISO_KVM_CLASS_SLOTS"]
CLASS_IDLE_FLAG: int = _C["ISO_KVM_CLASS_IDLE"]
PV_MARKS: Mapping[int, str] = {
    _C["ISO_KVM_PV_PIO"]: "pio",
    _C["ISO_KVM_PV_MMIO"]: "mmio",
    _C["ISO_KVM_PV_FAST_MMIO"]: "fast_mmio",
    _C["ISO_KVM_PV_HYPERCALL"]: "hypercall",
}
ISA_NAMES: Mapping[int, str] = {ISA_VMX: "vmx", ISA_SVM: "svm"}
VMX_FAILED_ENTRY = 0x8000_0000
"""Bit 31 of the VMX exit-reason field: the exit is a failed VM entry (SDM 25.9.1 / 28.2.1)."""

IDLE = "idle"
"""Classification value: the guest's own idle time (counted as L-1 ``vm_exit`` in metrics, no stall)."""

CLASS_VALUES: tuple[str, ...] = ("ept", "vm_exit", "pv_exit", "sandbox", IDLE)
"""Values a classification entry may take (components of L-0/L-1/L-2/L-4, or ``idle``)."""

# ---------------------------------------------------------------------------
# Intel SDM Vol. 3, Appendix C, Table C-1 "Basic Exit Reasons".
# code: (kernel name, SDM description)
# ---------------------------------------------------------------------------
VMX_EXIT_TABLE: Mapping[int, tuple[str, str]] = {
    0: ("EXCEPTION_NMI", "Exception or non-maskable interrupt (NMI)"),
    1: ("EXTERNAL_INTERRUPT", "External interrupt"),
    2: ("TRIPLE_FAULT", "Triple fault"),
    3: ("INIT_SIGNAL", "INIT signal"),
    4: ("SIPI_SIGNAL", "Start-up IPI (SIPI)"),
    5: ("IO_SMI", "I/O system-management interrupt (SMI)"),
    6: ("OTHER_SMI", "Other SMI"),
    7: ("INTERRUPT_WINDOW", "Interrupt window"),
    8: ("NMI_WINDOW", "NMI window"),
    9: ("TASK_SWITCH", "Task switch"),
    10: ("CPUID", "CPUID"),
    11: ("GETSEC", "GETSEC"),
    12: ("HLT", "HLT"),
    13: ("INVD", "INVD"),
    14: ("INVLPG", "INVLPG"),
    15: ("RDPMC", "RDPMC"),
    16: ("RDTSC", "RDTSC"),
    17: ("RSM", "RSM"),
    18: ("VMCALL", "VMCALL"),
    19: ("VMCLEAR", "VMCLEAR"),
    20: ("VMLAUNCH", "VMLAUNCH"),
    21: ("VMPTRLD", "VMPTRLD"),
    22: ("VMPTRST", "VMPTRST"),
    23: ("VMREAD", "VMREAD"),
    24: ("VMRESUME", "VMRESUME"),
    25: ("VMWRITE", "VMWRITE"),
    26: ("VMOFF", "VMXOFF"),
    27: ("VMON", "VMXON"),
    28: ("CR_ACCESS", "Control-register accesses"),
    29: ("DR_ACCESS", "MOV DR"),
    30: ("IO_INSTRUCTION", "I/O instruction"),
    31: ("MSR_READ", "RDMSR"),
    32: ("MSR_WRITE", "WRMSR"),
    33: ("INVALID_STATE", "VM-entry failure due to invalid guest state"),
    34: ("MSR_LOAD_FAIL", "VM-entry failure due to MSR loading"),
    36: ("MWAIT_INSTRUCTION", "MWAIT"),
    37: ("MONITOR_TRAP_FLAG", "Monitor trap flag"),
    39: ("MONITOR_INSTRUCTION", "MONITOR"),
    40: ("PAUSE_INSTRUCTION", "PAUSE"),
    41: ("MCE_DURING_VMENTRY", "VM-entry failure due to machine-check event"),
    43: ("TPR_BELOW_THRESHOLD", "TPR below threshold"),
    44: ("APIC_ACCESS", "APIC access"),
    45: ("EOI_INDUCED", "Virtualized EOI"),
    46: ("GDTR_IDTR", "Access to GDTR or IDTR"),
    47: ("LDTR_TR", "Access to LDTR or TR"),
    48: ("EPT_VIOLATION", "EPT violation"),
    49: ("EPT_MISCONFIG", "EPT misconfiguration"),
    50: ("INVEPT", "INVEPT"),
    51: ("RDTSCP", "RDTSCP"),
    52: ("PREEMPTION_TIMER", "VMX-preemption timer expired"),
    53: ("INVVPID", "INVVPID"),
    54: ("WBINVD", "WBINVD or WBNOINVD"),
    55: ("XSETBV", "XSETBV"),
    56: ("APIC_WRITE", "APIC write"),
    57: ("RDRAND", "RDRAND"),
    58: ("INVPCID", "INVPCID"),
    59: ("VMFUNC", "VMFUNC"),
    60: ("ENCLS", "ENCLS"),
    61: ("RDSEED", "RDSEED"),
    62: ("PML_FULL", "Page-modification log full"),
    63: ("XSAVES", "XSAVES"),
    64: ("XRSTORS", "XRSTORS"),
    65: ("PCONFIG", "PCONFIG"),
    66: ("SPP", "SPP-related event"),
    67: ("UMWAIT", "UMWAIT"),
    68: ("TPAUSE", "TPAUSE"),
    69: ("LOADIWKEY", "LOADIWKEY"),
    70: ("ENCLV", "ENCLV"),
    72: ("ENQCMD_PASID_FAIL", "ENQCMD PASID translation failure"),
    73: ("ENQCMDS_PASID_FAIL", "ENQCMDS PASID translation failure"),
    74: ("BUS_LOCK", "Bus lock"),
    75: ("NOTIFY", "Instruction timeout (notify VM exit)"),
    76: ("SEAMCALL", "SEAMCALL"),
    77: ("TDCALL", "TDCALL"),
    78: ("RDMSRLIST", "RDMSRLIST"),
    79: ("WRMSRLIST", "WRMSRLIST"),
    84: ("MSR_READ_IMM", "RDMSR with immediate operand"),
    85: ("MSR_WRITE_IMM", "WRMSRNS with immediate operand"),
}


def _svm_table() -> dict[int, tuple[str, str]]:
    """AMD APM Vol. 2, Appendix C, Table C-1 "SVM Intercept Codes" (+ SEV-ES GHCB codes)."""
    t: dict[int, tuple[str, str]] = {}
    for n in range(16):
        t[0x000 + n] = (f"read_cr{n}", f"VMEXIT_CR{n}_READ")
        t[0x010 + n] = (f"write_cr{n}", f"VMEXIT_CR{n}_WRITE")
        t[0x020 + n] = (f"read_dr{n}", f"VMEXIT_DR{n}_READ")
        t[0x030 + n] = (f"write_dr{n}", f"VMEXIT_DR{n}_WRITE")
        t[0x090 + n] = (f"write_cr{n}_trap", f"VMEXIT_CR{n}_WRITE_TRAP")
    # Exception intercepts 0x40..0x5f: vector n. Mnemonics from the SDM/APM
    # vector table; the kernel prints "<MN> excp" for the ones it names.
    vectors = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF", 9: "CSO",
               10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC", 19: "XF",
               20: "VE", 21: "CP", 28: "HV", 29: "VC", 30: "SX"}
    for n in range(32):
        mn = vectors.get(n)
        t[0x040 + n] = (f"{mn} excp" if mn else f"excp{n}", f"VMEXIT_EXCP{n}")
    named = {
        0x060: ("interrupt", "VMEXIT_INTR"), 0x061: ("nmi", "VMEXIT_NMI"), 0x062: ("smi", "VMEXIT_SMI"),
        0x063: ("init", "VMEXIT_INIT"), 0x064: ("vintr", "VMEXIT_VINTR"),
        0x065: ("cr0_sel_write", "VMEXIT_CR0_SEL_WRITE"), 0x066: ("read_idtr", "VMEXIT_IDTR_READ"),
        0x067: ("read_gdtr", "VMEXIT_GDTR_READ"), 0x068: ("read_ldtr", "VMEXIT_LDTR_READ"),
        0x069: ("read_rt", "VMEXIT_TR_READ"), 0x06a: ("write_idtr", "VMEXIT_IDTR_WRITE"),
        0x06b: ("write_gdtr", "VMEXIT_GDTR_WRITE"), 0x06c: ("write_ldtr", "VMEXIT_LDTR_WRITE"),
        0x06d: ("write_rt", "VMEXIT_TR_WRITE"), 0x06e: ("rdtsc", "VMEXIT_RDTSC"),
        0x06f: ("rdpmc", "VMEXIT_RDPMC"), 0x070: ("pushf", "VMEXIT_PUSHF"), 0x071: ("popf", "VMEXIT_POPF"),
        0x072: ("cpuid", "VMEXIT_CPUID"), 0x073: ("rsm", "VMEXIT_RSM"), 0x074: ("iret", "VMEXIT_IRET"),
        0x075: ("swint", "VMEXIT_SWINT"), 0x076: ("invd", "VMEXIT_INVD"), 0x077: ("pause", "VMEXIT_PAUSE"),
        0x078: ("hlt", "VMEXIT_HLT"), 0x079: ("invlpg", "VMEXIT_INVLPG"), 0x07a: ("invlpga", "VMEXIT_INVLPGA"),
        0x07b: ("io", "VMEXIT_IOIO"), 0x07c: ("msr", "VMEXIT_MSR"), 0x07d: ("task_switch", "VMEXIT_TASK_SWITCH"),
        0x07e: ("ferr_freeze", "VMEXIT_FERR_FREEZE"), 0x07f: ("shutdown", "VMEXIT_SHUTDOWN"),
        0x080: ("vmrun", "VMEXIT_VMRUN"), 0x081: ("hypercall", "VMEXIT_VMMCALL"),
        0x082: ("vmload", "VMEXIT_VMLOAD"), 0x083: ("vmsave", "VMEXIT_VMSAVE"), 0x084: ("stgi", "VMEXIT_STGI"),
        0x085: ("clgi", "VMEXIT_CLGI"), 0x086: ("skinit", "VMEXIT_SKINIT"), 0x087: ("rdtscp", "VMEXIT_RDTSCP"),
        0x088: ("icebp", "VMEXIT_ICEBP"), 0x089: ("wbinvd", "VMEXIT_WBINVD"),
        0x08a: ("monitor", "VMEXIT_MONITOR"), 0x08b: ("mwait", "VMEXIT_MWAIT"),
        0x08c: ("mwait_cond", "VMEXIT_MWAIT_CONDITIONAL"), 0x08d: ("xsetbv", "VMEXIT_XSETBV"),
        0x08e: ("rdpru", "VMEXIT_RDPRU"), 0x08f: ("write_efer_trap", "VMEXIT_EFER_WRITE_TRAP"),
        0x0a0: ("invlpgb", "VMEXIT_INVLPGB"), 0x0a1: ("invlpgb_illegal", "VMEXIT_INVLPGB_ILLEGAL"),
        0x0a2: ("invpcid", "VMEXIT_INVPCID"), 0x0a3: ("mcommit", "VMEXIT_MCOMMIT"),
        0x0a4: ("tlbsync", "VMEXIT_TLBSYNC"), 0x0a5: ("buslock", "VMEXIT_BUSLOCK"),
        0x0a6: ("idle-halt", "VMEXIT_IDLE_HLT"),
        0x400: ("npf", "VMEXIT_NPF"), 0x401: ("avic_incomplete_ipi", "VMEXIT_AVIC_INCOMPLETE_IPI"),
        0x402: ("avic_unaccelerated_access", "VMEXIT_AVIC_NOACCEL"), 0x403: ("vmgexit", "VMEXIT_VMGEXIT"),
        # SEV-ES GHCB protocol exit codes (GHCB spec, "SW_EXITCODE"), traced by KVM for VMGEXITs.
        0x8000_0001: ("vmgexit_mmio_read", "SVM_VMGEXIT_MMIO_READ"),
        0x8000_0002: ("vmgexit_mmio_write", "SVM_VMGEXIT_MMIO_WRITE"),
        0x8000_0003: ("vmgexit_nmi_complete", "SVM_VMGEXIT_NMI_COMPLETE"),
        0x8000_0004: ("vmgexit_ap_hlt_loop", "SVM_VMGEXIT_AP_HLT_LOOP"),
        0x8000_0005: ("vmgexit_ap_jump_table", "SVM_VMGEXIT_AP_JUMP_TABLE"),
        0x8000_0010: ("vmgexit_page_state_change", "SVM_VMGEXIT_PSC"),
        0x8000_0011: ("vmgexit_guest_request", "SVM_VMGEXIT_GUEST_REQUEST"),
        0x8000_0012: ("vmgexit_ext_guest_request", "SVM_VMGEXIT_EXT_GUEST_REQUEST"),
        0x8000_0013: ("vmgexit_ap_creation", "SVM_VMGEXIT_AP_CREATION"),
        0x8000_fffd: ("vmgexit_hypervisor_feature", "SVM_VMGEXIT_HV_FEATURES"),
        0xFFFF_FFFF: ("invalid_guest_state", "VMEXIT_INVALID"),
    }
    t.update(named)
    return t


SVM_EXIT_TABLE: Mapping[int, tuple[str, str]] = _svm_table()

VMX_EXIT_REASONS: Mapping[int, str] = {k: v[0] for k, v in VMX_EXIT_TABLE.items()}
SVM_EXIT_REASONS: Mapping[int, str] = {k: v[0] for k, v in SVM_EXIT_TABLE.items()}
_TABLES: Mapping[int, Mapping[int, str]] = {ISA_VMX: VMX_EXIT_REASONS, ISA_SVM: SVM_EXIT_REASONS}

# ---------------------------------------------------------------------------
# Default classification (docs/kvm.md, "Classification")
# ---------------------------------------------------------------------------
_VMX_CLASS: Mapping[str, str] = {
    # Second-level address translation faults: the hardware assist itself.
    "EPT_VIOLATION": "ept", "EPT_MISCONFIG": "ept", "PML_FULL": "ept",
    # Port I/O and hypercalls are how paravirtual devices (virtio kicks) and
    # PV interfaces reach the host.
    "IO_INSTRUCTION": "pv_exit", "VMCALL": "pv_exit", "TDCALL": "pv_exit",
    # A halted vCPU has nothing to run.
    "HLT": IDLE,
}
_SVM_CLASS: Mapping[str, str] = {
    "npf": "ept",
    "io": "pv_exit", "hypercall": "pv_exit", "vmgexit_mmio_read": "pv_exit", "vmgexit_mmio_write": "pv_exit",
    "hlt": IDLE, "idle-halt": IDLE, "vmgexit_ap_hlt_loop": IDLE,
}


def _default_classification() -> dict[tuple[int, int], str]:
    out: dict[tuple[int, int], str] = {}
    for isa, table, special in ((ISA_VMX, VMX_EXIT_REASONS, _VMX_CLASS), (ISA_SVM, SVM_EXIT_REASONS, _SVM_CLASS)):
        for code, name in table.items():
            out[(isa, code)] = special.get(name, "vm_exit")
    return out


DEFAULT_CLASSIFICATION: Mapping[tuple[int, int], str] = _default_classification()
"""(isa, exit code) → classification value; everything unlisted is ``vm_exit``."""


def basic_reason(isa: int, reason: int) -> int:
    """The code a reason is tabled under: VMX bits 15:0, SVM the full exit code."""
    return reason & 0xFFFF if isa == ISA_VMX else reason & 0xFFFF_FFFF


def exit_reason_name(isa: int, reason: int) -> str:
    """Name of an exit reason as the kernel and ``perf kvm stat`` print it.

    Args:
        isa: ``ISA_VMX`` or ``ISA_SVM``.
        reason: ``exit_reason`` as traced (VMX: the full field, bit 31 may be set).

    Returns:
        e.g. ``"EPT_VIOLATION"``, ``"npf"``; unknown codes as ``"vmx_0x51"`` / ``"svm_0x5ff"``.
    """
    code = basic_reason(isa, reason)
    name = _TABLES.get(isa, {}).get(code)
    if name is None:
        return f"{ISA_NAMES.get(isa, f'isa{isa}')}_{code:#x}"
    return name


def class_slot(isa: int, reason: int) -> int | None:
    """Index of ``(isa, reason)`` in the kernel's ``kvm_class`` array (``isoscope.h`` layout)."""
    if isa == ISA_VMX:
        basic = reason & 0xFFFF
        return basic if basic < 128 else None
    if isa == ISA_SVM:
        if reason < 0x100:
            return 128 + reason
        if 0x400 <= reason < 0x480:
            return 384 + reason - 0x400
    return None


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Classification:
    """Exit reason → component, after config overrides.

    Attributes:
        table: ``(isa, code)`` → one of ``CLASS_VALUES``.
        default: value of codes not in ``table`` (``vm_exit``).
    """

    table: Mapping[tuple[int, int], str]
    default: str = "vm_exit"

    def value(self, isa: int, reason: int) -> str:
        """The raw classification value (may be ``idle``)."""
        return self.table.get((isa, basic_reason(isa, reason)), self.default)

    def component(self, isa: int, reason: int, pv_marks: int = 0) -> str:
        """The stall component of one exit.

        Args:
            isa: ``ISA_VMX`` or ``ISA_SVM``.
            reason: traced exit reason.
            pv_marks: ``ISO_KVM_PV_*`` marks seen during the exit; any mark
                makes it ``pv_exit`` (as the kernel probe decides).
        """
        if pv_marks:
            return "pv_exit"
        value = self.value(isa, reason)
        return "vm_exit" if value == IDLE else value

    def is_idle(self, isa: int, reason: int, pv_marks: int = 0) -> bool:
        """Whether the exit is the guest's own idle time (no stall emitted)."""
        return not pv_marks and self.value(isa, reason) == IDLE

    def kernel_values(self) -> dict[int, int]:
        """``kvm_class`` array contents: slot → ISO_C_* code | idle flag (only slots that differ from 0)."""
        out: dict[int, int] = {}
        for (isa, code), value in self.table.items():
            slot = class_slot(isa, code)
            if slot is None:
                continue
            comp = "vm_exit" if value == IDLE else value
            out[slot] = layout.COMPONENT_CODE[comp] | (CLASS_IDLE_FLAG if value == IDLE else 0)
        return out


_KEY_RE = re.compile(r"^(?:(vmx|svm):)?(.+)$", re.I)


def _resolve_key(key: str) -> list[tuple[int, int]]:
    """``"vmx:HLT"``, ``"svm:0x78"``, ``"EPT_VIOLATION"``, ``"vmx:48"`` → matching (isa, code) pairs."""
    m = _KEY_RE.match(key.strip())
    if not m:
        return []
    isa_name, name = (m.group(1) or "").lower(), m.group(2).strip()
    isas = [i for i, n in ISA_NAMES.items() if not isa_name or n == isa_name]
    out = []
    for isa in isas:
        try:
            code = int(name, 0)
        except ValueError:
            code = None
        if code is not None and isa_name:
            out.append((isa, code))
            continue
        for c, n in _TABLES[isa].items():
            if n.lower() == name.lower():
                out.append((isa, c))
    return out


def load_classification(overrides: dict[str, str] | None = None) -> Classification:
    """The default classification with config overrides applied.

    Args:
        overrides: reason → value. Reasons are names (``"EPT_MISCONFIG"``,
            ``"hlt"``, matched case-insensitively in both tables) optionally
            prefixed by the ISA (``"vmx:HLT"``), or ``"vmx:<code>"`` /
            ``"svm:<code>"`` (decimal or ``0x`` hex) for codes not in the tables.
            Values: ``ept``, ``vm_exit``, ``pv_exit``, ``sandbox`` or ``idle``.

    Returns:
        The classification.

    Raises:
        ValueError: unknown reason or value (a typo in config must not be silently ignored).
    """
    table = dict(DEFAULT_CLASSIFICATION)
    for key, value in (overrides or {}).items():
        value = str(value).strip().lower()
        if value not in CLASS_VALUES:
            raise ValueError(f"kvm classification {key!r}: {value!r} is not one of {', '.join(CLASS_VALUES)}")
        pairs = _resolve_key(str(key))
        if not pairs:
            raise ValueError(f"kvm classification: unknown exit reason {key!r} "
                             "(use a name from docs/kvm.md or vmx:<code> / svm:<code>)")
        for pair in pairs:
            table[pair] = value
        logger.info("kvm exit classification override: %s → %s", key, value)
    return Classification(table)


def vendor_isa(proc_root: str = "/proc") -> int | None:
    """The virtualization ISA of this host's CPUs from ``/proc/cpuinfo`` (vendor_id).

    Returns:
        ``ISA_VMX`` (GenuineIntel, and Zhaoxin/Centaur which implement VMX),
        ``ISA_SVM`` (AuthenticAMD, HygonGenuine) or ``None``.
    """
    try:
        with open(os.path.join(proc_root, "cpuinfo"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "vendor_id":
                    vendor = value.strip()
                    if vendor in ("AuthenticAMD", "HygonGenuine"):
                        return ISA_SVM
                    if vendor in ("GenuineIntel", "CentaurHauls", "  Shanghai  ", "Shanghai"):
                        return ISA_VMX
                    return None
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------
# Stall details
# ---------------------------------------------------------------------------

def decode_details(detail: int, detail2: int) -> dict[str, Any]:
    """Details of a KVM-exit stall record (``detail`` = reason, ``detail2`` = isa | marks << 8 | vcpu << 32)."""
    isa = detail2 & 0xFF
    marks = (detail2 >> 8) & 0xFF
    out: dict[str, Any] = {
        "kvm.exit_reason": exit_reason_name(isa, detail),
        "kvm.exit_code": basic_reason(isa, detail),
        "kvm.isa": ISA_NAMES.get(isa, str(isa)),
        "kvm.vcpu": detail2 >> 32,
    }
    if isa == ISA_VMX and detail & VMX_FAILED_ENTRY:
        out["kvm.failed_entry"] = True
    if marks:
        out["kvm.pv"] = ",".join(name for bit, name in sorted(PV_MARKS.items()) if marks & bit)
    return out


def decode_sandbox_details(detail: int, detail2: int) -> dict[str, Any]:
    """Details of a ``sandbox`` stall: a microVM sandbox's exit carries its isa in ``detail2`` (never 0);
    a CPU sample of a sandbox runtime (``bpf/sandbox.bpf.c``) has ``detail2`` 0 and ``detail`` = in kernel."""
    if detail2 & 0xFF in ISA_NAMES:
        return decode_details(detail, detail2)
    return {"sandbox.sampled_in_kernel": bool(detail)}


SANDBOX_VMMS = ("firecracker",)
"""VMMs that are an L-4 sandbox themselves: their exits (but EPT/NPT and guest idle) are ``l4.sandbox``."""


def sync_sandbox_vmms(bpf: Any, vms: Iterable[Any]) -> int:
    """Make the probe's ``kvm_sandbox_vmms`` set exactly the sandbox VMMs among ``vms``; returns its size.

    Args:
        bpf: the loaded ``kvm`` probe.
        vms: the VMs on the node now (``isoscope.host.vms.VmInfo``: ``pid`` and ``vmm``).
    """
    table = bpf["kvm_sandbox_vmms"]
    want = {int(vm.pid) for vm in vms if vm.vmm in SANDBOX_VMMS}
    have = {int(key.value) for key in table.keys()}
    # Called every second: only the changes touch the map.
    for tgid in have - want:
        try:
            del table[table.Key(tgid)]
        except KeyError:
            pass
    for tgid in want - have:
        table[table.Key(tgid)] = table.Leaf(1)
    return len(want)


# ---------------------------------------------------------------------------
# Tracepoint format files (the running kernel's binary layout)
# ---------------------------------------------------------------------------

_FIELD_RE = re.compile(r"field:(?P<decl>[^;]+);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<sgn>\d);")


@dataclass(frozen=True)
class TracepointFormat:
    """A tracefs ``format`` file: field offsets, sizes and signedness.

    Attributes:
        name: event name.
        fields: field name → (offset, size, signed).
        print_fmt: the ``print fmt:`` line.
    """

    name: str
    fields: Mapping[str, tuple[int, int, bool]]
    print_fmt: str = ""

    @classmethod
    def parse(cls, text: str) -> "TracepointFormat":
        """Parse the text of a format file."""
        name = ""
        fields: dict[str, tuple[int, int, bool]] = {}
        print_fmt = ""
        for line in text.splitlines():
            if line.startswith("name:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("print fmt:"):
                print_fmt = line.split(":", 1)[1].strip()
            m = _FIELD_RE.search(line)
            if m:
                decl = m.group("decl").strip()
                fname = re.sub(r"\[.*\]$", "", decl.split()[-1])
                fields[fname] = (int(m.group("off")), int(m.group("size")), m.group("sgn") == "1")
        return cls(name, fields, print_fmt)

    @classmethod
    def read(cls, category: str, event: str, tracefs: str = "/sys/kernel/tracing") -> "TracepointFormat":
        """Read ``<tracefs>/events/<category>/<event>/format``."""
        with open(os.path.join(tracefs, "events", category, event, "format"), encoding="utf-8") as fh:
            return cls.parse(fh.read())

    @property
    def size(self) -> int:
        """Record size up to the end of the last field (before trailing alignment)."""
        return max(off + size for off, size, _ in self.fields.values())

    def decode(self, data: bytes) -> dict[str, int]:
        """Integer fields of one raw record laid out as this format says."""
        out = {}
        for fname, (off, size, signed) in self.fields.items():
            if size in (1, 2, 4, 8) and off + size <= len(data):
                out[fname] = int.from_bytes(data[off:off + size], "little", signed=signed)
        return out

    def encode(self, values: Mapping[str, int]) -> bytes:
        """A raw record with ``values`` at this format's offsets (other bytes zero)."""
        buf = bytearray((self.size + 7) // 8 * 8)
        for fname, value in values.items():
            off, size, signed = self.fields[fname]
            buf[off:off + size] = int(value).to_bytes(size, "little", signed=signed)
        return bytes(buf)

    def symbol_tables(self) -> list[dict[int, str]]:
        """Every ``__print_symbolic(..., { code, "name" }, ...)`` table in the print format, in order."""
        entry = re.compile(r'\s*,\s*\{\s*([^,{}]+?)\s*,\s*"([^"]*)"\s*\}')
        tables = []
        for chunk in self.print_fmt.split("__print_symbolic(")[1:]:
            # skip the value expression up to the first table entry
            pos = chunk.find(", {")
            table: dict[int, str] = {}
            while pos >= 0:
                m = entry.match(chunk, pos)
                if not m:
                    break
                try:
                    table[_eval_code(m.group(1))] = m.group(2)
                except ValueError:
                    logger.debug("unparsed symbol code %r", m.group(1))
                pos = m.end()
            tables.append(table)
        return tables


def _eval_code(expr: str) -> int:
    """Evaluate the integer expressions tracepoint symbol tables use (``0x040 + 13``, ``-1``)."""
    total = 0
    for term in expr.replace(" ", "").split("+"):
        if not re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", term):
            raise ValueError(expr)
        total += int(term, 0)
    return total & 0xFFFF_FFFF


@dataclass(frozen=True)
class KvmExit:
    """One decoded ``kvm:kvm_exit`` record.

    Attributes:
        isa: ``ISA_VMX`` / ``ISA_SVM``.
        reason: exit reason as traced.
        name: reason name.
        vcpu: vCPU index inside its VM.
        component: classification (``ept``/``vm_exit``/``pv_exit``/``sandbox``).
        idle: the exit is guest idle time.
    """

    isa: int
    reason: int
    name: str
    vcpu: int
    component: str
    idle: bool


def decode_exit_record(fmt: TracepointFormat, data: bytes, classification: Classification,
                       pv_marks: int = 0) -> KvmExit:
    """Decode a raw ``kvm_exit`` record with the running kernel's format and classify it."""
    f = fmt.decode(data)
    isa, reason = f["isa"], f["exit_reason"]
    return KvmExit(isa, reason, exit_reason_name(isa, reason), f.get("vcpu_id", 0),
                   classification.component(isa, reason, pv_marks), classification.is_idle(isa, reason, pv_marks))


# ---------------------------------------------------------------------------
# Kernel maps: classification in, exit totals out
# ---------------------------------------------------------------------------

def fill_kernel_classification(bpf: Any, classification: Classification) -> int:
    """Write the classification into the loaded probe's ``kvm_class`` array.

    Every slot is written (unlisted ones as ``vm_exit``), so a reload with a
    changed table leaves no stale entries.

    Returns:
        Number of slots written.
    """
    table = bpf["kvm_class"]
    values = classification.kernel_values()
    default = layout.COMPONENT_CODE[classification.default]
    for slot in range(CLASS_SLOTS):
        table[table.Key(slot)] = table.Leaf(values.get(slot, default))
    return CLASS_SLOTS


@dataclass(frozen=True)
class ExitTotal:
    """Cumulative exits of one (VMM, reason, component) since the probe attached.

    Attributes:
        tgid: VMM process.
        isa, reason: exit reason (VMX basic reason or SVM code).
        name: reason name.
        component: ``ept``/``vm_exit``/``pv_exit``/``sandbox`` (idle exits are ``vm_exit``).
        idle: guest idle exits.
        count: exits.
        sum_ns: time between exit and entry, summed.
    """

    tgid: int
    isa: int
    reason: int
    name: str
    component: str
    idle: bool
    count: int
    sum_ns: int

    @property
    def layer(self) -> str:
        return COMPONENT_LAYER[self.component]


class _KvmKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("reason", ctypes.c_uint32),
                ("isa", ctypes.c_uint32), ("component", ctypes.c_uint32)]


if ctypes.sizeof(_KvmKey) != _C["ISO_KVM_KEY_SIZE"]:  # pragma: no cover - guards header drift
    raise ImportError("struct iso_kvm_key and kvm_reasons._KvmKey disagree")


def totals_from_items(items: Iterable[tuple[Any, Any]]) -> list[ExitTotal]:
    """``ExitTotal`` rows from ``(iso_kvm_key, iso_total)`` pairs (bcc map items or ctypes structs)."""
    out = []
    for k, v in items:
        comp_code = k.component & 0xFF
        comp = layout.COMPONENT_BY_CODE.get(comp_code, "vm_exit")
        out.append(ExitTotal(int(k.tgid), int(k.isa), int(k.reason), exit_reason_name(k.isa, k.reason),
                             comp, bool(k.component & CLASS_IDLE_FLAG), int(v.count), int(v.sum_ns)))
    return out


def read_exit_totals(bpf: Any) -> list[ExitTotal]:
    """Read the probe's ``kvm_totals`` map."""
    return totals_from_items(bpf["kvm_totals"].items())


ExitSink = Callable[[str, str, str, int, float], None]
"""``(reason, layer, vm, count, seconds)``: e.g. ``PrometheusExporter.add_kvm_exits``."""


@dataclass
class KvmExitCounter:
    """Turns cumulative kernel totals into the deltas ``isoscope_kvm_exit*_total`` are fed with.

    Args:
        sink: receives ``(reason, layer, vm, count, seconds)`` deltas.
        vm_name: VMM tgid → VM label (``isoscope.host.vms.VmRegistry.vm_label``).
    """

    sink: ExitSink
    vm_name: Callable[[int], str]
    _seen: dict[tuple[int, int, int, str, bool], tuple[int, int]] = field(default_factory=dict)

    def update(self, totals: Iterable[ExitTotal]) -> int:
        """Feed the increase since the last call; returns the number of exits added."""
        added = 0
        for t in totals:
            key = (t.tgid, t.isa, t.reason, t.component, t.idle)
            prev_count, prev_ns = self._seen.get(key, (0, 0))
            if t.count < prev_count:  # map entry was recreated (VMM restarted with the same pid)
                prev_count, prev_ns = 0, 0
            d_count, d_ns = t.count - prev_count, t.sum_ns - prev_ns
            self._seen[key] = (t.count, t.sum_ns)
            if d_count > 0 or d_ns > 0:
                self.sink(t.name, t.layer, self.vm_name(t.tgid), d_count, d_ns / 1e9)
                added += d_count
        return added

    def forget(self, tgids: Iterable[int]) -> None:
        """Drop the bookkeeping of VMMs that exited."""
        gone = set(tgids)
        for key in [k for k in self._seen if k[0] in gone]:
            del self._seen[key]



def read_untimed_pv_events(bpf: Any) -> int:
    """PV events (port/MMIO I/O, hypercalls) the probe saw with no traced exit in flight.

    Non-zero while ``kvm_totals`` stays empty means guests run on a KVM backend
    that does not trace ``kvm_exit``/``kvm_entry`` (such as ``kvm_pvm``): exits
    happen but cannot be timed per reason.
    """
    table = bpf["kvm_pv_untimed"]
    return int(sum(table[table.Key(0)]))
