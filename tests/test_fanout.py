"""The fan-out: one serialization per batch, oversized requests split by size without losing a span."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from isoscope.model import TraceBatch
from isoscope.pipeline.fanout import Fanout, split_request


class _Queue:
    def __init__(self) -> None:
        self.items: list[tuple[bytes, int]] = []

    def enqueue(self, payload: bytes, span_count: int) -> None:
        self.items.append((payload, span_count))


def _request(shape: list[list[int]], attr_bytes: int = 200) -> ExportTraceServiceRequest:
    """Resources × scopes × spans (``shape[r][s]`` spans), each span carrying ``attr_bytes`` of attribute."""
    req = ExportTraceServiceRequest()
    for r, scopes in enumerate(shape):
        rs = req.resource_spans.add()
        rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=f"svc-{r}")))
        for s, n in enumerate(scopes):
            ss = rs.scope_spans.add()
            ss.scope.name = f"scope-{r}-{s}"
            for i in range(n):
                ss.spans.append(Span(trace_id=os.urandom(16), span_id=os.urandom(8), name=f"op-{r}-{s}-{i}",
                                     attributes=[KeyValue(key="blob", value=AnyValue(string_value="x" * attr_bytes))]))
    return req


def _flatten(req: ExportTraceServiceRequest) -> list[tuple[str, str, bytes]]:
    return [(rs.resource.attributes[0].value.string_value, ss.scope.name, sp.span_id)
            for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans]


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=3), min_size=1, max_size=4),
       max_bytes=st.integers(300, 20_000))
def test_split_keeps_every_span_once_in_order_with_its_resource_and_scope(shape, max_bytes) -> None:
    req = _request(shape)
    pieces = list(split_request(req, max_bytes))
    got = [x for piece, _ in pieces for x in _flatten(piece)]
    assert got == _flatten(req)
    for piece, count in pieces:
        assert count == len(_flatten(piece)) > 0
        # Over the bound only when one span alone is larger than it.
        assert piece.ByteSize() <= max_bytes or count == 1


def test_small_batches_are_serialized_once_and_not_split() -> None:
    q1, q2 = _Queue(), _Queue()
    req = _request([[10]])
    Fanout([q1, q2], max_request_bytes=1 << 20)(TraceBatch(req, "grpc", 10))
    assert q1.items == q2.items == [(req.SerializeToString(), 10)]


def test_a_request_over_the_bound_reaches_every_queue_in_pieces() -> None:
    q = _Queue()
    req = _request([[400], [300]], attr_bytes=10_000)  # ≈ 7 MB
    Fanout([q], max_request_bytes=3 << 20)(TraceBatch(req, "http", 700))
    assert len(q.items) >= 3
    assert sum(c for _, c in q.items) == 700
    assert all(len(p) <= 3 << 20 for p, _ in q.items)
    spans = [x for p, _ in q.items for x in _flatten(ExportTraceServiceRequest.FromString(p))]
    assert spans == _flatten(req)
