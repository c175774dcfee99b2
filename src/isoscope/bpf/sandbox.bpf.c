/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Sandbox runtimes (l4.sandbox): where the threads of WASM runtimes and of
 * gVisor's Sentry spend CPU time.
 *
 * A software cpu-clock perf event fires every ISO_SBX_SAMPLE_NS of CPU time
 * on each CPU.  Samples of processes user space registered in `sandbox_code` are
 * classified by the user-space instruction pointer (for a sample taken in the
 * kernel: where the thread entered the kernel, i.e. the first frame of its
 * user stack):
 *   guest    inside the module's JIT-compiled code,
 *   runtime  inside the runtime library or executable (host calls such as WASI,
 *            trampolines, the runtime's own machinery) — the sandbox's time,
 *   other    anything else (the embedding application, libc, kernel work on
 *            its behalf); in a process that is the runtime (a WASM runtime's
 *            own executable, gVisor's Sentry), this is the runtime's too.
 * Counts per (process, part) are kept in `sandbox_samples`; runtime samples also
 * cross as ISO_C_SANDBOX stalls covering the sample period that ended at the
 * sample, so spans of the process get their sandbox time.
 *
 * Maps: `sandbox_code` is written and pruned by user space when runtime
 * processes come and go; `sandbox_samples` is an LRU map, and user space
 * deletes the keys of processes that exited.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "isoscope.h"

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(sandbox_code, __u32, struct iso_sbx_code, ISO_SBX_MAX_PROCS);
BPF_TABLE("lru_hash", struct iso_sbx_key, __u64, sandbox_samples, ISO_SBX_MAX_PROCS * ISO_SBX_NPARTS);

static inline __attribute__((always_inline)) int in_ranges(const struct iso_sbx_range *r, __u32 n, __u64 ip)
{
	for (int i = 0; i < ISO_SBX_MAX_RANGES; i++) {
		if (i < n && ip >= r[i].start && ip < r[i].end)
			return 1;
	}
	return 0;
}

int on_cpu_clock(struct bpf_perf_event_data *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	struct iso_sbx_code *code = sandbox_code.lookup(&tgid);
	if (!code)
		return 0;

	/* Kernel addresses have the top bit set (x86-64 and arm64 alike). */
	int in_kernel = (PT_REGS_IP(&ctx->regs) >> 63) != 0;
	__u64 ip = 0;
	if (in_kernel) {
		if (bpf_get_stack(ctx, &ip, sizeof(ip), BPF_F_USER_STACK) < (int)sizeof(ip))
			ip = 0;
	} else {
		ip = PT_REGS_IP(&ctx->regs);
	}

	__u32 part = ISO_SBX_OTHER;
	if (!in_kernel && in_ranges(code->guest, code->n_guest, ip))
		part = ISO_SBX_GUEST;
	else if (code->runtime_is_process || in_ranges(code->runtime, code->n_runtime, ip))
		part = ISO_SBX_RUNTIME;

	struct iso_sbx_key k = {};
	k.tgid = tgid;
	k.part = part;
	__u64 one = 1;
	__u64 *n = sandbox_samples.lookup(&k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		sandbox_samples.update(&k, &one);

	if (part != ISO_SBX_RUNTIME)
		return 0;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(struct iso_stall_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();
	e->kind = ISO_EV_STALL;
	e->component = ISO_C_SANDBOX;
	e->start_ns = now - ISO_SBX_SAMPLE_NS;
	e->end_ns = now;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = tgid;
	e->tid = (__u32)pid_tgid;
	e->cpu = bpf_get_smp_processor_id();
	e->detail = in_kernel;
	e->detail2 = 0;    /* kvm exit stalls of a sandbox VMM carry their isa here (never 0) */
	events.ringbuf_submit(e, 0);
	return 0;
}
