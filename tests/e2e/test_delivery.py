"""Delivery guarantees of the real daemon, end to end, with the real OpenTelemetry SDK exporters as clients.

* Backend down for ``E2E_OUTAGE_S`` seconds (default 60) while spans
  keep arriving, then back on the same ports: every span the daemon
  acknowledged reaches the backend exactly once, or its loss is counted in
  ``isoscope_spans_dropped_total``.
* Persistent queue on (``exporters.queue.persist_dir``): ``kill -9`` of the
  daemon mid-stream, restart on the same ports and directory: every span whose
  export call the client saw succeed reaches the backend.
* Enrichment off (``--no-probes``, or every probe disabled in the config):
  spans still pass through, unenriched, and ``/metrics`` counts them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Sequence

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult

from isoscope.probes import catalog
from isoscope_lab.launcher import IsoscopeDaemon
from tests.e2e.spans import attributes, received_spans
from tests.otlp_backend import OtlpBackend

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

OUTAGE_S = float(os.environ.get("E2E_OUTAGE_S", "60"))
"""How long the backend stays down in the outage test (20 s keeps this file near 60 s; 60 s also works).

At ~40 one-span requests/s, an outage longer than ~50 s overflows the export
queue's default 2048 batches, so with 60 s some spans are dropped — and must be
counted; with 20 s every span must arrive exactly once. The assertion is the same."""

FAST_RETRY = {"exporters": {"queue": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0, "max_elapsed_s": 600.0}}}
"""Retries capped at 2 s so delivery resumes promptly once the backend is back (the default cap is 30 s)."""


class RecordingSender(SpanProcessor):
    """Exports every span synchronously with a real OTLP exporter and records whether the call succeeded.

    Args:
        exporter: an ``OTLPSpanExporter`` (gRPC or HTTP).
    """

    def __init__(self, exporter: Any) -> None:
        self._exporter = exporter
        self._lock = threading.Lock()
        self.acked: list[str] = []
        self.failed: list[str] = []

    def on_end(self, span: ReadableSpan) -> None:
        sid = format(span.get_span_context().span_id, "016x")
        try:
            ok = self._exporter.export([span]) is SpanExportResult.SUCCESS
        except Exception:
            ok = False
        with self._lock:
            (self.acked if ok else self.failed).append(sid)

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def make_sender(protocol: str, daemon: IsoscopeDaemon, service: str, timeout_s: float = 5.0
                ) -> tuple[TracerProvider, RecordingSender]:
    """A tracer provider whose spans go to ``daemon`` over ``protocol``, one export call per span."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as G
        exporter: Any = G(endpoint=daemon.grpc_endpoint, insecure=True, timeout=timeout_s)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H
        exporter = H(endpoint=daemon.http_traces_url, timeout=timeout_s)
    sender = RecordingSender(exporter)
    provider = TracerProvider(resource=Resource.create({"service.name": service, "process.pid": os.getpid()}))
    provider.add_span_processor(sender)
    return provider, sender


class Stream:
    """Spans sent at a steady rate from a background thread until stopped."""

    def __init__(self, provider: TracerProvider, interval_s: float, name: str) -> None:
        self._tracer = provider.get_tracer("tests.e2e.delivery")
        self._interval = interval_s
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream-{name}", daemon=True)
        self.sent = 0
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._tracer.start_as_current_span(f"{self._name}-{self.sent}",
                                                    attributes={"test.seq": self.sent}):
                pass
            self.sent += 1
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def wait_settled(backend: OtlpBackend, daemon: IsoscopeDaemon, ids: Sequence[str], timeout_s: float) -> set[str]:
    """Wait until every id arrived or the daemon holds nothing more; returns the ids still missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = set(ids) - set(backend.span_ids())
        if not missing or time.monotonic() > deadline:
            return missing
        if not any(daemon.status()["queues"].values()):
            time.sleep(0.5)  # a batch in the exporter's hands is not in any queue: let it land
            return set(ids) - set(backend.span_ids())
        time.sleep(0.25)


def wait_for_ids(backend: OtlpBackend, ids: Sequence[str], timeout_s: float) -> set[str]:
    """Ids not yet at the backend after waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    missing = set(ids) - set(backend.span_ids())
    while missing and time.monotonic() < deadline:
        time.sleep(0.25)
        missing = set(ids) - set(backend.span_ids())
    return missing


