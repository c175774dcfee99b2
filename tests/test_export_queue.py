"""The shared retry queue and its disk spool, against real loopback OTLP backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from isoscope.model import ExportOutcome, ExportResult, Stats
from isoscope.exporters import ExportQueue, InMemoryExporter, OtlpGrpcExporter, OtlpHttpExporter
from isoscope.spool import DiskSpool, SpoolCorrupt, decode_frame, decode_tagged_frame, encode_frame
from tests.otlp_backend import Failure, OtlpBackend, make_payload, span_hex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAST = dict(initial_backoff_s=0.05, max_backoff_s=0.3, max_elapsed_s=30)


@pytest.fixture
def backend():
    b = OtlpBackend()
    try:
        yield b
    finally:
        b.stop()


def _ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def _dropped(stats: Stats, reason: str) -> float:
    return stats.counter("spans_dropped_total", (reason,))


# ---------------------------------------------------------------------------
# DiskSpool
# ---------------------------------------------------------------------------

def test_frame_roundtrip_and_damage_detection():
    frame = encode_frame(b"hello", 7)
    assert decode_frame(frame) == (b"hello", 7)
    for damaged in (frame[:-1], frame + b"x", frame[:5] + b"H" + frame[6:],
                    b"XXXX" + frame[4:], frame[:12], b""):
        with pytest.raises(SpoolCorrupt):
            decode_frame(damaged)
    # The span count is covered by the checksum too.
    tampered = bytearray(frame)
    tampered[4] ^= 0x01
    with pytest.raises(SpoolCorrupt):
        decode_frame(bytes(tampered))


def test_tagged_frames_roundtrip_and_untagged_frames_read_as_traces(tmp_path):
    import struct
    import zlib
    # An ISQ1 frame as written before signals existed, built by hand from the documented layout.
    header = struct.pack("<4sIQ", b"ISQ1", 3, 5)
    legacy = header + b"abcde" + struct.pack("<I", zlib.crc32(b"abcde", zlib.crc32(header)))
    assert decode_tagged_frame(legacy) == (b"abcde", 3, "traces")
    assert encode_frame(b"abcde", 3) == legacy  # traces are still written untagged
    assert encode_frame(b"abcde", 3, "traces") == legacy
    tagged = encode_frame(b"points", 9, "metrics")
    assert tagged[:4] == b"ISQ2"
    assert decode_tagged_frame(tagged) == (b"points", 9, "metrics")
    assert decode_frame(tagged) == (b"points", 9)
    # The tag is covered by the checksum: flipping a byte of it never validates.
    tag_at = struct.calcsize("<4sIQB")
    flipped = bytearray(tagged)
    flipped[tag_at] ^= 0x20
    for damaged in (bytes(flipped), tagged[:-1], tagged[:tag_at + 2], tagged[:4] + b"\xff" + tagged[5:]):
        with pytest.raises(SpoolCorrupt):
            decode_tagged_frame(damaged)
    with pytest.raises(ValueError):
        encode_frame(b"x", 1, "")
    (tmp_path / "0000000000000001.batch").write_bytes(legacy)
    spool = DiskSpool(tmp_path)
    spool.put(b"records", 4, "logs")
    assert [(e.payload, e.span_count, e.signal) for e in spool.load()] == [
        (b"abcde", 3, "traces"), (b"records", 4, "logs")]


def test_spool_put_load_remove_and_reopen(tmp_path):
    spool = DiskSpool(tmp_path)
    payloads = [make_payload([i]) for i in range(1, 4)]
    keys = [spool.put(p, 1) for p in payloads]
    assert spool.keys() == keys
    spool.remove(keys[0])
    spool.remove(keys[0])  # idempotent
    # A leftover temp file (crash mid-write) is never loaded, and is cleaned on open.
    (tmp_path / "0000000000000099.batch.tmp").write_bytes(b"partial")
    reopened = DiskSpool(tmp_path)
    assert not (tmp_path / "0000000000000099.batch.tmp").exists()
    loaded = reopened.load()
    assert [e.key for e in loaded] == keys[1:]
    assert [e.payload for e in loaded] == payloads[1:]
    assert [e.span_count for e in loaded] == [1, 1]
    # Sequence continues after the highest existing key: order survives restarts.
    new_key = reopened.put(make_payload([4]), 1)
    assert new_key > keys[-1]
    assert [e.key for e in reopened.load()] == keys[1:] + [new_key]


def test_spool_quarantines_corrupt_files(tmp_path):
    seen = []
    spool = DiskSpool(tmp_path, on_quarantine=lambda key, why: seen.append((key, why)))
    keys = [spool.put(make_payload([i]), 1) for i in range(1, 6)]
    p1 = tmp_path / keys[1]
    data = bytearray(p1.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p1.write_bytes(bytes(data))
    p3 = tmp_path / keys[3]
    p3.write_bytes(p3.read_bytes()[:-7])
    loaded = spool.load()
    assert [e.key for e in loaded] == [keys[0], keys[2], keys[4]]
    assert spool.quarantined == 2
    assert sorted(os.listdir(tmp_path / "quarantine")) == [keys[1], keys[3]]
    assert [k for k, _ in seen] == [keys[1], keys[3]]
    assert "checksum" in seen[0][1] and "length" in seen[1][1]
    # Quarantined files are out of the way: the next load is clean.
    assert [e.key for e in spool.load()] == [keys[0], keys[2], keys[4]]
    assert spool.quarantined == 2


# ---------------------------------------------------------------------------
# Delivery and retries
# ---------------------------------------------------------------------------

def _produce(queue: ExportQueue, batches: int, per_batch: int, period_s: float) -> list[int]:
    sent = []
    for b in range(batches):
        ids = _ids(b * per_batch + 1, per_batch)
        assert queue.enqueue(make_payload(ids), per_batch)
        sent.extend(ids)
        time.sleep(period_s)
    return sent


@pytest.mark.parametrize("protocol,down_s", [("grpc", 5.0), ("http", 2.0)])
def test_backend_down_then_back_delivers_every_span_exactly_once(backend, protocol, down_s):
    exporter = (OtlpGrpcExporter(backend.grpc_endpoint, timeout_s=2, reconnect_backoff_max_s=0.5)
                if protocol == "grpc" else OtlpHttpExporter(backend.http_url, timeout_s=2))
    stats = Stats()
    queue = ExportQueue(exporter, stats, name="fwd", workers=2, **FAST)
    queue.start()
    sent: list[int] = []
    producer = threading.Thread(target=lambda: sent.extend(_produce(queue, 40, 5, (down_s + 1) / 40)))
    producer.start()
    time.sleep(0.3)
    backend.stop()
    down_at = time.monotonic()
    time.sleep(down_s)
    backend.start()
    producer.join()
    assert backend.wait_for_spans(len(sent), timeout_s=10)
    assert queue.shutdown(5)
    counts = backend.span_id_counts()
    assert set(counts) == {span_hex(i) for i in sent}
    assert max(counts.values()) == 1
    assert stats.counter("spans_exported_total", (exporter.name, "success")) == len(sent) == 200
    assert stats.counter_total("spans_dropped_total") == 0
    # The outage was real: attempts failed during it and succeeded after.
    assert any(a.at > down_at + down_s for a in backend.attempts)
    assert stats.gauge("queue_size", ("fwd",)) == 0


def _gap_after_failure(backend: OtlpBackend) -> float:
    attempts = backend.attempts
    first_fail = next(i for i, a in enumerate(attempts) if a.failure is not None)
    return attempts[first_fail + 1].at - attempts[first_fail].at


def test_http_429_retry_after_is_honoured(backend):
    stats = Stats()
    queue = ExportQueue(OtlpHttpExporter(backend.http_url), stats, name="h", initial_backoff_s=0.01,
                        max_backoff_s=0.02)
    queue.start()
    backend.fail_next(Failure.resource_exhausted(retry_after_s=1))
    assert queue.enqueue(make_payload([1, 2, 3]), 3)
    assert backend.wait_for_spans(3, timeout_s=5)
    queue.shutdown(2)
    gap = _gap_after_failure(backend)
    # The server's delay wins over the (much shorter) backoff.
    assert 0.95 <= gap < 1.6, gap
    assert backend.attempts[0].failure is not None and len(backend.attempts) == 2
    assert stats.counter("spans_exported_total", ("otlp_http", "success")) == 3


def test_grpc_unavailable_retry_info_is_honoured(backend):
    stats = Stats()
    queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats, name="g", initial_backoff_s=0.01,
                        max_backoff_s=0.02)
    queue.start()
    backend.fail_next(Failure.unavailable(retry_after_s=0.8))
    assert queue.enqueue(make_payload([1, 2]), 2)
    assert backend.wait_for_spans(2, timeout_s=5)
    queue.shutdown(2)
    gap = _gap_after_failure(backend)
    assert 0.75 <= gap < 1.4, gap
    assert backend.span_id_counts() == {span_hex(1): 1, span_hex(2): 1}


@pytest.mark.parametrize("protocol,failure", [
    ("http", Failure.invalid_argument()),
    ("http", Failure.too_large()),
    ("grpc", Failure.invalid_argument()),
    ("grpc", Failure.resource_exhausted()),  # no RetryInfo: not retryable
])
def test_non_retryable_failures_are_never_retried(backend, protocol, failure):
    exporter = (OtlpGrpcExporter(backend.grpc_endpoint) if protocol == "grpc"
                else OtlpHttpExporter(backend.http_url))
    stats = Stats()
    queue = ExportQueue(exporter, stats, name="q", workers=1, **FAST)
    queue.start()
    backend.fail_next(failure)
    assert queue.enqueue(make_payload([1, 2, 3, 4]), 4)
    assert queue.enqueue(make_payload([5]), 1)
    # One worker keeps order: once batch 2 arrived, batch 1 had its only chance.
    assert backend.wait_for_spans(1, timeout_s=5)
    queue.shutdown(2)
    assert backend.span_ids() == [span_hex(5)]
    assert sum(1 for a in backend.attempts if span_hex(1) in a.span_ids) == 1
    assert _dropped(stats, "rejected") == 4
    assert stats.counter("spans_exported_total", (exporter.name, "failed")) == 4
    assert stats.counter("spans_exported_total", (exporter.name, "success")) == 1


def test_retry_gives_up_after_max_elapsed(backend):
    backend.fail_always(Failure.unavailable())
    stats = Stats()
    queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats, name="q",
                        initial_backoff_s=0.05, max_backoff_s=0.1, max_elapsed_s=0.6)
    queue.start()
    t0 = time.monotonic()
    assert queue.enqueue(make_payload([1, 2, 3]), 3)
    while _dropped(stats, "retry_exhausted") < 3 and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert _dropped(stats, "retry_exhausted") == 3
    assert 0.3 <= elapsed < 1.5, elapsed
    assert len(backend.attempts) >= 3  # it did retry before giving up
    assert queue.shutdown(1)
    assert backend.span_ids() == []


def test_partial_success_counts_rejected_spans(backend):
    stats = Stats()
    queue = ExportQueue(OtlpHttpExporter(backend.http_url), stats, name="q", **FAST)
    queue.start()
    backend.fail_next(Failure.partial(2))
    assert queue.enqueue(make_payload([1, 2, 3, 4, 5]), 5)
    assert queue.shutdown(5)
    assert len(backend.attempts) == 1  # a partial success is not retried
    assert _dropped(stats, "rejected_by_backend") == 2
    assert stats.counter("spans_exported_total", ("otlp_http", "success")) == 3


def test_exporter_exception_is_retried_not_fatal():
    class Flaky(InMemoryExporter):
        calls = 0

        def export(self, payload, span_count):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("transport bug")
            return super().export(payload, span_count)

    exp = Flaky()
    queue = ExportQueue(exp, Stats(), name="q", **FAST)
    queue.start()
    assert queue.enqueue(make_payload([1]), 1)
    assert exp.wait_for_spans(1, 5)
    assert queue.shutdown(1)
    assert Flaky.calls == 2


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------

def test_overflow_is_bounded_and_drops_are_counted_exactly():
    backend = OtlpBackend(http_enabled=False, delay_s=0.02)  # slower than the producer
    try:
        stats = Stats()
        queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats, name="small",
                            max_batches=5, workers=2, **FAST)
        queue.start()
        sent = accepted = 0
        max_size = 0
        for b in range(150):
            ok = queue.enqueue(make_payload(_ids(b * 3 + 1, 3)), 3)
            sent += 3
            accepted += 3 if ok else 0
            max_size = max(max_size, queue.size(), int(stats.gauge("queue_size", ("small",))))
        assert queue.shutdown(10)
        received = len(backend.span_ids())
        assert max_size <= 5
        assert 0 < accepted < sent
        assert received == accepted
        assert _dropped(stats, "queue_full") == sent - received
        assert stats.counter("spans_exported_total", ("otlp_grpc", "dropped")) == sent - received
        assert max(backend.span_id_counts().values()) == 1
    finally:
        backend.stop()


def test_byte_bound():
    exp = InMemoryExporter(delay_s=0.2)
    stats = Stats()
    one = len(make_payload([1, 2]))
    queue = ExportQueue(exp, stats, name="b", max_batches=100, max_bytes=3 * one)
    results = [queue.enqueue(make_payload([2 * i + 1, 2 * i + 2]), 2) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert queue.size() == 3
    assert _dropped(stats, "queue_full") == 4
    assert not queue.enqueue(b"x" * (3 * one + 1), 9)  # larger than the whole queue
    queue.start()
    assert queue.shutdown(5)
    assert len(exp.span_ids()) == 6


# ---------------------------------------------------------------------------
# Shutdown / drain
# ---------------------------------------------------------------------------

def test_shutdown_drains_everything_before_the_deadline():
    backend = OtlpBackend(grpc_enabled=False, delay_s=0.02)
    try:
        stats = Stats()
        queue = ExportQueue(OtlpHttpExporter(backend.http_url), stats, name="d", **FAST)
        queue.start()
        for b in range(30):
            assert queue.enqueue(make_payload(_ids(b * 2 + 1, 2)), 2)
        t0 = time.monotonic()
        assert queue.shutdown(timeout_s=5)
        assert time.monotonic() - t0 < 5
        assert len(backend.span_ids()) == 60 and queue.size() == 0
        assert not queue.enqueue(make_payload([999]), 1)  # closed
        assert _dropped(stats, "shutdown") == 1
    finally:
        backend.stop()


def test_shutdown_deadline_without_persistence_counts_leftovers(backend):
    backend.stop()
    stats = Stats()
    queue = ExportQueue(OtlpHttpExporter(backend.http_url, timeout_s=1), stats, name="d", **FAST)
    queue.start()
    for b in range(10):
        assert queue.enqueue(make_payload(_ids(b * 3 + 1, 3)), 3)
    t0 = time.monotonic()
    assert queue.shutdown(timeout_s=1.0) is False
    took = time.monotonic() - t0
    assert 0.9 <= took < 2.5, took
    assert _dropped(stats, "shutdown") == 30
    assert queue.size() == 0
    assert stats.gauge("queue_size", ("d",)) == 0


def test_shutdown_deadline_with_persistence_keeps_leftovers_for_next_start(backend, tmp_path):
    backend.stop()
    stats = Stats()
    queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint, timeout_s=1), stats, name="p",
                        persist_dir=tmp_path, **FAST)
    queue.start()
    for b in range(6):
        assert queue.enqueue(make_payload(_ids(b * 2 + 1, 2)), 2)
    assert queue.shutdown(timeout_s=0.5) is False
    assert stats.counter_total("spans_dropped_total") == 0
    assert len(DiskSpool(tmp_path).keys()) == 6

    backend.start()
    stats2 = Stats()
    queue2 = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats2, name="p", persist_dir=tmp_path, **FAST)
    queue2.start()
    assert backend.wait_for_spans(12, timeout_s=5)
    assert queue2.shutdown(2)
    assert backend.span_ids() == [span_hex(i) for i in range(1, 13)]  # in order, once each
    assert DiskSpool(tmp_path).keys() == []


# ---------------------------------------------------------------------------
# Persistence across crashes
# ---------------------------------------------------------------------------

PRODUCER = textwrap.dedent("""
    import sys, time
    from isoscope.model import Stats
    from isoscope.exporters import ExportQueue, OtlpGrpcExporter
    from tests.otlp_backend import make_payload, span_hex

    endpoint, spool_dir = sys.argv[1], sys.argv[2]
    queue = ExportQueue(OtlpGrpcExporter(endpoint, timeout_s=1), Stats(), name="crash",
                        persist_dir=spool_dir, initial_backoff_s=0.05, max_backoff_s=0.2)
    queue.start()
    for b in range(2000):
        ids = [b * 4 + k + 1 for k in range(4)]
        if queue.enqueue(make_payload(ids), 4):
            # Printed only once enqueue returned True: an acknowledgement.
            print(" ".join(span_hex(i) for i in ids), flush=True)
        time.sleep(0.002)
    time.sleep(30)
