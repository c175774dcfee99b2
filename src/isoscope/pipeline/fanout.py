"""Hand each enriched batch to every exporter queue, serialized once.

A request the receivers accepted can be larger than what a backend takes in one
message (OTLP/HTTP bodies up to 20 MiB in; gRPC servers refuse over 4 MiB by
default, and refuse it for good): an oversized request is split into requests
of at most ``max_request_bytes``, at span granularity, each keeping its
resource and scope.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.model import TraceBatch

DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024
"""Below the 4 MiB a gRPC server accepts by default, with room for framing."""


class PayloadQueue(Protocol):
    def enqueue(self, payload: bytes, span_count: int, signal: str = "traces") -> object: ...


def _field_overhead(size: int) -> int:
    """Bytes a length-delimited field of ``size`` bytes takes (tag + varint length + body)."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def split_request(req: ExportTraceServiceRequest, max_bytes: int) -> Iterator[tuple[ExportTraceServiceRequest, int]]:
    """Yield ``(request, span_count)`` pieces of at most ``max_bytes`` each (a single span larger
    than that travels alone), in order, every span exactly once."""
    out = ExportTraceServiceRequest()
    count = 0
    size = 0
    for rs in req.resource_spans:
        rs_head = _field_overhead(rs.resource.ByteSize()) + len(rs.schema_url) + 4
        cur_rs = None
        for ss in rs.scope_spans:
            ss_head = _field_overhead(ss.scope.ByteSize()) + len(ss.schema_url) + 4
            cur_ss = None
            for span in ss.spans:
                need = _field_overhead(span.ByteSize())
                head = (rs_head if cur_rs is None else 0) + (ss_head if cur_ss is None else 0)
                if count and size + head + need > max_bytes:
                    yield out, count
                    out, count, size = ExportTraceServiceRequest(), 0, 0
                    cur_rs = cur_ss = None
                    head = rs_head + ss_head
                if cur_rs is None:
                    cur_rs = out.resource_spans.add()
                    cur_rs.resource.CopyFrom(rs.resource)
                    cur_rs.schema_url = rs.schema_url
                if cur_ss is None:
                    cur_ss = cur_rs.scope_spans.add()
                    cur_ss.scope.CopyFrom(ss.scope)
                    cur_ss.schema_url = ss.schema_url
                cur_ss.spans.append(span)
                count += 1
                size += head + need
    if count:
        yield out, count


class Fanout:
    """Serializes each enriched batch once and hands it to every exporter queue.

    Args:
        queues: the exporters' queues (each bounds, retries and persists on its own).
        max_request_bytes: larger batches are split into requests of at most this size.
    """

    def __init__(self, queues: Sequence[PayloadQueue], max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self._queues = tuple(queues)
        self._max = max_request_bytes

    def __call__(self, batch: TraceBatch) -> None:
        payload = batch.request.SerializeToString()
        if len(payload) <= self._max:
            self._enqueue(payload, batch.span_count)
            return
        for piece, count in split_request(batch.request, self._max):
            self._enqueue(piece.SerializeToString(), count)

    def forward(self, signal: str, payload: bytes, count: int) -> None:
        """Hand one metrics or logs request to every exporter queue, unchanged (never split or enriched).

        A queue whose exporter does not take ``signal`` counts it as dropped (``no_target``).
        """
        for q in self._queues:
            q.enqueue(payload, count, signal)

    def _enqueue(self, payload: bytes, span_count: int) -> None:
        for q in self._queues:
            q.enqueue(payload, span_count)
