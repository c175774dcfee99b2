/* SPDX-License-Identifier: Apache-2.0 */
/*
 * isoscope sched probe: run-queue waits per thread, split into CFS throttling
 * (l3.cpu_throttle) and CPU contention (l3.runqueue); on-CPU segments of
 * watched threads so user space can lay the per-CPU steal clock over them.
 *
 * Hooks (raw tracepoints only, no kprobes): sched_wakeup, sched_wakeup_new,
 * sched_switch, sched_process_exit, cgroup_attach_task (optional).
 *
 * Cost: sched_wakeup and sched_switch run on every wake-up and context switch
 * of the node, and every helper call there costs 12-50 ns (retpolines,
 * call-depth tracking; the clock read in a VM), while hash and array lookups
 * are inlined. So a wake-up of a thread already queued or running reads
 * nothing but its pid; a switch-out reuses the thread's cgroup id and
 * watched/unwatched decision for ISO_SCHED_WATCH_RECHECK_NS (a cgroup move
 * makes them stale at once); the idle clock is kept only by the idle method.
 *
 * Kernel struct access: raw tracepoints hand us task_struct pointers. The only
 * fields read through them are task_struct.pid / .tgid / .throttled, at byte offsets user space took from the running kernel's BTF
 * (collector/btf.py) and passes as ISO_OFF_* defines. The generic headers'
 * layouts are never used. sched_process_exit cross-checks the pid/tgid offsets
 * against bpf_get_current_pid_tgid() and counts the result in `btf_check`.
 *
 * A wait starts when a thread becomes runnable (wakeup / wakeup_new) or is
 * switched out while still runnable (prev_state == TASK_RUNNING: preempted,
 * or throttled) and ends when it is switched in. This is the same interval
 * schedstat accumulates into /proc/<tid>/schedstat run_delay.
 *
 * Throttling vs contention, two methods:
 *   task flag (ISO_OFF_TASK_THROTTLED defined; kernels with task-based CFS
 *     throttling, 6.18+): a throttled task is dequeued with p->throttled set
 *     and switched out while TASK_RUNNING. A wait that starts with the flag
 *     set is CFS throttling, all of it. Limit: time spent queued behind other
 *     tasks after the unthrottle (no tracepoint marks it) is counted as
 *     throttling too; it is bounded by one scheduling latency per period.
 *   idle (fallback): keep per-CPU cumulative idle ns (time the CPU ran pid 0).
 *     A preempted thread that waited while the CPU it was queued on sat idle
 *     can only have been held back by its throttled cfs_rq: that idle share
 *     is throttling, the rest contention. Limits: a thread migrated while
 *     waiting is judged by the idle time of the CPU it was queued on first;
 *     SMT siblings are separate CPUs (a sibling's load is not seen as
 *     contention); RT/DL tasks and other load running on the CPU while the
 *     cfs_rq is throttled make throttling look like contention; wake-ups
 *     (not preemptions) are never counted as throttling, so wake-up latency
 *     from an idle CPU stays runqueue time.
 *
 * Emitted records: a wait >= the threshold (ISO_MIN_STALL_NS, or
 * ISO_WATCHED_MIN_STALL_NS for watched threads) is sent as sub-intervals, one
 * stall record per non-zero component: [start, start + throttle_ns] as
 * ISO_C_CPU_THROTTLE, then [start + throttle_ns, end] as ISO_C_RUNQUEUE
 * (throttling precedes the queueing that follows an unthrottle). Durations
 * sum to the wait exactly. detail = throttle method (ISO_SCHED_M_*),
 * detail2 = the whole wait in ns.
 *
 * Short waits (watched threads): a wait below ISO_WATCHED_MIN_STALL_NS is not
 * a record of its own -- a thread woken a hundred thousand times a second
 * would flood the ring -- but its run-queue part is summed in the thread's
 * entry and crosses as ONE runqueue record per group (detail =
 * ISO_SCHED_M_SUMMARY, detail2 = waits summed), as the vmscan probe does for
 * reclaim episodes. A group holds the short waits that ended within
 * ISO_RUNQ_SUMMARY_WINDOW_NS of its first one's start and crosses as the
 * compact interval [last end - sum, last end]: its length is the summed wait
 * exactly and it lies inside [first start, last end], so it is misplaced by
 * at most the window. It is sent before any longer record of the thread (so
 * the two never overlap), when a wait ends outside its window, and whenever
 * the thread goes to sleep or exits: a group never spans a sleep, so its
 * interval never lies over time the thread spent blocked (a read waiting on
 * the disk would otherwise lose that time to the run queue, which takes
 * precedence in the join), and what a request waited crosses before its span
 * reaches the join. A group of less than ISO_RUNQ_SUMMARY_MIN_NS at a sleep
 * is dropped (it stays in the aggregates): a thread that sleeps and wakes
 * tens of thousands of times a second with waits of a microsecond would
 * otherwise send a record for each. Waits of unwatched threads are only in
 * the aggregates.
 *
 * Not a wait at all (no record, no aggregate): a woken thread switched in
 * straight after the idle task. No other task held it back; its microseconds
 * are the CPU leaving idle, which schedstat does not count as run delay either.
 *
 * Aggregates (always, for every thread): per-thread cumulative counters in
 * `tasks` (deleted at exit), per-cgroup totals in `cgroup_totals` and
 * per-cgroup log2 histograms of whole waits in `runq_hist` (LRU, bounded).
 *
 * Neighbours (ISO_SCHED_NEIGHBORS, on by default): who ran on the CPU while a
 * watched thread waited. Every switch appends the slice that just ended
 * (cgroup id of prev, 0 for the idle task; end time) to a ring of the CPU's
 * last ISO_NB_RING slices, or extends the newest slice when prev is of the same
 * cgroup: two stores, no helper call (prev's cgroup id is the one the switch
 * already knows). That is the whole cost paid by everyone. When a watched
 * thread's run-queue wait of at least ISO_WATCHED_MIN_STALL_NS ends, a bounded
 * scan of that ring splits the wait by cgroup: its own cgroup (self), the root
 * cgroup and idle (kernel), the ISO_NB_TOP other cgroups that ran longest, the
 * rest (other), and what is older than the ring (unseen). The record is an
 * iso_runq_event instead of a plain stall; the split is also added to the
 * `runq_neighbors` totals (victim cgroup, neighbour cgroup) for the metrics.
 * Limits: the ring read is that of the CPU the thread is switched in on (a
 * thread migrated while waiting is judged by its last CPU's history); softirq
 * work is counted for whatever task it interrupted, except in ksoftirqd (root
 * cgroup); a cgroup id is prev's as cached for ISO_SCHED_WATCH_RECHECK_NS.
 */