@pytest.fixture
def backend() -> Iterator[OtlpBackend]:
    with OtlpBackend() as b:
        yield b


def test_backend_outage_then_back_every_span_once_or_counted(backend: OtlpBackend, tmp_path: Any) -> None:
    # No child spans: then the daemon's drop counter counts exactly the client's spans.
    cfg = {**FAST_RETRY, "attribution": {"max_child_spans": 0}}
    with IsoscopeDaemon(forward=[backend.grpc_url], config=cfg) as daemon:
        grpc_p, grpc_s = make_sender("grpc", daemon, "e2e-outage-grpc")
        http_p, http_s = make_sender("http", daemon, "e2e-outage-http")
        streams = [Stream(grpc_p, 0.05, "g"), Stream(http_p, 0.05, "h")]
        try:
            time.sleep(1.0)
            backend.stop()
            down_from = len(grpc_s.acked) + len(http_s.acked)
            time.sleep(OUTAGE_S)
            during_outage = len(grpc_s.acked) + len(http_s.acked) - down_from
            backend.start()
            time.sleep(1.0)
        finally:
            for s in streams:
                s.stop()
            grpc_p.shutdown()
            http_p.shutdown()
        acked = grpc_s.acked + http_s.acked
        assert len(acked) > 20 * OUTAGE_S * 0.5, f"only {len(acked)} spans were sent"
        # The daemon keeps accepting while its backend is down: nothing pushed back to the clients.
        assert not (grpc_s.failed or http_s.failed), (len(grpc_s.failed), len(http_s.failed))
        missing = wait_settled(backend, daemon, acked, timeout_s=60)
        dropped = daemon.metric("isoscope_spans_dropped_total")
        if dropped:
            print("dropped by reason:", {k: v for k, v in daemon.metrics().items()
                                         if k[0] == "isoscope_spans_dropped_total" and v})
        counts = backend.span_id_counts()
        dup = {s: counts[s] for s in acked if counts[s] > 1}
        assert not dup, f"{len(dup)} spans arrived more than once"
        assert len(missing) == dropped, (f"{len(missing)} acknowledged spans missing, "
                                         f"{dropped} counted as dropped\n{daemon.log_text()[-2000:]}")
        # Not vacuous: spans were accepted while nothing could be delivered, so they waited in the daemon.
        assert during_outage > 0, "no span was acknowledged during the outage"
        assert daemon.stop() == 0, daemon.log_text()[-2000:]


