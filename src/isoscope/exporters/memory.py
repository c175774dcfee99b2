"""In-memory exporter: records what it was sent, answers what it is told to.

Meant for tests of anything upstream of an exporter (pipeline, daemon, the
retry queue): the outcomes can be scripted, attempts are timed, and only
accepted requests count as received, as with a real backend. Traces are
decoded into :meth:`InMemoryExporter.requests`; metrics and logs payloads are
kept as they came (:meth:`InMemoryExporter.payloads`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.exporters.signals import SIGNALS, TRACES, spec
from isoscope.model import ExportOutcome, ExportResult, iter_spans

logger = logging.getLogger(__name__)

OutcomeFn = Callable[[Any, int], ExportOutcome]
"""Decides an attempt from the parsed request (of the batch's signal) and its item count."""


class InMemoryExporter:
    """Thread-safe recording exporter.

    Args:
        name: exporter label value.
        delay_s: time each attempt takes (a slow backend).

    Outcomes are taken, in order, from :meth:`script`; when the script is empty,
    from the function given to :meth:`set_default` (SUCCESS if none).
    """

    signals: frozenset[str] = frozenset(SIGNALS)

    def __init__(self, name: str = "memory", *, delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self._cond = threading.Condition()
        self._script: deque[ExportOutcome] = deque()
        self._default: OutcomeFn | None = None
        self._requests: list[ExportTraceServiceRequest] = []
        self._payloads: dict[str, list[bytes]] = {s: [] for s in SIGNALS}
        self._attempts: list[tuple[float, int, ExportResult]] = []
        self.shut_down = False

    def script(self, outcomes: Iterable[ExportOutcome]) -> None:
        """Answer the next attempts with these outcomes, in order."""
        with self._cond:
            self._script.extend(outcomes)

    def set_default(self, fn: OutcomeFn | None) -> None:
        """Decide outcomes once the script is used up (None: always SUCCESS)."""
        with self._cond:
            self._default = fn

    def export(self, payload: bytes, span_count: int, signal: str = TRACES) -> ExportOutcome:
        """Decode the payload, pick the outcome, record the request if accepted."""
        if self.delay_s:
            time.sleep(self.delay_s)
        request = spec(signal).request_type.FromString(payload)
        with self._cond:
            if self._script:
                outcome = self._script.popleft()
            elif self._default is not None:
                outcome = self._default(request, span_count)
            else:
                outcome = ExportOutcome(ExportResult.SUCCESS)
            self._attempts.append((time.monotonic(), span_count, outcome.result))
            if outcome.result is ExportResult.SUCCESS:
                self._payloads[signal].append(payload)
                if signal == TRACES:
                    self._requests.append(request)
            self._cond.notify_all()
        return outcome

    def shutdown(self) -> None:
        self.shut_down = True

    def requests(self) -> list[ExportTraceServiceRequest]:
        """Accepted requests, in arrival order."""
        with self._cond:
            return list(self._requests)

    def payloads(self, signal: str = TRACES) -> list[bytes]:
        """Accepted payloads of ``signal``, byte for byte, in arrival order."""
        with self._cond:
            return list(self._payloads[signal])

    def spans(self) -> list[Any]:
        """Every span of every accepted request."""
        return [span for req in self.requests() for span in iter_spans(req)]

    def span_ids(self) -> list[str]:
        """Hex span ids of every accepted span (duplicates kept)."""
        return [span.span_id.hex() for span in self.spans()]

    def attempts(self) -> list[tuple[float, int, ExportResult]]:
        """``(monotonic time, span_count, result)`` of every attempt."""
        with self._cond:
            return list(self._attempts)

    def wait_for_spans(self, count: int, timeout_s: float) -> bool:
        """Block until at least ``count`` spans were accepted or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(len(list(iter_spans(r))) for r in self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True