#include <uapi/linux/ptrace.h>
#include "isoscope.h"

#ifndef ISO_OFF_TASK_PID
#error "ISO_OFF_TASK_PID (task_struct.pid offset from BTF) must be defined"
#endif
#ifndef ISO_OFF_TASK_TGID
#error "ISO_OFF_TASK_TGID (task_struct.tgid offset from BTF) must be defined"
#endif
#ifndef ISO_MAX_TASKS
#define ISO_MAX_TASKS 65536
#endif
#ifndef ISO_MAX_CGROUPS
#define ISO_MAX_CGROUPS 10240
#endif
#ifndef ISO_MAX_CPUS
#define ISO_MAX_CPUS 1024
#endif
#ifndef ISO_SCHED_NEIGHBORS
#define ISO_SCHED_NEIGHBORS 1
#endif
/* Slices of history per CPU (a power of two): a wait is split exactly while it
 * spans fewer switches between different cgroups than this. */
#ifndef ISO_NB_RING
#define ISO_NB_RING 32
#endif
/* Distinct other cgroups one wait's scan tracks (ISO_NB_TOP of them are named). */
#define ISO_NB_SLOTS 6

struct iso_sched_task {
	__u64 wait_start;    /* 0 when not waiting */
	__u64 idle_start;    /* idle clock of wait_cpu at wait_start */
	__u64 run_start;     /* last switch-in */
	__u64 cgroup_id;     /* learnt when the task was last current */
	__u64 runq_ns;       /* cumulative contention wait */
	__u64 throttle_ns;   /* cumulative throttled wait */
	__u64 waits;         /* waits completed */
	__u64 watch_checked; /* when `watched` was last decided (0 = never) */
	__u32 tid;
	__u32 _pad;
	__u32 tgid;
	__s32 wait_cpu;
	__u32 wait_flags;    /* ISO_SCHED_F_* of the current wait */
	__u32 watched;       /* is_watched() as of watch_checked */
	__u64 short_first;   /* pending group of short waits: first one's start */
	__u64 short_last;    /* its last one's end */
	__u64 short_ns;      /* their summed run-queue ns */
	__u32 short_n;       /* how many (0: no group pending; the other short_* are then stale) */
	__s32 short_cpu;     /* CPU of the last one */
};

