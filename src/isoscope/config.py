"""Configuration: one YAML file, ``ISOSCOPE_*`` environment overrides, then command-line flags.

Every key has a validated default, so ``isoscope run`` works with no file at
all. Nested keys are addressed in the environment with double underscores:
``ISOSCOPE_ATTRIBUTION__MIN_STALL_MS=2`` sets ``attribution.min_stall_ms``.
Values from the environment are read as YAML scalars (``true``, ``5``,
``[a, b]``). Errors are reported as one line naming the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from isoscope.exporters.targets import ForwardTarget

ENV_PREFIX = "ISOSCOPE_"
ENV_CONFIG_FILE = "ISOSCOPE_CONFIG"


class ConfigError(ValueError):
    """Invalid configuration; ``str()`` is one line that names the key."""


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port must be 0..65535")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OtlpGrpcConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:4317"
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0)

    _v = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class OtlpHttpConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:4318"
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)

    _v = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class SecurityConfig(_Section):
    """TLS / mTLS and bearer-token authentication of both receivers (off by default)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    bearer_token_file: str | None = None


class ReceiverLimitsConfig(_Section):
    """What one export request may hold, and how much request data may be in flight.

    Honest senders stay far below these: the OpenTelemetry SDKs cap a span at
    128 attributes, events and links, and export batches of 512 spans.
    """

    max_spans_per_request: int = Field(50_000, gt=0)
    """More spans in one request refuses it whole (HTTP 400 / gRPC INVALID_ARGUMENT)."""
    max_attributes_per_span: int = Field(1_000, gt=0)
    """A span with more attributes is dropped (partial success: rejected_spans)."""
    max_events_per_span: int = Field(1_000, gt=0)
    """A span with more events is dropped (partial success)."""
    max_links_per_span: int = Field(1_000, gt=0)
    """A span with more links is dropped (partial success)."""
    max_total_attributes_per_request: int = Field(1_000_000, gt=0)
    """Attributes (span, event, link, resource, scope) of one request; more refuses it whole."""
    max_data_points_per_request: int = Field(200_000, gt=0)
    """Metric data points of one metrics request (forwarded unchanged); more refuses it whole."""
    max_log_records_per_request: int = Field(50_000, gt=0)
    """Log records of one logs request (forwarded unchanged); more refuses it whole."""
    max_inflight_bytes: int | None = Field(None, gt=0)
    """Estimated memory of all requests being decoded and processed at once; past it, requests are
    answered HTTP 429 / gRPC RESOURCE_EXHAUSTED with a retry delay. None: 40% of the memory limit
    (256 MiB without one)."""
    large_request_bytes: int = Field(1024 * 1024, gt=0)
    """Requests larger than this (decoded) are processed by a separate, smaller set of workers,
    so big requests never occupy every worker."""


class ReceiversConfig(_Section):
    otlp_grpc: OtlpGrpcConfig = OtlpGrpcConfig()
    otlp_http: OtlpHttpConfig = OtlpHttpConfig()
    security: SecurityConfig = SecurityConfig()
    limits: ReceiverLimitsConfig = ReceiverLimitsConfig()


class MetricsConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:9464"
    max_label_values: int = Field(1000, ge=10)
    otlp_endpoint: str | None = None
    """Also push the metrics over OTLP (``grpc://host:port`` or ``http(s)://host:port``)."""
    otlp_interval_s: float = Field(15.0, gt=0)
    debug_status: bool = False
    """Serve /debug/status (workloads, probes, queues) on the metrics port; off by default because
    that port is reachable from the pod network."""

    _v = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class QueueConfig(_Section):
    max_batches: int = Field(2048, gt=0)
    max_bytes: int = Field(256 * 1024 * 1024, gt=0)
    persist_dir: str | None = None
    initial_backoff_s: float = Field(0.5, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)
    max_elapsed_s: float = Field(300.0, gt=0)
    workers: int = Field(4, ge=1, le=64)
    """Exports in flight per destination (a slow backend is not a bottleneck)."""


