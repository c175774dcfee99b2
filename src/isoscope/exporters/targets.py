"""Forward targets: where enriched spans go, configured as an OpenTelemetry user expects.

A :class:`ForwardTarget` is one OTLP destination with everything a hosted
backend or a TLS-terminated collector needs: protocol, headers (API keys,
possibly read from mounted Secret files), compression, timeout and TLS (CA,
client certificate for mTLS, plaintext or skip-verify). It is validated like
the rest of the configuration (pydantic), and three sources produce it:

* the configuration file: ``exporters.targets: [{endpoint: ..., ...}]``;
* a ``--forward URL`` / ``exporters.forward`` string (:func:`target_from_url`);
* the standard ``OTEL_EXPORTER_OTLP_*`` environment variables
  (:func:`targets_from_env`), used only when nothing else is configured.

Endpoint rules (the OpenTelemetry exporter specification, plus the
``grpc://`` / ``grpcs://`` spellings isoscope has always accepted):

=========================  =========================================================
``grpc://host:port``       OTLP/gRPC, plaintext
``grpcs://host[:port]``    OTLP/gRPC over TLS (port 443 by default)
``http://host[:port]``     OTLP/HTTP protobuf (or gRPC with ``protocol: grpc``)
``https://host[:port]``    the same over TLS
``host:port``              OTLP/gRPC; TLS unless ``tls.insecure: true`` (the
                           Collector's ``otlp`` exporter reads it the same way)
=========================  =========================================================

For OTLP/HTTP, ``endpoint`` is a base URL and ``/v1/traces`` is appended to its
path (not twice: a URL already ending in ``/v1/traces`` is kept), while
``traces_endpoint`` is used exactly as written (the OpenTelemetry
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` rule). Set one of the two.

Signals: isoscope also passes metrics and logs through unchanged. A target
configured with ``endpoint`` receives all three (OTLP/HTTP: ``/v1/metrics`` and
``/v1/logs`` under the same base path; gRPC: the ``MetricsService`` and
``LogsService`` of the same server). A target configured with only
``traces_endpoint`` (or from ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is a
traces-only destination: metrics and logs are not sent to it and are counted
as dropped there (``signals_dropped_total{reason="no_target"}``).

Secrets: header values are :class:`pydantic.SecretStr`; ``repr``, ``str``,
``model_dump`` (hence ``--print-config``) and every log line show ``***``
instead, and validation errors never echo them. Key files are read only when
an exporter is built and their content is never logged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_serializer, model_validator

from isoscope.exporters.signals import SIGNALS, TRACES, spec
from isoscope.model import SpanExporter

logger = logging.getLogger(__name__)

MASK = "***"
"""What a secret is shown as, everywhere."""

TRACES_PATH = "/v1/traces"
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 header-name characters
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a metric label value and a spool directory name
_RESERVED_HEADERS = frozenset({
    # Set by the exporters themselves or by the transport; overriding them breaks the request.
    "content-type", "content-encoding", "content-length", "transfer-encoding", "host", "te",
    "connection", "user-agent",
})
_DEFAULT_PORTS = {"grpcs": 443, "https": 443, "http": 80}

Protocol = Literal["grpc", "http/protobuf"]


def _printable(value: str) -> bool:
    # gRPC metadata values (and sane HTTP header values) are visible ASCII, space and tab;
    # a CR/LF would split a header and a NUL truncates it.
    return all(c == "\t" or " " <= c <= "~" for c in value)


class _Model(BaseModel):
    # hide_input_in_errors: a pydantic error message must never carry a header value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class HeaderValue(_Model):
    """One header's value: written inline, or read from a file (a mounted Kubernetes Secret).

    In YAML a plain string is an inline value; a mapping reads a file::

        headers:
          x-honeycomb-team: "abc123"                      # inline
          authorization:                                  # from a file
            value_file: /var/run/secrets/otlp/token
            prefix: "Bearer "                             # prepended to the file's content

    The file's content has surrounding whitespace (the trailing newline) removed,
    and is read again whenever the file changes, so a rotated Secret is picked up
    without a restart.
    """

    value: SecretStr | None = None
    value_file: str | None = None
    prefix: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, data: Any) -> Any:
        if isinstance(data, (str, int)) and not isinstance(data, bool):
            return {"value": str(data)}
        if isinstance(data, SecretStr):
            return {"value": data}
        if isinstance(data, Mapping) and isinstance(data.get("value"), int):
            return {**data, "value": str(data["value"])}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "HeaderValue":
        if (self.value is None) == (self.value_file is None):
            raise ValueError("give a header either a value or a value_file, not both or neither")
        if self.value_file is not None and not self.value_file:
            raise ValueError("value_file must be a path")
        if self.value is not None and not _printable(self.value.get_secret_value()):
            # Reached for SecretStr/dict input; ForwardTarget checks plain strings earlier
            # so that the offending value is never the reported input.
            raise ValueError("header value must be printable ASCII (no control characters)")
        if not _printable(self.prefix):
            raise ValueError("header prefix must be printable ASCII (no control characters)")
        return self

    @model_serializer(mode="plain")
    def _masked(self) -> Any:
        if self.value_file is not None:
            return {"value_file": self.value_file, "prefix": self.prefix} if self.prefix \
                else {"value_file": self.value_file}
        return MASK


class TlsSettings(_Model):
    """Transport security of one target.

    Attributes:
        insecure: plaintext; only meaningful for a bare ``host:port`` endpoint
            (a scheme already says whether TLS is used).
        ca_file: CA bundle (PEM) that signs the backend's certificate; the
            system store when unset.
        cert_file: client certificate chain (PEM) for mTLS; needs ``key_file``.
        key_file: client private key (PEM) for mTLS.
        insecure_skip_verify: TLS without checking the backend's certificate
            (OTLP/HTTP only: the gRPC client library cannot do it).
    """

    insecure: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _pairs(self) -> "TlsSettings":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self

    def any_file(self) -> bool:
        """Whether a CA, certificate or key file is set."""
        return bool(self.ca_file or self.cert_file or self.key_file)


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a target resolves to.

    Attributes:
        protocol: ``grpc`` or ``http/protobuf``.
        secure: TLS is used.
        address: ``host:port`` for gRPC, the full POST URL for OTLP/HTTP.
    """

    protocol: Protocol
    secure: bool
    address: str


