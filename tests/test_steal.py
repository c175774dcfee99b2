"""StealSampler: per-CPU steal from /proc/stat, interpolation, and overlay on run segments."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from isoscope.model import RunSegment
from isoscope.host.steal import StealSampler, parse_steal_ticks, read_steal_ticks, user_hz


def _direct_steal_ticks() -> dict[int, int]:
    """Independent parse of /proc/stat: field 8 of every cpuN line."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[int(name[3:])] = int(vals[7])
    return out


def test_totals_agree_with_proc_stat_over_the_same_interval() -> None:
    """Sampler totals and interval steal vs direct /proc/stat reads taken at the same instants."""
    tick = 1e9 / user_hz()
    s = StealSampler(interval_s=0.01, idle_interval_s=0.01)  # fixed-rate: this test counts samples
    s.start()
    try:
        d0, t0 = _direct_steal_ticks(), time.monotonic_ns()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # keep a vCPU busy so the hypervisor has steal to report
            pass
        d1, t1 = _direct_steal_ticks(), time.monotonic_ns()
        time.sleep(0.05)
        totals = s.totals()
    finally:
        s.shutdown()
    assert s.samples >= 10  # the busy loop above holds the GIL; the sampler still ran throughout
    assert set(totals) == set(d1) == set(range(len(d1)))
    for cpu, ticks in d1.items():
        # Absolute cumulative steal (non-zero on this KVM guest): within 5 % or one tick of a direct read.
        assert abs(totals[cpu] * 1e9 - ticks * tick) <= max(0.05 * ticks * tick, tick) + 1
        # Steal over the interval: the sampler's interpolation vs the direct delta, ±1 tick of sampling skew.
        got = s.steal_ns(cpu, t0, t1)
        want = (d1[cpu] - d0[cpu]) * tick
        assert abs(got - want) <= max(0.05 * want, tick) + 1, (cpu, got, want)


def test_interpolation_and_overlay(tmp_path: Path) -> None:
    """A procfs tree with known steal: interval queries and overlay are linear inside sample gaps."""
    (tmp_path / "stat").write_text("")
    now = [0]
    s = StealSampler(proc_root=str(tmp_path), clock=lambda: now[0])
    tick = s.resolution_ns

    def put(t_ns: int, steal0: int, steal1: int) -> None:
        (tmp_path / "stat").write_text(
            "cpu  1 2 3 4 5 6 7 9 0 0\n"
            f"cpu0 1 2 3 4 5 6 7 {steal0} 0 0\n"
            f"cpu1 1 2 3 4 5 6 7 {steal1} 0 0\n"
            "intr 0\n")
        now[0] = t_ns
        s.sample()

    put(1_000_000_000, 100, 7)
    put(1_100_000_000, 100, 7)
    put(1_200_000_000, 100, 7)     # flat run: collapsed, not grown
    put(1_300_000_000, 110, 7)     # 10 ticks of steal on cpu0 in (1.2 s, 1.3 s]
    assert read_steal_ticks(str(tmp_path)) == {0: 110, 1: 7}
    assert s.totals() == {0: 110 * tick / 1e9, 1: 7 * tick / 1e9}
    assert s.steal_ns(0, 1_000_000_000, 1_200_000_000) == 0
    assert s.steal_ns(0, 1_200_000_000, 1_300_000_000) == pytest.approx(10 * tick)
    assert s.steal_ns(0, 1_225_000_000, 1_275_000_000) == pytest.approx(5 * tick)
    assert s.steal_ns(1, 0, 2_000_000_000) == 0
    assert s.steal_ns(7, 0, 2_000_000_000) == 0  # unknown CPU

    segs = [
        RunSegment(tid=1, pid=1, cgroup_id=0, cpu=0, start_mono_ns=1_250_000_000, end_mono_ns=1_400_000_000),
        RunSegment(tid=1, pid=1, cgroup_id=0, cpu=1, start_mono_ns=1_200_000_000, end_mono_ns=1_300_000_000),
        RunSegment(tid=1, pid=1, cgroup_id=0, cpu=0, start_mono_ns=1_000_000_000, end_mono_ns=1_210_000_000),
    ]
    # cpu0 steals 10 ticks uniformly over (1.2, 1.3]: segment 1 sees half of it inside the window;
    # segment 3 overlaps the steal for 10 ms of its clipped part (1.2..1.21) = one tick; cpu1 none.
    assert s.overlay(segs, 1_000_000_000, 1_300_000_000) == pytest.approx(5 * tick + 1 * tick, abs=1)
    assert s.overlay(segs, 1_260_000_000, 1_270_000_000) == pytest.approx(1 * tick, abs=1)

    # Bounded: a flat run never grows the ring.
    for i in range(50):
        put(1_400_000_000 + i * 10_000_000, 110, 7)
    assert s.steal_ns(0, 1_300_000_000, 2_000_000_000) == 0