class FileExportConfig(_Section):
    enabled: bool | None = None
    """None: on when no forward target is configured (the embedded default)."""
    path: str = "./isoscope-data/traces.jsonl"
    max_bytes: int | None = Field(100 * 1024 * 1024, gt=0)
    """Rotate the file before it grows past this (None: never); the file export is on by default,
    so it must not fill the disk it writes to."""
    keep: int = Field(3, ge=0)
    """Rotated files kept (``path.1`` newest … ``path.N``)."""


class ExportersConfig(_Section):
    forward: list[str] = []
    """``--forward`` URLs: grpc://, grpcs://, http://, https:// with default settings."""
    targets: list[ForwardTarget] = []
    """Forward targets with headers, TLS, compression, timeout (see isoscope.exporters.targets)."""
    file: FileExportConfig = FileExportConfig()
    queue: QueueConfig = QueueConfig()
    max_request_bytes: int = Field(3 * 1024 * 1024, ge=64 * 1024)
    """Larger batches are forwarded as several requests of at most this size (a gRPC backend
    refuses messages over 4 MiB by default, and for good)."""

    @field_validator("forward")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("grpc", "grpcs", "http", "https") or not rest:
                raise ValueError(f"{url!r} must be grpc://host:port or http(s)://host:port")
        return urls

    @model_validator(mode="after")
    def _unique_names(self) -> "ExportersConfig":
        names = [t.name for t in self.targets if t.name]
        if len(names) != len(set(names)):
            raise ValueError("exporters.targets: names must be unique")
        return self


class AttributionConfig(_Section):
    min_stall_ms: float = Field(1.0, ge=0)
    max_child_spans: int = Field(16, ge=0)
    blame_threshold: float = Field(0.2, ge=0, le=1)
    hold_max_ms: float = Field(2000.0, ge=0, le=10000)
    hold_capacity_spans: int = Field(100_000, gt=0)
    kubernetes_attributes: bool = False
    """Add ``k8s.namespace.name``, ``k8s.pod.name``, ``k8s.pod.uid``, ``k8s.container.name``,
    ``k8s.node.name`` and ``container.id`` to the resource of spans whose workload was resolved
    (never overwriting what the sender set): a downstream processor matching by connection IP
    would otherwise tag every span with the isoscope pod. On in the DaemonSet's configuration."""
    child_spans: Literal["blamed", "all", "off"] = "blamed"
    """Which spans get child spans for their stalls: only those whose overhead reaches
    ``blame_threshold`` (default), every span a layer held back, or none."""


class TimelineConfig(_Section):
    ttl_s: float = Field(120.0, gt=0)
    max_threads: int = Field(50_000, gt=0)
    max_stalls_per_thread: int = Field(32768, gt=0)
    max_records: int = Field(250_000, gt=0)


class ProbesConfig(_Section):
    enabled: list[str] | None = None
    """Probe names to load; None loads every declared probe."""
    disabled: list[str] = []
    watch_all: bool = False
    """Follow every task on the node, not only the ones that send spans."""
    watch_cgroups: list[str] = []
    """Cgroup path prefixes (``/kubepods/burstable``) followed from the moment they exist, before any span."""
    watch_containers: bool = False
    """Follow every container cgroup (Docker, containerd, CRI-O, Podman, pods) from its creation."""
    poll_interval_ms: float = Field(20.0, gt=0)
    steal_sample_ms: float = Field(10.0, gt=0)


class KernelConfig(_Section):
    headers_dir: str | None = None
    host_proc: str = "/proc"
    host_sys: str = "/sys"
    strict_capabilities: bool = False
    """Exit at start when a required capability is missing (instead of forwarding spans unenriched)."""


class MemoryConfig(_Section):
    limit_mb: int | None = Field(None, gt=0)
    """The daemon's memory budget; None reads it from the daemon's cgroup (no limit there: no guard)."""
    high_fraction: float = Field(0.8, gt=0, le=1)
    """Above this share of the budget, receivers answer "retry later"."""


class KvmConfig(_Section):
    classification: dict[str, str] = {}
    """Exit-reason → component overrides, e.g. ``{"vmx:HLT": "vm_exit"}`` (see docs/kvm.md)."""


