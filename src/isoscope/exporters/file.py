"""File exporter: one OTLP/JSON ``ExportTraceServiceRequest`` per line.

The format is the protobuf JSON mapping with OTLP's hex ids (see
``isoscope.otlpjson``), so the file can be read back by ``isoscope report``,
replayed into any OTLP/HTTP JSON receiver, or inspected with ``jq``.

A line is written span by span as it is encoded: the Python object form of a
whole request takes tens of times its size, so it is never built; the
exporter's peak memory is the decoded request plus one span.

The file holds traces only: the exporter declares ``signals = {"traces"}``, so
the export queue counts metrics and logs batches as dropped
(``signals_dropped_total{reason="no_target"}``) instead of handing them here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import IO

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.exporters.signals import TRACES
from isoscope.model import ExportOutcome, ExportResult
from isoscope.otlpjson import iter_request_json

logger = logging.getLogger(__name__)


class FileExporter:
    """Appends batches to a JSON-lines file, flushing after every batch.

    Args:
        path: the file; parent directories are created.
        max_bytes: when set, the file is rotated before a write would make it
            larger than this (a single larger line is still written whole).
        rotate: rotated files kept (``path.1`` newest … ``path.N``); 0 discards
            the old content on rotation.
        fsync: also fsync after every batch (durable, slower).
        name: exporter label value in ``spans_exported_total{exporter}``.
    """

    signals: frozenset[str] = frozenset({TRACES})
    """Signals this exporter writes: traces only."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None,
                 rotate: int = 3, fsync: bool = False, name: str = "file") -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.rotate = max(0, rotate)
        self.name = name
        self._fsync = fsync
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._size = 0

    def export(self, payload: bytes, span_count: int, signal: str = TRACES) -> ExportOutcome:
        """Decode, encode as OTLP/JSON and append one line (streamed, span by span).

        A batch of another signal is refused (not retried): the file holds traces only.
        """
        if signal != TRACES:
            return ExportOutcome(ExportResult.FAILED, None, f"{self.name} writes traces only, not {signal}")
        try:
            request = ExportTraceServiceRequest.FromString(payload)
        except DecodeError as exc:
            return ExportOutcome(ExportResult.FAILED, None, f"payload is not a trace request: {exc}")
        del payload
        with self._lock:
            start = None
            try:
                f = self._open()
                start = self._size
                size = 0
                for n, piece in enumerate(iter_request_json(request), 1):
                    b = piece.encode("utf-8")
                    f.write(b)
                    size += len(b)
                    if n % 128 == 0:
                        # Encoding is pure Python: let the receivers' threads run.
                        time.sleep(0)
                f.write(b"\n")
                size += 1
                f.flush()
                self._size = start + size
                if self.max_bytes is not None and start > 0 and self._size > self.max_bytes:
                    # The line belongs at the start of a fresh file: move it there.
                    self._rotate_moving_tail(start)
                    f = self._open()
                if self._fsync:
                    os.fsync(f.fileno())
            except OSError as exc:
                # A full or read-only disk may recover; let the queue retry, and
                # leave no half line behind for the retry to append to.
                self._truncate_to(start)
                self._close()
                return ExportOutcome(ExportResult.RETRYABLE, None, f"cannot write {self.path}: {exc}")
        return ExportOutcome(ExportResult.SUCCESS, None, "")

    def shutdown(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._close()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "ab", buffering=1 << 16)
            self._size = self._file.tell()
        return self._file

    def _truncate_to(self, offset: int | None) -> None:
        if offset is None or self._file is None:
            return
        try:
            self._file.flush()
        except OSError:
            pass
        try:
            os.ftruncate(self._file.fileno(), offset)
            self._size = offset
        except OSError as exc:
            logger.error("%s: cannot remove a partial line from %s: %s", self.name, self.path, exc)

    def _rotate_moving_tail(self, start: int) -> None:
        """Rotate, carrying the bytes from ``start`` on (the line just written) into the new file."""
        assert self._file is not None
        self._file.close()
        self._file = None
        if self.rotate == 0:
            tmp = f"{self.path}.tail"
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                src.seek(start)
                _copy(src, dst)
            os.replace(tmp, self.path)
            self._size = os.path.getsize(self.path)
            return
        self._rotate()
        rotated = f"{self.path}.1"
        with open(rotated, "r+b") as src, open(self.path, "wb") as dst:
            src.seek(start)
            _copy(src, dst)
            src.truncate(start)
        self._size = os.path.getsize(self.path)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                logger.error("%s: closing %s: %s", self.name, self.path, exc)
            self._file = None

    def _rotate(self) -> None:
        self._close()
        if self.rotate == 0:
            os.unlink(self.path)
            return
        for i in range(self.rotate - 1, 0, -1):
            src = f"{self.path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")
        logger.info("%s: rotated %s", self.name, self.path)


def _copy(src: IO[bytes], dst: IO[bytes], chunk: int = 1 << 20) -> None:
    while True:
        buf = src.read(chunk)
        if not buf:
            return
        dst.write(buf)
