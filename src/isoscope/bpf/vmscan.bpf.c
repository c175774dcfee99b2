/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Memory-reclaim stalls (l3.memory_reclaim): direct reclaim, and memcg limit /
 * soft-limit reclaim, measured begin -> end on the reclaiming thread.
 *
 * begin/end of one kind are emitted by the same kernel function on the same
 * task, so the per-task entry is always deleted at `end` before the task can
 * exit; a begin without end (probe attached mid-reclaim) only leaves an entry
 * that the next begin of that thread overwrites. Entries are keyed by
 * (tid, kind) because soft-limit reclaim runs nested inside direct reclaim.
 */
#include "isoscope.h"

struct rc_key {
	__u32 tid;
	__u32 kind;      /* ISO_RECLAIM_* */
};

/* Reclaim under a tight memcg limit comes as many short episodes (tens of
 * microseconds each) that add up to a large share of a request: watched
 * workloads report them all down to this length. */
#ifndef ISO_RECLAIM_WATCHED_MIN_NS
#define ISO_RECLAIM_WATCHED_MIN_NS (ISO_MIN_STALL_NS < 10000ull ? ISO_MIN_STALL_NS : 10000ull)
#endif

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_HASH(reclaim_start, struct rc_key, __u64, 16384);
BPF_HASH(hist, struct iso_hist_key, __u64, 8192);              /* (cgroup, kind, log2 ns) */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, kind, 0) */

static inline __attribute__((always_inline)) int rc_watched(__u64 cg, __u32 tgid)
{
	__u32 zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return 1;
	if (watched_cgroups.lookup(&cg))
		return 1;
	return watched_tgids.lookup(&tgid) != 0;
}

static inline __attribute__((always_inline)) void rc_begin(__u32 kind)
{
	struct rc_key k = {};
	k.tid = (__u32)bpf_get_current_pid_tgid();
	k.kind = kind;
	__u64 ts = bpf_ktime_get_ns();
	reclaim_start.update(&k, &ts);
}

static inline __attribute__((always_inline)) void rc_end(__u32 kind, __u64 nr_reclaimed)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct rc_key k = {};
	k.tid = tid;
	k.kind = kind;
	__u64 *s = reclaim_start.lookup(&k);
	if (!s)
		return;
	__u64 now = bpf_ktime_get_ns();
	__u64 start = *s;
	reclaim_start.delete(&k);
	if (now < start)
		return;
	__u64 d = now - start;
	__u64 cg = bpf_get_current_cgroup_id();

	struct iso_hist_key hk = {};
	hk.cgroup_id = cg;
	hk.class_id = kind;
	__u32 slot = bpf_log2l(d);
	hk.slot = slot < ISO_HIST_SLOTS ? slot : ISO_HIST_SLOTS - 1;
	hist.atomic_increment(hk);
	struct iso_hist_key tk = {};
	tk.cgroup_id = cg;
	tk.class_id = kind;
	struct iso_total zt = {};
	struct iso_total *t = totals.lookup_or_try_init(&tk, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	if (d < ISO_MIN_STALL_NS && !(d >= ISO_RECLAIM_WATCHED_MIN_NS && rc_watched(cg, pid_tgid >> 32)))
		return;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(struct iso_stall_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return;
	}
	e->kind = ISO_EV_STALL;
	e->component = ISO_C_MEMORY_RECLAIM;
	e->start_ns = start;
	e->end_ns = now;
	e->cgroup_id = cg;
	e->pid = pid_tgid >> 32;
	e->tid = tid;
	e->cpu = bpf_get_smp_processor_id();
	e->detail = kind;
	e->detail2 = nr_reclaimed;
	events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_begin)
{
	rc_begin(ISO_RECLAIM_DIRECT);
	return 0;
}

TRACEPOINT_PROBE(vmscan, mm_vmscan_direct_reclaim_end)
{
	rc_end(ISO_RECLAIM_DIRECT, args->nr_reclaimed);
	return 0;
}

#ifdef ISO_HAVE_VMSCAN_MM_VMSCAN_MEMCG_RECLAIM_BEGIN
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_begin)
{
	rc_begin(ISO_RECLAIM_MEMCG);
	return 0;
}
#endif

#ifdef ISO_HAVE_VMSCAN_MM_VMSCAN_MEMCG_RECLAIM_END
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_reclaim_end)
{
	rc_end(ISO_RECLAIM_MEMCG, args->nr_reclaimed);
	return 0;
}
#endif

#ifdef ISO_HAVE_VMSCAN_MM_VMSCAN_MEMCG_SOFTLIMIT_RECLAIM_BEGIN
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_softlimit_reclaim_begin)
{
	rc_begin(ISO_RECLAIM_SOFTLIMIT);
	return 0;
}
#endif

#ifdef ISO_HAVE_VMSCAN_MM_VMSCAN_MEMCG_SOFTLIMIT_RECLAIM_END
TRACEPOINT_PROBE(vmscan, mm_vmscan_memcg_softlimit_reclaim_end)
{
	rc_end(ISO_RECLAIM_SOFTLIMIT, args->nr_reclaimed);
	return 0;
}
#endif
