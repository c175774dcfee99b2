/* Test program: one stall record per syscall of one process, into a deliberately tiny ring buffer. */
#include "isoscope.h"

BPF_RINGBUF_OUTPUT(events, ISO_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(lost_events, __u64, 1);

RAW_TRACEPOINT_PROBE(sys_enter)
{
	__u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != STORM_TGID)
		return 0;
	struct iso_stall_event *e = events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		int zero = 0;
		__u64 *lost = lost_events.lookup(&zero);
		if (lost)
			(*lost)++;
		return 0;
	}
	__u64 now = bpf_ktime_get_ns();
	e->kind = ISO_EV_STALL;
	e->component = ISO_C_SYSCALL;
	e->start_ns = now;
	e->end_ns = now + 1;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->cpu = bpf_get_smp_processor_id();
	e->detail = ISO_SC_OTHER;
	e->detail2 = 0;
	events.ringbuf_submit(e, 0);
	return 0;
}
