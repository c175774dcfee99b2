/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Syscall latency per (cgroup, class) and blocked-in-syscall intervals
 * (kernel.syscall) of watched workloads.
 *
 * Cost is what matters here: sys_enter/sys_exit run for every syscall on the
 * node. An unwatched task pays one array read (inlined by the verifier), the
 * cgroup id and two small hash misses on enter, and one hash miss on exit.
 * Only tracked tasks get per-thread state (`inflight`, keyed by tid).
 *
 * Tracking levels (decided once, at sys_enter, for that one syscall):
 *   full  - watch_all, watched_tgids, or watched_cgroups value ISO_SC_WATCH_FULL
 *           (what collector/probes/watch.py writes): histogram + a stall
 *           record for syscalls >= ISO_MIN_STALL_NS;
 *   hist  - watched_cgroups value ISO_SC_WATCH_HIST (pod cgroups user space
 *           wants the syscall_latency_seconds histogram for): histogram only.
 * Both live in one map so an unwatched task pays one cgroup lookup, not two.
 */
#include "isoscope.h"

#ifndef ISO_SC_MAX_NR
#define ISO_SC_MAX_NR 512          /* syscall numbers classified through `syscall_class` */
#endif
#ifndef ISO_SC_MAX_INFLIGHT
#define ISO_SC_MAX_INFLIGHT 16384  /* tracked threads inside a syscall at the same time */
#endif

#define ISO_SC_WATCH_FULL 1   /* watched_cgroups values */
#define ISO_SC_WATCH_HIST 2

#define SC_TRACK_HIST 1
#define SC_TRACK_FULL 2

struct sc_inflight {
	__u64 start_ns;
	__u64 cgroup_id;
	__u32 nr;
	__u32 level;
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_ARRAY(syscall_class, __u8, ISO_SC_MAX_NR);        /* nr -> ISO_SC_*, filled from user space */
BPF_HASH(inflight, __u32, struct sc_inflight, ISO_SC_MAX_INFLIGHT);
BPF_HASH(hist, struct iso_hist_key, __u64, 16384);    /* (cgroup, class, log2 ns) -> count */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, class, 0) -> count, sum */

RAW_TRACEPOINT_PROBE(sys_enter)
{
	long id = (long)ctx->args[1];
	__u32 zero = 0;
	__u32 level = 0;
	__u32 *all = watch_all.lookup(&zero);
	__u64 cg = bpf_get_current_cgroup_id();
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (all && *all) {
		level = SC_TRACK_FULL;
	} else {
		__u8 *w = watched_cgroups.lookup(&cg);
		__u32 wl = w ? *w : 0;   /* a plain value: the verifier rejects arithmetic on the pointer */
		if (wl && wl != ISO_SC_WATCH_HIST) {
			level = SC_TRACK_FULL;
		} else {
			__u32 tgid = pid_tgid >> 32;
			if (watched_tgids.lookup(&tgid))
				level = SC_TRACK_FULL;
			else if (wl)
				level = SC_TRACK_HIST;
			else
				return 0;
		}
	}
	if (id < 0)
		return 0;
	__u32 tid = (__u32)pid_tgid;
	struct sc_inflight v = {};
	v.start_ns = bpf_ktime_get_ns();
	v.cgroup_id = cg;
	v.nr = (__u32)id;
	v.level = level;
	inflight.update(&tid, &v);
	return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct sc_inflight *f = inflight.lookup(&tid);
	if (!f)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct sc_inflight v = *f;
	inflight.delete(&tid);
	if (now < v.start_ns)
		return 0;
	__u64 d = now - v.start_ns;

	__u32 cls = ISO_SC_OTHER;
	__u32 nr = v.nr;
	__u8 *c = syscall_class.lookup(&nr);
	if (c && *c < ISO_SC_NCLASS)
		cls = *c;

	struct iso_hist_key hk = {};
	hk.cgroup_id = v.cgroup_id;
	hk.class_id = cls;
	__u32 slot = bpf_log2l(d);
	hk.slot = slot < ISO_HIST_SLOTS ? slot : ISO_HIST_SLOTS - 1;
	hist.atomic_increment(hk);

	struct iso_hist_key tk = {};
	tk.cgroup_id = v.cgroup_id;
	tk.class_id = cls;
	struct iso_total zt = {};
	struct iso_total *t = totals.lookup_or_try_init(&tk, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	if (v.level != SC_TRACK_FULL || d < ISO_MIN_STALL_NS)
		return 0;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(struct iso_stall_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return 0;
	}
	e->kind = ISO_EV_STALL;
	e->component = ISO_C_SYSCALL;
	e->start_ns = v.start_ns;
	e->end_ns = now;
	e->cgroup_id = v.cgroup_id;
	e->pid = pid_tgid >> 32;
	e->tid = tid;
	e->cpu = -1;                 /* blocked, not tied to a CPU */
	e->detail = cls;
	e->detail2 = v.nr;
	events.ringbuf_submit(e, 0);
	return 0;
}

/* exit()/exit_group() and fatal signals never reach sys_exit: drop the entry here. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	inflight.delete(&tid);
	return 0;
}
