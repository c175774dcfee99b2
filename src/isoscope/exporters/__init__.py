"""Span exporters and the shared retry queue they run behind.

Every exporter implements ``isoscope.model.SpanExporter`` (one attempt per
call); :class:`ExportQueue` adds bounding, retries and persistence (on
:class:`isoscope.spool.DiskSpool`, which lives outside this package because
the daemon's receipt log uses it too).
"""

from __future__ import annotations

from typing import Mapping
from urllib.parse import urlsplit

from isoscope.model import SpanExporter
from isoscope.exporters.file import FileExporter
from isoscope.exporters.memory import InMemoryExporter
from isoscope.exporters.otlp_grpc import OtlpGrpcExporter
from isoscope.exporters.otlp_http import OtlpHttpExporter
from isoscope.exporters.queue import ExportQueue

__all__ = [
    "ExportQueue", "FileExporter", "InMemoryExporter", "OtlpGrpcExporter", "OtlpHttpExporter",
    "exporter_from_url",
]


def exporter_from_url(url: str, *, timeout_s: float = 10.0, headers: Mapping[str, str] | None = None,
                      compression: str | None = "gzip", name: str | None = None,
                      ca_certs: str | None = None) -> SpanExporter:
    """Build the exporter a ``--forward`` URL names.

    Args:
        url: ``grpc://host:port`` (plaintext OTLP/gRPC), ``grpcs://host:port``
            (OTLP/gRPC over TLS), ``http://host:port`` or ``https://host:port``
            (OTLP/HTTP protobuf; ``/v1/traces`` is appended unless present), or
            ``file:///path/traces.jsonl`` (OTLP/JSON lines).
        timeout_s: per-attempt timeout.
        headers: extra headers / gRPC metadata.
        compression: ``"gzip"`` or None.
        name: exporter label value; defaults to ``otlp_grpc``, ``otlp_http`` or ``file``.
        ca_certs: CA bundle path for TLS endpoints.

    Raises:
        ValueError: unknown scheme or missing host/port.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not parts.path:
            raise ValueError(f"{url!r}: file URL needs a path")
        return FileExporter(parts.path, name=name or "file")
    if scheme not in ("grpc", "grpcs", "http", "https"):
        raise ValueError(f"{url!r}: scheme must be grpc://, grpcs://, http://, https:// or file://")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"{url!r}: needs host:port")
    if scheme in ("grpc", "grpcs"):
        root = None
        if ca_certs:
            with open(ca_certs, "rb") as f:
                root = f.read()
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return OtlpGrpcExporter(f"{host}:{parts.port}", timeout_s=timeout_s, insecure=scheme == "grpc",
                                headers=headers, compression=compression, root_certificates=root,
                                name=name or "otlp_grpc")
    return OtlpHttpExporter(url, timeout_s=timeout_s, headers=headers, compression=compression,
                            ca_certs=ca_certs, name=name or "otlp_http")
