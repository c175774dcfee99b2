"""Backend outage, queue overflow and the retry rules, through the whole daemon.

The daemon runs as a subprocess forwarding to a real OTLP backend; spans go in
through its real receivers. Every test checks both what the backend received
(span ids) and what the daemon's ``/metrics`` says, because a lost span that
is not counted is the worst outcome.
"""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from tests.otlp_backend import Failure, make_payload, span_hex
from tests.reliability.clients import GrpcClient, http_post, wait_until

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow


def _export_queue_size(daemon) -> int:
    """Batches held by the export queues (``/debug/status``; the enrichment hold excluded)."""
    return sum(n for name, n in daemon.status()["queues"].items() if name != "enrich")


def _send_batches(daemon, first_id: int, batches: int, per_batch: int, *, protocol: str) -> list[int]:
    """Send ``batches`` requests; returns the ids the daemon acknowledged (200 / OK)."""
    acked: list[int] = []
    client = GrpcClient(daemon.grpc_endpoint) if protocol == "grpc" else None
    try:
        for b in range(batches):
            ids = list(range(first_id + b * per_batch, first_id + (b + 1) * per_batch))
            payload = make_payload(ids)
            if client is not None:
                code, details, _ = client.export(payload)
                ok = code is grpc.StatusCode.OK
            else:
                status, _, _ = http_post(daemon.http_traces_url, payload)
                ok = status == 200
            assert ok, f"batch {b} refused: {code if client else status}"
            acked.extend(ids)
    finally:
        if client is not None:
            client.close()
    return acked


@pytest.mark.parametrize("forward_kind", ["grpc", "http"])
def test_backend_outage_and_recovery_loses_nothing(daemon_factory, backend, forward_kind):
    """The backend goes down mid-stream and comes back: every acknowledged span arrives."""
    url = backend.grpc_url if forward_kind == "grpc" else backend.http_url
    d = daemon_factory("outage", forward=[url])
    sent = _send_batches(d, 1, 10, 50, protocol="grpc")
    assert backend.wait_for_spans(len(sent), 15)
    backend.stop()
    sent += _send_batches(d, 10_001, 10, 50, protocol="http")
    sent += _send_batches(d, 20_001, 10, 50, protocol="grpc")
    time.sleep(1.0)  # retries hit a closed port meanwhile
    assert _export_queue_size(d) >= 1, "the batches sent during the outage should be waiting"
    backend.start()
    want = {span_hex(i) for i in sent}
    assert wait_until(lambda: want <= set(backend.span_ids()), 30), (
        f"{len(want - set(backend.span_ids()))} spans never arrived\n{d.log_tail()}")
    counts = backend.span_id_counts()
    assert all(counts[h] >= 1 for h in want)
    assert d.metric("isoscope_spans_dropped_total") == 0
    assert d.metric("isoscope_spans_received_total") == len(sent)
    assert d.alive()


def test_queue_overflow_drops_are_counted_exactly(daemon_factory, backend):
    """With the backend down and a tiny queue, dropped == sent - received, exactly; memory stays bounded."""
    backend.stop()
    d = daemon_factory("overflow", forward=[backend.grpc_url],
                       config={"exporters": {"queue": {"max_batches": 8, "max_elapsed_s": 600}}})
    rss_before = d.rss_bytes()
    sent = _send_batches(d, 1, 60, 100, protocol="grpc")
    sent += _send_batches(d, 100_001, 60, 100, protocol="http")
    assert wait_until(lambda: d.metric("isoscope_spans_dropped_total") > 0, 10)
    rss_full = d.rss_bytes()
    backend.start()
    assert wait_until(lambda: _export_queue_size(d) == 0, 30), d.log_tail()
    time.sleep(0.5)
    received = set(backend.span_ids())
    sent_hex = {span_hex(i) for i in sent}
    assert received <= sent_hex, "the backend got spans nobody sent"
    dropped = d.metric("isoscope_spans_dropped_total", reason="queue_full")
    assert dropped == len(sent_hex) - len(received), (dropped, len(sent_hex), len(received))
    assert d.metric("isoscope_spans_dropped_total") == dropped, "only queue_full drops are expected"
    assert len(received) >= 8 * 100 - 100, "the queue should have held about max_batches batches"
    # 12,000 spans went through a queue bounded at 8 batches: RSS must not follow the input.
    assert rss_full - rss_before < 40 * 1024 * 1024, (rss_before, rss_full)


def _gap_after_first_failure(backend, ids: list[str]) -> float:
    times = [a.at for a in backend.attempts if set(ids) & set(a.span_ids)]
    assert len(times) >= 2, f"expected a retry, saw {len(times)} attempts"
    return times[1] - times[0]


@pytest.mark.parametrize("forward_kind,failure", [
    ("http", Failure.resource_exhausted(2.0)),          # 429 + Retry-After: 2
    ("http", Failure.unavailable(2.0, http_date=False)),  # 503 + Retry-After: 2
    ("grpc", Failure.unavailable(2.0)),                 # UNAVAILABLE + RetryInfo 2 s
    ("grpc", Failure.resource_exhausted(2.0)),          # RESOURCE_EXHAUSTED + RetryInfo 2 s
])
def test_server_retry_delay_is_honoured(daemon_factory, backend, forward_kind, failure):
    """The daemon waits at least the server's delay (its own backoff would be ~0.1 s)."""
    url = backend.grpc_url if forward_kind == "grpc" else backend.http_url
    d = daemon_factory("retry", forward=[url])
    backend.fail_next(failure, times=1)
    _send_batches(d, 500, 1, 5, protocol="grpc")
    assert backend.wait_for_spans(5, 15), d.log_tail()
    gap = _gap_after_first_failure(backend, [span_hex(i) for i in range(500, 505)])
    assert gap >= 1.9, f"retried after {gap:.2f} s, server asked for 2 s"
    assert d.metric("isoscope_spans_dropped_total") == 0


@pytest.mark.parametrize("forward_kind", ["grpc", "http"])
def test_permanent_errors_and_partial_success_are_never_retried(daemon_factory, backend, forward_kind):
    """400 / INVALID_ARGUMENT, 413 and partial success: one attempt each, losses counted, later spans flow."""
    url = backend.grpc_url if forward_kind == "grpc" else backend.http_url
    d = daemon_factory("permanent", forward=[url])
    # too_large is 413 over HTTP and RESOURCE_EXHAUSTED without RetryInfo over gRPC:
    # both are permanent by the OTLP specification.
    cases = [(Failure.invalid_argument(), 1000), (Failure.partial(3), 2000), (Failure.too_large(), 3000)]
    for failure, first in cases:
        backend.fail_next(failure, times=1)
        _send_batches(d, first, 1, 10, protocol="http")
        ids = {span_hex(i) for i in range(first, first + 10)}
        assert wait_until(lambda: any(ids & set(a.span_ids) for a in backend.attempts), 10)
    _send_batches(d, 9000, 1, 10, protocol="grpc")  # a good batch after them is delivered
    assert backend.wait_for_spans(10 + 10, 15)
    time.sleep(1.5)  # long enough for any (wrong) retry with a 0.1 s backoff to show up
    for _failure, first in cases:
        ids = {span_hex(i) for i in range(first, first + 10)}
        attempts = [a for a in backend.attempts if ids & set(a.span_ids)]
        assert len(attempts) == 1, f"batch {first} was attempted {len(attempts)} times"
    dropped = d.metric_by("isoscope_spans_dropped_total", "reason")
    assert dropped.get("rejected", 0) == 10 * 2
    assert dropped.get("rejected_by_backend", 0) == 3
    assert span_hex(9000) in backend.span_ids()
