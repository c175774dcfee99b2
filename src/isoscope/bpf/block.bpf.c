/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Block request time per device; time on virtio disks is l2.virtio_io,
 * attributed to the thread that submitted (and waits on) the request.
 *
 * Requests are keyed by (dev, sector, operation), read from tracepoint
 * arguments: no struct request is touched. The operation (R, W, D for discard,
 * F for a pure flush: the rwbs letter after an optional preflush F) keeps
 * apart a read and a discard of the same sectors in flight together (file
 * systems mounted with `discard` send those for just-freed blocks). The submitter is taken at block_io_start, which
 * runs in the submitting task when the request is created, so plugged I/O
 * dispatched later from a kworker is still charged to the right thread; where
 * that tracepoint is missing, the task current at block_rq_issue is used.
 * A request's time runs from its creation (block_io_start: bio submitted,
 * so plugging and I/O-scheduler queueing count, as the waiting thread
 * experiences them) to block_rq_complete; from block_rq_issue where
 * block_io_start does not exist.
 *
 * virtio_devs: user space writes the kernel dev_t (major << 20 | minor) of
 * every virtio disk (collector/blockdev.py). Watched workloads get a stall
 * record for every virtio request; others only for requests >= ISO_MIN_STALL_NS.
 * Every device, virtio or not, is aggregated per (cgroup, dev) in `hist`.
 */
#include "isoscope.h"

#ifndef ISO_BLK_MAX_INFLIGHT
#define ISO_BLK_MAX_INFLIGHT 16384
#endif

struct blk_key {
	__u32 dev;
	__u32 op;        /* rwbs operation letter */
	__u64 sector;
};

/* The operation letter of an rwbs string ("FWS" -> 'W', "F" -> 'F', "RA" -> 'R'). */
#define BLK_OP(a) ((a)->rwbs[0] == 'F' && (a)->rwbs[1] != 0 ? (a)->rwbs[1] : (a)->rwbs[0])

struct blk_req {
	__u64 start_ns;      /* request created (block_io_start), else issued */
	__u64 issue_ns;      /* 0 until block_rq_issue */
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 bytes;
	__u32 watched;
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_HASH(virtio_devs, __u32, __u8, 256);
BPF_HASH(inflight, struct blk_key, struct blk_req, ISO_BLK_MAX_INFLIGHT);
BPF_HASH(hist, struct iso_hist_key, __u64, 8192);              /* (cgroup, dev, log2 ns) */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, dev, 0) */

static inline __attribute__((always_inline)) __u32 blk_watched(__u64 cg, __u32 tgid)
{
	__u32 zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return 1;
	if (watched_cgroups.lookup(&cg))
		return 1;
	return watched_tgids.lookup(&tgid) != 0;
}

static inline __attribute__((always_inline)) void blk_owner(struct blk_req *r)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	r->cgroup_id = bpf_get_current_cgroup_id();
	r->pid = pid_tgid >> 32;
	r->tid = (__u32)pid_tgid;
	r->watched = blk_watched(r->cgroup_id, r->pid);
}

#ifdef ISO_HAVE_BLOCK_BLOCK_IO_START
TRACEPOINT_PROBE(block, block_io_start)
{
	struct blk_key k = {};
	k.dev = args->dev;
	k.sector = args->sector;
	k.op = BLK_OP(args);
	struct blk_req r = {};
	blk_owner(&r);
	r.start_ns = bpf_ktime_get_ns();
	r.bytes = args->bytes;
	inflight.update(&k, &r);
	return 0;
}
#endif

TRACEPOINT_PROBE(block, block_rq_issue)
{
	struct blk_key k = {};
	k.dev = args->dev;
	k.sector = args->sector;
	k.op = BLK_OP(args);
	__u64 now = bpf_ktime_get_ns();
	struct blk_req *r = inflight.lookup(&k);
	if (r) {
		r->issue_ns = now;
		if (args->bytes)
			r->bytes = args->bytes;
		return 0;
	}
	struct blk_req n = {};
	blk_owner(&n);
	n.start_ns = now;
	n.issue_ns = now;
	n.bytes = args->bytes;
	inflight.update(&k, &n);
	return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
	struct blk_key k = {};
	k.dev = args->dev;
	k.sector = args->sector;
	k.op = BLK_OP(args);
	struct blk_req *p = inflight.lookup(&k);
	if (!p)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct blk_req r = *p;
	inflight.delete(&k);
	if (r.issue_ns == 0 || now < r.issue_ns)
		return 0;
	/* The waiting thread is held back from the request's creation (I/O
	 * scheduler queueing and plugging included) to its completion. */
	__u64 start = r.start_ns && r.start_ns <= r.issue_ns ? r.start_ns : r.issue_ns;
	__u64 d = now - start;

	struct iso_hist_key hk = {};
	hk.cgroup_id = r.cgroup_id;
	hk.class_id = k.dev;
	__u32 slot = bpf_log2l(d);
	hk.slot = slot < ISO_HIST_SLOTS ? slot : ISO_HIST_SLOTS - 1;
	hist.atomic_increment(hk);
	struct iso_hist_key tk = {};
	tk.cgroup_id = r.cgroup_id;
	tk.class_id = k.dev;
	struct iso_total zt = {};
	struct iso_total *t = totals.lookup_or_try_init(&tk, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	__u32 dev = k.dev;
	if (!virtio_devs.lookup(&dev))
		return 0;
	if (!r.watched && d < ISO_MIN_STALL_NS)
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
	e->component = ISO_C_VIRTIO_IO;
	e->start_ns = start;
	e->end_ns = now;
	e->cgroup_id = r.cgroup_id;
	e->pid = r.pid;
	e->tid = r.tid;
	e->cpu = -1;                 /* waiting on the device, not on a CPU */
	e->detail = k.dev;
	e->detail2 = r.bytes ? r.bytes : ((__u64)args->nr_sector << 9);
	events.ringbuf_submit(e, 0);
	return 0;
}
