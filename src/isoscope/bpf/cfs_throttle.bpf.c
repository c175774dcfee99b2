/* SPDX-License-Identifier: Apache-2.0 */
/*
 * isoscope optional extra: exact CFS throttled intervals per cgroup from hooks
 * on the kernel functions throttle_cfs_rq() / unthrottle_cfs_rq(). One source
 * for both ways of hooking a kernel function; the catalog entry picks one with
 * a define (never by editing this text):
 *
 *   ISO_CFS_ATTACH_FENTRY   fentry programs (BPF trampoline, BTF-typed
 *                           arguments; cheapest)  — catalog: cfs_throttle_fentry
 *   ISO_CFS_ATTACH_KPROBE   kprobes                — catalog: cfs_throttle_kprobe
 *
 * Only loaded where the kernel supports the chosen method; elsewhere the sched
 * probe's tracepoint method stands alone.
 *
 * The cgroup of a cfs_rq is cfs_rq->tg->css.cgroup->kn->id, read at offsets
 * taken from the running kernel's BTF (isoscope/kernel/btf.py
 * CFS_THROTTLE_FIELDS), never through the generic headers.
 */
#include <uapi/linux/ptrace.h>
#include "isoscope.h"

#if defined(ISO_CFS_ATTACH_FENTRY) == defined(ISO_CFS_ATTACH_KPROBE)
#error "define exactly one of ISO_CFS_ATTACH_FENTRY and ISO_CFS_ATTACH_KPROBE"
#endif
#if !defined(ISO_OFF_CFS_RQ_TG) || !defined(ISO_OFF_TG_CSS_CGROUP) || !defined(ISO_OFF_CGROUP_KN) || !defined(ISO_OFF_KN_ID)
#error "cfs_rq → cgroup id offsets from BTF must be defined"
#endif

struct iso_cfs_throttle {
	__u64 throttled_ns;
	__u64 count;
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);
BPF_HASH(throttled_since, __u64, __u64, 16384);            /* cfs_rq pointer -> throttle start */
BPF_TABLE("lru_hash", __u64, struct iso_cfs_throttle, cgroup_throttle, 10240);

static inline __attribute__((always_inline)) __u64 cfs_rq_cgroup_id(__u64 cfs_rq)
{
	__u64 tg = 0, cgrp = 0, kn = 0, id = 0;
	bpf_probe_read_kernel(&tg, sizeof(tg), (void *)(cfs_rq + ISO_OFF_CFS_RQ_TG));
	if (!tg)
		return 0;
	bpf_probe_read_kernel(&cgrp, sizeof(cgrp), (void *)(tg + ISO_OFF_TG_CSS_CGROUP));
	if (!cgrp)
		return 0;
	bpf_probe_read_kernel(&kn, sizeof(kn), (void *)(cgrp + ISO_OFF_CGROUP_KN));
	if (!kn)
		return 0;
	bpf_probe_read_kernel(&id, sizeof(id), (void *)(kn + ISO_OFF_KN_ID));
	return id;
}

static inline __attribute__((always_inline)) int on_throttle(__u64 cfs_rq)
{
	__u64 now = bpf_ktime_get_ns();
	throttled_since.update(&cfs_rq, &now);
	return 0;
}

static inline __attribute__((always_inline)) int on_unthrottle(__u64 cfs_rq)
{
	__u64 *since = throttled_since.lookup(&cfs_rq);
	if (!since)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - *since;
	throttled_since.delete(&cfs_rq);
	__u64 cgid = cfs_rq_cgroup_id(cfs_rq);
	struct iso_cfs_throttle *t = cgroup_throttle.lookup(&cgid);
	if (t) {
		__sync_fetch_and_add(&t->throttled_ns, delta);
		__sync_fetch_and_add(&t->count, 1);
	} else {
		struct iso_cfs_throttle init = {delta, 1};
		cgroup_throttle.update(&cgid, &init);
	}
	return 0;
}

#ifdef ISO_CFS_ATTACH_FENTRY
KFUNC_PROBE(throttle_cfs_rq, __u64 cfs_rq)
{
	return on_throttle(cfs_rq);
}

KFUNC_PROBE(unthrottle_cfs_rq, __u64 cfs_rq)
{
	return on_unthrottle(cfs_rq);
}
#else
int kprobe__throttle_cfs_rq(struct pt_regs *ctx)
{
	return on_throttle(PT_REGS_PARM1(ctx));
}

int kprobe__unthrottle_cfs_rq(struct pt_regs *ctx)
{
	return on_unthrottle(PT_REGS_PARM1(ctx));
}
#endif
