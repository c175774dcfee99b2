"""File exporter: one OTLP/JSON ``ExportTraceServiceRequest`` per line.

The format is the protobuf JSON mapping with OTLP's hex ids (see
``isoscope.otlpjson``), so the file can be read back by ``isoscope report``,
replayed into any OTLP/HTTP JSON receiver, or inspected with ``jq``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import IO

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from isoscope.model import ExportOutcome, ExportResult
from isoscope.otlpjson import encode_request

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

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None,
                 rotate: int = 3, fsync: bool = False, name: str = "file") -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.rotate = max(0, rotate)
        self.name = name
        self._fsync = fsync
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._size = 0

    def export(self, payload: bytes, span_count: int) -> ExportOutcome:
        """Decode, encode as OTLP/JSON and append one line."""
        try:
            request = ExportTraceServiceRequest.FromString(payload)
        except DecodeError as exc:
            return ExportOutcome(ExportResult.FAILED, None, f"payload is not a trace request: {exc}")
        line = encode_request(request) + "\n"
        size = len(line.encode("utf-8"))
        with self._lock:
            try:
                f = self._open()
                if self.max_bytes is not None and self._size > 0 and self._size + size > self.max_bytes:
                    self._rotate()
                    f = self._open()
                f.write(line)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
                self._size += size
            except OSError as exc:
                # A full or read-only disk may recover; let the queue retry.
                self._close()
                return ExportOutcome(ExportResult.RETRYABLE, None, f"cannot write {self.path}: {exc}")
        return ExportOutcome(ExportResult.SUCCESS, None, "")

    def shutdown(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._close()

    def _open(self) -> IO[str]:
        if self._file is None:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
            self._size = self._file.tell()
        return self._file

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
