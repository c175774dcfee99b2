"""Every probe isoscope knows, declared in one place.

Order matters only for start-up logs. Required probes make the daemon report
itself degraded when missing; optional extras (kprobe/fentry) only improve
precision where the kernel allows them.
"""

from __future__ import annotations

from isoscope.probes import hooks
from isoscope.probes.spec import ProbeSpec, fentry, kprobe, perf_event, raw_tp, tp


def _sched_defines() -> dict[str, int | str]:
    from isoscope.kernel.btf import sched_defines
    defines: dict[str, int | str] = dict(sched_defines())
    how = "task flag" if "ISO_OFF_TASK_THROTTLED" in defines else "idle CPU while waiting"
    defines["ISO_METHOD"] = f"raw tracepoints + BTF offsets; throttling by {how}"
    return defines


def _cfs_throttle_defines() -> dict[str, int | str]:
    from isoscope.kernel.btf import cfs_throttle_defines
    return dict(cfs_throttle_defines("/sys/kernel/btf/vmlinux"))

SCHED = ProbeSpec(
    name="sched",
    source="sched.bpf.c",
    summary="run-queue waits per thread and cgroup; CFS throttling told apart from CPU contention "
            "(tracepoint method); on-CPU segments of watched threads for steal",
    # cgroup_attach_task only makes a moved thread's cached cgroup id stale at once (else within 10 ms).
    attach=(raw_tp("sched:sched_wakeup"), raw_tp("sched:sched_wakeup_new"), raw_tp("sched:sched_switch"),
            raw_tp("sched:sched_process_exit"), raw_tp("cgroup:cgroup_attach_task", required=False)),
    fallback="no run-queue, throttling or steal attribution",
    ringbuf_pages=256,
    kernel_defines=_sched_defines,
)

SYSCALLS = ProbeSpec(
    name="syscalls",
    source="syscalls.bpf.c",
    summary="per-class syscall latency histograms per cgroup; blocked-in-syscall intervals of watched workloads; "
            "namespace changes (unshare, setns) for the lifecycle stream",
    # task_newtask only invalidates cached per-CPU decisions (a new task may reuse a dead one's stack);
    # without it every syscall takes the task-storage path.
    attach=(raw_tp("raw_syscalls:sys_enter"), raw_tp("raw_syscalls:sys_exit"),
            raw_tp("cgroup:cgroup_attach_task", required=False), raw_tp("task:task_newtask", required=False)),
    features=("bpf", "raw_tracepoint", "ringbuf", "btf"),
    fallback="no kernel.syscall baseline",
    ringbuf_pages=1024,
    setup=hooks.setup_syscalls,
)

VMSCAN = ProbeSpec(
    name="vmscan",
    source="vmscan.bpf.c",
    summary="direct and memcg reclaim stalls; short episodes of watched threads summed per thread",
    attach=(tp("vmscan:mm_vmscan_direct_reclaim_begin"), tp("vmscan:mm_vmscan_direct_reclaim_end"),
            tp("vmscan:mm_vmscan_memcg_reclaim_begin", required=False),
            tp("vmscan:mm_vmscan_memcg_reclaim_end", required=False),
            tp("vmscan:mm_vmscan_memcg_softlimit_reclaim_begin", required=False),
            tp("vmscan:mm_vmscan_memcg_softlimit_reclaim_end", required=False),
            # Flushes a thread's summed short episodes when it sleeps (e.g. between requests), so
            # a span's reclaim has crossed by the time the span is joined.
            raw_tp("sched:sched_switch")),
    features=("bpf", "tracepoint", "raw_tracepoint", "ringbuf"),
    fallback="no memory-reclaim attribution",
)

BLOCK = ProbeSpec(
    name="block",
    source="block.bpf.c",
    summary="block request time per device; time on virtio disks attributed to the waiting thread",
    attach=(tp("block:block_rq_issue"), tp("block:block_rq_complete"), tp("block:block_io_start", required=False)),
    features=("bpf", "tracepoint", "ringbuf"),
    fallback="no virtio_io attribution",
    setup=hooks.setup_block,
)

LIFECYCLE = ProbeSpec(
    name="lifecycle",
    source="lifecycle.bpf.c",
    summary="process exec/exit/fork, clone with CLONE_NEW* and cgroup mkdir/rmdir/attach, so tracked sets "
            "follow workloads as they come and go (unshare and setns come from the syscalls probe)",
    # No syscalls:* tracepoint here: attaching any of them routes every syscall on the node through the
    # syscall-tracing dispatch (about 60 ns each). Clone flags come with task_newtask.
    attach=(tp("task:task_newtask"), tp("sched:sched_process_exec"), tp("sched:sched_process_exit"),
            tp("cgroup:cgroup_mkdir", required=False), tp("cgroup:cgroup_rmdir", required=False),
            tp("cgroup:cgroup_attach_task", required=False)),
    features=("bpf", "tracepoint", "ringbuf"),
    fallback="workloads are discovered from /proc scans only",
)

