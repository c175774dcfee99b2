// Smallest program that proves the chosen kernel headers compile on the
// running kernel: a kernel header is included, a tracepoint argument is read
// (its layout comes from tracefs), maps are updated, and the filter value
// arrives through cflags.
#include <linux/sched.h>

#ifndef ISO_TARGET_TGID
#error "ISO_TARGET_TGID must be passed with -D"
#endif

BPF_ARRAY(hits, u64, 1);
BPF_ARRAY(last_nr, s64, 1);
BPF_ARRAY(comm_len, u32, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != ISO_TARGET_TGID)
        return 0;
    int zero = 0;
    u64 *count = hits.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    s64 nr = args->__syscall_nr;
    last_nr.update(&zero, &nr);
    u32 len = TASK_COMM_LEN;
    comm_len.update(&zero, &len);
    return 0;
}
