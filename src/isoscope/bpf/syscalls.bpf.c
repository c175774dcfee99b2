/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Syscall latency per (cgroup, class) and blocked-in-syscall intervals
 * (kernel.syscall) of watched workloads; and, because these two programs run
 * for every syscall anyway, the namespace changes unshare(2) and setns(2)
 * (ISO_LC_UNSHARE / ISO_LC_SETNS lifecycle records, on success only).
 *
 * Cost is what matters here: sys_enter/sys_exit run for every syscall on the
 * node, and on kernels built with retpolines and call-depth tracking every
 * helper call costs 12-25 ns (bpf_ktime_get_ns about 50 ns in a VM), while
 * array lookups are inlined by the verifier and nearly free. So:
 *
 *  1. Per-CPU slots (`cpu_slots`, no helper call): the pt_regs pointer a raw
 *     syscall tracepoint receives is unique to the running task (it sits at
 *     the top of the task's kernel stack). Each CPU remembers the last few
 *     tasks found untracked there, with the generation each was decided at.
 *     A task doing syscalls on one CPU (the costly case) is recognised on
 *     entry and on exit with array reads and no helper call.
 *  2. Task-local storage (`task_state`, freed by the kernel with the task):
 *     the decision per task, when no slot names it (it migrated, or more
 *     tasks took turns on the CPU). One helper pair per program.
 *  3. The decision itself (watch_all, watched_cgroups, watched_tgids hash
 *     lookups): on a task's first syscall and after a generation change.
 *
 * The generation (`watch_gen`) changes whenever a cached decision may have
 * become wrong, or a slot may name the wrong syscall:
 *   - every bpf() syscall on the node that writes a map (update, delete and
 *     their batch forms), on entry and on exit: user space
 *     (isoscope/probes/watch.py) changes the watch maps only through bpf();
 *     the bump on exit closes the window in which a task could re-decide
 *     against a half-applied update. Map reads (lookups, key walks: most
 *     bpf() calls, e.g. metrics collection) leave the caches alone;
 *   - every cgroup_attach_task: a task moved into or out of a watched cgroup;
 *   - every task_newtask: a new task may reuse a dead task's kernel stack and
 *     so its pt_regs address; no slot written before it exists stays valid;
 *   - every unshare/setns entry: the exit must reach the task's storage even
 *     when the syscall ends on another CPU whose slots name this task.
 * A slot {regs, gen} thus always means: the task with these pt_regs was
 * untracked at generation gen and has entered no syscall with exit work
 * since (tracking or per-syscall work is only ever started after a bump).
 * Without task_newtask (ISO_HAVE_TASK_TASK_NEWTASK undefined) the slots are
 * not used and every syscall takes the task-storage path.
 *
 * Tracking levels (the decision):
 *   full  - watch_all, watched_tgids, or watched_cgroups value ISO_SC_WATCH_FULL
 *           (what collector/probes/watch.py writes): histogram + a stall
 *           record for syscalls >= ISO_SYSCALL_WATCHED_MIN_NS;
 *   hist  - watched_cgroups value ISO_SC_WATCH_HIST (pod cgroups user space
 *           wants the syscall_latency_seconds histogram for): histogram only.
 */
#include <uapi/linux/ptrace.h>
#include "isoscope.h"

#ifndef ISO_SC_MAX_NR
#define ISO_SC_MAX_NR 512          /* syscall numbers classified through `syscall_class` */
#endif
/* Syscall numbers on x86_64; other architectures pass their own. */
#ifndef ISO_NR_BPF
#define ISO_NR_BPF 321
#endif
#ifndef ISO_NR_UNSHARE
#define ISO_NR_UNSHARE 272
#endif
#ifndef ISO_NR_SETNS
#define ISO_NR_SETNS 308
#endif

/* enum bpf_cmd values that change a map's contents (uapi, stable). */
#define ISO_BPF_MAP_UPDATE_ELEM             2
#define ISO_BPF_MAP_DELETE_ELEM             3
#define ISO_BPF_MAP_LOOKUP_AND_DELETE_ELEM 21
#define ISO_BPF_MAP_LOOKUP_AND_DELETE_BATCH 25
#define ISO_BPF_MAP_UPDATE_BATCH           26
#define ISO_BPF_MAP_DELETE_BATCH           27

/* CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME */
#define ISO_CLONE_NEW_MASK 0x7E020080ull

#if defined(ISO_HAVE_TASK_TASK_NEWTASK)
#define SC_USE_SLOT 1
#else
#define SC_USE_SLOT 0
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
	__u8 ns_type;         /* ISO_LC_UNSHARE / ISO_LC_SETNS in flight, 0 if none */
	__u8 pad[3];
	__u32 ns_flags;       /* its CLONE_NEW* flags (setns: the nstype argument) */
};

/* Per CPU: the last few tasks found untracked on this CPU (see 1. above); a
 * few, not one, so that tasks taking turns on a CPU (a pipe or socket
 * ping-pong, a thread pool) keep finding themselves. */