NETNS = ProbeSpec(
    name="netns",
    source="netns.bpf.c",
    summary="per-packet veth crossing time between network namespaces (l3.netns), per pod",
    attach=(tp("net:net_dev_queue"), tp("net:netif_receive_skb"), tp("net:netif_rx", required=False)),
    features=("bpf", "tracepoint", "ringbuf"),
    required=False,
    fallback="no netns crossing attribution",
    setup=hooks.VethTable,
)

KVM = ProbeSpec(
    name="kvm",
    source="kvm.bpf.c",
    summary="KVM exits per vCPU thread by reason (host side): EPT → L-0, HLT/MSR/CPUID/... → L-1, "
            "PIO/MMIO/hypercall → L-2",
    attach=(tp("kvm:kvm_exit"), tp("kvm:kvm_entry"), tp("kvm:kvm_pio", required=False),
            tp("kvm:kvm_mmio", required=False), tp("kvm:kvm_fast_mmio", required=False),
            tp("kvm:kvm_hypercall", required=False), tp("sched:sched_process_exit")),
    features=("bpf", "tracepoint", "ringbuf"),
    required=False,
    fallback="no host-side VM-exit attribution (only matters on nodes that run VMs)",
    setup=hooks.KvmRuntime,
)

SANDBOX_SAMPLE_NS = 1_000_000
"""CPU-clock sampling period of sandbox runtimes: 1 ms, so a span's sandbox time has ~1 ms grain."""

SANDBOX = ProbeSpec(
    name="sandbox",
    source="sandbox.bpf.c",
    summary="CPU samples of WASM runtimes (guest code vs. WASI and other host calls) and gVisor Sentries; "
            "the runtimes' own time is l4.sandbox",
    attach=(perf_event("software:cpu-clock", SANDBOX_SAMPLE_NS),),
    features=("bpf", "ringbuf"),
    required=False,
    fallback="WASM and gVisor workloads are detected, but their sandbox time is not measured",
    cflags=(f"-DISO_SBX_SAMPLE_NS={SANDBOX_SAMPLE_NS}ull",),
    method="perf event sampling",
    setup=hooks.SandboxRuntime,  # closes the perf events while no sandbox runtime is watched
)

CFS_THROTTLE_FENTRY = ProbeSpec(
    name="cfs_throttle_fentry",
    source="cfs_throttle.bpf.c",
    summary="exact CFS throttle/unthrottle events per cgroup via fentry (cheapest exact method)",
    attach=(fentry("throttle_cfs_rq", required=True), fentry("unthrottle_cfs_rq", required=True)),
    features=("bpf", "fentry", "ringbuf"),
    required=False,
    fallback="CFS throttling measured with the tracepoint method",
    kernel_defines=_cfs_throttle_defines,
    cflags=("-DISO_CFS_ATTACH_FENTRY=1",),  # one source, two ways of hooking the same functions
    method="fentry",
)

CFS_THROTTLE_KPROBE = ProbeSpec(
    name="cfs_throttle_kprobe",
    source="cfs_throttle.bpf.c",
    summary="exact CFS throttle/unthrottle events per cgroup via kprobes",
    attach=(kprobe("throttle_cfs_rq", required=True), kprobe("unthrottle_cfs_rq", required=True)),
    features=("bpf", "kprobes", "ringbuf"),
    required=False,
    fallback="CFS throttling measured with the tracepoint method",
    kernel_defines=_cfs_throttle_defines,
    cflags=("-DISO_CFS_ATTACH_KPROBE=1",),
    method="kprobe",
)

ALL_PROBES: tuple[ProbeSpec, ...] = (
    SCHED, SYSCALLS, VMSCAN, BLOCK, LIFECYCLE, NETNS, KVM, SANDBOX, CFS_THROTTLE_FENTRY, CFS_THROTTLE_KPROBE,
)


def by_name(names: list[str] | None = None) -> list[ProbeSpec]:
    """The declared probes, optionally restricted to ``names`` (unknown names raise ``KeyError``)."""
    if names is None:
        return list(ALL_PROBES)
    index = {p.name: p for p in ALL_PROBES}
    return [index[n] for n in names]
