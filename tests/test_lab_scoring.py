"""The lab's referee on its own: how a span's verdict is judged against its ``test.truth.*`` oracle."""

from __future__ import annotations

from isoscope.report import SpanRecord
from isoscope_lab import truth as T
from isoscope_lab.scenario import blame_agrees_with_truth, expected_blame

MS = 1_000_000


def _span(blame: str = "", **truth_ms: float) -> SpanRecord:
    keys = {"runqueue": T.RUNQUEUE, "cpu_throttle": T.THROTTLE, "memory_reclaim": T.RECLAIM,
            "virtio_io": T.IO, "steal": T.STEAL}
    attrs = {keys[c]: int(ms * MS) for c, ms in truth_ms.items()}
    if blame:
        attrs["isolation.blame"] = blame
    return SpanRecord("t", "s", "", "GET", "hop", 0, 100 * MS, attrs)


def test_the_dominant_component_is_the_verdict() -> None:
    s = _span("l3.cpu_throttle", cpu_throttle=50, runqueue=10)
    assert expected_blame(s) == "cpu_throttle"
    assert blame_agrees_with_truth(s)
    assert not blame_agrees_with_truth(_span("l3.runqueue", cpu_throttle=50, runqueue=10))
    assert not blame_agrees_with_truth(_span("", cpu_throttle=50))
    assert blame_agrees_with_truth(_span("", cpu_throttle=5))


def test_run_delay_inside_reclaim_is_not_held_against_a_reclaim_verdict() -> None:
    # 40 ms in reclaim, 30 of them preempted: PSI says 40, schedstat's run delay says 45 (30 + 15 outside).
    s = _span("l3.memory_reclaim", memory_reclaim=40, runqueue=45)
    assert expected_blame(s) == "runqueue"  # what the raw oracle says
    assert blame_agrees_with_truth(s)       # what it cannot rule out
    # Run-queue time beyond everything reclaim can explain still wins.
    assert not blame_agrees_with_truth(_span("l3.memory_reclaim", memory_reclaim=20, runqueue=70))
    assert blame_agrees_with_truth(_span("l3.runqueue", memory_reclaim=20, runqueue=70))


def test_no_blame_is_right_when_the_overlap_may_take_the_span_under_the_threshold() -> None:
    # 12 ms reclaim + 12 ms run delay could be 12 ms in all (all preempted in reclaim): under 20 %.
    assert blame_agrees_with_truth(_span("", memory_reclaim=12, runqueue=12))
    assert not blame_agrees_with_truth(_span("", memory_reclaim=12, cpu_throttle=12))


def test_virtio_ns_must_lie_between_the_disks_and_the_threads_read_time() -> None:
    from isoscope_lab.scenario import bracketed, score

    def io_span(measured_ms: float, device_ms: float | None, thread_ms: float) -> SpanRecord:
        s = _span(virtio_io=thread_ms)
        s.attrs.update({T.FAULT: "virtio_io", "isolation.l2.virtio_io.ns": int(measured_ms * MS),
                        "isolation.overhead.ratio": 0.1})
        if device_ms is not None:
            s.attrs[T.DEVICE_READ] = int(device_ms * MS)
        return s

    assert bracketed(11 * MS, 10 * MS, 13 * MS)
    assert bracketed(13_500_000, 10 * MS, 13 * MS)  # over the top, within ±2 ms
    assert not bracketed(40 * MS, 10 * MS, 13 * MS)
    assert not bracketed(int(7.5 * MS), 10 * MS, 13 * MS)
    (h,) = score([io_span(11, 10, 13), io_span(30, 10, 13), io_span(12, None, 13)])
    assert (h.device_spans, h.device_bracketed, h.device_ms) == (2, 1, 10.0)
