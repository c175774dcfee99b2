"""The shared retry queue every exporter runs behind, with optional disk persistence.

An exporter (``isoscope.model.SpanExporter``) makes exactly one attempt per
call. :class:`ExportQueue` owns everything around it: bounding memory,
retrying with exponential backoff and jitter, honouring server-suggested
delays, giving up after a maximum elapsed time, draining on shutdown, and —
when a ``persist_dir`` is given — keeping every accepted batch on disk until it
is delivered or its loss has been counted.

Accounting is exact: every span handed to :meth:`ExportQueue.enqueue` ends up
in exactly one of ``spans_exported_total{outcome="success"}``,
``spans_dropped_total{reason=...}`` or (persistent queues only) on disk for the
next start. Tests rely on ``dropped == sent - received``.

Batches carry a signal (``traces``, ``metrics``, ``logs``; see
:mod:`isoscope.exporters.signals`). Metrics and logs are passed through
unchanged and go through the same bounds, retries and spool as traces; their
items (data points, log records) are counted in
``signals_exported_total{exporter,signal,outcome}`` and
``signals_dropped_total{signal,reason}`` instead of the span counters, with the
same exactness. An exporter declares the signals it can deliver in its
``signals`` attribute (traces only when absent); a batch of any other signal is
refused at once and counted as dropped with ``reason="no_target"``. Metrics and
logs together may hold at most ``other_signals_share`` of the queue's bounds,
so a burst of logs cannot push traces out.

The disk format is :class:`isoscope.spool.DiskSpool`; each spooled batch keeps
its signal.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

from isoscope.exporters.signals import TRACES, spec
from isoscope.model import ExportOutcome, ExportResult, SpanExporter, Stats
from isoscope.spool import DiskSpool

logger = logging.getLogger(__name__)

# Drop reasons (label values of spans_dropped_total{reason}).
REASON_QUEUE_FULL = "queue_full"
REASON_REJECTED = "rejected"
REASON_RETRY_EXHAUSTED = "retry_exhausted"
REASON_REJECTED_BY_BACKEND = "rejected_by_backend"
REASON_SHUTDOWN = "shutdown"
REASON_PERSIST_FAILED = "persist_failed"
REASON_NO_TARGET = "no_target"

_BACKOFF_MULTIPLIER = 1.5
_JITTER = 0.5  # delay is drawn from [d*(1-j), d*(1+j)], as the OpenTelemetry Collector does
_WARN_EVERY_S = 60.0


def _items(signal: str) -> str:
    return spec(signal).item + "s"


@dataclass(slots=True)
class _Batch:
    payload: bytes
    span_count: int
    key: str | None = None
    signal: str = TRACES


class ExportQueue:
    """Bounded, retrying, optionally persistent queue in front of one exporter.

    Args:
        exporter: the transport; called from worker threads, one attempt per call.
        stats: where counters and the ``queue_size{queue}`` gauge go.
        name: queue label value (``queue_size{queue=name}``); unique per queue.
        max_batches: most batches held (queued + being exported).
        max_bytes: most payload bytes held.
        persist_dir: if set, batches are written here before ``enqueue`` returns
            and replayed on the next start. One directory per queue.
        initial_backoff_s: first retry delay (before jitter).
        max_backoff_s: cap of the exponential retry delay (a server's
            ``retry_after_s`` may exceed it).
        max_elapsed_s: a batch still failing this long after its first attempt
            is dropped (``reason="retry_exhausted"``).
        workers: concurrent export attempts. With 1, delivery keeps enqueue order.
        fsync: see :class:`isoscope.spool.DiskSpool`.
        other_signals_share: fraction of ``max_batches`` and ``max_bytes`` that
            metrics and logs batches may hold together (traces may use it all).
    """

    def __init__(self, exporter: SpanExporter, stats: Stats, *, name: str,
                 max_batches: int = 1000, max_bytes: int = 64 * 1024 * 1024,
                 persist_dir: str | os.PathLike[str] | None = None,
                 initial_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 max_elapsed_s: float = 300.0, workers: int = 1, fsync: bool = True,
                 other_signals_share: float = 0.5) -> None:
        if max_batches < 1 or max_bytes < 1 or workers < 1:
            raise ValueError("max_batches, max_bytes and workers must be positive")
        if not 0.0 <= other_signals_share <= 1.0:
            raise ValueError("other_signals_share must be between 0 and 1")
        self.exporter = exporter
        self.stats = stats
        self.name = name
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_elapsed_s = max_elapsed_s
        self._n_workers = workers
        self._exporter_label = getattr(exporter, "name", type(exporter).__name__)
        # Exporters written before metrics and logs existed deliver traces only.
        self.signals: frozenset[str] = frozenset(getattr(exporter, "signals", (TRACES,)))
        self._other_max_batches = int(max_batches * other_signals_share)
        self._other_max_bytes = int(max_bytes * other_signals_share)
        self.spool: DiskSpool | None = None
        if persist_dir is not None:
            self.spool = DiskSpool(persist_dir, fsync=fsync, on_quarantine=self._count_quarantine)
        self._cond = threading.Condition()
        self._pending: deque[_Batch] = deque()
        # Held = reserved by enqueue + pending + being exported: what bounds memory.
        self._held_batches = 0
        self._held_bytes = 0
        self._held_other_batches = 0  # the part of the above that is metrics and logs
        self._held_other_bytes = 0
        self._reserving = 0  # accepted by enqueue, not yet in _pending (disk write running)
        self._closing = False
        self._deadline = 0.0
        self._abort = threading.Event()
        self._started = False
        self._workers: list[threading.Thread] = []
        self._rng = random.Random()
        self._last_warned: dict[str, float] = {}
        self._publish_size()

    # -- public API ---------------------------------------------------------

    def start(self) -> None:
        """Load persisted batches (oldest first, ahead of anything new) and start the workers."""
        with self._cond:
            if self._started:
                return
            self._started = True
        if self.spool is not None:
            with self._cond:
                known = {b.key for b in self._pending}
            loaded = [e for e in self.spool.load() if e.key not in known]
            for e in [e for e in loaded if e.signal not in self.signals]:
                # The target no longer takes this signal (its configuration changed).
                loaded.remove(e)
                self._count_drop(e.span_count, REASON_NO_TARGET, e.signal)
                self._forget(_Batch(e.payload, e.span_count, e.key, e.signal))
            if loaded:
                logger.info("queue %s: replaying %d persisted batches (%d items)", self.name,
                            len(loaded), sum(e.span_count for e in loaded))
            with self._cond:
                # Replayed batches were accepted before any new one, so they go
                # first; they are kept even beyond the bounds because they were
                # already acknowledged to someone.
                for e in reversed(loaded):
                    batch = _Batch(e.payload, e.span_count, e.key, e.signal)
                    self._pending.appendleft(batch)
                    self._hold_locked(batch)
                if self._held_batches > self.max_batches or self._held_bytes > self.max_bytes:
                    logger.warning("queue %s: replayed backlog exceeds the bounds; new batches "
                                   "are refused until it drains", self.name)
                self._publish_size_locked()
        for i in range(self._n_workers):
            t = threading.Thread(target=self._worker, name=f"export-{self.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def enqueue(self, payload: bytes, span_count: int, signal: str = TRACES) -> bool:
        """Accept one serialized export request of ``signal`` for delivery.

        With persistence on, the batch is on stable storage when this returns True.

        Args:
            payload: a serialized ``Export{Trace,Metrics,Logs}ServiceRequest``.
            span_count: the items in it (spans, data points or log records).
            signal: ``traces``, ``metrics`` or ``logs``.

        Returns:
            True if accepted; False if refused (the exporter does not take this
            signal, full, shutting down, or the disk write failed), in which
            case ``span_count`` items are counted as dropped.

        Raises:
            ValueError: ``signal`` is not a known signal.
        """
        spec(signal)  # an unknown signal is a bug of the caller, not a drop
        batch = _Batch(payload, span_count, None, signal)
        size = len(payload)
        other = signal != TRACES
        with self._cond:
            if signal not in self.signals:
                reason = REASON_NO_TARGET
            elif self._closing:
                reason = REASON_SHUTDOWN
            elif self._held_batches + 1 > self.max_batches or self._held_bytes + size > self.max_bytes:
                reason = REASON_QUEUE_FULL
            elif other and (self._held_other_batches + 1 > self._other_max_batches
                            or self._held_other_bytes + size > self._other_max_bytes):
                reason = REASON_QUEUE_FULL
            else:
                reason = ""
                self._hold_locked(batch)
                self._reserving += 1
        if reason:
            self._count_drop(span_count, reason, signal)
            return False
        if self.spool is not None:
            try:
                batch.key = self.spool.put(payload, span_count, signal)
            except OSError as exc:
                logger.error("queue %s: cannot persist batch: %s", self.name, exc)
                with self._cond:
                    self._reserving -= 1
                    self._release_locked(batch)
                    self._publish_size_locked()
                    self._cond.notify_all()
                self._count_drop(span_count, REASON_PERSIST_FAILED, signal)
                return False
        with self._cond:
            self._reserving -= 1
            late = self._abort.is_set()
            if late:
                # Shutdown finished while this batch was being written: it was
                # accepted, so it follows the leftover rule (disk or counted).
                self._release_locked(batch)
            else:
                self._pending.append(batch)
            self._publish_size_locked()
            self._cond.notify_all()
        if late:
            self._abandon(batch)
        return True

    def size(self) -> int:
        """Batches held: waiting, being exported, or being accepted right now."""
        with self._cond:
            return self._held_batches

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Stop accepting, keep exporting until empty or ``timeout_s``, then stop.

        What is left at the deadline stays on disk when persistence is on (to be
        sent on the next start); otherwise it is counted as dropped
        (``reason="shutdown"``). The exporter is shut down last.

        Returns:
            True if everything was delivered or dealt with before the deadline.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._closing = True
            self._deadline = deadline
            self._cond.notify_all()
        for t in self._workers:
            t.join(max(0.0, deadline - time.monotonic()))
        workers_done = not any(t.is_alive() for t in self._workers)
        with self._cond:
            self._abort.set()
            self._cond.notify_all()
            leftovers = list(self._pending)
            self._pending.clear()
            for b in leftovers:
                self._release_locked(b)
            self._publish_size_locked()
        drained = workers_done and not leftovers
        for b in leftovers:
            self._abandon(b)
        try:
            # Closing the transport also cancels an attempt still in flight, so
            # a worker blocked in export() returns promptly.
            self.exporter.shutdown()
        except Exception:  # noqa: BLE001 - shutdown must always finish
            logger.exception("queue %s: exporter shutdown failed", self.name)
        for t in self._workers:
            t.join(1.0)
        return drained

    # -- workers ------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            with self._cond:
                # While closing, wait for batches still being written by enqueue
                # so a drain does not miss them.
                while not self._pending and not self._abort.is_set() and (
                        not self._closing or self._reserving):
                    self._cond.wait()
                if self._abort.is_set() or not self._pending:
                    return
                batch = self._pending.popleft()
            done = False
            try:
                done = self._deliver(batch)
            finally:
                with self._cond:
                    self._release_locked(batch)
                    self._publish_size_locked()
                    self._cond.notify_all()
                if not done:
                    self._abandon(batch)

    def _deliver(self, batch: _Batch) -> bool:
        """Export one batch until it is delivered or its loss counted.

        Returns:
            False only when shutdown cut it short (the batch is then unfinished).
        """
        first = time.monotonic()
        backoff = self.initial_backoff_s
        while True:
            try:
                if batch.signal == TRACES:
                    # Positional only: exporters that know nothing of signals still work.
                    outcome = self.exporter.export(batch.payload, batch.span_count)
                else:
                    outcome = self.exporter.export(batch.payload, batch.span_count,  # type: ignore[call-arg]
                                                   signal=batch.signal)
            except Exception as exc:  # noqa: BLE001 - a transport bug must not kill the worker
                logger.exception("queue %s: exporter raised", self.name)
                outcome = ExportOutcome(ExportResult.RETRYABLE, None, f"exporter raised: {exc!r}")
            if outcome.result is ExportResult.SUCCESS:
                self._count_success(batch, outcome)
                return True
            if outcome.result is ExportResult.FAILED:
                self._warn_failed(batch, outcome)
                self._finish_dropped(batch, REASON_REJECTED, outcome="failed")
                return True
            delay = min(backoff, self.max_backoff_s) * self._rng.uniform(1 - _JITTER, 1 + _JITTER)
            if outcome.retry_after_s is not None and outcome.retry_after_s > delay:
                delay = outcome.retry_after_s
            backoff = min(backoff * _BACKOFF_MULTIPLIER, self.max_backoff_s)
            now = time.monotonic()
            if now + delay - first > self.max_elapsed_s:
                logger.warning("queue %s: giving up on %d %s after %.1fs: %s", self.name,
                               batch.span_count, _items(batch.signal), now - first, outcome.message)
                self._finish_dropped(batch, REASON_RETRY_EXHAUSTED, outcome="failed")
                return True
            logger.debug("queue %s: retrying in %.3fs: %s", self.name, delay, outcome.message)
            with self._cond:
                deadline = self._deadline if self._closing else None
            if deadline is not None and now + delay > deadline:
                # Draining: waiting beyond the deadline is pointless; wait for the
                # abort instead so shutdown is not held up.
                delay = max(0.0, deadline - now) + 1.0
            if self._abort.wait(delay):
                return False

    # -- accounting ---------------------------------------------------------

    def _hold_locked(self, batch: _Batch) -> None:
        self._held_batches += 1
        self._held_bytes += len(batch.payload)
        if batch.signal != TRACES:
            self._held_other_batches += 1
            self._held_other_bytes += len(batch.payload)

    def _release_locked(self, batch: _Batch) -> None:
        self._held_batches -= 1
        self._held_bytes -= len(batch.payload)
        if batch.signal != TRACES:
            self._held_other_batches -= 1
            self._held_other_bytes -= len(batch.payload)

    def _abandon(self, batch: _Batch) -> None:
        """A batch left unfinished at shutdown: kept on disk, or counted as lost."""
        if batch.key is None:
            self._count_drop(batch.span_count, REASON_SHUTDOWN, batch.signal)

    def _warn_failed(self, batch: _Batch, outcome: ExportOutcome) -> None:
        if batch.signal != TRACES:
            # A backend without metrics or logs support refuses every such batch
            # (404, UNIMPLEMENTED): say so once a minute, not once per batch.
            now = time.monotonic()
            if now - self._last_warned.get(batch.signal, -math.inf) < _WARN_EVERY_S:
                logger.debug("queue %s: %d %s rejected, not retried: %s", self.name,
                             batch.span_count, _items(batch.signal), outcome.message)
                return
            self._last_warned[batch.signal] = now
        logger.warning("queue %s: %d %s rejected, not retried: %s", self.name,
                       batch.span_count, _items(batch.signal), outcome.message)

    def _count_success(self, batch: _Batch, outcome: ExportOutcome) -> None:
        rejected = min(max(outcome.rejected_spans, 0), batch.span_count)
        accepted = batch.span_count - rejected
        if accepted:
            self._count_exported(batch.signal, "success", accepted)
        if rejected:
            logger.warning("queue %s: backend rejected %d of %d %s: %s", self.name, rejected,
                           batch.span_count, _items(batch.signal), outcome.message)
            self._count_exported(batch.signal, "failed", rejected)
            self._count_dropped_only(batch.signal, REASON_REJECTED_BY_BACKEND, rejected)
        self._forget(batch)

    def _finish_dropped(self, batch: _Batch, reason: str, *, outcome: str) -> None:
        self._count_exported(batch.signal, outcome, batch.span_count)
        self._count_dropped_only(batch.signal, reason, batch.span_count)
        self._forget(batch)

    def _count_exported(self, signal: str, outcome: str, n: int) -> None:
        if signal == TRACES:
            self.stats.inc("spans_exported_total", (self._exporter_label, outcome), n)
        else:
            self.stats.inc("signals_exported_total", (self._exporter_label, signal, outcome), n)

    def _count_dropped_only(self, signal: str, reason: str, n: int) -> None:
        if signal == TRACES:
            self.stats.inc("spans_dropped_total", (reason,), n)
        else:
            self.stats.inc("signals_dropped_total", (signal, reason), n)

    def _forget(self, batch: _Batch) -> None:
        if batch.key is not None and self.spool is not None:
            try:
                self.spool.remove(batch.key)
            except OSError as exc:
                # Worst case the batch is sent again after a restart (at-least-once).
                logger.error("queue %s: cannot remove %s: %s", self.name, batch.key, exc)

    def _count_drop(self, span_count: int, reason: str, signal: str = TRACES) -> None:
        self._count_exported(signal, "dropped", span_count)
        self._count_dropped_only(signal, reason, span_count)

    def _count_quarantine(self, key: str, reason: str) -> None:
        self.stats.inc("queue_files_quarantined_total", (self.name,))

    def _publish_size(self) -> None:
        with self._cond:
            self._publish_size_locked()

    def _publish_size_locked(self) -> None:
        self.stats.set_gauge("queue_size", (self.name,), float(self._held_batches))
