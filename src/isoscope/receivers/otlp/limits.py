"""Request limits and bomb-safe decompression for the OTLP receivers.

Two kinds of limit live here:

* **size**: OTLP requires servers to cap the request size *after*
  decompression (opentelemetry-proto ``docs/specification.md``, "OTLP/HTTP
  Request"). A gzip member of a few kilobytes can expand to gigabytes, so
  decompression is incremental and stops as soon as the output would pass the
  limit: memory use stays bounded by the limit whatever the input claims.
* **shape** (:class:`RequestLimits`): a request within the size limit can
  still hold a million attributes on one span or a hundred thousand spans,
  which every later stage (validation, enrichment, export) pays for. Spans over
  a per-span limit are dropped and reported through partial success; a request
  over a per-request limit is refused whole (HTTP 400 / ``INVALID_ARGUMENT``).

Decoding is linear in the body: each gzip member boundary costs work
proportional to that member, never to the rest of the body.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRPC_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HTTP_BODY_BYTES = 20 * 1024 * 1024
DEFAULT_LARGE_REQUEST_BYTES = 1024 * 1024

# Peak memory of handling one request, per decoded byte, beyond the bytes
# themselves: the parsed message (protobuf: 3x for typical spans, up to 9x for
# masses of tiny attributes), enrichment and re-serialisation; OTLP/JSON first
# becomes a tree of Python objects (4x typical, 11x for tiny attributes).
_COST_FACTOR = {"application/json": 12}
_COST_FACTOR_DEFAULT = 8


HELD_COST_FACTOR = 4
"""A parsed batch held for the join, with its child spans and its serialized copy for the exporters,
costs about this many times its protobuf size (see :func:`held_estimate`)."""


def held_estimate(decoded_bytes: int) -> int:
    """The part of a request's reservation that stays with its batch until it is exported.

    The rest (the body's chunks, decompression, JSON decoding) is over once the receiver answers.
    """
    return decoded_bytes * HELD_COST_FACTOR


def memory_estimate(decoded_bytes: int, media: str = "application/x-protobuf") -> int:
    """Estimated peak memory of decoding and processing ``decoded_bytes`` of a request body.

    Args:
        decoded_bytes: size of the (decompressed) body.
        media: its content type (``application/json`` costs more than protobuf).
    """
    return decoded_bytes * _COST_FACTOR.get(media, _COST_FACTOR_DEFAULT)

# zlib window-bits values: 16+15 accepts only a gzip header, 15 a zlib header.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset({"identity", "", *_WBITS})
"""``Content-Encoding`` values the receivers accept (case-insensitive)."""


class BodyTooLarge(Exception):
    """The (decompressed) body would exceed the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes (after decompression)")
        self.limit = limit


class CorruptBody(Exception):
    """The compressed body is not valid for its ``Content-Encoding``."""


class UnsupportedEncoding(Exception):
    """The ``Content-Encoding`` is not one the receivers can decode."""


class _Inflater:
    """One pass of zlib over a (possibly multi-member) body, in linear time.

    Input is handed to zlib in slices that start small after every member
    boundary and double while a member goes on, so the copy zlib makes of the
    input left over after a member (``unused_data``) is bounded by the size of
    the member just decoded, not by the rest of the body: 200,000 empty gzip
    members cost 200,000 small steps, not 200,000 copies of the remaining body.
    """

    __slots__ = ("_encoding", "_wbits", "_zobj", "_slice", "ended", "members", "_emit")

    _MIN_SLICE = 256
    _MAX_SLICE = 64 * 1024
    _MAX_OUT = 256 * 1024  # decoded bytes produced per zlib call

    def __init__(self, encoding: str, wbits: int, emit: Callable[[bytes], None]) -> None:
        self._encoding = encoding
        self._wbits = wbits
        self._zobj: Any = zlib.decompressobj(wbits)
        self._slice = self._MAX_SLICE
        self.ended = False  # the current member ended; only NUL padding or a new member may follow
        self.members = 0
        self._emit = emit

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        pos, end = 0, len(view)
        while pos < end:
            if self.ended:
                # Between members: trailing NUL padding is tolerated (some
                # servers pad), anything else starts a new member (RFC 1952 §2.2).
                while pos < end and view[pos] == 0:
                    pos += 1
                if pos == end:
                    return
                if self._encoding == "deflate":
                    raise CorruptBody("trailing data after the deflate stream")
                self._zobj = zlib.decompressobj(self._wbits)
                self.ended = False
            piece = view[pos:pos + self._slice]
            pos += len(piece)
            self._inflate(piece)
            if self._zobj.eof:
                # Input after the end of this member came back in unused_data
                # (a copy of at most one slice): step back over it.
                pos -= len(self._zobj.unused_data)
                self.members += 1
                self.ended = True
                self._slice = self._MIN_SLICE
            elif self._slice < self._MAX_SLICE:
                self._slice *= 2

    def _inflate(self, data: Any) -> None:
        zobj = self._zobj
        while True:
            try:
                out = zobj.decompress(data, self._MAX_OUT)
            except zlib.error as exc:
                raise CorruptBody(f"invalid {self._encoding} data: {exc}") from None
            if out:
                self._emit(out)
            data = zobj.unconsumed_tail
            if not data or zobj.eof:
                return


class BoundedDecoder:
    """Incremental decoder for one request body with a hard output limit.

    Feed the body chunk by chunk as it arrives. Compressed input is decoded
    twice: once while it is fed, only *counting* the output in pieces that are
    thrown away at once, and once in ``finish`` when the decoded size is known
    to fit. A bomb is therefore rejected having cost one small scratch buffer,
    never ``limit`` bytes of memory. Both passes are linear in the body, also
    for bodies made of many concatenated gzip members.

    Args:
        encoding: the request's ``Content-Encoding`` (``gzip``, ``x-gzip``,
            ``deflate``, ``identity`` or empty).
        limit: maximum number of decoded bytes (also applies to the raw body).

    Raises:
        UnsupportedEncoding: the encoding is not supported.
    """

    __slots__ = ("_limit", "_raw", "_raw_size", "_decoded", "_wbits", "_counter", "encoding")

    def __init__(self, encoding: str, limit: int) -> None:
        enc = encoding.strip().lower()
        if enc not in SUPPORTED_ENCODINGS:
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
        self.encoding = enc
        """The normalised ``Content-Encoding``."""
        self._limit = limit
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._decoded = 0
        self._wbits = _WBITS.get(enc)
        self._counter = _Inflater(enc, self._wbits, self._count) if self._wbits is not None else None

    def feed(self, chunk: bytes) -> None:
        """Add the next chunk of the raw (possibly compressed) body.

        Raises:
            BodyTooLarge: the raw or decoded body passed the limit.
            CorruptBody: the compressed stream is invalid.
        """
        if not chunk:
            return
        self._raw_size += len(chunk)
        if self._raw_size > self._limit:
            raise BodyTooLarge(self._limit)
        self._raw.append(chunk)
        if self._counter is None:
            self._decoded = self._raw_size
            return
        self._counter.feed(chunk)

    def _count(self, out: bytes) -> None:
        self._decoded += len(out)
        if self._decoded > self._limit:
            self._raw = []
            raise BodyTooLarge(self._limit)

    def finish(self) -> bytes:
        """Return the complete decoded body (the decoder is empty afterwards).

        Raises:
            CorruptBody: the compressed stream ended early.
        """
        raw, self._raw = self._raw, []
        if self._counter is None:
            return raw[0] if len(raw) == 1 else b"".join(raw)
        # An empty body carries no compressed stream at all: treat it as an
        # empty request rather than as corrupt.
        if not raw:
            return b""
        if not self._counter.ended:
            raise CorruptBody(f"truncated {self.encoding} data")
        out: list[bytes] = []
        assert self._wbits is not None
        inflater = _Inflater(self.encoding, self._wbits, out.append)
        for i in range(len(raw)):
            chunk, raw[i] = raw[i], b""
            inflater.feed(chunk)
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def decoded_size(self) -> int:
        """Decoded bytes counted so far."""
        return self._decoded

    @property
    def raw_size(self) -> int:
        """Raw (as received) bytes so far."""
        return self._raw_size

    @property
    def members(self) -> int:
        """Compressed members (streams) completed so far (0 for identity)."""
        return self._counter.members if self._counter is not None else 0


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Decode a whole body at once with the same limits as ``BoundedDecoder``.

    Args:
        body: raw body bytes.
        encoding: its ``Content-Encoding``.
        limit: maximum decoded size.

    Returns:
        The decoded body.

    Raises:
        UnsupportedEncoding, BodyTooLarge, CorruptBody: see ``BoundedDecoder``.
    """
    dec = BoundedDecoder(encoding, limit)
    dec.feed(body)
    return dec.finish()


# ---------------------------------------------------------------------------
# Shape limits
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-request and per-span limits on what one export request may hold.

    The defaults are far above what an honest SDK sends (the OpenTelemetry
    SDKs cap a span at 128 attributes, events and links, and batch 512
    spans) and far below what makes one request cost the daemon hundreds of
    megabytes.

    Attributes:
        max_spans_per_request: more spans than this refuses the whole request.
        max_attributes_per_span: a span with more attributes is dropped.
        max_events_per_span: a span with more events is dropped.
        max_links_per_span: a span with more links is dropped.
        max_total_attributes_per_request: attributes of the kept spans (their
            own, their events' and their links') plus resource and scope
            attributes; more refuses the whole request.
        max_data_points_per_request: metric data points in one metrics
            request (passed through unchanged); more refuses the whole request.
        max_log_records_per_request: log records in one logs request (passed
            through unchanged); more refuses the whole request.
    """

    max_spans_per_request: int = 50_000
    max_attributes_per_span: int = 1_000
    max_events_per_span: int = 1_000
    max_links_per_span: int = 1_000
    max_total_attributes_per_request: int = 1_000_000
    max_data_points_per_request: int = 200_000
    max_log_records_per_request: int = 50_000

    def max_items(self, signal: str) -> tuple[str, int]:
        """``(limit name, value)`` bounding the items of one request of ``signal``."""
        name = {"traces": "max_spans_per_request", "metrics": "max_data_points_per_request",
                "logs": "max_log_records_per_request"}[signal]
        return name, getattr(self, name)


class RequestOverLimit(Exception):
    """The whole request is over a per-request limit (HTTP 400 / ``INVALID_ARGUMENT``).

    Attributes:
        limit: the name of the limit (``max_spans_per_request`` …).
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class LimitChecker:
    """Applies :class:`RequestLimits` to one request, counting as it goes.

    One checker serves one request, in either representation: the OTLP/JSON
    object tree (before it becomes a protobuf message, so an oversized span is
    never converted) or the parsed protobuf message (only ``len()`` of
    repeated fields is read, which does not materialise their elements).

    Args:
        limits: the limits.
    """

    __slots__ = ("limits", "spans", "attributes", "rejected")

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self.spans = 0
        self.attributes = 0
        self.rejected: Counter[str] = Counter()

    def count_spans(self, n: int) -> None:
        """Add ``n`` spans to the request's total.

        Raises:
            RequestOverLimit: the total passed ``max_spans_per_request``.
        """
        self.spans += n
        if self.spans > self.limits.max_spans_per_request:
            raise RequestOverLimit(
                "max_spans_per_request",
                f"request holds more than {self.limits.max_spans_per_request} spans "
                f"(receivers.limits.max_spans_per_request); send smaller batches")

    def count_attributes(self, n: int) -> None:
        """Add ``n`` attributes to the request's total.

        Raises:
            RequestOverLimit: the total passed ``max_total_attributes_per_request``.
        """
        self.attributes += n
        if self.attributes > self.limits.max_total_attributes_per_request:
            raise RequestOverLimit(
                "max_total_attributes_per_request",
                f"request holds more than {self.limits.max_total_attributes_per_request} attributes "
                f"(receivers.limits.max_total_attributes_per_request); send smaller batches")

    def _judge(self, n_attrs: int, n_events: int, n_links: int) -> str | None:
        lim = self.limits
        if n_attrs > lim.max_attributes_per_span:
            return f"more than {lim.max_attributes_per_span} attributes (receivers.limits.max_attributes_per_span)"
        if n_events > lim.max_events_per_span:
            return f"more than {lim.max_events_per_span} events (receivers.limits.max_events_per_span)"
        if n_links > lim.max_links_per_span:
            return f"more than {lim.max_links_per_span} links (receivers.limits.max_links_per_span)"
        return None

    def span_problem_pb(self, span: Any) -> str | None:
        """Why a protobuf ``Span`` is over a per-span limit, or None (then its attributes are counted).

        Raises:
            RequestOverLimit: the request's attribute total passed its limit.
        """
        events, links = span.events, span.links
        why = self._judge(len(span.attributes), len(events), len(links))
        if why is not None:
            self.rejected[why] += 1
            return why
        n = len(span.attributes)
        for ev in events:
            n += len(ev.attributes)
        for link in links:
            n += len(link.attributes)
        self.count_attributes(n)
        return None

    def span_problem_json(self, span: dict[str, Any]) -> str | None:
        """Why an OTLP/JSON span object is over a per-span limit, or None (then its attributes are counted).

        Raises:
            RequestOverLimit: the request's attribute total passed its limit.
        """
        attrs, events, links = (_json_len(span.get(k)) for k in ("attributes", "events", "links"))
        why = self._judge(attrs, events, links)
        if why is not None:
            self.rejected[why] += 1
            return why
        n = attrs
        for key in ("events", "links"):
            items = span.get(key)
            if isinstance(items, list):
                for item in items:
                    if isinstance(item, dict):
                        n += _json_len(item.get("attributes"))
        self.count_attributes(n)
        return None


def _json_len(value: Any) -> int:
    return len(value) if isinstance(value, list) else 0
