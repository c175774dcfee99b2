"""Hand each enriched batch to every exporter queue, serialized once."""

from __future__ import annotations

from typing import Protocol, Sequence

from isoscope.model import TraceBatch


class PayloadQueue(Protocol):
    def enqueue(self, payload: bytes, span_count: int) -> object: ...


class Fanout:
    """Serializes each enriched batch once and hands it to every exporter queue.

    Args:
        queues: the exporters' queues (each bounds, retries and persists on its own).
    """

    def __init__(self, queues: Sequence[PayloadQueue]) -> None:
        self._queues = tuple(queues)

    def __call__(self, batch: TraceBatch) -> None:
        payload = batch.request.SerializeToString()
        for q in self._queues:
            q.enqueue(payload, batch.span_count)
