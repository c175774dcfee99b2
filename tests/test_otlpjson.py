"""OTLP/JSON codec and span validation: examples and property-based tests."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from isoscope import otlpjson
from isoscope.model import iter_spans
from isoscope.otlpjson import OtlpJsonError, decode_request, encode_request, encode_response
from isoscope.receivers.otlp.validate import MAX_ANYVALUE_DEPTH, validate_request

TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"

# -- strategies --------------------------------------------------------------------

ids16 = st.binary(min_size=16, max_size=16).filter(lambda b: any(b))
ids8 = st.binary(min_size=8, max_size=8).filter(lambda b: any(b))
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
scalar = st.one_of(
    st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=20)),
    st.builds(lambda v: AnyValue(int_value=v), int64),
    st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
    st.builds(lambda v: AnyValue(double_value=v), st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=8)),
)


def _array(values: list[AnyValue]) -> AnyValue:
    v = AnyValue()
    v.array_value.values.extend(values)
    return v


def _kvlist(items: list[tuple[str, AnyValue]]) -> AnyValue:
    v = AnyValue()
    for k, val in items:
        v.kvlist_value.values.add(key=k).value.CopyFrom(val)
    return v


anyvalue = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(_array),
    st.lists(st.tuples(st.text(max_size=5), inner), max_size=3).map(_kvlist),
), max_leaves=8)


@st.composite
def spans(draw, *, valid: bool = True):
    span = {
        "trace_id": draw(ids16) if valid else draw(st.one_of(ids16, st.binary(max_size=20))),
        "span_id": draw(ids8) if valid else draw(st.one_of(ids8, st.binary(max_size=10))),
        "parent_span_id": draw(st.one_of(st.just(b""), ids8)) if valid
        else draw(st.one_of(st.just(b""), ids8, st.binary(max_size=10))),
        "name": draw(st.text(max_size=30)),
        "kind": draw(st.integers(0, 5)),
        "start_time_unix_nano": draw(uint64),
        "end_time_unix_nano": draw(uint64),
    }
    attrs = draw(st.lists(st.tuples(st.text(max_size=10), anyvalue), max_size=4))
    links = draw(st.lists(st.tuples(ids16, ids8), max_size=2))
    return span, attrs, links


@st.composite
def requests_(draw, *, valid: bool = True):
    req = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = draw(st.text(max_size=10))
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            ss.scope.name = draw(st.text(max_size=10))
            for span, attrs, links in draw(st.lists(spans(valid=valid), max_size=4)):
                s = ss.spans.add(**span)
                for k, v in attrs:
                    s.attributes.add(key=k).value.CopyFrom(v)
                for tid, sid in links:
                    s.links.add(trace_id=tid, span_id=sid)
    return req


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)

otlp_keys = st.sampled_from(["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "parentSpanId",
                             "links", "attributes", "name", "kind", "value", "key", "stringValue",
                             "kvlistValue", "arrayValue", "values", "intValue", "startTimeUnixNano"])
otlp_shaped = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=34),
              st.sampled_from([TRACE, SPAN, "", "zz", TRACE.upper()])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(otlp_keys, inner, max_size=4)),
    max_leaves=25)

# -- codec examples ------------------------------------------------------------------


def test_decode_uses_hex_ids_and_integer_enums():
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": TRACE, "spanId": SPAN, "parentSpanId": "", "name": "op", "kind": 3,
        "startTimeUnixNano": "1700000000000000001", "endTimeUnixNano": 1700000000000000002,
        "links": [{"traceId": TRACE.upper(), "spanId": SPAN}],
        "unknownField": {"ignored": True}}]}]}]}
    req = decode_request(json.dumps(doc).encode())
    span = next(iter_spans(req))
    assert span.trace_id == bytes.fromhex(TRACE) and span.span_id == bytes.fromhex(SPAN)
    assert span.parent_span_id == b"" and span.kind == 3
    assert span.start_time_unix_nano == 1700000000000000001
    assert span.links[0].trace_id == bytes.fromhex(TRACE)
    out = json.loads(encode_request(req))
    s = out["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert s["traceId"] == TRACE and s["spanId"] == SPAN and s["kind"] == 3
    assert s["links"][0]["traceId"] == TRACE
    assert "\n" not in encode_request(req)


@pytest.mark.parametrize("doc,needle", [
    ({"resourceSpans": {}}, "resourceSpans must be an array"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": 5}]}]}, "spans must be an array"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"links": 7}]}]}]}, "links must be an array"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"links": [3]}]}]}]}, "must be an object"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "abc"}]}]}]}, "is not hex"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"spanId": "00" * 9}]}]}]}, "must be 8 bytes"),
    ({"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": [1]}]}]}]}, "not an OTLP trace request"),
    ([], "must be a JSON object"),
])
def test_decode_errors_say_where(doc, needle):
    with pytest.raises(OtlpJsonError) as ei:
        decode_request(json.dumps(doc))
    assert needle in str(ei.value)


def test_null_fields_are_defaults():
    req = decode_request('{"resourceSpans": [{"scopeSpans": null}, {"scopeSpans": [{"spans": '
                         '[{"traceId": null, "name": "n"}]}]}]}')
    assert [s.name for s in iter_spans(req)] == ["n"]


def test_invalid_utf8_and_lone_surrogates_are_errors():
    with pytest.raises(OtlpJsonError):
        decode_request(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\xc3\x28"}]}]}]}')
    with pytest.raises(OtlpJsonError):
        decode_request('{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\\ud800"}]}]}]}')


def test_encode_response_partial_success():
    resp = ExportTraceServiceResponse()
    resp.partial_success.rejected_spans = 3
    resp.partial_success.error_message = "bad ids"
    doc = json.loads(encode_response(resp))
    assert doc == {"partialSuccess": {"rejectedSpans": "3", "errorMessage": "bad ids"}}


# -- codec properties ----------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_())
def test_json_round_trip(req):
    again = decode_request(encode_request(req))
    assert again == req
    assert decode_request(encode_request(req).encode()) == req


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_decode_arbitrary_json_only_raises_documented_error(doc):
    try:
        result = decode_request(json.dumps(doc))
    except OtlpJsonError:
        return
    assert isinstance(result, ExportTraceServiceRequest)


@settings(max_examples=300, deadline=None)
@given(otlp_shaped)
def test_decode_otlp_shaped_json_only_raises_documented_error(doc):
    try:
        result = decode_request(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [doc]}]}]}))
    except OtlpJsonError:
        return
    assert isinstance(result, ExportTraceServiceRequest)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_only_raises_documented_error(data):
    try:
        decode_request(data)
    except OtlpJsonError:
        pass


# -- validation --------------------------------------------------------------------

def _is_valid(span) -> bool:
    """Independent statement of the rules validate_request enforces on ids."""
    return (len(span.trace_id) == 16 and any(span.trace_id) and len(span.span_id) == 8
            and any(span.span_id) and len(span.parent_span_id) in (0, 8))


def _depth(v: AnyValue) -> int:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return 1 + max((_depth(x) for x in v.array_value.values), default=0)
    if kind == "kvlist_value":
        return 1 + max((_depth(kv.value) for kv in v.kvlist_value.values), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(requests_())
def test_valid_requests_pass_untouched(req):
    before = req.SerializeToString()
    n = sum(1 for _ in iter_spans(req))
    res = validate_request(req)
    assert res.accepted is req
    assert res.rejected == 0 and res.message == "" and res.accepted_spans == n
    assert req.SerializeToString() == before


@settings(max_examples=300, deadline=None)
@given(requests_(valid=False))
def test_invalid_spans_are_removed_and_counted(req):
    expected = [s.name for s in iter_spans(req) if _is_valid(s)]
    empty_before = sum(1 for rs in req.resource_spans for ss in rs.scope_spans if not ss.spans)
    n_bad = sum(1 for s in iter_spans(req) if not _is_valid(s))
    res = validate_request(req)
    assert res.rejected == n_bad
    assert [s.name for s in iter_spans(res.accepted)] == expected
    assert res.accepted_spans == len(expected)
    assert all(_is_valid(s) for s in iter_spans(res.accepted))
    assert bool(res.message) == (n_bad > 0)
    # Scopes emptied by the removal are dropped; ones that came empty are left alone.
    empty_after = sum(1 for rs in res.accepted.resource_spans for ss in rs.scope_spans if not ss.spans)
    assert empty_after == empty_before
    # Idempotent: what was accepted stays accepted.
    assert validate_request(res.accepted).rejected == 0


@pytest.mark.parametrize("depth,kind", [(MAX_ANYVALUE_DEPTH, "array"), (MAX_ANYVALUE_DEPTH + 1, "array"),
                                        (MAX_ANYVALUE_DEPTH + 1, "kvlist"), (5, "kvlist")])
def test_anyvalue_depth_limit(depth, kind):
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x01" * 8, name="deep")
    v = span.events.add(name="e").attributes.add(key="k").value
    for _ in range(depth):
        v = v.array_value.values.add() if kind == "array" else v.kvlist_value.values.add(key="x").value
    v.string_value = "leaf"
    assert _depth(span.events[0].attributes[0].value) == depth
    res = validate_request(req)
    assert res.rejected == (1 if depth > MAX_ANYVALUE_DEPTH else 0)
    if res.rejected:
        assert "event attribute" in res.message
        assert len(req.resource_spans) == 0


def test_resource_attribute_too_deep_rejects_its_spans():
    req = ExportTraceServiceRequest()
    bad = req.resource_spans.add()
    v = bad.resource.attributes.add(key="k").value
    for _ in range(MAX_ANYVALUE_DEPTH + 1):
        v = v.array_value.values.add()
    ss = bad.scope_spans.add()
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x01" * 8)
    ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    good = req.resource_spans.add()
    good.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 8, name="kept")
    res = validate_request(req)
    assert res.rejected == 2 and "resource attribute" in res.message
    assert [s.name for s in iter_spans(req)] == ["kept"]


def test_module_api_is_stable():
    assert {"decode_request", "encode_request", "encode_response", "OtlpJsonError"} <= set(dir(otlpjson))
