"""Request size limits and bomb-safe decompression for the OTLP receivers.

OTLP requires servers to cap the request size *after* decompression
(opentelemetry-proto ``docs/specification.md``, "OTLP/HTTP Request"). A gzip
member of a few kilobytes can expand to gigabytes, so decompression here is
incremental and stops as soon as the output would pass the limit: memory use
stays bounded by the limit no matter what the compressed input claims.
"""

from __future__ import annotations

import logging
import zlib

logger = logging.getLogger(__name__)

DEFAULT_MAX_GRPC_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_HTTP_BODY_BYTES = 20 * 1024 * 1024

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


class BoundedDecoder:
    """Incremental decoder for one request body with a hard output limit.

    Feed the body chunk by chunk as it arrives from the socket. Compressed
    input is decoded twice: once while it arrives, only *counting* the output
    in small pieces that are thrown away at once, and once in ``finish`` when
    the decoded size is known to fit. A bomb is therefore rejected having
    cost one small scratch buffer, never ``limit`` bytes of memory.

    Args:
        encoding: the request's ``Content-Encoding`` (``gzip``, ``deflate``,
            ``identity`` or empty).
        limit: maximum number of decoded bytes (also applies to the raw body).

    Raises:
        UnsupportedEncoding: the encoding is not supported.
    """

    __slots__ = ("_limit", "_raw", "_raw_size", "_decoded", "_wbits", "_zobj", "_encoding")

    _SCRATCH = 64 * 1024

    def __init__(self, encoding: str, limit: int) -> None:
        enc = encoding.strip().lower()
        if enc not in SUPPORTED_ENCODINGS:
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
        self._encoding = enc
        self._limit = limit
        self._raw: list[bytes] = []
        self._raw_size = 0
        self._decoded = 0
        self._wbits = _WBITS.get(enc)
        self._zobj = zlib.decompressobj(self._wbits) if self._wbits is not None else None

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
        if self._zobj is None:
            self._decoded = self._raw_size
            return
        self._decoded += self._count(chunk)
        if self._decoded > self._limit:
            raise BodyTooLarge(self._limit)

    def _count(self, data: bytes) -> int:
        n = 0
        assert self._zobj is not None and self._wbits is not None
        while data:
            try:
                out = self._zobj.decompress(data, self._SCRATCH)
            except zlib.error as exc:
                raise CorruptBody(f"invalid {self._encoding} data: {exc}") from None
            n += len(out)
            if self._decoded + n > self._limit:
                return n
            if self._zobj.eof:
                # Concatenated gzip members are legal (RFC 1952 §2.2).
                rest = self._zobj.unused_data
                if not rest.strip(b"\x00"):
                    return n
                if self._encoding == "deflate":
                    raise CorruptBody("trailing data after the deflate stream")
                self._zobj = zlib.decompressobj(self._wbits)
                data = rest
                continue
            data = self._zobj.unconsumed_tail
        return n

    def finish(self) -> bytes:
        """Return the complete decoded body.

        Raises:
            CorruptBody: the compressed stream ended early.
        """
        raw = b"".join(self._raw)
        self._raw = []
        if self._zobj is None:
            return raw
        # An empty body carries no compressed stream at all: treat it as an
        # empty request rather than as corrupt.
        if not raw:
            return b""
        if not self._zobj.eof:
            raise CorruptBody(f"truncated {self._encoding} data")
        out: list[bytes] = []
        data = raw
        while data.strip(b"\x00"):
            zobj = zlib.decompressobj(self._wbits)
            # The counting pass proved the output fits; the cap is a second guard.
            out.append(zobj.decompress(data, self._limit + 1))
            data = zobj.unused_data
        return b"".join(out)

    @property
    def decoded_size(self) -> int:
        """Decoded bytes counted so far."""
        return self._decoded


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
