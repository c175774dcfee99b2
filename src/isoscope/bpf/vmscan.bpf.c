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
 *
 * Every episode goes into the per-cgroup totals and histograms. What crosses
 * to user space as stall records:
 *   - an episode >= ISO_MIN_STALL_NS (any thread), or >= ISO_RECLAIM_WATCHED_MIN_NS
 *     of a watched thread: one record, as measured;
 *   - the shorter episodes of a watched thread: summed per thread in
 *     `reclaim_acc` and sent as ONE ordinary record (same layout, same
 *     component, detail = kind, detail2 = pages summed) per group. Memory-limit
 *     reclaim comes as hundreds of 5-7 us episodes per request: sent one by one
 *     they would flood the ring buffer, left out they are most of the stall.
 *
 * A group holds the episodes of one thread, kind and cgroup that began within
 * ISO_RECLAIM_SUMMARY_WINDOW_NS of its first one. It crosses as the compact
 * interval [last_end - sum, last_end]: its length is the summed reclaim
 * exactly, and it lies inside [first start, last end] of the episodes it
 * sums, so it is never placed outside the time they happened and is off by at
 * most the window. Groups of one thread never overlap each other or the
 * thread's single-episode records, so the join (which unites overlapping
 * intervals of a component) sees every nanosecond once. The price of one
 * interval per group: time between its episodes that the compact interval
 * covers (a page-in wait, a preemption) counts as reclaim, which takes
 * precedence in the join, and that other component loses as much; the
 * reclaim total stays exact.
 *
 * A group is sent (and its entry deleted):
 *   - at a reclaim end, once the window since its first episode has passed
 *     (also before a new episode that begins outside the window);
 *   - before a long episode's own record, or an episode of another kind or
 *     cgroup;
 *   - at the thread's next interruptible sleep (sched_switch with
 *     TASK_INTERRUPTIBLE): the end of a request -- waiting for the next one,
 *     for a lock, a sleep -- so the leftover of a request's last episodes
 *     crosses before the span can reach the join. Uninterruptible waits
 *     (page-ins, the very I/O that alternates with limit reclaim) do not
 *     flush: they would cut every group down to one episode;
 *   - at the thread's last switch (TASK_DEAD): nothing outlives the task.
 * The sched_switch program runs on every context switch of the node: it
 * reads prev_state and an array slot (both inlined) and does nothing more
 * while no group is pending anywhere. (ISO_RECLAIM_FLUSH_ON_SLEEP 0 trades
 * the sleep flush for no program on the switch path, see below.)
 */
#include "isoscope.h"

struct rc_key {
	__u32 tid;
	__u32 kind;      /* ISO_RECLAIM_* */
};

/* Reclaim under a tight memcg limit comes as many short episodes that add up
 * to a large share of a request: a watched thread's episodes down to this
 * length cross one by one, shorter ones summed per thread (above). */
#ifndef ISO_RECLAIM_WATCHED_MIN_NS
#define ISO_RECLAIM_WATCHED_MIN_NS (ISO_MIN_STALL_NS < 10000ull ? ISO_MIN_STALL_NS : 10000ull)
#endif

/* Episodes of one group began within this long of its first one: the most a
 * summed record's placement can be off by. */
#ifndef ISO_RECLAIM_SUMMARY_WINDOW_NS
#define ISO_RECLAIM_SUMMARY_WINDOW_NS 2000000ull
#endif

/* Threads with a pending group at once; when full, a short episode crosses as its own record. */
#ifndef ISO_RECLAIM_MAX_PENDING
#define ISO_RECLAIM_MAX_PENDING 16384
#endif

/* 1: a thread's pending group also crosses at its next interruptible sleep (a
 * sched_switch program: one more program run on every context switch of the
 * node, about 0.1 us added to a 5 us pipe ping-pong round trip -- two
 * switches -- on the development VM). 0: no
 * sched_switch program; groups cross only at reclaim ends and at exit
 * (sched_process_exit), so the last group of a burst waits for the thread's
 * next reclaim and may reach user space after the span it belongs to was
 * joined: up to one window of reclaim per burst is missed on spans. */
#ifndef ISO_RECLAIM_FLUSH_ON_SLEEP
#define ISO_RECLAIM_FLUSH_ON_SLEEP 1
#endif

/* include/linux/sched.h task states (stable values) seen as sched_switch prev_state. */
#define RC_TASK_INTERRUPTIBLE 0x1u
#define RC_TASK_DEAD          0x80u

/* Short episodes of a watched thread not yet sent (see above). */
struct rc_acc {
	__u64 first_start;   /* begin of the group's first episode */
	__u64 last_end;      /* end of its last episode */
	__u64 sum_ns;        /* summed episode lengths */
	__u64 pages;         /* summed nr_reclaimed */
	__u64 cgroup_id;
	__u32 tgid;
	__u32 kind;          /* ISO_RECLAIM_* */
	__s32 cpu;           /* CPU of the last episode */
	__u32 count;         /* episodes summed */
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_HASH(reclaim_start, struct rc_key, __u64, 16384);
BPF_HASH(hist, struct iso_hist_key, __u64, 8192);              /* (cgroup, kind, log2 ns) */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, kind, 0) */

