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
import contextlib
import gc
import json
import threading
import time
from typing import Any, Callable, Iterator

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SpanFilter = Callable[[dict[str, Any]], "str | None"]
"""Judges one span object before conversion: a reason to drop it, or None to keep it."""

_ID_LENGTHS = {"traceId": 16, "spanId": 8, "parentSpanId": 8}


_gc_lock = threading.Lock()
_gc_holders = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large JSON document becomes objects.

    Building millions of (acyclic) dicts and lists triggers repeated full
    collections that walk the whole heap with the GIL held, stalling every
    other thread of the daemon for up to seconds; reference counting alone
    frees these objects. Nested and concurrent pauses are counted, so the
    collector comes back when the last one ends.
    """
    global _gc_holders
    with _gc_lock:
        _gc_holders += 1
        if _gc_holders == 1:
            was_enabled = gc.isenabled()
            gc.disable()
            gc_paused.was_enabled = was_enabled  # type: ignore[attr-defined]
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and getattr(gc_paused, "was_enabled", True):
                gc.enable()


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


def json_array(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    """``obj[key]`` as a list; absent or null (the JSON mapping's default) is empty."""
    val = obj.get(key)
    if val is None:
        return []
    if not isinstance(val, list):
        raise OtlpJsonError(f"{where + '.' if where else ''}{key} must be an array")
    return val


def decode_request(data: bytes | str, *, span_filter: SpanFilter | None = None,
                   on_spans: Callable[[int], None] | None = None) -> ExportTraceServiceRequest:
    """Parse an OTLP/JSON ``ExportTraceServiceRequest``.

    The JSON object tree is checked (and filtered) before it is converted to
    a protobuf message, the expensive part: a span dropped by ``span_filter``
    is never converted, and an exception raised by ``on_spans`` or
    ``span_filter`` (e.g. a per-request limit) stops decoding at once.

    Args:
        data: the JSON document (UTF-8 bytes or str).
        span_filter: called with each span object; a returned reason drops the span.
        on_spans: called with the number of spans of each ``scopeSpans``
            entry, before its spans are looked at.

    Returns:
        The request message (without the dropped spans).

    Raises:
        OtlpJsonError: not JSON, not UTF-8, wrong shape, or a bad hex id.
    """
    with gc_paused():
        return _decode_request(data, span_filter, on_spans)


def _decode_request(data: bytes | str, span_filter: SpanFilter | None,
                    on_spans: Callable[[int], None] | None) -> ExportTraceServiceRequest:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise OtlpJsonError(f"body is not valid JSON: {exc}") from None
    del data
    if not isinstance(doc, dict):
        raise OtlpJsonError("body must be a JSON object (ExportTraceServiceRequest)")
    span_lists: list[tuple[int, int, list[Any]]] = []
    for i, rs in enumerate(json_array(doc, "resourceSpans", "")):
        if not isinstance(rs, dict):
            raise OtlpJsonError(f"resourceSpans[{i}] must be an object")
        for j, ss in enumerate(json_array(rs, "scopeSpans", f"resourceSpans[{i}]")):
            if not isinstance(ss, dict):
                raise OtlpJsonError(f"resourceSpans[{i}].scopeSpans[{j}] must be an object")
            spans = json_array(ss, "spans", f"resourceSpans[{i}].scopeSpans[{j}]")
            if on_spans is not None:
                on_spans(len(spans))
            dropped: list[int] = []
            for k, span in enumerate(spans):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                if not isinstance(span, dict):
                    raise OtlpJsonError(f"{where} must be an object")
                if span_filter is not None and span_filter(span) is not None:
                    dropped.append(k)
                    continue
                _ids_hex_to_b64(span, where)
                for m, link in enumerate(json_array(span, "links", where)):
                    if not isinstance(link, dict):
                        raise OtlpJsonError(f"{where}.links[{m}] must be an object")
                    _ids_hex_to_b64(link, f"{where}.links[{m}]")
            if dropped:
                keep = set(range(len(spans))).difference(dropped)
                spans = [spans[k] for k in sorted(keep)]
            # Spans are converted one by one below: detach them from the skeleton.
            span_lists.append((i, j, spans))
            if "spans" in ss:
                ss["spans"] = []
    msg = ExportTraceServiceRequest()
    where = "request"
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
        del doc
        converted = 0
        for i, j, spans in span_lists:
            target = msg.resource_spans[i].scope_spans[j].spans
            for k, span in enumerate(spans):
                where = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                json_format.ParseDict(span, target.add(), ignore_unknown_fields=True)
                converted += 1
                if converted % _YIELD_EVERY == 0:
                    # Conversion is pure Python and can take seconds for a big
                    # request: let the threads serving other senders run.
                    time.sleep(0)
    except (json_format.ParseError, RecursionError, ValueError, TypeError, AttributeError,
            OverflowError) as exc:
        raise OtlpJsonError(f"not an OTLP trace request: {where}: {exc}") from None
    return msg


_YIELD_EVERY = 128


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


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def span_to_dict(span: Any) -> dict[str, Any]:
    """The OTLP/JSON object form of one ``Span``."""
    d = json_format.MessageToDict(span, use_integers_for_enums=True)
    _b64_ids_to_hex(d)
    for link in d.get("links", ()):
        _b64_ids_to_hex(link)
    return d


def iter_request_json(request: ExportTraceServiceRequest) -> Iterator[str]:
    """The OTLP/JSON text of a request, in pieces of at most one span each.

    Joined, the pieces are exactly ``json.dumps(request_to_dict(request))``
    with compact separators; producing them holds one span's object form at a
    time instead of the whole request's, whose Python objects take tens of
    times the request's size. Fields appear in field-number order and
    default-valued ones are left out, as ``MessageToDict`` does.
    """
    yield "{"
    if len(request.resource_spans):
        yield '"resourceSpans":['
        for i, rs in enumerate(request.resource_spans):
            yield "{" if i == 0 else ",{"
            sep = ""
            if rs.HasField("resource"):
                yield '"resource":' + _dumps(json_format.MessageToDict(rs.resource, use_integers_for_enums=True))
                sep = ","
            if len(rs.scope_spans):
                yield sep + '"scopeSpans":['
                sep = ","
                for j, ss in enumerate(rs.scope_spans):
                    yield from _iter_scope_spans(ss, j == 0)
                yield "]"
            if rs.schema_url:
                yield sep + '"schemaUrl":' + _dumps(rs.schema_url)
            yield "}"
        yield "]"
    yield "}"


def _iter_scope_spans(ss: Any, first: bool) -> Iterator[str]:
    yield "{" if first else ",{"
    sep = ""
    if ss.HasField("scope"):
        yield '"scope":' + _dumps(json_format.MessageToDict(ss.scope, use_integers_for_enums=True))
        sep = ","
    if len(ss.spans):
        yield sep + '"spans":['
        sep = ","
        for k, span in enumerate(ss.spans):
            yield ("" if k == 0 else ",") + _dumps(span_to_dict(span))
        yield "]"
    if ss.schema_url:
        yield sep + '"schemaUrl":' + _dumps(ss.schema_url)
    yield "}"


def encode_request(request: ExportTraceServiceRequest) -> str:
    """Serialize a request as one line of OTLP/JSON (no newline inside)."""
    return "".join(iter_request_json(request))


def encode_response(response: ExportTraceServiceResponse) -> str:
    """Serialize an ``ExportTraceServiceResponse`` as OTLP/JSON."""
    return json.dumps(json_format.MessageToDict(response), separators=(",", ":"))