class ForwardTarget(_Model):
    """One OTLP destination. See the module docstring for the endpoint rules.

    Attributes:
        name: label in ``spans_exported_total{exporter}`` and spool directory
            name; ``otlp_grpc`` / ``otlp_http`` when unset.
        endpoint: base endpoint (``/v1/traces`` appended for OTLP/HTTP).
        traces_endpoint: full traces URL for OTLP/HTTP, used as written.
        protocol: ``grpc`` or ``http/protobuf``; from the scheme when unset.
        headers: sent with every export (gRPC metadata / HTTP headers).
        compression: ``gzip`` or ``none``.
        timeout_s: time one export attempt may take.
        tls: transport security.
    """

    name: str | None = None
    endpoint: str | None = None
    traces_endpoint: str | None = None
    protocol: Protocol | None = None
    headers: dict[str, HeaderValue] = {}
    compression: Literal["gzip", "none"] = "gzip"
    timeout_s: float = Field(10.0, gt=0)
    tls: TlsSettings = TlsSettings()

    @model_validator(mode="before")
    @classmethod
    def _headers_shape(cls, data: Any) -> Any:
        # Checked here, where pydantic reports the whole target as the input,
        # so a mistyped header map is never echoed back with its secrets.
        if isinstance(data, Mapping) and "headers" in data:
            headers = data["headers"]
            if headers is None:
                return {**data, "headers": {}}
            if not isinstance(headers, Mapping):
                raise ValueError("headers must be a mapping of header name to value")
            for key, value in headers.items():
                if not isinstance(key, str) or not _TOKEN.match(key):
                    raise ValueError(f"header name {str(key)[:40]!r} is not a valid HTTP header name")
                if key.lower() in _RESERVED_HEADERS or key.startswith("grpc-"):
                    raise ValueError(f"header {key!r} is set by the exporter and cannot be configured")
                if not isinstance(value, (str, int, Mapping, HeaderValue, SecretStr)) or isinstance(value, bool):
                    raise ValueError(f"header {key!r}: value must be a string or {{value_file: PATH}}")
                if isinstance(value, Mapping) and not set(value) <= {"value", "value_file", "prefix"}:
                    raise ValueError(f"header {key!r}: a mapping takes value, value_file and prefix only")
                if isinstance(value, Mapping) and not isinstance(value.get("value", ""), (str, int, SecretStr)):
                    raise ValueError(f"header {key!r}: value must be a string")
                if isinstance(value, (str, int)) and not _printable(str(value)):
                    raise ValueError(f"header {key!r}: value must be printable ASCII (no control characters)")
            lowered = [k.lower() for k in headers]
            if len(set(lowered)) != len(lowered):
                raise ValueError("header names must be unique (case-insensitively)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "ForwardTarget":
        if self.name is not None and (not _NAME.match(self.name) or len(self.name) > 64):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        dest = self.destination()  # raises ValueError with the reason
        if not dest.secure and (self.tls.any_file() or self.tls.insecure_skip_verify):
            raise ValueError("tls settings given but the endpoint is plaintext: use grpcs:// or https://")
        if self.tls.insecure_skip_verify and dest.protocol == "grpc":
            raise ValueError("tls.insecure_skip_verify is not supported for gRPC: set tls.ca_file "
                             "to the backend's CA instead")
        return self

    # -- resolution ------------------------------------------------------------------

    def signals(self) -> tuple[str, ...]:
        """The signals this target receives: all with ``endpoint``, traces only with ``traces_endpoint``."""
        return SIGNALS if self.traces_endpoint is None else (TRACES,)

    def signal_destination(self, signal: str) -> Destination | None:
        """Where ``signal`` goes (OTLP/HTTP: the signal's own path), or None if this target does not take it.

        Raises:
            ValueError: the endpoint and the other settings do not fit together, or an unknown signal.
        """
        spec(signal)
        if signal not in self.signals():
            return None
        return self.destination(signal)

    def destination(self, signal: str = TRACES) -> Destination:
        """Protocol, TLS and address this target resolves to (for ``signal``: its OTLP/HTTP path).

        Raises:
            ValueError: the endpoint and the other settings do not fit together.
        """
        if (self.endpoint is None) == (self.traces_endpoint is None):
            raise ValueError("set exactly one of endpoint and traces_endpoint")
        raw = (self.endpoint if self.endpoint is not None else self.traces_endpoint) or ""
        full = self.traces_endpoint is not None
        if not raw.strip() or any(c.isspace() for c in raw):
            raise ValueError("endpoint is empty or contains whitespace")
        if "@" in (raw.partition("://")[2] if "://" in raw else raw).partition("/")[0]:
            # Checked first: every other message quotes the endpoint, and this one holds a password.
            raise ValueError("endpoint: credentials in the URL are not supported; put them in headers")
        if "://" not in raw:
            return self._bare(raw)
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if scheme not in ("grpc", "grpcs", "http", "https"):
            raise ValueError(f"endpoint {raw!r}: scheme must be grpc, grpcs, http or https")
        if not parts.hostname:
            raise ValueError(f"endpoint {raw!r}: no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"endpoint {raw!r}: bad port") from None
        if port is None:
            port = _DEFAULT_PORTS.get(scheme)
            if port is None:
                raise ValueError(f"endpoint {raw!r}: grpc:// needs host:port")
        secure = scheme in ("grpcs", "https")
        if self.tls.insecure and secure:
            raise ValueError(f"endpoint {raw!r} is TLS but tls.insecure is set")
        protocol = self.protocol
        if scheme in ("grpc", "grpcs"):
            if protocol not in (None, "grpc"):
                raise ValueError(f"endpoint {raw!r} is gRPC but protocol is {protocol}")
            protocol = "grpc"
        protocol = protocol or "http/protobuf"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if protocol == "grpc":
            # gRPC has no URL path (the method is fixed); the specification says to ignore it.
            return Destination("grpc", secure, f"{host}:{port}")
        netloc = parts.netloc if parts.port is not None else f"{host}:{port}"
        path = parts.path
        if full:
            path = path or "/"
        else:
            path = _signal_path(path, signal)
        query = f"?{parts.query}" if parts.query else ""
        return Destination("http/protobuf", secure, f"{scheme}://{netloc}{path}{query}")

    def _bare(self, raw: str) -> Destination:
        host, sep, port = raw.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {raw!r}: give a URL (https://host:port) or host:port")
        if self.protocol == "http/protobuf":
            raise ValueError(f"endpoint {raw!r}: OTLP/HTTP needs an http:// or https:// URL")
        return Destination("grpc", not self.tls.insecure, raw)

    def label(self) -> str:
        """The exporter name: ``name``, else ``otlp_grpc`` / ``otlp_http``."""
        if self.name:
            return self.name
        try:
            protocol = self.destination().protocol
        except ValueError:
            return "otlp"
        return "otlp_grpc" if protocol == "grpc" else "otlp_http"

    def __str__(self) -> str:
        try:
            dest = self.destination()
            where = f"{dest.protocol}{'+tls' if dest.secure else ''} {dest.address}"
        except ValueError:
            where = "(invalid endpoint)"
        headers = ", ".join(f"{k}={MASK}" for k in self.headers)
        return f"{self.label()}: {where}" + (f" headers[{headers}]" if headers else "")


def _signal_path(path: str, signal: str) -> str:
    """A base path plus ``signal``'s OTLP/HTTP path; a base already ending in a signal path has it replaced."""
    base = path.rstrip("/")
    for other in SIGNALS:
        if base.endswith(spec(other).http_path):
            base = base[:-len(spec(other).http_path)]
            break
    return base + spec(signal).http_path


# ---------------------------------------------------------------------------
# --forward URL strings
# ---------------------------------------------------------------------------

def target_from_url(url: str, *, name: str | None = None) -> ForwardTarget:
    """The target a ``--forward`` / ``exporters.forward`` URL names, with default settings.

    ``grpc://`` and ``grpcs://`` are OTLP/gRPC, ``http://`` and ``https://``
    OTLP/HTTP with ``/v1/traces`` appended (as before targets existed).

    Raises:
        ValueError: the URL is not a valid endpoint.
    """
    if "://" not in url:
        # A bare host:port on the command line has always been refused; keep
        # refusing it so a missing scheme is not silently read as TLS gRPC.
        raise ValueError(f"{url!r} must be grpc://host:port, grpcs://host:port or http(s)://host:port")
    from pydantic import ValidationError
    try:
        return ForwardTarget(endpoint=url, name=name)
    except ValidationError as exc:
        raise ValueError(f"{url!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


# ---------------------------------------------------------------------------
# OTEL_EXPORTER_OTLP_* environment
# ---------------------------------------------------------------------------

_ENV = "OTEL_EXPORTER_OTLP_"
_ENV_TRACES = "OTEL_EXPORTER_OTLP_TRACES_"


def _env(environ: Mapping[str, str], key: str) -> str | None:
    """The signal-specific value if set, else the general one; empty counts as unset."""
    for name in (_ENV_TRACES + key, _ENV + key):
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def parse_env_headers(text: str, *, source: str = "OTEL_EXPORTER_OTLP_HEADERS") -> dict[str, str]:
    """Parse ``k1=v1,k2=v2`` (W3C-baggage-like; keys and values percent-decoded).

    Malformed entries are skipped with a warning that names the entry's
    position and key but never its value.
    """
    out: dict[str, str] = {}
    for i, item in enumerate(text.split(",")):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = unquote(key).strip()
        value = unquote(value).strip()
        if not sep or not key or not _TOKEN.match(key):
            logger.warning("%s: entry %d is not key=value with a valid header name; ignored", source, i + 1)
            continue
        if not _printable(value):
            logger.warning("%s: value of %r has control characters; ignored", source, key)
            continue
        out[key] = value
    return out


def targets_from_env(environ: Mapping[str, str]) -> list[ForwardTarget]:
    """The target the ``OTEL_EXPORTER_OTLP_*`` variables describe, if any.

    Follows the OpenTelemetry specification ("OpenTelemetry Protocol Exporter"):
    each ``OTEL_EXPORTER_OTLP_TRACES_X`` wins over ``OTEL_EXPORTER_OTLP_X``;
    ``ENDPOINT`` is a base URL (``/v1/traces`` appended for OTLP/HTTP) while
    ``TRACES_ENDPOINT`` is used as is; ``PROTOCOL`` defaults to ``http/protobuf``
    (``grpc`` for a ``grpc(s)://`` or scheme-less endpoint); ``HEADERS`` is
    ``k=v,k2=v2``, percent-decoded; ``TIMEOUT`` is milliseconds; ``COMPRESSION``
    is ``gzip`` or ``none`` (default ``none``); ``CERTIFICATE``,
    ``CLIENT_CERTIFICATE`` and ``CLIENT_KEY`` are PEM files; ``INSECURE`` applies
    to a scheme-less gRPC endpoint only. An invalid optional value is ignored
    with a warning, as the specification asks.

    ``TRACES_ENDPOINT`` makes a traces-only target: metrics and logs received
    by isoscope are then not forwarded (counted as dropped, ``no_target``);
    ``ENDPOINT`` alone forwards all three signals.

    Unlike an SDK there is no ``localhost`` default endpoint: the daemon itself
    listens there, and forwarding to itself would loop. ``OTEL_TRACES_EXPORTER``
    without ``otlp`` (e.g. ``none``) turns this off too.

    Returns:
        ``[]`` or one target.

    Raises:
        ValueError: the endpoint is set but unusable.
    """
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if exporters and "otlp" not in [e.strip().lower() for e in exporters.split(",")]:
        logger.info("OTEL_TRACES_EXPORTER=%s: OTEL_EXPORTER_OTLP_* not used for forwarding", exporters)
        return []
    traces_endpoint = environ.get(_ENV_TRACES + "ENDPOINT", "").strip() or None
    endpoint = None if traces_endpoint else (environ.get(_ENV + "ENDPOINT", "").strip() or None)
    if endpoint is None and traces_endpoint is None:
        stray = sorted(k for k in environ if k.startswith(_ENV) and environ[k].strip())
        if stray:
            logger.warning("%s set but no OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "
                           "not forwarding from the environment", ", ".join(stray))
        return []
    raw = traces_endpoint or endpoint or ""
    scheme = raw.partition("://")[0].lower() if "://" in raw else ""

    protocol: str | None = _env(environ, "PROTOCOL")
    if protocol == "http/json":
        # Every OTLP/HTTP server must accept binary protobuf, so this still reaches the backend.
        logger.warning("OTLP protocol http/json is not implemented; sending http/protobuf")
        protocol = "http/protobuf"
    elif protocol not in (None, "grpc", "http/protobuf"):
        logger.warning("OTLP protocol %r is unknown; using the default", protocol)
        protocol = None
    if protocol is None:
        protocol = "grpc" if scheme in ("", "grpc", "grpcs") else "http/protobuf"

    compression = (_env(environ, "COMPRESSION") or "none").lower()
    if compression not in ("gzip", "none"):
        logger.warning("OTLP compression %r is unknown; sending uncompressed", compression)
        compression = "none"

    timeout_s = 10.0
    timeout = _env(environ, "TIMEOUT")
    if timeout is not None:
        try:
            ms = float(timeout)
            if not ms > 0:
                raise ValueError
            timeout_s = ms / 1000.0
        except ValueError:
            logger.warning("OTLP timeout %r is not a positive number of milliseconds; using 10000", timeout)

    header_var = _ENV_TRACES + "HEADERS" if environ.get(_ENV_TRACES + "HEADERS", "").strip() \
        else _ENV + "HEADERS"
    headers = parse_env_headers(environ.get(header_var, ""), source=header_var)

    plaintext_scheme = scheme in ("grpc", "http")
    insecure = False
    insecure_raw = _env(environ, "INSECURE")
    if insecure_raw is not None and not scheme:
        # The specification limits INSECURE to scheme-less gRPC endpoints.
        insecure = insecure_raw.lower() == "true"
    ca, cert, key = (_env(environ, k) for k in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"))
    if plaintext_scheme or insecure:
        if ca or cert or key:
            logger.warning("OTLP certificate settings ignored: the endpoint is plaintext")
        ca = cert = key = None
    if bool(cert) != bool(key):
        logger.warning("OTLP client certificate ignored: CLIENT_CERTIFICATE and CLIENT_KEY go together")
        cert = key = None

    fields: dict[str, Any] = {
        "protocol": protocol, "compression": compression, "timeout_s": timeout_s,
        "headers": {k: SecretStr(v) for k, v in headers.items()},
        "tls": {"insecure": insecure, "ca_file": ca, "cert_file": cert, "key_file": key},
    }
    if traces_endpoint:
        fields["traces_endpoint"] = traces_endpoint
    else:
        fields["endpoint"] = endpoint
    from pydantic import ValidationError
    try:
        return [ForwardTarget(**fields)]
    except ValidationError as exc:
        msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        var = (_ENV_TRACES if traces_endpoint else _ENV) + "ENDPOINT"
        raise ValueError(f"{var}: {msg}") from None


def resolve_targets(forward: list[str], targets: list[ForwardTarget],
                    environ: Mapping[str, str]) -> list[ForwardTarget]:
    """Every configured target: ``forward`` URLs, then ``targets``; the environment's when both are empty.

    Raises:
        ValueError: a URL or the environment's endpoint is unusable.
    """
    out = [target_from_url(url) for url in forward] + list(targets)
    if out:
        return out
    return targets_from_env(environ)


# ---------------------------------------------------------------------------
# Building exporters
# ---------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise ValueError(f"{what} {path} is empty")
    return data


class HeaderSource:
    """The headers of a target, with file-backed values re-read when their file changes.

    Calling it returns the current headers. A file is ``stat``-ed on each call
    (cheap next to an export) and read again only when its identity, size or
    mtime changed; Kubernetes swaps Secret files atomically, so a changed file
    is complete. A file that becomes unreadable or empty keeps the last good
    value and is reported once, without its content.

    Args:
        headers: the target's header map.

    Raises:
        ValueError: a value file is unreadable or empty at the start.
    """

    def __init__(self, headers: Mapping[str, HeaderValue]) -> None:
        self._static: dict[str, str] = {}
        self._files: dict[str, tuple[str, str]] = {}  # header -> (path, prefix)
        self._stamp: dict[str, tuple[int, int, int, int]] = {}
        self._current: dict[str, str] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        for key, hv in headers.items():
            if hv.value is not None:
                self._static[key] = hv.value.get_secret_value()
            else:
                self._files[key] = (str(hv.value_file), hv.prefix)
        for key, (path, prefix) in self._files.items():
            value = self._load(key, path, prefix)
            if value is None:
                raise ValueError(f"header {key!r}: value_file {path} is unreadable, empty or not printable")
        self._rebuild()

    def _load(self, key: str, path: str, prefix: str) -> str | None:
        try:
            st = os.stat(path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._stamp.get(key) == stamp:
                return self._current.get(key)
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not text or not _printable(text):
            return None
        self._stamp[key] = stamp
        value = prefix + text
        self._current[key] = value
        return value

    def _rebuild(self) -> None:
        self._headers = {**self._static, **{k: self._current[k] for k in self._files}}

    @property
    def dynamic(self) -> bool:
        """Whether any value comes from a file."""
        return bool(self._files)

    def __call__(self) -> Mapping[str, str]:
        if not self._files:
            return self._headers
        with self._lock:
            changed = False
            for key, (path, prefix) in self._files.items():
                before = self._current.get(key)
                value = self._load(key, path, prefix)
                if value is None:
                    if key not in self._warned:
                        self._warned.add(key)
                        logger.warning("header %r: %s is unreadable, empty or not printable; "
                                       "keeping the previous value", key, path)
                    continue
                self._warned.discard(key)
                changed |= value != before
            if changed:
                self._rebuild()
            return self._headers

    def __repr__(self) -> str:
        return f"HeaderSource({', '.join(f'{k}={MASK}' for k in [*self._static, *self._files])})"


def build_exporter(target: ForwardTarget, *, max_connections: int = 4) -> SpanExporter:
    """The exporter that sends to ``target``.

    Args:
        target: a validated target.
        max_connections: HTTP connections kept (match the export queue's workers).

    Raises:
        ValueError: a TLS or header file is unreadable or empty.
    """
    from isoscope.exporters.otlp_grpc import OtlpGrpcExporter
    from isoscope.exporters.otlp_http import OtlpHttpExporter

    dest = target.destination()
    tls = target.tls
    headers = HeaderSource(target.headers)
    header_arg: Mapping[str, str] | Callable[[], Mapping[str, str]] = headers if headers.dynamic else headers()
    compression = None if target.compression == "none" else "gzip"
    name = target.label()
    if dest.protocol == "grpc":
        root = _read(tls.ca_file, "tls.ca_file") if tls.ca_file else None
        chain = _read(tls.cert_file, "tls.cert_file") if tls.cert_file else None
        key = _read(tls.key_file, "tls.key_file") if tls.key_file else None
        exporter: SpanExporter = OtlpGrpcExporter(
            dest.address, timeout_s=target.timeout_s, insecure=not dest.secure, headers=header_arg,
            compression=compression, root_certificates=root, certificate_chain=chain, private_key=key,
            name=name, signals=target.signals())
    else:
        for path, what in ((tls.ca_file, "tls.ca_file"), (tls.cert_file, "tls.cert_file"),
                           (tls.key_file, "tls.key_file")):
            if path:
                _read(path, what)  # fail at start with the file's name, not at the first export
        if tls.insecure_skip_verify:
            logger.warning("%s: TLS certificate of %s is NOT verified (tls.insecure_skip_verify)",
                           name, dest.address)
        urls = {}
        for signal in SIGNALS:
            where = target.signal_destination(signal)
            urls[signal] = where.address if where is not None else None
        exporter = OtlpHttpExporter(
            dest.address, timeout_s=target.timeout_s, headers=header_arg, compression=compression,
            ca_certs=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file,
            insecure_skip_verify=tls.insecure_skip_verify, append_traces_path=False,
            name=name, max_connections=max_connections, signal_urls=urls)
    if target.traces_endpoint is not None:
        logger.info("forwarding to %s (traces only: a traces_endpoint takes no metrics or logs)", target)
    else:
        logger.info("forwarding to %s", target)
    return exporter
