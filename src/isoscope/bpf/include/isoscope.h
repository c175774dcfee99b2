/* SPDX-License-Identifier: Apache-2.0 */
/*
 * isoscope: event layouts shared by every bpf/<subsystem>.bpf.c and by
 * collector/probes/decode.py.  This header is the single source of truth for
 * what crosses from the kernel to user space: fixed-width types only, explicit
 * padding, every struct a multiple of 8 bytes.  decode.py checks its ctypes
 * mirrors against the sizes below at import time (ISO_*_SIZE).
 *
 * Conventions every probe follows:
 *   - timestamps are bpf_ktime_get_ns() (CLOCK_MONOTONIC);
 *   - pid = tgid, tid = kernel pid, both in the host (init) PID namespace;
 *   - cgroup_id is bpf_get_current_cgroup_id() (the cgroup v2 id);
 *   - one ring buffer named `events` per probe (each declares its own, see the
 *     list of maps below); a failed reserve adds 1 to slot 0 of the per-CPU
 *     array `lost_events` (in each probe's own lines: bcc rewrites map calls
 *     only in the main source file, so no helper here can do it);
 *   - every map is bounded and per-task entries are deleted on exit.
 */
#ifndef ISOSCOPE_H
#define ISOSCOPE_H

/* ---- event kinds (first u32 of every record) ---- */
#define ISO_EV_STALL      1u
#define ISO_EV_LIFECYCLE  2u
#define ISO_EV_RUN        3u   /* on-CPU run segment of a watched thread (steal overlay) */
#define ISO_EV_PACKET     4u   /* veth crossing of one packet (netns) */
#define ISO_EV_RUNQ       5u   /* run-queue wait of a watched thread, with who ran meanwhile */

/* ---- stall components (collector/model.py COMPONENT_LAYER) ---- */
#define ISO_C_RUNQUEUE        1u
#define ISO_C_CPU_THROTTLE    2u
#define ISO_C_MEMORY_RECLAIM  3u
#define ISO_C_SYSCALL         4u
#define ISO_C_VIRTIO_IO       5u
#define ISO_C_NETNS           6u
#define ISO_C_VM_EXIT         7u
#define ISO_C_PV_EXIT         8u
#define ISO_C_EPT             9u
#define ISO_C_SANDBOX        10u
#define ISO_C_STEAL          11u

/* ---- lifecycle types ---- */
#define ISO_LC_FORK           1u
#define ISO_LC_EXEC           2u
#define ISO_LC_EXIT           3u
#define ISO_LC_UNSHARE        4u
#define ISO_LC_SETNS          5u
#define ISO_LC_CLONE_NS       6u
#define ISO_LC_CGROUP_MKDIR   7u
#define ISO_LC_CGROUP_RMDIR   8u
#define ISO_LC_CGROUP_ATTACH  9u

/* ---- syscall classes (detail of ISO_C_SYSCALL stalls, histogram key) ---- */
#define ISO_SC_OTHER  0u
#define ISO_SC_NET    1u
#define ISO_SC_FILE   2u
#define ISO_SC_LOCK   3u
#define ISO_SC_SLEEP  4u
#define ISO_SC_NCLASS 5u

#define ISO_COMM_LEN 16
#define ISO_PATH_LEN 128
#define ISO_HIST_SLOTS 32

/* A stall interval: a thread was held back by one component. 56 bytes. */
struct iso_stall_event {
	__u32 kind;        /* ISO_EV_STALL */
	__u32 component;   /* ISO_C_* */
	__u64 start_ns;
	__u64 end_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__s32 cpu;
	__u32 detail;      /* syscall nr | kvm exit reason | dev_t | syscall class ... */
	__u64 detail2;     /* component-specific: bytes, sector, ifindex pair ... */
};
#define ISO_STALL_SIZE 56

/* A process / namespace / cgroup lifecycle event. 184 bytes. */
struct iso_lifecycle_event {
	__u32 kind;        /* ISO_EV_LIFECYCLE */
	__u32 type;        /* ISO_LC_* */
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 ppid;
	__u32 flags;       /* CLONE_NEW* flags, or exit code */
	char comm[ISO_COMM_LEN];
	char path[ISO_PATH_LEN];
};
#define ISO_LIFECYCLE_SIZE 184

/* An on-CPU segment of a watched thread (for laying steal over it). 40 bytes. */
struct iso_run_event {
	__u32 kind;        /* ISO_EV_RUN */
	__u32 tid;
	__u64 start_ns;
	__u64 end_ns;
	__u64 cgroup_id;
	__u32 pid;
	__s32 cpu;
};
#define ISO_RUN_SIZE 40

/* Log2 histogram key: per cgroup (and class for syscalls). 16 bytes. */
struct iso_hist_key {
	__u64 cgroup_id;
	__u32 class_id;    /* ISO_SC_* for syscalls, 0 otherwise */
	__u32 slot;        /* log2(ns) bucket */
};


