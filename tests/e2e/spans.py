"""Reading what a recording OTLP backend received: spans by id, attributes as plain Python values."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def any_value(v: Any) -> Any:
    """A protobuf ``AnyValue`` as a plain Python value (arrays as lists)."""
    which = v.WhichOneof("value")
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def attributes(kvs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` → dict."""
    return {kv.key: any_value(kv.value) for kv in kvs}


def received_spans(requests: Any) -> dict[str, tuple[dict[str, Any], Any]]:
    """Every span in a list of ``ExportTraceServiceRequest``: hex span id → (resource attributes, span).

    A span id seen twice keeps its last copy (check duplicates with ``OtlpBackend.span_id_counts``).
    """
    out: dict[str, tuple[dict[str, Any], Any]] = {}
    for req in list(requests):
        for rs in req.resource_spans:
            res = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    out[span.span_id.hex()] = (res, span)
    return out