struct iso_sched_cgroup {
	__u64 runq_ns;
	__u64 throttle_ns;
	__u64 waits;
};

struct iso_cpu_idle {
	__u64 cum_ns;        /* completed idle time */
	__u64 since;         /* start of the current idle period, 0 if not idle/unknown */
};

/* include/linux/sched.h TASK_DEAD: __state of a task's last switch-out (stable uapi-like value). */
#define ISO_TASK_DEAD 0x80u

#define ISO_SCHED_F_PREEMPTED 1u
#define ISO_SCHED_F_THROTTLED 2u

/* The idle method (see above) runs only where the task flag cannot be read. */
#ifdef ISO_OFF_TASK_THROTTLED
#define ISO_SCHED_IDLE_METHOD 0
#else
#define ISO_SCHED_IDLE_METHOD 1
#endif

/* How long a thread's cgroup id (a helper call) and watched/unwatched decision
 * (two hash lookups) are reused at its switch-outs; a cgroup_attach_task of
 * the thread makes both stale at once. A newly watched thread's on-CPU
 * segments start at most this much late. */
#ifndef ISO_SCHED_WATCH_RECHECK_NS
#define ISO_SCHED_WATCH_RECHECK_NS 10000000ull
#endif
/* Short waits summed into one record (see above): the group's span, and the least a group must
 * hold at a sleep to be sent. */
#ifndef ISO_RUNQ_SUMMARY_WINDOW_NS
#define ISO_RUNQ_SUMMARY_WINDOW_NS 200000ull
#endif
#ifndef ISO_RUNQ_SUMMARY_MIN_NS
#define ISO_RUNQ_SUMMARY_MIN_NS 2000ull
#endif

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);
BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

/* Keyed by the task_struct address the tracepoints hand over: no read of the
 * pid is needed to find a thread's state (the tid is kept in the value). A
 * recycled address is re-initialised at wake_up_new_task, before the new task
 * first runs; entries are deleted at exit. */
BPF_HASH(tasks, __u64, struct iso_sched_task, ISO_MAX_TASKS);
BPF_TABLE("lru_hash", __u64, struct iso_sched_cgroup, cgroup_totals, ISO_MAX_CGROUPS);
BPF_TABLE("lru_hash", struct iso_hist_key, __u64, runq_hist, ISO_MAX_CGROUPS * 8);
BPF_ARRAY(cpu_idle, struct iso_cpu_idle, ISO_MAX_CPUS);
BPF_ARRAY(btf_check, __u64, 2);   /* [0] offsets agreed, [1] offsets disagreed */
BPF_PERCPU_ARRAY(task_map_full, __u64, 1);

#if ISO_SCHED_NEIGHBORS
struct iso_cpu_slice {
	__u64 cgroup_id;     /* 0: the idle task */
	__u64 end_ns;        /* the slice began where the previous one ended */
};

struct iso_cpu_ring {
	__u64 head;          /* slices appended so far; the newest is s[(head - 1) % ISO_NB_RING] */
	__u64 _pad[7];       /* a whole cache line: no CPU's ring shares one with another's (576 bytes) */
	struct iso_cpu_slice s[ISO_NB_RING];
};

/* A plain array keyed by CPU (its lookup is inlined); only its own CPU touches an entry,
 * under the run-queue lock the switch holds. */
BPF_ARRAY(cpu_ring, struct iso_cpu_ring, ISO_MAX_CPUS);
BPF_TABLE("lru_hash", struct iso_nb_key, __u64, runq_neighbors, ISO_MAX_CGROUPS * 4);
#endif

