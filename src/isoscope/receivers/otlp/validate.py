"""Span-level validation of received OTLP trace requests.

A request that parses is not necessarily usable: spans with ids of the wrong
length cannot be joined or forwarded, and attribute values nested without
bound make every later stage (enrichment, JSON export) recurse without bound.
Such spans are removed and reported through OTLP partial success
(``docs/specification.md``, "Partial Success"); the rest of the request goes on.
With :class:`~isoscope.receivers.otlp.limits.RequestLimits`, spans over a
per-span limit (attributes, events, links) are removed the same way, and a
request over a per-request limit (spans, total attributes) raises
``RequestOverLimit`` before any span is looked at closely.

This runs on the hot path for every span, so the common case (nothing to
reject) only reads fields and never copies or rebuilds the request.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.receivers.otlp.limits import LimitChecker, RequestLimits

logger = logging.getLogger(__name__)

MAX_ANYVALUE_DEPTH = 32
"""Deepest allowed nesting of ``AnyValue`` (kvlist / array) inside one attribute value."""

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


@dataclass(slots=True)
class ValidationResult:
    """Outcome of ``validate_request``.

    Attributes:
        accepted: the request with invalid spans removed (the same object that was passed in).
        rejected: number of spans removed.
        message: human-readable reason for the rejections, ``""`` if none.
        accepted_spans: number of spans left in ``accepted``.
    """

    accepted: ExportTraceServiceRequest
    rejected: int
    message: str
    accepted_spans: int = 0

    @property
    def received_spans(self) -> int:
        """Spans in the request as received (accepted + rejected)."""
        return self.accepted_spans + self.rejected


def _value_too_deep(value: Any, depth: int) -> bool:
    """True if an AnyValue nests kvlists/arrays deeper than the limit."""
    kind = value.WhichOneof("value")
    if kind == "kvlist_value":
        if depth > MAX_ANYVALUE_DEPTH:
            return True
        for kv in value.kvlist_value.values:
            if _value_too_deep(kv.value, depth + 1):
                return True
    elif kind == "array_value":
        if depth > MAX_ANYVALUE_DEPTH:
            return True
        for v in value.array_value.values:
            if _value_too_deep(v, depth + 1):
                return True
    return False


def _attrs_too_deep(attributes: Any) -> bool:
    for kv in attributes:
        v = kv.value
        # Scalars are the overwhelming majority: test for the two nesting
        # kinds directly instead of recursing into every value.
        if (v.HasField("kvlist_value") or v.HasField("array_value")) and _value_too_deep(v, 1):
            return True
    return False


def _span_problem(span: Any) -> str | None:
    """Why a span must be rejected, or None if it is fine."""
    tid = span.trace_id
    if len(tid) != 16 or tid == _ZERO_TRACE:
        return "trace_id must be 16 bytes and not all zero"
    sid = span.span_id
    if len(sid) != 8 or sid == _ZERO_SPAN:
        return "span_id must be 8 bytes and not all zero"
    psid = span.parent_span_id
    if psid and len(psid) != 8:
        return "parent_span_id must be empty or 8 bytes"
    if span.attributes and _attrs_too_deep(span.attributes):
        return f"attribute value nested deeper than {MAX_ANYVALUE_DEPTH}"
    for ev in span.events:
        if ev.attributes and _attrs_too_deep(ev.attributes):
            return f"event attribute value nested deeper than {MAX_ANYVALUE_DEPTH}"
    for link in span.links:
        if link.attributes and _attrs_too_deep(link.attributes):
            return f"link attribute value nested deeper than {MAX_ANYVALUE_DEPTH}"
    return None


def _resource_problem(rs: Any) -> str | None:
    if _attrs_too_deep(rs.resource.attributes):
        return f"resource attribute value nested deeper than {MAX_ANYVALUE_DEPTH}"
    for ss in rs.scope_spans:
        if _attrs_too_deep(ss.scope.attributes):
            return f"scope attribute value nested deeper than {MAX_ANYVALUE_DEPTH}"
    return None


def _check_request_limits(req: ExportTraceServiceRequest, checker: LimitChecker) -> None:
    """Per-request limits that need no look inside a span: span count, resource/scope attributes."""
    for rs in req.resource_spans:
        checker.count_attributes(len(rs.resource.attributes))
        for ss in rs.scope_spans:
            checker.count_spans(len(ss.spans))
            checker.count_attributes(len(ss.scope.attributes))


def validate_request(req: ExportTraceServiceRequest, limits: RequestLimits | None = None) -> ValidationResult:
    """Remove invalid spans from ``req`` in place.

    A span is invalid when its trace id is not 16 bytes or all zero, its span
    id is not 8 bytes or all zero, its parent span id is neither empty nor 8
    bytes, or one of its attribute values (span, event or link) nests
    ``AnyValue`` deeper than ``MAX_ANYVALUE_DEPTH``, or it is over one of the
    per-span ``limits``. A resource or scope whose own attributes nest too
    deep takes all its spans with it. Scope and resource entries left without
    spans are removed.

    Args:
        req: the parsed request; modified only when something is rejected.
        limits: span and attribute limits; None checks none.

    Returns:
        The validation result; ``result.accepted is req``.

    Raises:
        RequestOverLimit: the request is over a per-request limit (nothing
            was removed from it).
    """
    checker = None
    if limits is not None:
        checker = LimitChecker(limits)
        _check_request_limits(req, checker)
    reasons: Counter[str] | None = None
    accepted = 0
    rs_list = req.resource_spans
    for ri in range(len(rs_list) - 1, -1, -1):
        rs = rs_list[ri]
        rproblem = _resource_problem(rs)
        if rproblem is not None:
            n = sum(len(ss.spans) for ss in rs.scope_spans)
            if n:
                reasons = reasons if reasons is not None else Counter()
                reasons[rproblem] += n
            del rs_list[ri]
            continue
        ss_list = rs.scope_spans
        emptied = False
        for si in range(len(ss_list) - 1, -1, -1):
            spans = ss_list[si].spans
            bad: list[int] | None = None
            for i, span in enumerate(spans):
                # Limits first: they only read lengths, so an oversized span is
                # dropped without its attributes ever being walked.
                problem = checker.span_problem_pb(span) if checker is not None else None
                if problem is None:
                    problem = _span_problem(span)
                if problem is not None:
                    if bad is None:
                        bad = []
                    bad.append(i)
                    reasons = reasons if reasons is not None else Counter()
                    reasons[problem] += 1
            n = len(spans)
            if bad is not None:
                for i in reversed(bad):
                    del spans[i]
                n -= len(bad)
                if n == 0:
                    del ss_list[si]
                    emptied = True
            accepted += n
        if emptied and len(ss_list) == 0:
            del rs_list[ri]
    if reasons is None:
        return ValidationResult(req, 0, "", accepted)
    rejected = sum(reasons.values())
    detail = "; ".join(f"{n} span(s): {why}" for why, n in sorted(reasons.items()))
    message = f"rejected {rejected} invalid span(s): {detail}"
    logger.debug("%s", message)
    return ValidationResult(req, rejected, message, accepted)