def test_kill_9_with_persistent_queue_loses_no_acknowledged_span(tmp_path: Any) -> None:
    persist = tmp_path / "queue"
    cfg = {"exporters": {"queue": {"persist_dir": str(persist), "workers": 1,
                                   **FAST_RETRY["exporters"]["queue"]}}}
    # A slow backend (one export at a time, 30 ms each, while ~65 spans/s arrive one per request)
    # keeps a backlog inside the daemon at the moment it is killed.
    with OtlpBackend(delay_s=0.03) as backend, IsoscopeDaemon(forward=[backend.grpc_url], config=cfg) as daemon:
        grpc_p, grpc_s = make_sender("grpc", daemon, "e2e-kill-grpc", timeout_s=3.0)
        http_p, http_s = make_sender("http", daemon, "e2e-kill-http", timeout_s=3.0)
        streams = [Stream(grpc_p, 0.03, "g"), Stream(http_p, 0.03, "h")]
        try:
            time.sleep(3.0)
            acked_before_kill = len(grpc_s.acked) + len(http_s.acked)
            at_backend_before_kill = len(set(backend.span_ids()))
            daemon.kill9()
            time.sleep(1.0)
            daemon.start()
            time.sleep(3.0)
        finally:
            for s in streams:
                s.stop()
            grpc_p.shutdown()
            http_p.shutdown()
        acked = grpc_s.acked + http_s.acked
        # The kill happened mid-stream with spans still inside the daemon.
        assert acked_before_kill > at_backend_before_kill, (acked_before_kill, at_backend_before_kill)
        assert len(acked) > acked_before_kill, "nothing was acknowledged after the restart"
        missing = wait_for_ids(backend, acked, timeout_s=60)
        assert not missing, (f"{len(missing)} of {len(acked)} acknowledged spans lost across kill -9 "
                             f"({len(grpc_s.failed) + len(http_s.failed)} export calls failed while it was down)\n"
                             f"{daemon.log_text()[-3000:]}")
        counts = backend.span_id_counts()
        dups = sum(1 for s in acked if counts[s] > 1)
        if dups:
            # At-least-once across a crash: a batch delivered but not yet removed from disk is resent.
            print(f"{dups} of {len(acked)} spans delivered twice across kill -9")


def _pass_through(daemon: IsoscopeDaemon, backend: OtlpBackend) -> None:
    """Send spans over both protocols and check they arrive unenriched and are counted."""
    before = {p: daemon.metric("isoscope_spans_received_total", protocol=p) for p in ("grpc", "http")}
    senders = {}
    for proto in ("grpc", "http"):
        provider, sender = make_sender(proto, daemon, f"e2e-pass-{proto}")
        tracer = provider.get_tracer("tests.e2e.delivery")
        for i in range(10):
            with tracer.start_as_current_span(f"pass-{i}", attributes={"test.original.string": "kept"}):
                pass
        provider.shutdown()
        senders[proto] = sender
        assert not sender.failed and len(sender.acked) == 10, (proto, sender.failed)
    ids = senders["grpc"].acked + senders["http"].acked
    assert not wait_for_ids(backend, ids, 30), daemon.log_text()[-2000:]
    got = received_spans(backend.requests)
    for sid in ids:
        attrs = attributes(got[sid][1].attributes)
        assert attrs["test.original.string"] == "kept"
        assert not [k for k in attrs if k.startswith("isolation.")], attrs
    for p in ("grpc", "http"):
        assert daemon.metric("isoscope_spans_received_total", protocol=p) - before[p] == 10, p
    assert daemon.metric("isoscope_spans_exported_total", outcome="success") >= 20
    assert daemon.metric("isoscope_spans_enriched_total") == 0
    assert daemon.metric("isoscope_spans_dropped_total") == 0
    code, body = daemon.readyz()
    assert code == 200, body


def test_no_probes_spans_pass_through_unenriched(backend: OtlpBackend) -> None:
    with IsoscopeDaemon(forward=[backend.grpc_url], probes=False) as daemon:
        _pass_through(daemon, backend)
        assert daemon.status()["probes"] == []
        assert daemon.stop() == 0


def test_all_probes_disabled_in_config_spans_pass_through_unenriched(backend: OtlpBackend) -> None:
    names = [p.name for p in catalog.ALL_PROBES]
    with IsoscopeDaemon(forward=[backend.grpc_url], config={"probes": {"disabled": names}}) as daemon:
        _pass_through(daemon, backend)
        assert not [p for p in daemon.status()["probes"] if p["attached"]]
        assert daemon.stop() == 0


def test_empty_probe_list_in_config_loads_no_probe(backend: OtlpBackend) -> None:
    """``probes.enabled: []`` names no probe to load, so none may be attached."""
    with IsoscopeDaemon(forward=[backend.grpc_url], config={"probes": {"enabled": []}}) as daemon:
        attached = [p["name"] for p in daemon.status()["probes"] if p["attached"]]
        assert not attached, f"probes.enabled: [] still attached {attached}"