static inline __attribute__((always_inline)) void lost_inc(void)
{
	int zero = 0;
	__u64 *v = lost_events.lookup(&zero);
	if (v)
		(*v)++;
}

static inline __attribute__((always_inline)) int is_watched(__u32 tgid, __u64 cgid)
{
	int zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return 1;
	if (watched_tgids.lookup(&tgid))
		return 1;
	if (cgid && watched_cgroups.lookup(&cgid))
		return 1;
	return 0;
}

/* Idle clock of a CPU at time now: completed idle + the running idle period. */
static inline __attribute__((always_inline)) __u64 idle_at(__s32 cpu, __u64 now)
{
	__u32 key = (__u32)cpu;
	struct iso_cpu_idle *ci = cpu_idle.lookup(&key);
	if (!ci)
		return 0;
	__u64 cum = ci->cum_ns;
	__u64 since = ci->since;
	if (since && now > since)
		cum += now - since;
	return cum;
}

static inline __attribute__((always_inline)) int read_u32(const void *base, int off, __u32 *out)
{
	return bpf_probe_read_kernel(out, sizeof(*out), (const char *)base + off);
}

static inline __attribute__((always_inline)) void wait_begin_st(struct iso_sched_task *st, __s32 cpu,
							       __u32 flags, __u64 now)
{
	if (st->wait_start)   /* already queued (e.g. a second wake-up): keep the first start */
		return;
	st->wait_start = now;
	st->wait_cpu = cpu;
	st->wait_flags = flags;
#if ISO_SCHED_IDLE_METHOD
	/* Only a preempted wait is ever judged by the idle clock. */
	if (flags & ISO_SCHED_F_PREEMPTED)
		st->idle_start = idle_at(cpu, now);
#endif
}

/* A new per-task entry (NULL when the map is full, counted in task_map_full). */
static inline __attribute__((always_inline)) struct iso_sched_task *task_new(__u64 key, __u32 tid, __u32 tgid,
									     __u64 cgid, __s32 wait_cpu)
{
	struct iso_sched_task init = {};
	init.tid = tid;
	init.tgid = tgid;
	init.cgroup_id = cgid;
	init.wait_cpu = wait_cpu;
	if (tasks.update(&key, &init) != 0) {
		int zero = 0;
		__u64 *full = task_map_full.lookup(&zero);
		if (full)
			(*full)++;
		return 0;
	}
	return tasks.lookup(&key);
}

static inline __attribute__((always_inline)) void emit_part(__u32 component, __u64 start, __u64 end,
							  struct iso_sched_task *st, __s32 cpu,
							  __u32 method, __u64 wait)
{
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		lost_inc();
		return;
	}
	e->kind = ISO_EV_STALL;
	e->component = component;
	e->start_ns = start;
	e->end_ns = end;
	e->cgroup_id = st->cgroup_id;
	e->pid = st->tgid;
	e->tid = st->tid;
	e->cpu = cpu;
	e->detail = method;
	e->detail2 = wait;
	events.ringbuf_submit(e, 0);
}

/* Send the thread's pending group of short waits, if any, as one compact runqueue record. */
static inline __attribute__((always_inline)) void runq_flush(struct iso_sched_task *st)
{
	if (!st->short_n)
		return;
	emit_part(ISO_C_RUNQUEUE, st->short_last - st->short_ns, st->short_last, st, st->short_cpu,
		  ISO_SCHED_M_SUMMARY, st->short_n);
	st->short_n = 0;
}

/* Add a short wait's run-queue part [start, end] to the thread's group (sending an expired group first). */
static inline __attribute__((always_inline)) void runq_sum(struct iso_sched_task *st, __s32 cpu,
							  __u64 start, __u64 end)
{
	if (st->short_n && end - st->short_first > ISO_RUNQ_SUMMARY_WINDOW_NS)
		runq_flush(st);
	if (!st->short_n) {
		st->short_first = start;
		st->short_ns = 0;
	}
	st->short_last = end;
	st->short_ns += end - start;
	st->short_n++;
	st->short_cpu = cpu;
}

