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
from isoscope.exporters.targets import ForwardTarget, build_exporter, resolve_targets, target_from_url, targets_from_env

__all__ = [
    "ExportQueue", "FileExporter", "ForwardTarget", "InMemoryExporter", "OtlpGrpcExporter", "OtlpHttpExporter",
    "build_exporter", "exporter_from_url", "resolve_targets", "target_from_url", "targets_from_env",
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
    if parts.scheme.lower() == "file":
        if not parts.path:
            raise ValueError(f"{url!r}: file URL needs a path")
        return FileExporter(parts.path, name=name or "file")
    # The URL rules live in one place: a URL is a forward target with default settings.
    target = target_from_url(url, name=name)
    fields = target.model_dump(exclude={"headers", "tls"})
    fields.update(timeout_s=timeout_s, compression=compression or "none", headers=dict(headers or {}),
                  tls={"ca_file": ca_certs} if ca_certs else {})
    return build_exporter(ForwardTarget(**fields))
