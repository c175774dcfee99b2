"""OTLP/JSON decoding of metrics and logs export requests (pure functions, no I/O).

OTLP/JSON is the protobuf JSON mapping except that trace and span ids are
lowercase hex, not base64 (opentelemetry-proto ``docs/specification.md``,
"JSON Protobuf Encoding"). In metrics and logs such ids appear in two places:
``logRecords[].traceId/spanId`` and the ``exemplars[].traceId/spanId`` of
metric data points. They are rewritten to base64 in the object tree, and the
tree is then converted with ``google.protobuf.json_format``.

Items (data points, log records) are counted on the object tree, before the
conversion (the expensive part), so a request over its item limit costs only
the JSON parse.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable

from google.protobuf import json_format

from isoscope.exporters.signals import LOGS, METRICS, spec
from isoscope.otlpjson import OtlpJsonError, gc_paused, json_array

__all__ = ["decode_signal_request"]

_ID_LENGTHS = {"traceId": 16, "spanId": 8}
# The members of Metric's ``data`` oneof: each holds dataPoints (all but summary's may carry exemplars).
_POINT_KINDS = ("gauge", "sum", "histogram", "exponentialHistogram", "summary")


def decode_signal_request(signal: str, data: bytes | str,
                          on_items: Callable[[int], None] | None = None) -> tuple[Any, int]:
    """Parse an OTLP/JSON ``ExportMetricsServiceRequest`` or ``ExportLogsServiceRequest``.

    Args:
        signal: ``metrics`` or ``logs``.
        data: the JSON document (UTF-8 bytes or str).
        on_items: called with the number of items of each data-point or
            log-record list, before it is looked at; an exception it raises
            (a per-request limit) stops decoding at once.

    Returns:
        ``(request message, item count)``.

    Raises:
        OtlpJsonError: not JSON, not UTF-8, wrong shape, or a bad hex id.
        ValueError: ``signal`` is not ``metrics`` or ``logs``.
    """
    if signal not in (METRICS, LOGS):
        raise ValueError(f"{signal!r} is not decoded here")
    with gc_paused():
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise OtlpJsonError(f"body is not valid JSON: {exc}") from None
        del data
        request_type = spec(signal).request_type
        if not isinstance(doc, dict):
            raise OtlpJsonError(f"body must be a JSON object ({request_type.DESCRIPTOR.name})")
        count = _walk_metrics(doc, on_items) if signal == METRICS else _walk_logs(doc, on_items)
        msg = request_type()
        try:
            json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
        except (json_format.ParseError, RecursionError, ValueError, TypeError, AttributeError,
                OverflowError) as exc:
            raise OtlpJsonError(f"not an OTLP {signal} request: {exc}") from None
        return msg, count


def _array(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """``obj[key]`` as a list of objects; absent or null (the JSON mapping's default) is empty."""
    val = json_array(obj, key, where)
    for i, item in enumerate(val):
        if not isinstance(item, dict):
            raise OtlpJsonError(f"{where + '.' if where else ''}{key}[{i}] must be an object")
    return val


def _ids_hex_to_b64(obj: dict[str, Any], where: str) -> None:
    for key, want in _ID_LENGTHS.items():
        value = obj.get(key)
        if value is None or value == "":
            continue  # a log record outside any trace has no ids
        if not isinstance(value, str):
            raise OtlpJsonError(f"{where}.{key}: expected a hex string, got {type(value).__name__}")
        try:
            raw = binascii.unhexlify(value)
        except (binascii.Error, ValueError):
            raise OtlpJsonError(f"{where}.{key}: {value[:40]!r} is not hex") from None
        if len(raw) != want:
            raise OtlpJsonError(f"{where}.{key}: must be {want} bytes ({want * 2} hex digits), got {len(raw)}")
        obj[key] = base64.b64encode(raw).decode("ascii")


def _walk_metrics(doc: dict[str, Any], on_items: Callable[[int], None] | None) -> int:
    count = 0
    for i, rm in enumerate(_array(doc, "resourceMetrics", "")):
        for j, sm in enumerate(_array(rm, "scopeMetrics", f"resourceMetrics[{i}]")):
            for k, metric in enumerate(_array(sm, "metrics", f"resourceMetrics[{i}].scopeMetrics[{j}]")):
                where = f"resourceMetrics[{i}].scopeMetrics[{j}].metrics[{k}]"
                for kind in _POINT_KINDS:
                    data = metric.get(kind)
                    if not isinstance(data, dict):
                        continue
                    points = _array(data, "dataPoints", f"{where}.{kind}")
                    if on_items is not None:
                        on_items(len(points))
                    count += len(points)
                    for m, point in enumerate(points):
                        pwhere = f"{where}.{kind}.dataPoints[{m}]"
                        for n, exemplar in enumerate(_array(point, "exemplars", pwhere)):
                            _ids_hex_to_b64(exemplar, f"{pwhere}.exemplars[{n}]")
    return count


def _walk_logs(doc: dict[str, Any], on_items: Callable[[int], None] | None) -> int:
    count = 0
    for i, rl in enumerate(_array(doc, "resourceLogs", "")):
        for j, sl in enumerate(_array(rl, "scopeLogs", f"resourceLogs[{i}]")):
            where = f"resourceLogs[{i}].scopeLogs[{j}]"
            records = _array(sl, "logRecords", where)
            if on_items is not None:
                on_items(len(records))
            count += len(records)
            for k, record in enumerate(records):
                _ids_hex_to_b64(record, f"{where}.logRecords[{k}]")
    return count