/* ---- memory-reclaim kinds (detail of ISO_C_MEMORY_RECLAIM stalls, histogram class_id) ---- */
#define ISO_RECLAIM_DIRECT     0u
#define ISO_RECLAIM_MEMCG      1u
#define ISO_RECLAIM_SOFTLIMIT  2u

/* Per-key running totals (exact sums for isoscope_layer_stall_seconds_total). 16 bytes. */
struct iso_total {
	__u64 count;
	__u64 sum_ns;
};
#define ISO_TOTAL_SIZE 16

#ifndef ISO_WATCHED_MIN_STALL_NS
#define ISO_WATCHED_MIN_STALL_NS 100000ull  /* watched workloads: finer stalls (reclaim, netns) still cross */
#endif

#ifndef ISO_MIN_STALL_NS
#define ISO_MIN_STALL_NS 1000000ull   /* stalls shorter than this stay in kernel aggregates */
#endif
/* ---- sched probe: how a wait's throttled share was determined (stall detail) ---- */
#define ISO_SCHED_M_NONE       0u   /* no throttling in this wait */
#define ISO_SCHED_M_TASK_FLAG  1u   /* task_struct.throttled seen at switch-out (exact, 6.18+) */
#define ISO_SCHED_M_IDLE       2u   /* CPU idle while the preempted thread waited (inferred) */
#define ISO_SCHED_M_KPROBE     3u   /* throttle_cfs_rq/unthrottle_cfs_rq events */
#define ISO_SCHED_M_SUMMARY    4u   /* not one wait: a watched thread's short waits summed (detail2 = how many) */

/* ---- sched probe: who ran on the CPU while a watched thread waited (bpf/sched.bpf.c) ---- */
#define ISO_NB_TOP            3     /* named contributors per wait record */
#define ISO_ROOT_CGROUP_ID    1u    /* cgroup v2 root: kernel threads (kworkers, ksoftirqd) and unconfined tasks */

/* One contributor to a wait: a cgroup and how long it ran on the CPU during the wait. 16 bytes. */
struct iso_runq_neighbor {
	__u64 cgroup_id;
	__u64 ns;
};

/*
 * A run-queue wait of a watched thread (component ISO_C_RUNQUEUE) with the
 * work that ran on the CPU meanwhile. The first 56 bytes are a struct
 * iso_stall_event with kind ISO_EV_RUNQ. The shares add up to the stall's
 * interval (the whole wait less any throttled share):
 *   self_ns    threads of the waiting thread's own cgroup (its own contention);
 *   kernel_ns  the root cgroup (kworkers, ksoftirqd, unconfined tasks) and
 *              the idle task (wake-up latency of an idle CPU);
 *   top[]      the other cgroups that ran longest, longest first (ns 0 = unused);
 *   other_ns   the remaining other cgroups;
 *   unseen_ns  the part of the wait older than the CPU's slice history holds.
 * 136 bytes.
 */
struct iso_runq_event {
	struct iso_stall_event stall;
	__u64 self_ns;
	__u64 kernel_ns;
	__u64 other_ns;
	__u64 unseen_ns;
	struct iso_runq_neighbor top[ISO_NB_TOP];
};
#define ISO_RUNQ_SIZE 136

/* Key of the sched probe's `runq_neighbors` totals (value: __u64 ns): who delayed whom.
 * neighbor_id = victim_id for the victim's own threads, ISO_ROOT_CGROUP_ID for the root
 * cgroup and the idle task, 0 for the rest (beyond the tracked contributors, or unseen). 16 bytes. */
struct iso_nb_key {
	__u64 victim_id;
	__u64 neighbor_id;
};
#define ISO_NB_KEY_SIZE 16

#ifndef ISO_RINGBUF_PAGES
#define ISO_RINGBUF_PAGES 64
#endif

/*
 * Maps every probe declares in its own .bpf.c file.  (bcc rewrites map calls
 * only in the main source file, so the maps and the few lines that touch them
 * cannot live in this header.)  User space relies on these names:
 *
 *   BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);   records to user space
 *   BPF_PERCPU_ARRAY(lost_events, __u64, 1);         slot 0: reserve failures,
 *                                                    exported as
 *                                                    isoscope_kernel_events_lost_total{probe}
 *
 * Probes that only follow watched workloads (user space fills the maps from
 * collector/probes/watch.py; `watch_all` slot 0 = 1 turns the filter off):
 *
 *   BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
 *   BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
 *   BPF_ARRAY(watch_all, __u32, 1);
 */
#define ISO_MAX_WATCHED_TGIDS   16384
#define ISO_MAX_WATCHED_CGROUPS 4096

