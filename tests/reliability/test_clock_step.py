"""Wall-clock steps while running: joins stay correct once the offset is re-measured.

Stepping the real system clock would move it for every process on the machine
(and every other test running on it), so the step is injected instead: the
daemon's own offset measurement (``isoscope.kernel.clock.measure_offset``) is given a
wall clock that runs ahead of or behind the real one, and spans are stamped with
that same stepped clock, as a sender on a stepped machine would stamp them. The
pipeline, timeline, resolver and attributor are the real ones, in process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest

from isoscope.kernel import clock as clock_mod
from isoscope.join.attribution import Attributor
from isoscope.kernel.clock import MonoWallClock
from isoscope.config import AttributionConfig
from isoscope.metadata.resolver import WorkloadResolver
from isoscope.model import Stall, Stats, TraceBatch
from isoscope.pipeline.processor import EnrichPipeline
from isoscope.join.timeline import Timeline
from tests.otlp_backend import make_request

logger = logging.getLogger(__name__)

STALL_NS = 20_000_000


class SteppableWall:
    """The real wall clock plus an offset that a test can step."""

    def __init__(self) -> None:
        self.shift_ns = 0

    def __call__(self) -> int:
        return time.time_ns() + self.shift_ns


def _attr(span: Any, key: str) -> Any:
    for kv in span.attributes:
        if kv.key == key:
            return getattr(kv.value, kv.value.WhichOneof("value"))
    return None


@pytest.fixture
def stepped(monkeypatch: pytest.MonkeyPatch) -> Any:
    wall = SteppableWall()
    real = clock_mod.measure_offset
    monkeypatch.setattr(clock_mod, "measure_offset",
                        lambda samples=5, wall_fn=wall, mono=time.monotonic_ns: real(samples, wall_fn, mono))
    stats = Stats()
    clk = MonoWallClock(on_step=lambda d: stats.inc("clock_steps_total"))
    timeline = Timeline()
    timeline.set_probe_up("sched", True, at_mono_ns=0)
    out: list[TraceBatch] = []
    pipe = EnrichPipeline(resolver=WorkloadResolver(), attributor=Attributor(timeline), clock=clk,
                          drained_until=lambda: time.monotonic_ns() + 10**12, cfg=AttributionConfig(),
                          stats=stats, output=out.append)
    return wall, clk, timeline, pipe, stats


_slot = iter(range(1, 1000))


def _span_over_stall(wall: SteppableWall, timeline: Timeline, real_offset_ns: int) -> tuple[TraceBatch, int]:
    """A runqueue stall of this thread, and a span around it stamped with the (stepped) wall clock.

    Each call uses its own 100 ms slot so one span's window never covers another's stall.
    """
    tid, pid = threading.get_native_id(), os.getpid()
    m0 = time.monotonic_ns() + next(_slot) * 100_000_000
    timeline.add_stall(Stall("runqueue", m0 + 10_000_000, m0 + 10_000_000 + STALL_NS, tid, pid))
    req = make_request([42])
    attr = req.resource_spans[0].resource.attributes.add()
    attr.key, attr.value.int_value = "process.pid", pid
    span = req.resource_spans[0].scope_spans[0].spans[0]
    t = span.attributes.add()
    t.key, t.value.int_value = "thread.id", tid
    # The sender's clock is the stepped one: wall = mono + real offset + step.
    span.start_time_unix_nano = m0 + real_offset_ns + wall.shift_ns
    span.end_time_unix_nano = span.start_time_unix_nano + 50_000_000
    # The sender is this process (as the receiver would have found from its socket).
    return TraceBatch(req, "grpc", 1, peer_pid=pid), m0


@pytest.mark.parametrize("step_s", [+2.0, -2.0, +3600.0])
def test_join_is_correct_after_a_step_once_the_offset_is_re_measured(stepped, step_s):
    wall, clk, timeline, pipe, stats = stepped
    real_offset = clk.offset_ns

    # Before any step: the join finds the stall.
    batch, _ = _span_over_stall(wall, timeline, real_offset)
    pipe.enrich(batch, time.monotonic_ns() + 10**12)
    span = batch.request.resource_spans[0].scope_spans[0].spans[0]
    assert _attr(span, "isolation.scope") == "thread"
    assert _attr(span, "isolation.l3.runqueue.ns") == STALL_NS

    wall.shift_ns = int(step_s * 1e9)
    # Stepped but not yet re-measured: the window lands elsewhere on the monotonic
    # axis and the stall is missed (this is what re-measuring exists to fix).
    stale, _ = _span_over_stall(wall, timeline, real_offset)
    pipe.enrich(stale, time.monotonic_ns() + 10**12)
    stale_span = stale.request.resource_spans[0].scope_spans[0].spans[0]
    assert not _attr(stale_span, "isolation.l3.runqueue.ns")

    delta = clk.remeasure()
    assert abs(delta - wall.shift_ns) < 5_000_000
    assert clk.steps == 1 and stats.counter("clock_steps_total") == 1

    fresh, m0 = _span_over_stall(wall, timeline, real_offset)
    pipe.enrich(fresh, time.monotonic_ns() + 10**12)
    rs = fresh.request.resource_spans[0]
    span = rs.scope_spans[0].spans[0]
    assert _attr(span, "isolation.l3.runqueue.ns") == STALL_NS
    # The child span sits at the stall's real interval on the (stepped) wall clock.
    children = [s for ss in rs.scope_spans for s in ss.spans if s.name == "isolation L-3 runqueue"]
    assert len(children) == 1
    want_start = m0 + 10_000_000 + real_offset + wall.shift_ns
    assert abs(children[0].start_time_unix_nano - want_start) < 5_000_000
    assert children[0].end_time_unix_nano - children[0].start_time_unix_nano == STALL_NS


def test_clock_thread_re_measures_on_its_own(stepped):
    """The periodic measurement (not a test call) picks the step up within a few intervals."""
    wall, clk, _timeline, _pipe, stats = stepped
    clk.interval_s = 0.05
    clk.start()
    try:
        before = clk.offset_ns
        wall.shift_ns = -2_000_000_000
        deadline = time.monotonic() + 5
        while clk.steps == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert clk.steps >= 1
        assert abs((clk.offset_ns - before) + 2_000_000_000) < 5_000_000
        assert stats.counter("clock_steps_total") >= 1
    finally:
        clk.shutdown()