#if ISO_SCHED_NEIGHBORS
static inline __attribute__((always_inline)) void nb_total(__u64 victim, __u64 neighbor, __u64 ns)
{
	if (!ns)
		return;
	struct iso_nb_key k = {};
	k.victim_id = victim;
	k.neighbor_id = neighbor;
	__u64 *v = runq_neighbors.lookup(&k);
	if (v)
		__sync_fetch_and_add(v, ns);
	else
		runq_neighbors.update(&k, &ns);
}

/* Record [start + thr, now] of a watched thread's wait as an iso_runq_event: the CPU's slice
 * history since `start` split by cgroup (see the header comment). `thr` is the throttled share
 * the idle method found (idle time of the CPU, so it is taken off the idle slices here). */
static inline __attribute__((always_inline)) void emit_runq(struct iso_sched_task *st, __s32 cpu, __u64 start,
							   __u64 thr, __u64 now, __u32 method, __u64 wait,
							   struct iso_cpu_ring *ring)
{
	__u64 self = st->cgroup_id;
	__u64 self_ns = 0, kern_ns = 0, idle_ns = 0, other_ns = 0, unseen_ns = 0;
	__u64 sc[ISO_NB_SLOTS] = {}, sn[ISO_NB_SLOTS] = {};
	__u64 head = ring->head;
	for (int i = 0; i < ISO_NB_RING; i++) {
		if ((__u64)i >= head)
			break;
		struct iso_cpu_slice *cur = &ring->s[(head - 1 - i) & (ISO_NB_RING - 1)];
		__u64 end = cur->end_ns;
		if (end <= start)
			break;
		if ((__u64)i + 1 >= head || i + 1 >= ISO_NB_RING) {
			unseen_ns += end - start;   /* this slice's start is no longer (or never was) known */
			break;
		}
		__u64 from = ring->s[(head - 2 - i) & (ISO_NB_RING - 1)].end_ns;
		if (from < start)
			from = start;
		if (end <= from)
			continue;
		__u64 ov = end - from;
		__u64 cg = cur->cgroup_id;
		if (cg == self) {
			self_ns += ov;
		} else if (cg == ISO_ROOT_CGROUP_ID) {
			kern_ns += ov;
		} else if (cg == 0) {
			idle_ns += ov;
		} else {
			int placed = 0;
#pragma unroll
			for (int j = 0; j < ISO_NB_SLOTS; j++) {
				if (!placed && (sc[j] == cg || sc[j] == 0)) {
					sc[j] = cg;
					sn[j] += ov;
					placed = 1;
				}
			}
			if (!placed)
				other_ns += ov;
		}
	}
	kern_ns += idle_ns > thr ? idle_ns - thr : 0;

	struct iso_runq_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		lost_inc();
		return;
	}
	e->stall.kind = ISO_EV_RUNQ;
	e->stall.component = ISO_C_RUNQUEUE;
	e->stall.start_ns = start + thr;
	e->stall.end_ns = now;
	e->stall.cgroup_id = self;
	e->stall.pid = st->tgid;
	e->stall.tid = st->tid;
	e->stall.cpu = cpu;
	e->stall.detail = method;
	e->stall.detail2 = wait;
	e->self_ns = self_ns;
	e->kernel_ns = kern_ns;
	e->unseen_ns = unseen_ns;
	/* The ISO_NB_TOP longest of the tracked cgroups, longest first; the rest is `other`. */
#pragma unroll
	for (int k = 0; k < ISO_NB_TOP; k++) {
		int best = -1;
		__u64 best_ns = 0;
#pragma unroll
		for (int j = 0; j < ISO_NB_SLOTS; j++) {
			if (sn[j] > best_ns) {
				best_ns = sn[j];
				best = j;
			}
		}
		e->top[k].cgroup_id = 0;
		e->top[k].ns = 0;
#pragma unroll
		for (int j = 0; j < ISO_NB_SLOTS; j++) {
			if (j == best) {
				e->top[k].cgroup_id = sc[j];
				e->top[k].ns = sn[j];
				nb_total(self, sc[j], sn[j]);
				sn[j] = 0;
			}
		}
	}