#define SC_SLOTS 4
struct sc_slots {
	__u64 regs[SC_SLOTS]; /* pt_regs pointer of each task, 0 = none */
	__u32 gen[SC_SLOTS];  /* watch_gen when it was found untracked */
	__u32 next;           /* entry the next untracked task replaces */
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
BPF_PERCPU_ARRAY(cpu_slots, struct sc_slots, 1);
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

/* Arguments 1 and 2 of the syscall from its pt_regs (ABI registers: stable layout). */
static inline __attribute__((always_inline)) __u64 sc_arg(struct pt_regs *regs, int second)
{
	__u64 v = 0;
	if (second)
		bpf_probe_read_kernel(&v, sizeof(v), &PT_REGS_PARM2(regs));
	else
		bpf_probe_read_kernel(&v, sizeof(v), &PT_REGS_PARM1(regs));
	return v;
}

/* unshare/setns entry: remember what it asks for; the exit reports it on success. */
static inline __attribute__((always_inline)) void sc_ns_enter(struct sc_task *s, long id, struct pt_regs *regs)
{
	s->ns_type = 0;
	if (id == ISO_NR_UNSHARE) {
		__u64 flags = sc_arg(regs, 0) & ISO_CLONE_NEW_MASK;
		if (!flags)
			return;            /* unshare of files/fs/sysvsem only: no namespace */
		s->ns_type = ISO_LC_UNSHARE;
		s->ns_flags = (__u32)flags;
	} else {
		s->ns_type = ISO_LC_SETNS;
		s->ns_flags = (__u32)sc_arg(regs, 1);   /* nstype, 0 = whatever the fd is */
	}
}

static inline __attribute__((always_inline)) void sc_ns_exit(struct sc_task *s, long ret)
{
	__u32 type = s->ns_type;
	s->ns_type = 0;
	if (ret != 0)
		return;
	struct iso_lifecycle_event *e = events.ringbuf_reserve(sizeof(struct iso_lifecycle_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = ISO_EV_LIFECYCLE;
	e->type = type;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->flags = s->ns_flags;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	events.ringbuf_submit(e, 0);
}

/* Whether this CPU's slots know the task with pt_regs `regs` as untracked at generation `gen`. */
static inline __attribute__((always_inline)) int sc_slot_hit(struct sc_slots *sl, __u64 regs, __u32 gen)
{
#pragma unroll
	for (int i = 0; i < SC_SLOTS; i++) {
		if (sl->regs[i] == regs && sl->gen[i] == gen)
			return 1;
	}
	return 0;
}

static inline __attribute__((always_inline)) void sc_slot_put(struct sc_slots *sl, __u64 regs, __u32 gen)
{
	__u32 i = sl->next & (SC_SLOTS - 1);
	sl->regs[i] = regs;
	sl->gen[i] = gen;
	sl->next = i + 1;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
	/* TP_PROTO(struct pt_regs *regs, long id) */
	__u64 regs = ctx->args[0];
	long id = (long)ctx->args[1];
	__u32 zero = 0;
	__u32 *g = watch_gen.lookup(&zero);
	__u32 gen = g ? *g : 0;
	struct sc_slots *slots = cpu_slots.lookup(&zero);
	if (!slots)
		return 0;
	int special = id == ISO_NR_UNSHARE || id == ISO_NR_SETNS;
	if (id == ISO_NR_BPF) {
		__u64 cmd = sc_arg((struct pt_regs *)regs, 0);
		special = cmd == ISO_BPF_MAP_UPDATE_ELEM || cmd == ISO_BPF_MAP_DELETE_ELEM ||
			  cmd == ISO_BPF_MAP_LOOKUP_AND_DELETE_ELEM || cmd == ISO_BPF_MAP_LOOKUP_AND_DELETE_BATCH ||
			  cmd == ISO_BPF_MAP_UPDATE_BATCH || cmd == ISO_BPF_MAP_DELETE_BATCH;
	}
	if (SC_USE_SLOT && !special && sc_slot_hit(slots, regs, gen))
		return 0;                       /* the common case: a task this CPU knows as untracked */

	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct sc_task *s = task_state.task_storage_get(task, 0, 0);
	if (special) {
		/* The exit must find this task's storage, whichever CPU it ends on. */
		sc_bump_gen();
		gen += 1;
		if (!s)
			s = task_state.task_storage_get(task, 0, SC_F_CREATE);
		if (!s)
			return 0;
		if (id == ISO_NR_BPF)
			s->in_bpf = 1;
		else
			sc_ns_enter(s, id, (struct pt_regs *)regs);
	} else if (s && s->valid && s->gen == gen && s->level == SC_TRACK_NONE) {
		sc_slot_put(slots, regs, gen);  /* known unwatched: next time the slots answer */
		return 0;
	}

	__u64 cg = bpf_get_current_cgroup_id();
	if (!s || !s->valid || s->gen != gen) {
		__u8 level = sc_decide(cg);
		if (!s) {
			/* Remember the decision, "unwatched" included, so the task's next syscall is cheap. */
			s = task_state.task_storage_get(task, 0, SC_F_CREATE);
			if (!s)
				return 0;
		}
		s->level = level;
		s->gen = gen;
		s->valid = 1;
	}
	if (s->level == SC_TRACK_NONE) {
		s->active = 0;                  /* a syscall entered while tracked is no longer measured */
		if (!special)
			sc_slot_put(slots, regs, gen);
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
	/* TP_PROTO(struct pt_regs *regs, long ret) */
	__u32 zero = 0;
	if (SC_USE_SLOT) {
		__u32 *g = watch_gen.lookup(&zero);
		struct sc_slots *slots = cpu_slots.lookup(&zero);
		if (g && slots && sc_slot_hit(slots, ctx->args[0], *g))
			return 0;                   /* untracked, no per-syscall work since (see the generation) */
	}
	struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
	struct sc_task *s = task_state.task_storage_get(task, 0, 0);
	if (!s)
		return 0;
	if (s->in_bpf) {
		s->in_bpf = 0;
		sc_bump_gen();
	}
	if (s->ns_type)
		sc_ns_exit(s, (long)ctx->args[1]);
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

#ifdef ISO_HAVE_TASK_TASK_NEWTASK
/* A new task: it may reuse a dead task's kernel stack, so no slot stays valid. */
RAW_TRACEPOINT_PROBE(task_newtask)
{
	sc_bump_gen();
	return 0;
}
#endif
