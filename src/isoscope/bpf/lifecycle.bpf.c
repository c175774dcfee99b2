/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Process, namespace and cgroup lifecycle (ISO_EV_LIFECYCLE records), so the
 * tracked sets follow workloads as they come and go.
 *
 *   exec                 every exec (path = file name);
 *   exit                 thread-group leaders and threads of watched tgids
 *                        (flags stays 0: the exit code needs struct access);
 *   fork                 only children of watched processes (ppid = parent);
 *   unshare / setns      on success (sys_exit ret == 0), flags = CLONE_NEW*
 *                        (setns: the nstype argument, 0 = "whatever the fd is");
 *   clone_ns             clone/clone3 with CLONE_NEW*: emitted at
 *                        sched_process_fork with the child's host pid, so the
 *                        new process is known from its first instruction;
 *   cgroup_mkdir/rmdir   cgroup_id = new cgroup, flags = hierarchy id (0 = v2);
 *   cgroup_attach        pid/tid = the moved task, cgroup_id = destination.
 */
#include "isoscope.h"

/* CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME */
#define ISO_CLONE_NEW_MASK 0xFE020080ull

#ifndef ISO_LC_MAX_PENDING
#define ISO_LC_MAX_PENDING 8192
#endif

struct lc_pending {
	__u32 type;      /* ISO_LC_UNSHARE / ISO_LC_SETNS / ISO_LC_CLONE_NS */
	__u32 flags;
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

/* Between a namespace syscall's entry and its exit / fork, per tid. */
BPF_HASH(pending, __u32, struct lc_pending, ISO_LC_MAX_PENDING);

static inline __attribute__((always_inline)) __u32 lc_watched(__u64 cg, __u32 tgid)
{
	__u32 zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return 1;
	if (watched_cgroups.lookup(&cg))
		return 1;
	return watched_tgids.lookup(&tgid) != 0;
}

/* A zeroed record with current's identity, or NULL (counted as lost). */
static inline __attribute__((always_inline)) struct iso_lifecycle_event *lc_new(__u32 type)
{
	struct iso_lifecycle_event *e = events.ringbuf_reserve(sizeof(struct iso_lifecycle_event));
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			*lost += 1;
		return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = ISO_EV_LIFECYCLE;
	e->type = type;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	struct iso_lifecycle_event *e = lc_new(ISO_LC_EXEC);
	if (!e)
		return 0;
	TP_DATA_LOC_READ_STR(e->path, filename, sizeof(e->path));
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 tgid = pid_tgid >> 32;
	pending.delete(&tid);
	if (tid != tgid && !lc_watched(bpf_get_current_cgroup_id(), tgid))
		return 0;
	struct iso_lifecycle_event *e = lc_new(ISO_LC_EXIT);
	if (!e)
		return 0;
	events.ringbuf_submit(e, 0);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	/* Runs in the parent: current is the task that called fork/clone. */
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 child = args->child_pid;
	struct lc_pending *p = pending.lookup(&tid);
	if (p && p->type == ISO_LC_CLONE_NS) {
		__u32 flags = p->flags;
		pending.delete(&tid);
		struct iso_lifecycle_event *e = lc_new(ISO_LC_CLONE_NS);
		if (!e)
			return 0;
		e->ppid = e->pid;
		e->pid = child;
		e->tid = child;
		e->flags = flags;
		events.ringbuf_submit(e, 0);
		return 0;
	}
	if (!lc_watched(bpf_get_current_cgroup_id(), pid_tgid >> 32))
		return 0;
	struct iso_lifecycle_event *e = lc_new(ISO_LC_FORK);
	if (!e)
		return 0;
	e->ppid = e->pid;
	e->pid = child;
	e->tid = child;
	events.ringbuf_submit(e, 0);
	return 0;
}

static inline __attribute__((always_inline)) void lc_remember(__u32 type, __u64 flags)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	if (type != ISO_LC_SETNS && !(flags & ISO_CLONE_NEW_MASK)) {
		pending.delete(&tid);   /* a plain fork/thread: forget an older failed clone */
		return;
	}
	struct lc_pending p = {};
	p.type = type;
	p.flags = (__u32)(flags & ISO_CLONE_NEW_MASK);
	pending.update(&tid, &p);
}

static inline __attribute__((always_inline)) void lc_complete(__u32 type, long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct lc_pending *p = pending.lookup(&tid);
	if (!p)
		return;
	__u32 ptype = p->type;
	__u32 flags = p->flags;
	pending.delete(&tid);
	if (ptype != type || ret != 0)
		return;
	struct iso_lifecycle_event *e = lc_new(type);
	if (!e)
		return;
	e->flags = flags;
	events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_unshare)
{
	lc_remember(ISO_LC_UNSHARE, args->unshare_flags);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_unshare)
{
	lc_complete(ISO_LC_UNSHARE, args->ret);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_setns)
{
	lc_remember(ISO_LC_SETNS, (__u64)(__u32)args->flags);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_setns)
{
	lc_complete(ISO_LC_SETNS, args->ret);
	return 0;
}

#ifdef ISO_HAVE_SYSCALLS_SYS_ENTER_CLONE
TRACEPOINT_PROBE(syscalls, sys_enter_clone)
{
	lc_remember(ISO_LC_CLONE_NS, args->clone_flags);
	return 0;
}
#endif

#ifdef ISO_HAVE_SYSCALLS_SYS_ENTER_CLONE3
TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
	/* struct clone_args is user memory with a stable ABI: flags is its first u64. */
	__u64 flags = 0;
	if (args->size >= sizeof(__u64))
		bpf_probe_read_user(&flags, sizeof(flags), (void *)args->uargs);
	lc_remember(ISO_LC_CLONE_NS, flags);
	return 0;
}
#endif

#ifdef ISO_HAVE_CGROUP_CGROUP_MKDIR
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
	struct iso_lifecycle_event *e = lc_new(ISO_LC_CGROUP_MKDIR);
	if (!e)
		return 0;
	e->cgroup_id = args->id;
	e->flags = (__u32)args->root;
	TP_DATA_LOC_READ_STR(e->path, path, sizeof(e->path));
	events.ringbuf_submit(e, 0);
	return 0;
}
#endif

#ifdef ISO_HAVE_CGROUP_CGROUP_RMDIR
TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
	struct iso_lifecycle_event *e = lc_new(ISO_LC_CGROUP_RMDIR);
	if (!e)
		return 0;
	e->cgroup_id = args->id;
	e->flags = (__u32)args->root;
	TP_DATA_LOC_READ_STR(e->path, path, sizeof(e->path));
	events.ringbuf_submit(e, 0);
	return 0;
}
#endif

#ifdef ISO_HAVE_CGROUP_CGROUP_ATTACH_TASK
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	struct iso_lifecycle_event *e = lc_new(ISO_LC_CGROUP_ATTACH);
	if (!e)
		return 0;
	e->ppid = e->pid;            /* who moved it */
	e->pid = (__u32)args->pid;
	e->tid = (__u32)args->pid;
	e->cgroup_id = args->dst_id;
	e->flags = (__u32)args->dst_root;
	TP_DATA_LOC_READ_STR(e->path, dst_path, sizeof(e->path));
	events.ringbuf_submit(e, 0);
	return 0;
}
#endif
