"""The three OTLP signals: what travels where, and how many items a request holds.

Traces are the only signal isoscope enriches. Metrics and logs are accepted
by the same receivers and forwarded unchanged, through the same export queues,
so every part of the path needs the same few facts per signal: the OTLP/HTTP
path, the gRPC method, the request and response messages, and the name of the
partial-success field. They live here, in one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["LOGS", "METRICS", "SIGNALS", "TRACES", "SignalSpec", "count_items", "rejected_of", "spec"]

TRACES = "traces"
METRICS = "metrics"
LOGS = "logs"
SIGNALS: tuple[str, ...] = (TRACES, METRICS, LOGS)
"""Every signal, as spelled in the ``signal`` label, spool frames and configuration."""


@dataclass(frozen=True, slots=True)
class SignalSpec:
    """The protocol facts of one signal.

    Attributes:
        name: ``traces``, ``metrics`` or ``logs``.
        http_path: OTLP/HTTP path (``/v1/traces`` …).
        grpc_service: fully qualified gRPC service name.
        request_type: the ``Export…ServiceRequest`` message class.
        response_type: the ``Export…ServiceResponse`` message class.
        rejected_field: the ``partial_success`` field counting rejected items.
        item: what one counted item is, for messages (``span``, ``data point``, ``log record``).
    """

    name: str
    http_path: str
    grpc_service: str
    request_type: Any
    response_type: Any
    rejected_field: str
    item: str

    @property
    def grpc_method(self) -> str:
        """The full gRPC method path (``/<service>/Export``)."""
        return f"/{self.grpc_service}/Export"


_SPECS = {
    TRACES: SignalSpec(TRACES, "/v1/traces", "opentelemetry.proto.collector.trace.v1.TraceService",
                       ExportTraceServiceRequest, ExportTraceServiceResponse, "rejected_spans", "span"),
    METRICS: SignalSpec(METRICS, "/v1/metrics", "opentelemetry.proto.collector.metrics.v1.MetricsService",
                        ExportMetricsServiceRequest, ExportMetricsServiceResponse, "rejected_data_points",
                        "data point"),
    LOGS: SignalSpec(LOGS, "/v1/logs", "opentelemetry.proto.collector.logs.v1.LogsService",
                     ExportLogsServiceRequest, ExportLogsServiceResponse, "rejected_log_records", "log record"),
}


def spec(signal: str) -> SignalSpec:
    """The facts of ``signal``.

    Raises:
        ValueError: not a known signal.
    """
    try:
        return _SPECS[signal]
    except KeyError:
        raise ValueError(f"unknown signal {signal!r}: use one of {', '.join(SIGNALS)}") from None


def rejected_of(response: Any, signal: str) -> tuple[int, str]:
    """``(rejected item count, error message)`` of a response's ``partial_success``."""
    partial = response.partial_success
    return int(getattr(partial, spec(signal).rejected_field)), partial.error_message


def count_items(signal: str, request: Any) -> int:
    """Spans, metric data points or log records in a parsed request.

    Only ``len()`` of repeated fields is read, which does not materialise
    their elements: counting costs one step per metric / scope, not per item.
    """
    n = 0
    if signal == METRICS:
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is not None:
                        n += len(getattr(metric, kind).data_points)
    elif signal == LOGS:
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                n += len(sl.log_records)
    elif signal == TRACES:
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                n += len(ss.spans)
    else:
        spec(signal)  # raises
    return n
