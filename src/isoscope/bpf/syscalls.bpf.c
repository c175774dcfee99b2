/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Syscall latency per (cgroup, class) and blocked-in-syscall intervals
 * (kernel.syscall) of watched workloads.
 *
 * Cost is what matters here: sys_enter/sys_exit run for every syscall on the
 * node, and on kernels built with retpolines and call-depth tracking every
 * helper call and hash lookup is expensive. So whether a task is tracked is
 * decided once and cached in the task's own local storage (`task_state`,
 * freed by the kernel with the task), stamped with a generation number. An
 * unwatched task then pays one storage read and one array read per syscall
 * on entry and one storage read on exit: no hash lookups at all.
 *
 * The generation (`watch_gen`) changes whenever a cached decision may have
 * become wrong:
 *   - every bpf() syscall on the node, on entry and on exit: user space
 *     (collector/probes/watch.py) changes the watch maps only through bpf();
 *     the bump on exit closes the window in which a task could re-decide
 *     against a half-applied update;
 *   - every cgroup_attach_task: a task moved into or out of a watched cgroup.
 *
 * Tracking levels (the decision):
 *   full  - watch_all, watched_tgids, or watched_cgroups value ISO_SC_WATCH_FULL
 *           (what collector/probes/watch.py writes): histogram + a stall
 *           record for syscalls >= ISO_SYSCALL_WATCHED_MIN_NS;
 *   hist  - watched_cgroups value ISO_SC_WATCH_HIST (pod cgroups user space
 *           wants the syscall_latency_seconds histogram for): histogram only.
 */
#include "isoscope.h"

#ifndef ISO_SC_MAX_NR
#define ISO_SC_MAX_NR 512          /* syscall numbers classified through `syscall_class` */
#endif
#ifndef ISO_NR_BPF
#define ISO_NR_BPF 321             /* __NR_bpf on x86_64; other architectures pass their own */
#endif

#define ISO_SC_WATCH_FULL 1   /* watched_cgroups values */
#define ISO_SC_WATCH_HIST 2

#define SC_TRACK_NONE 0
#define SC_TRACK_HIST 1
#define SC_TRACK_FULL 2

#define SC_F_CREATE 1         /* BPF_LOCAL_STORAGE_GET_F_CREATE */

struct sc_task {
	__u64 start_ns;       /* entry of the syscall in flight (tracked tasks) */
	__u64 cgroup_id;
	__u32 nr;
	__u32 gen;            /* watch_gen the decision was made at */
	__u8 level;           /* SC_TRACK_*: the cached decision */
	__u8 valid;           /* a decision has been made */
	__u8 active;          /* a tracked syscall is in flight */
	__u8 in_bpf;          /* inside bpf(): bump the generation again on exit */
	__u32 pad;
};

/* Watched threads report blocking syscalls down to this length: short I/O
 * syscalls (a 4 KiB O_DIRECT read on virtio takes tens of microseconds) add
 * up within one request, and the join needs their intervals to tell the
 * virtio path and the kernel baseline apart. */
#ifndef ISO_SYSCALL_WATCHED_MIN_NS
#define ISO_SYSCALL_WATCHED_MIN_NS (ISO_MIN_STALL_NS < 20000ull ? ISO_MIN_STALL_NS : 20000ull)
#endif

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_ARRAY(watch_gen, __u32, 1);
BPF_TASK_STORAGE(task_state, struct sc_task);
BPF_ARRAY(syscall_class, __u8, ISO_SC_MAX_NR);        /* nr -> ISO_SC_*, filled from user space */
BPF_HASH(hist, struct iso_hist_key, __u64, 16384);    /* (cgroup, class, log2 ns) -> count */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, class, 0) -> count, sum */

static inline __attribute__((always_inline)) void sc_bump_gen(void)
{
	__u32 zero = 0;
	__u32 *g = watch_gen.lookup(&zero);
	if (g)
		__sync_fetch_and_add(g, 1);
}