""")


def test_sigkill_loses_no_acknowledged_span(backend, tmp_path):
    spool_dir = tmp_path / "spool"
    backend.stop()  # the producer's backend is down for its whole life
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, backend.grpc_endpoint, str(spool_dir)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, text=True,
    )
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 4 * 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.extend(line.split())
        # Killed mid-stream, while it is still enqueueing and retrying.
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 4 * 60

    backend.start()
    stats = Stats()
    queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats, name="crash",
                        persist_dir=spool_dir, workers=2, **FAST)
    queue.start()
    assert backend.wait_for_spans(len(acked), timeout_s=10)
    assert queue.shutdown(5)
    counts = backend.span_id_counts()
    missing = set(acked) - set(counts)
    assert not missing, f"{len(missing)} acknowledged spans lost"
    # At most the one batch written but not yet acknowledged arrives in addition.
    assert len(counts) - len(acked) <= 4
    assert max(counts.values()) == 1
    assert stats.counter_total("queue_files_quarantined_total") == 0
    assert DiskSpool(spool_dir).keys() == []


def test_corrupted_spool_file_is_quarantined_and_the_rest_delivered(backend, tmp_path):
    spool = DiskSpool(tmp_path)
    keys = [spool.put(make_payload(_ids(b * 3 + 1, 3)), 3) for b in range(5)]
    bad = tmp_path / keys[2]
    raw = bytearray(bad.read_bytes())
    raw[20] ^= 0x55
    bad.write_bytes(bytes(raw))
    (tmp_path / keys[4]).write_bytes((tmp_path / keys[4]).read_bytes()[:10])  # truncated
    stats = Stats()
    queue = ExportQueue(OtlpGrpcExporter(backend.grpc_endpoint), stats, name="spooled",
                        persist_dir=tmp_path, **FAST)
    queue.start()  # must not raise
    assert backend.wait_for_spans(9, timeout_s=5)
    assert queue.shutdown(2)
    expected = [span_hex(i) for b in (0, 1, 3) for i in _ids(b * 3 + 1, 3)]
    assert backend.span_ids() == expected
    assert stats.counter("queue_files_quarantined_total", ("spooled",)) == 2
    assert sorted(os.listdir(tmp_path / "quarantine")) == [keys[2], keys[4]]
    assert DiskSpool(tmp_path).keys() == []


def test_replayed_batches_go_before_new_ones(tmp_path):
    spool = DiskSpool(tmp_path)
    spool.put(make_payload([1]), 1)
    spool.put(make_payload([2]), 1)
    exp = InMemoryExporter()
    queue = ExportQueue(exp, Stats(), name="o", persist_dir=tmp_path, **FAST)
    assert queue.enqueue(make_payload([3]), 1)  # before start: still after the backlog
    queue.start()
    assert queue.enqueue(make_payload([4]), 1)
    assert exp.wait_for_spans(4, 5)
    assert queue.shutdown(2)
    assert exp.span_ids() == [span_hex(i) for i in (1, 2, 3, 4)]
    assert exp.shut_down


def test_persisted_batches_removed_only_after_success_or_counted_drop(tmp_path):
    exp = InMemoryExporter()
    exp.script([ExportOutcome(ExportResult.RETRYABLE, 0.3, "busy"), ExportOutcome(ExportResult.FAILED, None, "bad")])
    stats = Stats()
    queue = ExportQueue(exp, stats, name="r", persist_dir=tmp_path, **FAST)
    queue.start()
    assert queue.enqueue(make_payload([1]), 1)
    time.sleep(0.1)  # first attempt failed, retry pending: the file must still be there
    assert len(DiskSpool(tmp_path).keys()) == 1
    assert queue.enqueue(make_payload([2]), 1)
    assert exp.wait_for_spans(1, 5)
    assert queue.shutdown(2)
    assert _dropped(stats, "rejected") == 1
    assert exp.span_ids() == [span_hex(2)]
    assert DiskSpool(tmp_path).keys() == []


def test_spool_is_a_leaf_module() -> None:
    """The export queue and the daemon's receipt log both use the spool: it must not pull either in."""
    code = ("import sys, isoscope.spool; "
            "print(sorted(m for m in sys.modules if m.startswith('isoscope.') and m != 'isoscope.spool'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
