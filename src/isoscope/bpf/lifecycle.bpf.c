/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Process, namespace and cgroup lifecycle (ISO_EV_LIFECYCLE records), so the
 * tracked sets follow workloads as they come and go.
 *
 *   exec                 every exec (path = file name);
 *   exit                 thread-group leaders and threads of watched tgids
 *                        (flags stays 0: the exit code needs struct access);
 *   fork                 only children of watched processes (ppid = parent);
 *   clone_ns             clone/clone3 with CLONE_NEW* (flags = those flags):
 *                        emitted at task_newtask with the child's host pid,
 *                        so the new process is known from its first
 *                        instruction; such a child gets no fork record;
 *   cgroup_mkdir/rmdir   cgroup_id = new cgroup, flags = hierarchy id (0 = v2);
 *   cgroup_attach        pid/tid = the moved task, cgroup_id = destination.
 *
 * unshare / setns (ISO_LC_UNSHARE / ISO_LC_SETNS) have no tracepoint of their
 * own outside the syscall tracepoints; the syscalls probe (syscalls.bpf.c)
 * reports them from its raw sys_enter/sys_exit programs, which run for every
 * syscall anyway, instead of this probe adding per-syscall hooks.
 */
#include "isoscope.h"

/* CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME */
#define ISO_CLONE_NEW_MASK 0x7E020080ull

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

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
	if (tid != tgid && !lc_watched(bpf_get_current_cgroup_id(), tgid))
		return 0;
	struct iso_lifecycle_event *e = lc_new(ISO_LC_EXIT);
	if (!e)
		return 0;
	events.ringbuf_submit(e, 0);
	return 0;
}

/*
 * task_newtask runs in the parent (current called fork/clone/clone3) once the
 * child exists, before it can run, and carries the clone flags: a clone with
 * CLONE_NEW* needs no syscall hook (syscalls:sys_enter_clone* tracepoints
 * would route every syscall on the node through the syscall-tracing dispatch).
 */
TRACEPOINT_PROBE(task, task_newtask)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 child = (__u32)args->pid;
	__u32 ns_flags = (__u32)(args->clone_flags & ISO_CLONE_NEW_MASK);
	__u32 type = ISO_LC_CLONE_NS;
	if (!ns_flags) {
		if (!lc_watched(bpf_get_current_cgroup_id(), pid_tgid >> 32))
			return 0;
		type = ISO_LC_FORK;
	}
	struct iso_lifecycle_event *e = lc_new(type);
	if (!e)
		return 0;
	e->ppid = e->pid;
	e->pid = child;
	e->tid = child;
	e->flags = ns_flags;
	events.ringbuf_submit(e, 0);
	return 0;
}

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