/* The full decision: only on a task's first syscall and after a generation change. */
static inline __attribute__((always_inline)) __u8 sc_decide(__u64 cg)
{
	__u32 zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return SC_TRACK_FULL;
	__u8 *w = watched_cgroups.lookup(&cg);
	__u32 wl = w ? *w : 0;   /* a plain value: the verifier rejects arithmetic on the pointer */
	if (wl && wl != ISO_SC_WATCH_HIST)
		return SC_TRACK_FULL;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (watched_tgids.lookup(&tgid))
		return SC_TRACK_FULL;
	return wl ? SC_TRACK_HIST : SC_TRACK_NONE;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
	long id = (long)ctx->args[1];
	__u32 zero = 0;
	__u32 *g = watch_gen.lookup(&zero);
	__u32 gen = g ? *g : 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct sc_task *s = task_state.task_storage_get(task, 0, 0);

	if (id == ISO_NR_BPF) {
		sc_bump_gen();
		gen += 1;
		if (!s)
			s = task_state.task_storage_get(task, 0, SC_F_CREATE);
		if (s)
			s->in_bpf = 1;
	}
	if (s && s->valid && s->gen == gen && s->level == SC_TRACK_NONE)
		return 0;                       /* the common case: known unwatched */

	__u64 cg = bpf_get_current_cgroup_id();
	if (!s || !s->valid || s->gen != gen) {
		__u8 level = sc_decide(cg);
		if (!s) {
			if (level == SC_TRACK_NONE) {
				/* Remember "unwatched" so the next syscall takes the fast path. */
				s = task_state.task_storage_get(task, 0, SC_F_CREATE);
				if (s) {
					s->level = SC_TRACK_NONE;
					s->gen = gen;
					s->valid = 1;
				}
				return 0;
			}
			s = task_state.task_storage_get(task, 0, SC_F_CREATE);
			if (!s)
				return 0;
		}
		s->level = level;
		s->gen = gen;
		s->valid = 1;
		if (level == SC_TRACK_NONE)
			return 0;
	}
	if (id < 0)
		return 0;
	s->start_ns = bpf_ktime_get_ns();
	s->cgroup_id = cg;
	s->nr = (__u32)id;
	s->active = 1;
	return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct sc_task *s = task_state.task_storage_get(task, 0, 0);
	if (!s)
		return 0;
	if (s->in_bpf) {
		s->in_bpf = 0;
		sc_bump_gen();
	}
	if (!s->active)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	s->active = 0;
	__u64 start = s->start_ns;
	__u64 cg = s->cgroup_id;
	__u32 nr = s->nr;
	__u32 level = s->level;
	if (now < start)
		return 0;
	__u64 d = now - start;

	__u32 cls = ISO_SC_OTHER;
	__u8 *c = syscall_class.lookup(&nr);
	if (c && *c < ISO_SC_NCLASS)
		cls = *c;

	struct iso_hist_key hk = {};
	hk.cgroup_id = cg;
	hk.class_id = cls;
	__u32 slot = bpf_log2l(d);
	hk.slot = slot < ISO_HIST_SLOTS ? slot : ISO_HIST_SLOTS - 1;
	hist.atomic_increment(hk);

	struct iso_hist_key tk = {};
	tk.cgroup_id = cg;
	tk.class_id = cls;
	struct iso_total zt = {};
	struct iso_total *t = totals.lookup_or_try_init(&tk, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	if (level != SC_TRACK_FULL || d < ISO_SYSCALL_WATCHED_MIN_NS)
		return 0;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(struct iso_stall_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->kind = ISO_EV_STALL;
	e->component = ISO_C_SYSCALL;
	e->start_ns = start;
	e->end_ns = now;
	e->cgroup_id = cg;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->cpu = -1;                 /* blocked, not tied to a CPU */
	e->detail = cls;
	e->detail2 = nr;
	events.ringbuf_submit(e, 0);
	return 0;
}

#ifdef ISO_HAVE_CGROUP_CGROUP_ATTACH_TASK
/* A task changed cgroup: cached decisions may name the wrong cgroup. */
RAW_TRACEPOINT_PROBE(cgroup_attach_task)
{
	sc_bump_gen();
	return 0;
}
#endif