class RelaysConfig(_Section):
    """Trusted relays (e.g. an OpenTelemetry Collector agent): their spans may name the workload they
    come from. Every non-empty criterion must hold; ``comms``/``exes`` are chosen by whoever starts a
    process, so on a node with hostile tenants give ``cgroup_prefixes`` (set by the runtime)."""

    comms: list[str] = []
    exes: list[str] = []
    cgroup_prefixes: list[str] = []


class IdentityConfig(_Section):
    trust_unproven_claims: bool = False
    """Resolve a span whose sender could not be found (no socket owner) from its claims alone.
    Off: such spans are forwarded unenriched, since anyone could claim anything."""
    relays: RelaysConfig = RelaysConfig()


class KubernetesConfig(_Section):
    enabled: bool = False
    node_name: str = ""
    api_url: str | None = None
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


class Config(_Section):
    """The whole daemon configuration."""

    receivers: ReceiversConfig = ReceiversConfig()
    metrics: MetricsConfig = MetricsConfig()
    exporters: ExportersConfig = ExportersConfig()
    attribution: AttributionConfig = AttributionConfig()
    timeline: TimelineConfig = TimelineConfig()
    probes: ProbesConfig = ProbesConfig()
    kernel: KernelConfig = KernelConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    kvm: KvmConfig = KvmConfig()
    identity: IdentityConfig = IdentityConfig()
    memory: MemoryConfig = MemoryConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"

    def file_export_enabled(self, forwarding: bool | None = None) -> bool:
        """The file export is on when nothing is forwarded, or when asked for explicitly.

        Args:
            forwarding: whether spans are forwarded anywhere (targets from ``OTEL_EXPORTER_OTLP_*``
                count); None: whether the configuration names a forward target.
        """
        if self.exporters.file.enabled is not None:
            return self.exporters.file.enabled
        if forwarding is None:
            forwarding = bool(self.exporters.forward or self.exporters.targets)
        return not forwarding


def _set_path(doc: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    node = doc
    for key in path[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {'.'.join(path)}: {key} is not a section")
        node = nxt
    node[path[-1]] = value


# Kubelet service links: every Service named ``isoscope…`` in the pod's namespace puts
# ``ISOSCOPE…_SERVICE_HOST``, ``…_SERVICE_PORT[_NAME]`` and ``…_PORT[_N_PROTO[_ADDR|_PORT|_PROTO]]``
# into the environment. They are not configuration: config keys have no such names, and a
# Service name (a DNS label) never yields the double underscore that nests config keys.
_SERVICE_LINK = re.compile(r"^ISOSCOPE[A-Z0-9_]*?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
                           r"|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)$")


def _env_overrides(env: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_FILE or (
                "__" not in name and _SERVICE_LINK.match(name)):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((path, value, f"environment {name}"))
    return out


def _format_error(err: ValidationError, origin: Mapping[str, str]) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        src = origin.get(key)
        parts.append(f"{key}: {msg}" + (f" [from {src}]" if src else ""))
    return "invalid configuration: " + "; ".join(parts)


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the configuration from defaults, a YAML file, the environment and flags.

    Args:
        path: YAML file; when None, ``$ISOSCOPE_CONFIG`` if set, else defaults only.
        env: environment to read ``ISOSCOPE_*`` overrides from (default ``os.environ``).
        overrides: dotted keys set by command-line flags, applied last.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or bad value; one line naming the key.
    """
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG_FILE) or None
    doc: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path}{where}: not valid YAML") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        doc = loaded
    for keypath, value, src in _env_overrides(env):
        _set_path(doc, keypath, value, src)
        origin[".".join(keypath)] = src
    for dotted, value in (overrides or {}).items():
        _set_path(doc, dotted.split("."), value, "command line")
        origin[dotted] = "command line"
    try:
        return Config.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None


def dump_defaults() -> str:
    """The default configuration as YAML (documentation and ``isoscope run --print-config``)."""
    return yaml.safe_dump(Config().model_dump(), sort_keys=False)
