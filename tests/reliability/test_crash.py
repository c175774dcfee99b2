"""kill -9 and restart with the persistent queue; corrupted queue files on restart.

An acknowledged span is a promise: with ``exporters.queue.persist_dir`` set, a
batch is on disk before the client is told 200 / OK, so a daemon killed with
SIGKILL must deliver it after the restart. A damaged file found on restart is
moved aside and counted; it must never make the daemon crash-loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from tests.otlp_backend import make_payload, span_hex
from tests.reliability.clients import GrpcClient, http_post, wait_until

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow


def _ack(daemon, ids: list[int], protocol: str) -> None:
    payload = make_payload(ids)
    if protocol == "grpc":
        client = GrpcClient(daemon.grpc_endpoint)
        try:
            code, details, _ = client.export(payload)
        finally:
            client.close()
        assert code is grpc.StatusCode.OK, details
    else:
        status, _, body = http_post(daemon.http_traces_url, payload)
        assert status == 200, body


def _batch_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.batch") if "quarantine" not in p.parts)


def test_kill9_then_restart_delivers_every_acknowledged_span(daemon_factory, backend, tmp_path):
    backend.stop()  # nothing can be delivered before the crash
    spool = tmp_path / "spool"
    d = daemon_factory("crash", forward=[backend.grpc_url],
                       config={"exporters": {"queue": {"persist_dir": str(spool)}}})
    acked: list[int] = []
    for b in range(20):
        ids = list(range(1 + b * 25, 1 + (b + 1) * 25))
        _ack(d, ids, "grpc" if b % 2 else "http")
        acked.extend(ids)
    d.kill9()
    assert _batch_files(spool), "acknowledged batches must be on disk after SIGKILL"
    backend.start()
    d.start()
    want = {span_hex(i) for i in acked}
    assert wait_until(lambda: want <= set(backend.span_ids()), 30), (
        f"{len(want - set(backend.span_ids()))} acknowledged spans lost\n{d.log_tail()}")
    assert wait_until(lambda: not _batch_files(spool), 10), "delivered batches must leave the disk"
    assert d.metric("isoscope_spans_dropped_total") == 0


def test_kill9_during_delivery_to_a_slow_backend(daemon_factory, tmp_path):
    """Crash while an export is in flight: at-least-once, nothing lost."""
    from tests.otlp_backend import OtlpBackend

    with OtlpBackend(delay_s=0.3) as slow:
        spool = tmp_path / "spool"
        d = daemon_factory("crash-slow", forward=[slow.grpc_url],
                           config={"exporters": {"queue": {"persist_dir": str(spool)}}})
        acked: list[int] = []
        for b in range(15):
            ids = list(range(50_000 + b * 20, 50_000 + (b + 1) * 20))
            _ack(d, ids, "grpc")
            acked.extend(ids)
        assert slow.wait_for_attempts(1, 10)
        d.kill9()
        d.start()
        want = {span_hex(i) for i in acked}
        assert wait_until(lambda: want <= set(slow.span_ids()), 40), (
            f"{len(want - set(slow.span_ids()))} acknowledged spans lost\n{d.log_tail()}")


def test_corrupted_queue_file_is_quarantined_and_counted(daemon_factory, backend, tmp_path):
    backend.stop()
    spool = tmp_path / "spool"
    d = daemon_factory("corrupt", forward=[backend.grpc_url],
                       config={"exporters": {"queue": {"persist_dir": str(spool)}}})
    for b in range(4):
        _ack(d, list(range(70_000 + b * 10, 70_000 + (b + 1) * 10)), "grpc")
    # All four past the receipt log and into the export queue's own files.
    assert wait_until(lambda: len([p for p in _batch_files(spool) if "receipt" not in p.parts]) == 4, 10)
    d.kill9()
    files = [p for p in _batch_files(spool) if "receipt" not in p.parts]
    assert len(files) == 4, files
    victim = files[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])          # torn write
    files[2].write_bytes(b"\x00" * len(files[2].read_bytes()))  # zeroed block
    backend.start()
    d.start()
    quarantined = list((victim.parent / "quarantine").iterdir())
    assert {p.name for p in quarantined} == {victim.name, files[2].name}
    intact = {span_hex(i) for b in (0, 3) for i in range(70_000 + b * 10, 70_000 + (b + 1) * 10)}
    assert wait_until(lambda: intact <= set(backend.span_ids()), 20), d.log_tail()
    # A second restart finds nothing to quarantine again: no crash loop, no double count.
    d.stop()
    d.start()
    assert d.alive()
    assert len(list((victim.parent / "quarantine").iterdir())) == 2


def test_corrupted_receipt_log_is_quarantined_and_counted(daemon_factory, backend, tmp_path):
    """The write-ahead log of received requests follows the same rule as the queues."""
    spool = tmp_path / "spool"
    d = daemon_factory("corrupt-wal", forward=[backend.grpc_url],
                       config={"exporters": {"queue": {"persist_dir": str(spool)}}})
    d.stop()
    receipt = spool / "receipt"
    receipt.mkdir(parents=True, exist_ok=True)
    (receipt / "0000000000000001.batch").write_bytes(b"ISQ1 definitely not a frame")
    d.start()
    assert d.alive()
    assert (receipt / "quarantine" / "0000000000000001.batch").exists()
    _ack(d, [80_001], "grpc")
    assert backend.wait_for_spans(1, 10)


def test_quarantined_files_are_counted_in_metrics(daemon_factory, backend, tmp_path):
    """Every quarantined file, queue or receipt log, shows in isoscope_queue_files_quarantined_total."""
    spool = tmp_path / "spool"
    d = daemon_factory("count", forward=[backend.grpc_url],
                       config={"exporters": {"queue": {"persist_dir": str(spool)}}})
    d.stop()
    for sub in ("receipt", "otlp_grpc"):
        (spool / sub).mkdir(parents=True, exist_ok=True)
        (spool / sub / "0000000000000009.batch").write_bytes(b"ISQ1 not a frame")
    d.start()
    assert d.metric("isoscope_queue_files_quarantined_total") == 2