/* tid -> its pending group. Only the thread itself touches its entry (at its
 * reclaim ends and its own switch-out), so no two programs race on one. */
BPF_HASH(reclaim_acc, __u32, struct rc_acc, ISO_RECLAIM_MAX_PENDING);
/* Slot 0: entries in reclaim_acc; the sched_switch program's gate. */
BPF_ARRAY(acc_pending, __u64, 1);

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

static inline __attribute__((always_inline)) void rc_emit(__u64 start, __u64 end, __u64 cg, __u32 tgid,
							  __u32 tid, __s32 cpu, __u32 kind, __u64 pages)
{
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
	e->end_ns = end;
	e->cgroup_id = cg;
	e->pid = tgid;
	e->tid = tid;
	e->cpu = cpu;
	e->detail = kind;
	e->detail2 = pages;
	events.ringbuf_submit(e, 0);
}

/* Send a thread's pending group as one record and delete its entry. */
static inline __attribute__((always_inline)) void rc_flush(__u32 tid, struct rc_acc *a)
{
	__u64 end = a->last_end;
	__u64 start = end - a->sum_ns;
	rc_emit(start, end, a->cgroup_id, a->tgid, tid, a->cpu, a->kind, a->pages);
	if (reclaim_acc.delete(&tid) == 0) {
		__u32 zero = 0;
		__u64 *n = acc_pending.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, -1);
	}
}

/* Add a short episode of a watched thread to its group; returns 0 when it
 * could not be held (map full) and must cross as its own record. */
static inline __attribute__((always_inline)) int rc_hold(__u32 tid, __u32 tgid, __u64 cg, __u32 kind, __u64 start,
							 __u64 end, __u64 pages, __s32 cpu)
{
	struct rc_acc *a = reclaim_acc.lookup(&tid);
	if (a && (a->kind != kind || a->cgroup_id != cg || a->tgid != tgid ||
		  start - a->first_start > ISO_RECLAIM_SUMMARY_WINDOW_NS || start < a->last_end)) {
		/* Not part of this group (another kind or cgroup, began outside the
		 * window, or nested in it): the group crosses as it is. */
		rc_flush(tid, a);
		a = 0;
	}
	if (!a) {
		struct rc_acc fresh = {};
		fresh.first_start = start;
		fresh.cgroup_id = cg;
		fresh.tgid = tgid;
		fresh.kind = kind;
		if (reclaim_acc.insert(&tid, &fresh) != 0)
			return 0;
		__u32 zero = 0;
		__u64 *n = acc_pending.lookup(&zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		a = reclaim_acc.lookup(&tid);
		if (!a)
			return 0;
	}
	a->last_end = end;
	a->sum_ns += end - start;
	a->pages += pages;
	a->cpu = cpu;
	a->count += 1;
	if (end - a->first_start >= ISO_RECLAIM_SUMMARY_WINDOW_NS)
		rc_flush(tid, a);
	return 1;
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
	__u32 tgid = pid_tgid >> 32;
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

	__s32 cpu = (__s32)bpf_get_smp_processor_id();
	if (d < ISO_MIN_STALL_NS) {
		if (!rc_watched(cg, tgid))
			return;
		if (d < ISO_RECLAIM_WATCHED_MIN_NS) {
			if (rc_hold(tid, tgid, cg, kind, start, now, nr_reclaimed, cpu))
				return;
			rc_emit(start, now, cg, tgid, tid, cpu, kind, nr_reclaimed);
			return;
		}
	}
	/* A long episode: the thread's pending group (ended before it began) crosses first. */
	struct rc_acc *a = reclaim_acc.lookup(&tid);
	if (a)
		rc_flush(tid, a);
	rc_emit(start, now, cg, tgid, tid, cpu, kind, nr_reclaimed);
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

/* Send the current thread's pending group, if it has one. The pending count is
 * read first (an inlined array lookup): while no group is pending anywhere,
 * that is all a switch or an exit costs. */
static inline __attribute__((always_inline)) void rc_flush_current(void)
{
	__u32 zero = 0;
	__u64 *n = acc_pending.lookup(&zero);
	if (!n || !*n)
		return;
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct rc_acc *a = reclaim_acc.lookup(&tid);
	if (a)
		rc_flush(tid, a);
}

#if ISO_RECLAIM_FLUSH_ON_SLEEP
/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state):
 * runs on the CPU where prev is still current. A thread going to an
 * interruptible sleep, or switched out for the last time, sends its group. */
RAW_TRACEPOINT_PROBE(sched_switch)
{
	__u32 prev_state = (__u32)ctx->args[3];
	if (prev_state & (RC_TASK_INTERRUPTIBLE | RC_TASK_DEAD))
		rc_flush_current();
	return 0;
}
#else
/* TP_PROTO(struct task_struct *p, bool group_dead): runs in the exiting task. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	rc_flush_current();
	return 0;
}
#endif