/* ---- kvm probe (bpf/kvm.bpf.c, collector/kvm_reasons.py) ---- */
#define ISO_KVM_ISA_VMX       1u   /* KVM_ISA_VMX in arch/x86/kvm/trace.h */
#define ISO_KVM_ISA_SVM       2u   /* KVM_ISA_SVM */
/*
 * kvm_class: component of each exit reason, filled from user space (the
 * overridable classification table).  Slot of (isa, reason):
 *   VMX  basic reason (reason & 0xffff) < 128          -> reason
 *   SVM  exit code < 0x100                              -> 128 + code
 *   SVM  0x400 <= exit code < 0x480 (npf, avic, vmgexit) -> 384 + (code - 0x400)
 *   anything else: no slot, classified ISO_C_VM_EXIT.
 * Value: ISO_C_* in the low byte; ISO_KVM_CLASS_IDLE set = the exit is the
 * guest's own idle time (HLT): counted in the totals, never emitted as a stall.
 * An unfilled slot (0) means ISO_C_VM_EXIT.
 */
#define ISO_KVM_CLASS_SLOTS   512
#define ISO_KVM_CLASS_IDLE    256u   /* 0x100 */
/* PV marks: set when kvm_pio / kvm_mmio / kvm_fast_mmio / kvm_hypercall fire
 * between an exit and the next entry; any mark makes the exit ISO_C_PV_EXIT. */
#define ISO_KVM_PV_PIO        1u
#define ISO_KVM_PV_MMIO       2u
#define ISO_KVM_PV_FAST_MMIO  4u
#define ISO_KVM_PV_HYPERCALL  8u
#define ISO_KVM_MAX_VCPUS     8192   /* in-flight exits (one per vCPU thread) */
/* kvm_sandbox_vmms: VMM tgids that are an L-4 sandbox themselves (Firecracker),
 * filled from user space.  Their exits that are neither EPT/NPT (L-0, the
 * hardware's) nor guest idle are the microVM's own machinery: ISO_C_SANDBOX. */
#define ISO_KVM_MAX_SANDBOX_VMMS 4096
#define ISO_KVM_MAX_KEYS      16384  /* exit totals keys */
/* Stall record of a KVM exit: detail = exit reason as traced (VMX: full value,
 * bit 31 = failed VM entry), detail2 = isa | pv marks << 8 | vcpu_id << 32. */

/* Exit totals key: per VMM process, reason and resulting component. 16 bytes.
 * Value: struct iso_total. */
struct iso_kvm_key {
	__u32 tgid;        /* VMM process (host PID namespace) */
	__u32 reason;      /* VMX basic reason or SVM exit code */
	__u32 isa;         /* ISO_KVM_ISA_* */
	__u32 component;   /* ISO_C_EPT / ISO_C_VM_EXIT / ISO_C_PV_EXIT ... | ISO_KVM_CLASS_IDLE */
};
#define ISO_KVM_KEY_SIZE 16

/* ---- sandbox probe (bpf/sandbox.bpf.c, collector/sandbox_sampler.py) ---- */
/*
 * CPU-clock samples of sandbox runtime processes (WASM runtimes, gVisor's
 * Sentry), each classified by the code the thread was running: a WASM
 * guest's JIT-compiled code (anonymous executable mappings), the runtime's own
 * code (its library or executable: WASI and other host calls, trampolines,
 * the runtime's machinery) or other code (the embedding application, libc,
 * the kernel on its behalf).  User space writes the code ranges of each
 * process into `sandbox_code`; runtime samples cross as ISO_C_SANDBOX stalls
 * of one sample period.
 */
#define ISO_SBX_GUEST         0u
#define ISO_SBX_RUNTIME       1u
#define ISO_SBX_OTHER         2u
#define ISO_SBX_NPARTS        3u
#define ISO_SBX_MAX_RANGES    16
#define ISO_SBX_MAX_PROCS     1024
#ifndef ISO_SBX_SAMPLE_NS
#define ISO_SBX_SAMPLE_NS     1000000ull   /* cpu-clock sample period */
#endif

/* A code range [start, end) of a process's address space. 16 bytes. */
struct iso_sbx_range {
	__u64 start;
	__u64 end;
};

/* Code ranges of one runtime process (value of `sandbox_code`, key tgid). 528 bytes. */
struct iso_sbx_code {
	__u32 n_guest;
	__u32 n_runtime;
	__u32 runtime_is_process;  /* the process is the runtime (a WASM CLI, the Sentry): all non-guest time is its */
	__u32 _pad;
	struct iso_sbx_range guest[ISO_SBX_MAX_RANGES];
	struct iso_sbx_range runtime[ISO_SBX_MAX_RANGES];
};
#define ISO_SBX_CODE_SIZE 528

/* Sample counts per process and part (key of `sandbox_samples`, value __u64). 8 bytes. */
struct iso_sbx_key {
	__u32 tgid;
	__u32 part;        /* ISO_SBX_* */
};
#define ISO_SBX_KEY_SIZE 8

#endif /* ISOSCOPE_H */
