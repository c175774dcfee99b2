/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Network-namespace crossing (l3.netns): per packet, the time from
 * net_dev_queue on a veth to netif_receive_skb on its peer, keyed by the skb
 * address (a tracepoint argument, used as a key only, never dereferenced).
 *
 * veth_ifaces: user space writes the name of every veth device it found (in
 * any namespace) with its ifindex. Interface names are all the tracepoints
 * give; both ends must be in the map, and a pairing older than
 * ISO_NETNS_MAX_NS is discarded, so a reused skb address of a physical NIC
 * with the same name as a pod-side veth cannot produce a bogus crossing.
 *
 * The crossing is charged to the task current at net_dev_queue: on veth that
 * is the sending thread (transmission is synchronous in its context).
 */
#include "isoscope.h"

#ifndef ISO_NETNS_MAX_NS
#define ISO_NETNS_MAX_NS 1000000000ull
#endif
#ifndef ISO_NETNS_MAX_INFLIGHT
#define ISO_NETNS_MAX_INFLIGHT 16384
#endif

struct ifname {
	char name[16];
};

struct skb_tx {
	__u64 ts;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	__u32 ifindex;
	__u32 watched;
};

/*
 * A veth crossing costs microseconds, so a watched thread's crossings are
 * summed in the kernel (`burst`) instead of crossing one record per packet:
 * crossings of one direction and cgroup less than ISO_NETNS_BURST_GAP_NS
 * apart join one burst, and a burst becomes one stall record once it holds
 * ISO_NETNS_BURST_NS of crossing time, or when the thread's next crossing
 * starts a new burst. The record covers the burst's crossing time, ending at
 * its last crossing: exact in total, placed within the burst. A burst still
 * open when its thread goes quiet stays below ISO_NETNS_BURST_NS.
 */
#ifndef ISO_NETNS_BURST_GAP_NS
#define ISO_NETNS_BURST_GAP_NS 1000000ull
#endif
#ifndef ISO_NETNS_BURST_NS
#define ISO_NETNS_BURST_NS 50000ull
#endif

struct nn_burst {
	__u64 last_end;
	__u64 sum_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 ifindex;
	__u32 rx_ifindex;
	__u32 pad;
};

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

BPF_HASH(watched_tgids, __u32, __u8, ISO_MAX_WATCHED_TGIDS);
BPF_HASH(watched_cgroups, __u64, __u8, ISO_MAX_WATCHED_CGROUPS);
BPF_ARRAY(watch_all, __u32, 1);

BPF_HASH(veth_ifaces, struct ifname, __u32, 4096);
/* LRU: a thread that exits with an open burst ages out. */
BPF_TABLE("lru_hash", __u32, struct nn_burst, burst, 16384);
/* LRU: a queued skb that is never received (peer down, dropped) ages out. */
BPF_TABLE("lru_hash", __u64, struct skb_tx, skbs, ISO_NETNS_MAX_INFLIGHT);
BPF_HASH(hist, struct iso_hist_key, __u64, 8192);              /* (cgroup, tx ifindex, log2 ns) */
BPF_HASH(totals, struct iso_hist_key, struct iso_total, 4096); /* (cgroup, tx ifindex, 0) */

static inline __attribute__((always_inline)) __u32 nn_watched(__u64 cg, __u32 tgid)
{
	__u32 zero = 0;
	__u32 *all = watch_all.lookup(&zero);
	if (all && *all)
		return 1;
	if (watched_cgroups.lookup(&cg))
		return 1;
	return watched_tgids.lookup(&tgid) != 0;
}

static inline __attribute__((always_inline)) void nn_emit(__u32 tid, struct nn_burst *b)
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
	e->component = ISO_C_NETNS;
	e->start_ns = b->last_end - b->sum_ns;
	e->end_ns = b->last_end;
	e->cgroup_id = b->cgroup_id;
	e->pid = b->pid;
	e->tid = tid;
	e->cpu = -1;
	e->detail = b->ifindex;
	e->detail2 = b->rx_ifindex;
	events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(net, net_dev_queue)
{
	struct ifname n = {};
	TP_DATA_LOC_READ_STR(n.name, name, sizeof(n.name));
	__u32 *ifindex = veth_ifaces.lookup(&n);
	if (!ifindex)
		return 0;
	__u64 skb = (__u64)args->skbaddr;
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct skb_tx v = {};
	v.ts = bpf_ktime_get_ns();
	v.cgroup_id = bpf_get_current_cgroup_id();
	v.pid = pid_tgid >> 32;
	v.tid = (__u32)pid_tgid;
	v.ifindex = *ifindex;
	v.watched = nn_watched(v.cgroup_id, v.pid);
	skbs.update(&skb, &v);
	return 0;
}

TRACEPOINT_PROBE(net, netif_receive_skb)
{
	__u64 skb = (__u64)args->skbaddr;
	struct skb_tx *p = skbs.lookup(&skb);
	if (!p)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct skb_tx v = *p;
	skbs.delete(&skb);
	struct ifname n = {};
	TP_DATA_LOC_READ_STR(n.name, name, sizeof(n.name));
	__u32 *rx_ifindex = veth_ifaces.lookup(&n);
	if (!rx_ifindex || now < v.ts || now - v.ts > ISO_NETNS_MAX_NS)
		return 0;
	__u64 d = now - v.ts;

	struct iso_hist_key hk = {};
	hk.cgroup_id = v.cgroup_id;
	hk.class_id = v.ifindex;
	__u32 slot = bpf_log2l(d);
	hk.slot = slot < ISO_HIST_SLOTS ? slot : ISO_HIST_SLOTS - 1;
	hist.atomic_increment(hk);
	struct iso_hist_key tk = {};
	tk.cgroup_id = v.cgroup_id;
	tk.class_id = v.ifindex;
	struct iso_total zt = {};
	struct iso_total *t = totals.lookup_or_try_init(&tk, &zt);
	if (t) {
		__sync_fetch_and_add(&t->count, 1);
		__sync_fetch_and_add(&t->sum_ns, d);
	}

	/* This crossing as a burst of its own. */
	struct nn_burst nb = {};
	nb.last_end = now;
	nb.sum_ns = d;
	nb.cgroup_id = v.cgroup_id;
	nb.pid = v.pid;
	nb.ifindex = v.ifindex;
	nb.rx_ifindex = *rx_ifindex;
	if (!v.watched) {
		if (d >= ISO_MIN_STALL_NS)
			nn_emit(v.tid, &nb);
		return 0;
	}
	__u32 tid = v.tid;
	struct nn_burst *b = burst.lookup(&tid);
	/* A burst is one direction of one cgroup: its record names them. A crossing
	 * charged to this thread in another direction (an ARP reply the kernel sends
	 * in softirq while the thread is current) starts a burst of its own. */
	if (b && v.ts <= b->last_end + ISO_NETNS_BURST_GAP_NS && b->ifindex == nb.ifindex &&
	    b->rx_ifindex == nb.rx_ifindex && b->cgroup_id == nb.cgroup_id) {
		b->last_end = now > b->last_end ? now : b->last_end;
		b->sum_ns += d;
		if (b->sum_ns >= ISO_NETNS_BURST_NS) {
			nn_emit(tid, b);
			burst.delete(&tid);
		}
		return 0;
	}
	if (b) {
		nn_emit(tid, b);  /* the previous burst ended: a pause, or another direction */
	}
	if (d >= ISO_NETNS_BURST_NS) {
		nn_emit(tid, &nb);
		burst.delete(&tid);
		return 0;
	}
	burst.update(&tid, &nb);
	return 0;
}
