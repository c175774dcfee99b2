"""OTLP/JSON codec for trace requests (pure functions, no I/O).

OTLP/JSON is the protobuf JSON mapping with two OTLP-specific rules
(opentelemetry-proto ``docs/specification.md``, "JSON Protobuf Encoding"):

* ``traceId``, ``spanId`` and ``parentSpanId`` (also inside links) are
  lowercase hex strings, not base64;
* enum values are integers; keys are lowerCamelCase; unknown fields are
  ignored by receivers.

This module counts as part of the model layer: receivers use it to decode,
exporters use it to encode.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_ID_LENGTHS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


class OtlpJsonError(ValueError):
    """The JSON document is not a valid OTLP/JSON trace request; the message says where."""


def _hex_to_b64(value: Any, key: str, where: str, *, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise OtlpJsonError(f"{where}.{key}: expected a hex string, got {type(value).__name__}")
    if value == "" and allow_empty:
        return ""
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise OtlpJsonError(f"{where}.{key}: {value[:40]!r} is not hex") from None
    want = _ID_LENGTHS[key]
    if len(raw) != want:
        raise OtlpJsonError(f"{where}.{key}: must be {want} bytes ({want * 2} hex digits), got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def _ids_hex_to_b64(obj: dict[str, Any], where: str) -> None:
    for key in _ID_LENGTHS:
        if obj.get(key) is not None:
            # parentSpanId is empty for root spans; traceId/spanId may be empty in
            # links only when the sender is broken: let the span validator judge.
            obj[key] = _hex_to_b64(obj[key], key, where, allow_empty=True)


def _array(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """``obj[key]`` as a list; absent or null (the JSON mapping's default) is empty."""
    val = obj.get(key)
    if val is None:
        return []
    if not isinstance(val, list):
        raise OtlpJsonError(f"{where + '.' if where else ''}{key} must be an array")
    return val


def decode_request(data: bytes | str) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON ``ExportTraceServiceRequest``.

    Args:
        data: the JSON document (UTF-8 bytes or str).

    Returns:
        The request message.

    Raises:
        OtlpJsonError: not JSON, not UTF-8, wrong shape, or a bad hex id.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OtlpJsonError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OtlpJsonError("body must be a JSON object (ExportTraceServiceRequest)")
    for i, rs in enumerate(_array(doc, "resourceSpans", "")):
        if not isinstance(rs, dict):
            raise OtlpJsonError(f"resourceSpans[{i}] must be an object")
        for j, ss in enumerate(_array(rs, "scopeSpans", f"resourceSpans[{i}]")):
            if not isinstance(ss, dict):
                raise OtlpJsonError(f"resourceSpans[{i}].scopeSpans[{j}] must be an object")
            for k, span in enumerate(_array(ss, "spans", f"resourceSpans[{i}].scopeSpans[{j}]")):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                if not isinstance(span, dict):
                    raise OtlpJsonError(f"{where} must be an object")
                _ids_hex_to_b64(span, where)
                for m, link in enumerate(_array(span, "links", where)):
                    if not isinstance(link, dict):
                        raise OtlpJsonError(f"{where}.links[{m}] must be an object")
                    _ids_hex_to_b64(link, f"{where}.links[{m}]")
    msg = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError, AttributeError,
            OverflowError) as exc:
        raise OtlpJsonError(f"not an OTLP trace request: {exc}") from None
    return msg


def _b64_ids_to_hex(obj: dict[str, Any]) -> None:
    for key in _ID_LENGTHS:
        val = obj.get(key)
        if val:
            obj[key] = base64.b64decode(val).hex()


def request_to_dict(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON object form of a request (hex ids, integer enums, camelCase keys)."""
    doc = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                _b64_ids_to_hex(span)
                for link in span.get("links", []):
                    _b64_ids_to_hex(link)
    return doc


def encode_request(request: ExportTraceServiceRequest) -> str:
    """Serialize a request as one line of OTLP/JSON (no newline inside)."""
    return json.dumps(request_to_dict(request), separators=(",", ":"), ensure_ascii=False)


def encode_response(response: ExportTraceServiceResponse) -> str:
    """Serialize an ``ExportTraceServiceResponse`` as OTLP/JSON."""
    return json.dumps(json_format.MessageToDict(response), separators=(",", ":"))