#pragma unroll
	for (int j = 0; j < ISO_NB_SLOTS; j++)
		other_ns += sn[j];
	e->other_ns = other_ns;
	events.ringbuf_submit(e, 0);
	nb_total(self, self, self_ns);
	nb_total(self, ISO_ROOT_CGROUP_ID, kern_ns);
	nb_total(self, 0, other_ns + unseen_ns);
}
#endif

/* The task at `key` is switched in on `cpu` at `now`: close its wait, if any. */
static inline __attribute__((always_inline)) void wait_end(__u64 key, __s32 cpu, __u64 now, void *ring,
							 int from_idle)
{
	struct iso_sched_task *st = tasks.lookup(&key);
	if (!st)
		return;
	st->run_start = now;
	__u64 start = st->wait_start;
	if (!start)
		return;
	st->wait_start = 0;
	if (now <= start)
		return;
	/* Woken, and switched in straight after the idle task: no other task held it
	 * back. The time is the CPU leaving idle (the IRQ that woke it, the idle exit;
	 * in a VM, the halt exit), which schedstat does not count as run delay either;
	 * counted, a disk reader on an idle node would show run-queue contention (a
	 * quiet O_DIRECT reader: 214 ms of it in 2 s against 6.7 ms of run_delay). */
	if (from_idle && !(st->wait_flags & ISO_SCHED_F_PREEMPTED))
		return;
	__u64 wait = now - start;
	__u64 thr = 0;
	__u32 method = ISO_SCHED_M_NONE;
	if (st->wait_flags & ISO_SCHED_F_THROTTLED) {
		thr = wait;
		method = ISO_SCHED_M_TASK_FLAG;
	}
#ifndef ISO_OFF_TASK_THROTTLED
	else if (st->wait_flags & ISO_SCHED_F_PREEMPTED) {
		__u64 idle = idle_at(st->wait_cpu, now);
		if (idle > st->idle_start) {
			thr = idle - st->idle_start;
			if (thr > wait)
				thr = wait;
			method = ISO_SCHED_M_IDLE;
		}
	}
#endif
	__u64 runq = wait - thr;
	st->runq_ns += runq;
	st->throttle_ns += thr;
	st->waits++;

	__u64 cgid = st->cgroup_id;
	struct iso_sched_cgroup *ct = cgroup_totals.lookup(&cgid);
	if (ct) {
		__sync_fetch_and_add(&ct->runq_ns, runq);
		__sync_fetch_and_add(&ct->throttle_ns, thr);
		__sync_fetch_and_add(&ct->waits, 1);
	} else {
		struct iso_sched_cgroup init = {};
		init.runq_ns = runq;
		init.throttle_ns = thr;
		init.waits = 1;
		cgroup_totals.update(&cgid, &init);
	}

	struct iso_hist_key hk = {};
	hk.cgroup_id = cgid;
	hk.slot = bpf_log2l(wait);
	if (hk.slot >= ISO_HIST_SLOTS)
		hk.slot = ISO_HIST_SLOTS - 1;
	__u64 *cnt = runq_hist.lookup(&hk);
	if (cnt) {
		__sync_fetch_and_add(cnt, 1);
	} else {
		__u64 one = 1;
		runq_hist.update(&hk, &one);
	}

	/* The watched decision cached at the thread's last switch-out (at most
	 * ISO_SCHED_WATCH_RECHECK_NS old) spares the lookups for watched threads. */
	int watched = st->watched;
	if (wait < ISO_WATCHED_MIN_STALL_NS) {
		if (watched && runq)
			runq_sum(st, cpu, start + thr, now);
		return;
	}
	if (wait < ISO_MIN_STALL_NS && !watched && !is_watched(st->tgid, cgid))
		return;
	runq_flush(st);   /* before this wait's records: the group's interval ends before it began */
	if (thr)
		emit_part(ISO_C_CPU_THROTTLE, start, start + thr, st, cpu, method, wait);
	if (!runq)
		return;
#if ISO_SCHED_NEIGHBORS
	if (watched && ring) {
		emit_runq(st, cpu, start, thr, now, method, wait, (struct iso_cpu_ring *)ring);
		return;
	}
#endif
	emit_part(ISO_C_RUNQUEUE, start + thr, now, st, cpu, method, wait);
}