def test_real_resolution_is_user_hz() -> None:
    """/proc/stat steal is exported in USER_HZ ticks: the finest steal granularity a guest can read."""
    assert StealSampler().resolution_ns == 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert read_steal_ticks() .keys() == _direct_steal_ticks().keys()


def test_parse_steal_ticks_reads_the_eighth_counter_of_cpu_lines_only() -> None:
    data = (b"cpu  1 2 3 4 5 6 7 99 0 0\n"
            b"cpu0 1 2 3 4 5 6 7 8 9 10\n"
            b"cpu12 10 20 30 40 50 60 70 80\n"
            b"cpu3 1 2 3 4 5 6 7\n"          # a kernel without the steal column
            b"intr 1 2 3\ncpufreq 5\nctxt 9\n")
    assert parse_steal_ticks(data) == {0: 8, 12: 80, 3: 0}
    assert parse_steal_ticks(Path("/proc/stat").read_bytes()).keys() == _direct_steal_ticks().keys()


def test_sampling_is_fine_while_steal_moves_and_coarse_while_flat(tmp_path: Path) -> None:
    """A flat counter proves zero steal at any period: the sampler backs off to ``idle_interval_s``
    then, samples every ``interval_s`` for ``hot_hold_s`` after any change, and coarsely while no
    thread is watched; the steal it reports over flat and moving stretches is the same either way."""
    now = [0]
    watched = [True]
    s = StealSampler(proc_root=str(tmp_path), interval_s=0.01, idle_interval_s=0.1, hot_hold_s=0.5,
                     clock=lambda: now[0], watching=lambda: watched[0])
    tick = s.resolution_ns

    def put(t_ms: int, steal0: int) -> None:
        (tmp_path / "stat").write_text(f"cpu  0 0 0 0 0 0 0 {steal0} 0 0\ncpu0 0 0 0 0 0 0 0 {steal0} 0 0\n")
        now[0] = t_ms * 1_000_000
        s.sample()

    put(0, 50)
    assert s.next_interval_s() == 0.1           # nothing moved yet
    put(100, 50)
    put(200, 50)
    assert s.next_interval_s() == 0.1           # flat: coarse
    put(300, 52)                                # steal starts: 2 ticks somewhere in (200, 300] ms
    assert s.next_interval_s() == 0.01
    put(310, 53)
    put(320, 53)
    now[0] = 800 * 1_000_000
    assert s.next_interval_s() == 0.01          # within hot_hold_s of the last change (310 ms)
    now[0] = 811 * 1_000_000
    assert s.next_interval_s() == 0.1           # flat for longer than hot_hold_s
    put(820, 53)
    assert s.steal_ns(0, 0, 200_000_000) == 0   # flat stretch: exactly no steal, at any period
    assert s.steal_ns(0, 300_000_000, 310_000_000) == pytest.approx(tick)  # fine samples place the tick
    assert s.steal_ns(0, 0, 820_000_000) == pytest.approx(3 * tick)
    put(830, 60)
    watched[0] = False
    assert s.next_interval_s() == 0.1           # moving, but no thread to charge it to
    watched[0] = True
    assert s.next_interval_s() == 0.01
    fixed = StealSampler(proc_root=str(tmp_path), interval_s=0.01, idle_interval_s=0.001)
    assert fixed.idle_interval_s == 0.01        # the coarse period is never finer than the fine one
    s.shutdown()
    fixed.shutdown()
