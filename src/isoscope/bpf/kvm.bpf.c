/* SPDX-License-Identifier: Apache-2.0 */
/*
 * KVM exits seen from the host (l0.ept, l1.vm_exit, l2.pv_exit; l4.sandbox for
 * microVM sandboxes such as Firecracker).
 *
 * kvm:kvm_exit and kvm:kvm_entry fire on the vCPU thread of the VMM process
 * (QEMU, Firecracker, Cloud Hypervisor ...): exit -> entry is the time the
 * vCPU spent outside the guest for one exit, including any round trip to the
 * VMM in user space (KVM_RUN returns, the VMM emulates the device, KVM_RUN
 * again) -- the same interval `perf kvm stat` reports per reason.
 *
 * Classification is data from user space: `kvm_class` holds, per exit-reason
 * slot (see isoscope.h), the component code and the idle flag.  kvm_pio,
 * kvm_mmio, kvm_fast_mmio and kvm_hypercall firing between an exit and its
 * entry mark the exit as paravirtual I/O, whatever its reason: on Intel a
 * virtio kick over PCI arrives as EPT_MISCONFIG + kvm_fast_mmio, and only the
 * mark tells it from a real EPT fault.  Exits of a VMM listed in
 * `kvm_sandbox_vmms` (a Firecracker microVM: the VMM is the pod's sandbox) are
 * the sandbox's own time, except EPT/NPT faults and guest idle time.
 *
 * Every exit is counted in `kvm_totals` (per VMM tgid, reason, isa,
 * component); exits >= ISO_MIN_STALL_NS that are not guest idle time (HLT)
 * cross to user space as stall records.  `kvm_inflight` holds at most one
 * entry per vCPU thread, removed at entry and at thread exit.
 */
#include "isoscope.h"

struct kvm_inflight_val {
	__u64 ts;
	__u32 reason;
	__u32 isa;
	__u32 vcpu;
	__u32 pv;         /* ISO_KVM_PV_* marks */
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_ARRAY(kvm_class, __u32, ISO_KVM_CLASS_SLOTS);
BPF_HASH(kvm_sandbox_vmms, __u32, __u8, ISO_KVM_MAX_SANDBOX_VMMS);
BPF_HASH(kvm_inflight, __u32, struct kvm_inflight_val, ISO_KVM_MAX_VCPUS);
BPF_HASH(kvm_totals, struct iso_kvm_key, struct iso_total, ISO_KVM_MAX_KEYS);
/* PV events (pio/mmio/hypercall) seen with no traced exit in flight: guests run
 * on a KVM backend that does not trace kvm_exit (e.g. kvm_pvm), so exits cannot
 * be timed; user space reports it instead of showing zero exits. */
BPF_PERCPU_ARRAY(kvm_pv_untimed, __u64, 1);

static inline __attribute__((always_inline)) void kvm_lost(void)
{
	__u32 zero = 0;
	__u64 *n = lost_events.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
}

/* The slot layout is mirrored by collector/kvm_reasons.py class_slot(). */
static inline __attribute__((always_inline)) int kvm_slot(__u32 isa, __u32 reason)
{
	if (isa == ISO_KVM_ISA_VMX) {
		__u32 basic = reason & 0xffff;
		return basic < 128 ? (int)basic : -1;
	}
	if (isa == ISO_KVM_ISA_SVM) {
		if (reason < 0x100)
			return 128 + (int)reason;
		if (reason >= 0x400 && reason < 0x480)
			return 384 + (int)(reason - 0x400);
	}
	return -1;
}

static inline __attribute__((always_inline)) void kvm_mark(__u32 mark)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct kvm_inflight_val *v = kvm_inflight.lookup(&tid);
	if (v) {
		v->pv |= mark;
		return;
	}
	__u32 zero = 0;
	__u64 *n = kvm_pv_untimed.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
}

TRACEPOINT_PROBE(kvm, kvm_exit)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct kvm_inflight_val v = {};
	v.ts = bpf_ktime_get_ns();
	v.reason = args->exit_reason;
	v.isa = args->isa;
	v.vcpu = args->vcpu_id;
	kvm_inflight.update(&tid, &v);
	return 0;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct kvm_inflight_val *vp = kvm_inflight.lookup(&tid);
	if (!vp)
		return 0;   /* first entry of a vCPU, or attached mid-exit */
	struct kvm_inflight_val v = *vp;
	kvm_inflight.delete(&tid);
	__u64 now = bpf_ktime_get_ns();
	if (now < v.ts)
		return 0;
	__u64 d = now - v.ts;

	__u32 cls = 0;
	int slot = kvm_slot(v.isa, v.reason);
	if (slot >= 0) {
		__u32 s = (__u32)slot;
		__u32 *c = kvm_class.lookup(&s);
		if (c)
			cls = *c;
	}
	__u32 comp = cls & 0xff;
	__u32 idle = cls & ISO_KVM_CLASS_IDLE;
	if (comp == 0)
		comp = ISO_C_VM_EXIT;
	if (v.pv) {
		comp = ISO_C_PV_EXIT;
		idle = 0;
	}
	__u32 tgid = (__u32)(pid_tgid >> 32);
	if (!idle && comp != ISO_C_EPT && kvm_sandbox_vmms.lookup(&tgid))
		comp = ISO_C_SANDBOX;

	struct iso_kvm_key k = {};
	k.tgid = tgid;
	k.reason = v.isa == ISO_KVM_ISA_VMX ? (v.reason & 0xffff) : v.reason;
	k.isa = v.isa;
	k.component = comp | idle;
	struct iso_total zt = {};
	struct iso_total *t = kvm_totals.lookup_or_try_init(&k, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	if (idle || d < ISO_MIN_STALL_NS)
		return 0;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		kvm_lost();
		return 0;
	}
	e->kind = ISO_EV_STALL;
	e->component = comp;
	e->start_ns = v.ts;
	e->end_ns = now;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->tid = tid;
	e->cpu = (__s32)bpf_get_smp_processor_id();
	e->detail = v.reason;
	e->detail2 = (__u64)(v.isa & 0xff) | ((__u64)(v.pv & 0xff) << 8) | ((__u64)v.vcpu << 32);
	events.ringbuf_submit(e, 0);
	return 0;
}

#ifdef ISO_HAVE_KVM_KVM_PIO
TRACEPOINT_PROBE(kvm, kvm_pio)
{
	kvm_mark(ISO_KVM_PV_PIO);
	return 0;
}
#endif

#ifdef ISO_HAVE_KVM_KVM_MMIO
TRACEPOINT_PROBE(kvm, kvm_mmio)
{
	/* every type counts: "unsatisfied-read" (0) is a read forwarded to the
	 * VMM's user-space device model, the costliest kind */
	kvm_mark(ISO_KVM_PV_MMIO);
	return 0;
}
#endif

#ifdef ISO_HAVE_KVM_KVM_FAST_MMIO
TRACEPOINT_PROBE(kvm, kvm_fast_mmio)
{
	kvm_mark(ISO_KVM_PV_FAST_MMIO);
	return 0;
}
#endif

#ifdef ISO_HAVE_KVM_KVM_HYPERCALL
TRACEPOINT_PROBE(kvm, kvm_hypercall)
{
	kvm_mark(ISO_KVM_PV_HYPERCALL);
	return 0;
}
#endif

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	/* a vCPU thread that dies mid-exit never reaches kvm_entry */
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	kvm_inflight.delete(&tid);
	return 0;
}
