"""A join that cannot keep up forwards spans unenriched instead of refusing senders.

A real HTTP receiver in front of the processor. The processor's kernel data
never drains here (``drained_until`` stays 0) and its hold time is long, so
every batch it accepts stays in the hold queue: the state of a join that has
fallen behind. Past the queue's capacity, batches must reach the output at
once, unenriched and counted; only an output that refuses (full export
queues) makes the sender retry.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.config import AttributionConfig
from isoscope.join.attribution import Attributor
from isoscope.join.timeline import Timeline
from isoscope.kernel.clock import MonoWallClock
from isoscope.host.memguard import MemoryGuard
from isoscope.model import Backpressure, Stats, TraceBatch, Workload, iter_spans
from isoscope.pipeline.processor import EnrichPipeline
from isoscope.receivers.otlp import OtlpHttpReceiver
from isoscope.receivers.otlp.limits import held_estimate

PB = {"Content-Type": "application/x-protobuf"}


class Output:
    """The exporters' side: keeps batches, or refuses them like full export queues."""

    def __init__(self) -> None:
        self.batches: list[TraceBatch] = []
        self.full = False
        self.lock = threading.Lock()

    def __call__(self, batch: TraceBatch) -> None:
        with self.lock:
            if self.full:
                raise Backpressure("export queues are full", retry_after_s=1.0)
            self.batches.append(batch)

    def span_names(self) -> set[str]:
        with self.lock:
            return {s.name for b in self.batches for s in iter_spans(b.request)}


def _request(tag: str, n: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.int_value = "process.pid", 1
    ss = rs.scope_spans.add()
    now = time.time_ns()
    for i in range(n):
        ss.spans.add(trace_id=bytes(15) + b"\x01", span_id=bytes(7) + bytes([i + 1]), name=f"{tag}-{i}",
                     start_time_unix_nano=now - 10**6, end_time_unix_nano=now)
    return req.SerializeToString()


@pytest.fixture()
def stack():
    stats, out = Stats(), Output()
    cfg = AttributionConfig(hold_max_ms=10_000, hold_capacity_spans=10)
    pipe = EnrichPipeline(resolver=SimpleNamespace(resolve=lambda ident, tid, peer: Workload("process", pid=1)),
                          attributor=Attributor(Timeline()), clock=MonoWallClock(), drained_until=lambda: 0,
                          cfg=cfg, stats=stats, output=out)
    pipe.start()
    guard = MemoryGuard(None, max_inflight_bytes=64 << 20)
    receiver = OtlpHttpReceiver(pipe, stats, "127.0.0.1:0", memory=guard)
    url = f"http://{receiver.start()}/v1/traces"
    yield pipe, out, stats, url, guard
    receiver.shutdown(1.0)
    pipe.shutdown(0.1)


def test_a_held_batch_keeps_its_share_of_the_memory_budget_until_it_is_exported(stack) -> None:
    pipe, out, stats, url, guard = stack
    held_body = _request("held", 8)
    assert requests.post(url, data=held_body, headers=PB, timeout=10).status_code == 200
    # The receiver has answered, but the parsed batch is still in the daemon (held for the join):
    # its share of the reservation stays taken; the rest (body, decoding) was returned.
    assert pipe.held() == 1
    assert guard.reserved_bytes == held_estimate(len(held_body)) > 0
    # A batch past the hold capacity goes straight to the exporters: nothing of it stays reserved.
    assert requests.post(url, data=_request("over", 8), headers=PB, timeout=10).status_code == 200
    assert out.span_names() == {f"over-{i}" for i in range(8)}
    assert guard.reserved_bytes == held_estimate(len(held_body))
    # Shutting down forwards the held batch: the budget is whole again.
    pipe.shutdown(5.0)
    assert {f"held-{i}" for i in range(8)} <= out.span_names()
    assert guard.reserved_bytes == 0


def test_batches_past_the_hold_capacity_are_forwarded_unenriched(stack) -> None:
    pipe, out, stats, url, _ = stack
    held = requests.post(url, data=_request("held", 8), headers=PB, timeout=10)
    assert held.status_code == 200
    assert pipe.held() == 1 and not out.batches  # waiting for kernel data that never comes

    over = requests.post(url, data=_request("over", 8), headers=PB, timeout=10)
    assert over.status_code == 200, over.text  # accepted, not "enrichment queue is full"
    assert out.span_names() == {f"over-{i}" for i in range(8)}
    assert pipe.held() == 1
    assert stats.counter("enrichment_failures_total", ("overload",)) == 8
    assert stats.counter("requests_rejected_total", ("http", "backpressure")) == 0
    forwarded = [s for b in out.batches for s in iter_spans(b.request)]
    assert not any(kv.key.startswith("isolation.") for s in forwarded for kv in s.attributes)


def test_full_export_queues_still_refuse_a_bypassing_batch(stack) -> None:
    pipe, out, stats, url, _ = stack
    assert requests.post(url, data=_request("held", 8), headers=PB, timeout=10).status_code == 200
    out.full = True
    refused = requests.post(url, data=_request("over", 8), headers=PB, timeout=10)
    assert refused.status_code == 503
    assert refused.headers.get("Retry-After")
    assert stats.counter("enrichment_failures_total", ("overload",)) == 0
    assert pipe.held() == 1  # the held batch is untouched
