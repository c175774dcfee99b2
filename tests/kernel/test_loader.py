"""The probe loader on the running kernel: degrade alone, count losses, decode, detach."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from isoscope.model import Stall, Stats
from isoscope.probes import catalog
from isoscope.probes.loader import ProbeManager
from isoscope.probes.spec import ProbeSpec, raw_tp, tp
from isoscope.join.timeline import Timeline

pytestmark = pytest.mark.kernel

DATA = Path(__file__).resolve().parents[1] / "data"


def test_missing_tracepoint_degrades_that_probe_only(kernel_env) -> None:
    ghost = ProbeSpec(name="ghost", source="vmscan.bpf.c", summary="test",
                      attach=(tp("nosuchcategory:nosuch_event"),), features=("bpf", "tracepoint", "ringbuf"),
                      fallback="no ghost data")
    stats = Stats()
    mgr = ProbeManager([ghost, catalog.VMSCAN], kernel_env.features, lambda ev: None, stats)
    try:
        by = {s.name: s for s in mgr.load()}
        assert not by["ghost"].attached
        assert "tracepoint nosuchcategory:nosuch_event is not present in this kernel" in by["ghost"].reason
        assert "no ghost data" in by["ghost"].reason
        assert by["vmscan"].attached, by["vmscan"].reason
        assert stats.gauge("probe_attached", ("ghost",)) == 0.0
        assert stats.gauge("probe_attached", ("vmscan",)) == 1.0
    finally:
        mgr.shutdown()
    assert mgr.loaded_modules() == []


def test_missing_feature_names_the_fallback(kernel_env) -> None:
    stats = Stats()
    mgr = ProbeManager([catalog.CFS_THROTTLE_KPROBE], kernel_env.features, lambda ev: None, stats)
    try:
        (status,) = mgr.load()
    finally:
        mgr.shutdown()
    if kernel_env.features.kprobes:
        assert status.attached
    else:
        assert not status.attached
        assert "kprobes" in status.reason and "tracepoint method" in status.reason


def test_compile_error_is_reported_not_raised(kernel_env, tmp_path) -> None:
    broken = ProbeSpec(name="broken", source="does_not_exist.bpf.c", summary="test",
                       attach=(raw_tp("raw_syscalls:sys_enter"),))
    mgr = ProbeManager([broken], kernel_env.features, lambda ev: None, Stats())
    try:
        (status,) = mgr.load()
    finally:
        mgr.shutdown()
    assert not status.attached and "could not compile/attach" in status.reason


def test_ring_buffer_overflow_is_counted_and_lowers_coverage(kernel_env) -> None:
    storm = ProbeSpec(name="storm", source="storm.bpf.c", summary="test", attach=(raw_tp("raw_syscalls:sys_enter"),),
                      cflags=(f"-DSTORM_TGID={os.getpid()}",), ringbuf_pages=1)
    events: list = []
    stats = Stats()
    tl = Timeline()
    mgr = ProbeManager([storm], kernel_env.features, events.append, stats, bpf_dir=DATA,
                       on_loss=lambda probe, n, a, b: tl.note_loss(probe, a, b))
    try:
        (status,) = mgr.load()
        assert status.attached, status.reason
        tl.set_probe_up("storm", True)
        mgr.poll()
        base = mgr.check_losses()["storm"]  # loading itself makes syscalls the tiny ring may drop
        # a quiet window: a handful of syscalls fit in the ring, nothing is lost
        q0 = time.monotonic_ns()
        q1 = time.monotonic_ns()
        mgr.poll()
        assert mgr.check_losses()["storm"] == base
        assert tl.coverage(q0, q1, drained_until=q1) == 1.0
        t0 = time.monotonic_ns()
        for _ in range(20000):  # far more records than one page of ring buffer holds
            os.getppid()
        mgr.poll()
        totals = mgr.check_losses()
        t1 = time.monotonic_ns()
        assert totals["storm"] > base
        assert stats.counter("kernel_events_lost_total", ("storm",)) == totals["storm"]
        assert status.lost_events == totals["storm"]
        decoded = [e for e in events if isinstance(e, Stall)]
        assert decoded and all(e.pid == os.getpid() and e.component == "syscall" for e in decoded)
        assert 0 < len(decoded) < 20000
        assert tl.coverage(t0, t1, drained_until=t1) < 1.0
    finally:
        mgr.shutdown()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


def test_compiler_code_pages_are_released_and_compiling_still_works(kernel_env) -> None:
    from isoscope.probes.memory import release_compiler_pages

    first = ProbeManager([catalog.VMSCAN], kernel_env.features, lambda ev: None, Stats())
    try:
        first.load()  # compiles, then releases LLVM/Clang code pages
        after_release = _rss_file_kb()
        # Touch the compiler again: pages fault back in from the library files.
        second = ProbeManager([catalog.BLOCK], kernel_env.features, lambda ev: None, Stats())
        try:
            (status,) = second.load()
            assert status.attached, status.reason
        finally:
            second.shutdown()
    finally:
        first.shutdown()
    mgr = ProbeManager([catalog.VMSCAN], kernel_env.features, lambda ev: None, Stats())
    try:
        mgr.load()
    finally:
        mgr.shutdown()
    released = release_compiler_pages()
    assert released > 10 * 1024 * 1024  # LLVM and Clang code mappings exist and were advised
    assert _rss_file_kb() <= after_release + 8 * 1024


def _compiled_functions(spec: ProbeSpec, extra: tuple[str, ...] = ()) -> list[str]:
    """Compile a probe as the loader would (its cflags and BTF defines) without loading or attaching it."""
    from bcc import BPF, lib

    from isoscope.probes.sources import BPF_DIR

    class CompileOnly(BPF):
        def _trace_autoload(self) -> None:  # no program is loaded into the kernel, none attached
            pass

    mgr = ProbeManager([spec], None, lambda ev: None, Stats())  # type: ignore[arg-type]
    defines = dict(spec.kernel_defines()) if spec.kernel_defines else {}
    defines.pop("ISO_METHOD", None)
    flags = mgr.cflags_for(spec, [f"-D{k}={v}" for k, v in defines.items()]) + list(extra)
    bpf = CompileOnly(src_file=str(BPF_DIR / spec.source).encode(), cflags=flags)
    try:
        return [lib.bpf_function_name(bpf.module, i).decode() for i in range(lib.bpf_num_functions(bpf.module))]
    finally:
        bpf.cleanup()


def test_one_cfs_throttle_source_builds_for_each_attach_method(kernel_env) -> None:
    # Both catalog entries compile the same file; their cflags select the hook kind, nothing edits the text.
    assert catalog.CFS_THROTTLE_FENTRY.source == catalog.CFS_THROTTLE_KPROBE.source == "cfs_throttle.bpf.c"
    assert sorted(_compiled_functions(catalog.CFS_THROTTLE_FENTRY)) == [
        "kfunc__throttle_cfs_rq", "kfunc__unthrottle_cfs_rq"]
    assert sorted(_compiled_functions(catalog.CFS_THROTTLE_KPROBE)) == [
        "kprobe__throttle_cfs_rq", "kprobe__unthrottle_cfs_rq"]
    plain = ProbeSpec(name="cfs_plain", source="cfs_throttle.bpf.c", summary="test",
                      attach=catalog.CFS_THROTTLE_KPROBE.attach, kernel_defines=catalog.CFS_THROTTLE_KPROBE.kernel_defines)
    with pytest.raises(Exception, match="Failed to compile"):
        _compiled_functions(plain)  # no method chosen: refused by #error
    with pytest.raises(Exception, match="Failed to compile"):
        _compiled_functions(catalog.CFS_THROTTLE_KPROBE, ("-DISO_CFS_ATTACH_FENTRY=1",))  # both: refused