static inline __attribute__((always_inline)) int on_wakeup(const void *p, int is_new)
{
	__u64 key = (__u64)p;
	/* A new task's address may be a dead task's: never trust an entry there. */
	struct iso_sched_task *st = is_new ? 0 : tasks.lookup(&key);
	if (st) {
		/* Woken while still on a CPU (it had not slept yet), or already queued
		 * (a second wake-up keeps the first start): no wait starts. Checked
		 * before anything else is read: helper calls are the cost here. */
		if (st->run_start || st->wait_start)
			return 0;
	} else {
		__u32 tid = 0, tgid = 0;
		if (read_u32(p, ISO_OFF_TASK_PID, &tid) != 0 || tid == 0)
			return 0;
		read_u32(p, ISO_OFF_TASK_TGID, &tgid);
		/* A new task has never been current; it starts in its parent's cgroup,
		 * and wake_up_new_task runs in the parent's context. */
		st = task_new(key, tid, tgid, is_new ? bpf_get_current_cgroup_id() : 0, 0);
		if (!st)
			return 0;
	}
	/* A woken (not preempted) wait is never judged by the idle clock, so the
	 * CPU it is queued on is not needed (nor read from the task). */
	wait_begin_st(st, -1, 0, bpf_ktime_get_ns());
	return 0;
}

#ifdef ISO_HAVE_SCHED_SCHED_WAKEUP
RAW_TRACEPOINT_PROBE(sched_wakeup)
{
	return on_wakeup((const void *)ctx->args[0], 0);
}
#endif

#ifdef ISO_HAVE_SCHED_SCHED_WAKEUP_NEW
RAW_TRACEPOINT_PROBE(sched_wakeup_new)
{
	return on_wakeup((const void *)ctx->args[0], 1);
}
#endif

/* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state) */
RAW_TRACEPOINT_PROBE(sched_switch)
{
	const void *prev = (const void *)ctx->args[1];
	const void *next = (const void *)ctx->args[2];
	__u32 prev_state = (__u32)ctx->args[3];
	__u64 now = bpf_ktime_get_ns();
	__s32 cpu = (__s32)bpf_get_smp_processor_id();
	__u64 pid_tgid = bpf_get_current_pid_tgid();   /* current is still prev here */
	__u32 prev_tid = (__u32)pid_tgid;
	__u32 prev_tgid = pid_tgid >> 32;
#if ISO_SCHED_IDLE_METHOD
	__u32 next_tid = 0;
	read_u32(next, ISO_OFF_TASK_PID, &next_tid);
#endif

	/* Per-CPU idle clock (idle method only): touched on switches to and from the idle task. */
#if ISO_SCHED_IDLE_METHOD
	if (prev_tid == 0 || next_tid == 0) {
		__u32 key = (__u32)cpu;
		struct iso_cpu_idle *ci = cpu_idle.lookup(&key);
		if (ci) {
			if (prev_tid == 0 && ci->since && now > ci->since)
				ci->cum_ns += now - ci->since;
			ci->since = next_tid == 0 ? now : 0;
		}
	}
#endif

	__u64 cgid = 0;   /* prev's cgroup; stays 0 for the idle task */
	if (prev_tid != 0) {
		__u64 prev_key = (__u64)prev;
		struct iso_sched_task *st = tasks.lookup(&prev_key);
		if (st) {
			if (now - st->watch_checked > ISO_SCHED_WATCH_RECHECK_NS) {
				cgid = bpf_get_current_cgroup_id();
				st->cgroup_id = cgid;
				st->watched = is_watched(prev_tgid, cgid);
				st->watch_checked = now;
			}
			cgid = st->cgroup_id;
			st->tid = prev_tid;     /* a thread that execs as a non-leader takes the leader's pid */
			st->tgid = prev_tgid;
			if (st->run_start && now > st->run_start && st->watched) {
				struct iso_run_event *r = events.ringbuf_reserve(sizeof(*r));
				if (r) {
					r->kind = ISO_EV_RUN;
					r->tid = prev_tid;
					r->start_ns = st->run_start;
					r->end_ns = now;
					r->cgroup_id = cgid;
					r->pid = prev_tgid;
					r->cpu = cpu;
					events.ringbuf_submit(r, 0);
				} else {
					lost_inc();
				}
			}
			st->run_start = 0;
			if (st->short_n && prev_state != 0) {
				/* Going to sleep (or exiting): the group ends here, sent or dropped. */
				if (st->short_ns >= ISO_RUNQ_SUMMARY_MIN_NS)
					runq_flush(st);
				else
					st->short_n = 0;
			}
			if (prev_state & ISO_TASK_DEAD) {
				/* Last switch of an exiting task: it may have been woken after
				 * sched_process_exit (sleeping in the exit path), recreating state. */
				tasks.delete(&prev_key);
				st = 0;
			}
		} else {
			cgid = bpf_get_current_cgroup_id();
		}
		if (prev_state == 0) {   /* TASK_RUNNING: still runnable, so it waits from now */
			__u32 flags = ISO_SCHED_F_PREEMPTED;
#ifdef ISO_OFF_TASK_THROTTLED
			__u8 thr = 0;
			bpf_probe_read_kernel(&thr, 1, (const char *)prev + ISO_OFF_TASK_THROTTLED);
			if (thr)
				flags |= ISO_SCHED_F_THROTTLED;
#endif
			if (!st)
				st = task_new(prev_key, prev_tid, prev_tgid, cgid, cpu);
			if (st)
				wait_begin_st(st, cpu, flags, now);
		} else if (st) {
			st->wait_start = 0;   /* goes to sleep: any stale wait is void */
		} else if (!(prev_state & ISO_TASK_DEAD)) {
			/* Learn identity of a sleeping task so its first wait is attributed.
			 * (Not for the final switch of an exiting task: its entry is gone.) */
			task_new(prev_key, prev_tid, prev_tgid, cgid, -1);
		}
	}
	void *ring = 0;
#if ISO_SCHED_NEIGHBORS
	{
		/* The slice prev just ended: extend the newest one when it is of the same cgroup. */
		__u32 rkey = (__u32)cpu;
		struct iso_cpu_ring *r = cpu_ring.lookup(&rkey);
		if (r) {
			__u64 h = r->head;
			struct iso_cpu_slice *last = &r->s[(h - 1) & (ISO_NB_RING - 1)];
			if (h && last->cgroup_id == cgid) {
				last->end_ns = now;
			} else {
				struct iso_cpu_slice *nx = &r->s[h & (ISO_NB_RING - 1)];
				nx->cgroup_id = cgid;
				nx->end_ns = now;
				r->head = h + 1;
			}
			ring = r;
		}
	}
#endif
	/* The idle task never has an entry (no wake-up targets it, and prev_tid 0 creates none). */
	wait_end((__u64)next, cpu, now, ring, prev_tid == 0);
	return 0;
}

/* TP_PROTO(struct task_struct *p, bool group_dead): runs in the exiting task. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	const void *p = (const void *)ctx->args[0];
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 off_tid = 0, off_tgid = 0;
	read_u32(p, ISO_OFF_TASK_PID, &off_tid);
	read_u32(p, ISO_OFF_TASK_TGID, &off_tgid);
	int idx = (off_tid == tid && off_tgid == (__u32)(pid_tgid >> 32)) ? 0 : 1;
	__u64 *c = btf_check.lookup(&idx);
	if (c)
		__sync_fetch_and_add(c, 1);
	__u64 key = (__u64)p;
	struct iso_sched_task *st = tasks.lookup(&key);
	if (st)
		runq_flush(st);
	tasks.delete(&key);
	return 0;
}

#ifdef ISO_HAVE_CGROUP_CGROUP_ATTACH_TASK
/* TP_PROTO(struct cgroup *dst_cgrp, const char *path, struct task_struct *task, bool threadgroup):
 * once per moved task. Its cached cgroup id and watched decision are stale now. */
RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
	__u64 key = ctx->args[2];
	struct iso_sched_task *st = tasks.lookup(&key);
	if (st)
		st->watch_checked = 0;
	return 0;
}
#endif
