"""The isoscope daemon: wiring only.

Every piece is built in :meth:`Daemon.__init__` from the configuration, with its
collaborators passed through its constructor; :meth:`Daemon.start` starts them
in data-flow order and :meth:`Daemon.shutdown` stops what was started in
reverse order. The order keeps spans flowing first: exporters and the kernel
side come up before the pipeline and receivers, but the probes compile in the
background (seconds) and until they settle spans are forwarded with
``isolation.coverage`` 0; on the way down receivers stop first and the pipeline
drains while the probes still run. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from isoscope import __version__
from isoscope.config import Config, ConfigError
from isoscope.exporters import ExportQueue, FileExporter, build_exporter, resolve_targets
from isoscope.host import memguard
from isoscope.host.blockdev import virtio_dev_ts
from isoscope.host.stack import detect_host_stack
from isoscope.host.steal import StealSampler
from isoscope.host.vms import VmRegistry
from isoscope.housekeeping import Housekeeper
from isoscope.join.attribution import Attributor
from isoscope.join.timeline import Timeline
from isoscope.kernel import capabilities
from isoscope.kernel.clock import MonoWallClock
from isoscope.logs import setup_logging
from isoscope.metadata.identity import RelayPolicy
from isoscope.metadata.resolver import WorkloadResolver
from isoscope.metrics.admin import AdminServer
from isoscope.metrics.kernel import MIRRORED_COMPONENTS, KernelMetrics
from isoscope.metrics.prometheus import PrometheusExporter
from isoscope.model import SpanExporter, Stats, TraceBatch, Workload
from isoscope.pipeline.fanout import Fanout
from isoscope.pipeline.processor import EnrichPipeline
from isoscope.probes import catalog
from isoscope.probes.hooks import ProbeContext
from isoscope.probes.router import CgroupWatchPolicy, KernelEventRouter
from isoscope.probes.runtime import KernelProbes, KernelSettings
from isoscope.probes.watch import WatchSet
from isoscope.spool import DiskSpool

if TYPE_CHECKING:
    from isoscope.metadata.kubernetes import KubePodMetadata
    from isoscope.receivers.otlp.security import ReceiverSecurity

logger = logging.getLogger(__name__)

class StartupError(RuntimeError):
    """The daemon cannot start; ``str()`` is one line for the operator."""


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Receiver(Protocol):
    """A span receiver: ``start()`` returns the address it listens on."""

    def start(self) -> str: ...

    def shutdown(self, grace_s: float = 5.0) -> None: ...


@dataclass(frozen=True)
class _Started:
    name: str
    stop: Callable[[], None]


class Daemon:
    """The whole node agent, as wiring.

    Args:
        cfg: validated configuration.
        load_probes: compile and attach the kernel probes (False runs a pass-through daemon).
    """

    def __init__(self, cfg: Config, *, load_probes: bool = True) -> None:
        self.cfg = cfg
        self.load_probes = load_probes
        self.stats = Stats()
        self.started_at = time.monotonic_ns()
        self.listen: dict[str, str] = {}
        self._started: list[_Started] = []
        k = cfg.kernel

        # Where spans go.
        self.memory = memguard.MemoryGuard(
            (cfg.memory.limit_mb << 20) if cfg.memory.limit_mb else memguard.cgroup_memory_limit(),
            cfg.memory.high_fraction, max_inflight_bytes=cfg.receivers.limits.max_inflight_bytes)
        self.queues = self._export_queues()
        self.fanout = Fanout(self.queues, cfg.exporters.max_request_bytes)
        persist = cfg.exporters.queue.persist_dir
        self.receipts = DiskSpool(os.path.join(persist, "receipt"),
                                  on_quarantine=lambda name, why: self.stats.inc("queue_files_quarantined_total",
                                                                                 ("receipt",))) \
            if persist else None
        self.metrics = PrometheusExporter(self.stats, max_label_values=cfg.metrics.max_label_values) \
            if cfg.metrics.enabled else None

        # Who sent a span, and what the kernel saw.
        self.pods = self._pod_metadata()
        self.vms = VmRegistry(k.host_proc, k.host_sys)
        tl = cfg.timeline
        self.timeline = Timeline(tl.ttl_s, tl.max_threads, tl.max_stalls_per_thread, tl.max_records)
        ident = cfg.identity
        self.resolver = WorkloadResolver(
            k.host_proc, k.host_sys, detect_host_stack(k.host_proc, k.host_sys), self.pods, vms=self.vms,
            stats=self.stats, trust_unproven=ident.trust_unproven_claims,
            relays=RelayPolicy(comms=tuple(ident.relays.comms), exes=tuple(ident.relays.exes),
                               cgroup_prefixes=tuple(ident.relays.cgroup_prefixes)),
            thread_owner=self.timeline.thread_pid)
        # Sampled finely only while steal moves or something is watched (whose spans it explains).
        self.steal = StealSampler(k.host_proc, interval_s=cfg.probes.steal_sample_ms / 1000,
                                  watching=lambda: bool(self.watch.tgids or self.watch.cgroups
                                                        or self.watch.watch_all)) \
            if load_probes else None
        self.clock = MonoWallClock(on_step=lambda d: self.stats.inc("clock_steps_total"))
        self.netns_changed = threading.Event()
        self.watch = WatchSet()
        self.kernel = self._kernel_side() if load_probes else None
        # Node-wide layer time from the probes' in-kernel totals (read once the probes are loaded).
        self.kernel_metrics = KernelMetrics(
            self.kernel.bpf, self.metrics, self.resolver.cgroup_labels,
            is_virtio_dev=set(virtio_dev_ts(k.host_sys)).__contains__) \
            if self.kernel is not None and self.metrics is not None else None

        # The span path.
        self.pipeline = EnrichPipeline(
            resolver=self.resolver, attributor=Attributor(self.timeline, self.steal), clock=self.clock,
            drained_until=self.kernel.drained_until if self.kernel else (lambda: 0),
            cfg=cfg.attribution, stats=self.stats, output=self.fanout, observer=self.metrics,
            on_workload=self._watch_workload if self.kernel else None,
            enrich_enabled=self.kernel.enriching if self.kernel else (lambda: False),
            spool=self.receipts, memory_over=self.memory.over,
            node_name=cfg.kubernetes.node_name or os.environ.get("NODE_NAME", ""))
        self.receivers = self._receivers()
        self.housekeeper = Housekeeper([self._evict, self._queue_gauges, self._kernel_chores])

    # -- construction ---------------------------------------------------------------

    def _export_queues(self) -> list[ExportQueue]:
        cfg = self.cfg
        qc = cfg.exporters.queue
        try:
            forward = resolve_targets(cfg.exporters.forward, cfg.exporters.targets, os.environ)
        except ValueError as exc:
            raise StartupError(f"exporters: {exc}") from None
        targets: list[tuple[str, SpanExporter]] = []
        for i, target in enumerate(forward):
            try:
                exp = build_exporter(target, max_connections=qc.workers)
            except ValueError as exc:
                raise StartupError(f"exporters: {target.label()}: {exc}") from None
            # Unnamed targets keep the old labels (otlp_grpc, otlp_http_1, ...).
            targets.append((target.label() if target.name or len(forward) == 1 else f"{target.label()}_{i}", exp))
        if cfg.file_export_enabled(forwarding=bool(forward)):
            try:
                fc = cfg.exporters.file
                targets.append(("file", FileExporter(fc.path, max_bytes=fc.max_bytes, rotate=fc.keep)))
            except OSError as exc:
                raise StartupError(f"exporters.file.path: cannot write {cfg.exporters.file.path}: "
                                   f"{exc.strerror}") from None
        max_bytes = qc.max_bytes
        if self.memory.limit_bytes and targets:
            # Queued payloads must fit beside the daemon itself under its memory limit.
            max_bytes = min(max_bytes, int(self.memory.limit_bytes * 0.3) // len(targets))
        persist = qc.persist_dir
        return [ExportQueue(exp, self.stats, name=name, max_batches=qc.max_batches, max_bytes=max_bytes,
                            persist_dir=os.path.join(persist, name) if persist else None,
                            initial_backoff_s=qc.initial_backoff_s, max_backoff_s=qc.max_backoff_s,
                            max_elapsed_s=qc.max_elapsed_s, workers=qc.workers)
                for name, exp in targets]

    def _pod_metadata(self) -> KubePodMetadata | None:
        """Kubernetes pod metadata from the API server (watching this node's pods), when enabled."""
        k = self.cfg.kubernetes
        if not k.enabled:
            return None
        from urllib.parse import urlsplit

        from isoscope.metadata.kubernetes import KubeAPIConfig, KubeConfigError, KubePodMetadata
        try:
            if k.api_url:
                u = urlsplit(k.api_url)
                if not u.hostname:
                    raise KubeConfigError(f"{k.api_url!r} has no host")
                api = KubeAPIConfig(host=u.hostname, port=u.port or (443 if u.scheme == "https" else 80),
                                    scheme=u.scheme or "https",
                                    token_file=k.token_file if os.path.isfile(k.token_file) else "",
                                    ca_file=k.ca_file if os.path.isfile(k.ca_file) else "")
            else:
                api = KubeAPIConfig.in_cluster()
        except KubeConfigError as exc:
            raise StartupError(f"kubernetes: {exc}") from None
        return KubePodMetadata(api, k.node_name or os.environ.get("NODE_NAME", ""), stats=self.stats)

    def _kernel_side(self) -> KernelProbes:
        cfg = self.cfg
        watch = self.watch
        policy = CgroupWatchPolicy(cfg.probes.watch_cgroups, cfg.probes.watch_containers, self.resolver.v2_root)
        router = KernelEventRouter(self.timeline, self.resolver, watch, policy, self.netns_changed,
                                   metrics=self.metrics, mirrored=MIRRORED_COMPONENTS,
                                   lifecycle_listeners=[self.resolver.on_lifecycle])
        context = ProbeContext(
            host_proc=cfg.kernel.host_proc, host_sys=cfg.kernel.host_sys, watched_tgids=watch.tgid_snapshot,
            netns_changed=self.netns_changed, vms=self.vms, kvm_classification=dict(cfg.kvm.classification),
            kvm_exits=self.metrics.add_kvm_exits if self.metrics else None,
            sandbox_sample_ns=catalog.SANDBOX_SAMPLE_NS)
        settings = KernelSettings(
            headers_dir=cfg.kernel.headers_dir, host_proc=cfg.kernel.host_proc, host_sys=cfg.kernel.host_sys,
            enabled=cfg.probes.enabled, disabled=cfg.probes.disabled,
            defines={"ISO_MIN_STALL_NS": int(cfg.attribution.min_stall_ms * 1e6)},
            poll_interval_s=cfg.probes.poll_interval_ms / 1000, watch_all=cfg.probes.watch_all)
        return KernelProbes(settings, self.stats, router, self.timeline, watch, policy, context)

    def _receivers(self) -> list[tuple[str, Receiver]]:
        from isoscope.receivers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver
        from isoscope.receivers.otlp.limits import RequestLimits
        cfg = self.cfg.receivers
        lim = cfg.limits
        limits = RequestLimits(max_spans_per_request=lim.max_spans_per_request,
                               max_attributes_per_span=lim.max_attributes_per_span,
                               max_events_per_span=lim.max_events_per_span,
                               max_links_per_span=lim.max_links_per_span,
                               max_total_attributes_per_request=lim.max_total_attributes_per_request,
                               max_data_points_per_request=lim.max_data_points_per_request,
                               max_log_records_per_request=lim.max_log_records_per_request)
        # Both receivers share the limits and the daemon's memory guard (in-flight request bytes);
        # metrics and logs go straight to the export queues, unchanged.
        shared = dict(security=self._security(), proc_root=self.cfg.kernel.host_proc, limits=limits,
                      memory=self.memory, large_request_bytes=lim.large_request_bytes,
                      forward_signal=self.fanout.forward)
        out: list[tuple[str, Receiver]] = []
        if cfg.otlp_grpc.enabled:
            out.append(("otlp_grpc", OtlpGrpcReceiver(self.pipeline, self.stats, cfg.otlp_grpc.listen,
                                                      max_message_bytes=cfg.otlp_grpc.max_message_bytes, **shared)))
        if cfg.otlp_http.enabled:
            out.append(("otlp_http", OtlpHttpReceiver(self.pipeline, self.stats, cfg.otlp_http.listen,
                                                      max_body_bytes=cfg.otlp_http.max_body_bytes, **shared)))
        return out

    def _security(self) -> ReceiverSecurity | None:
        sec = self.cfg.receivers.security
        if not (sec.cert_file or sec.bearer_token_file or sec.client_ca_file):
            return None
        from isoscope.receivers.otlp.security import ReceiverSecurity
        token = None
        if sec.bearer_token_file:
            try:
                with open(sec.bearer_token_file) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise StartupError(f"receivers.security.bearer_token_file: {exc.strerror}") from None
        try:
            return ReceiverSecurity(cert_file=sec.cert_file, key_file=sec.key_file,
                                    client_ca_file=sec.client_ca_file, bearer_token=token)
        except Exception as exc:
            raise StartupError(f"receivers.security: {exc}") from None

    # -- readiness and status -------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for ``/readyz``."""
        if len([k for k in self.listen if k.startswith("otlp_")]) < len(self.receivers):
            return False, "receivers are not listening yet"
        if self.kernel is None:
            return True, "ready (kernel probes off: spans are forwarded unenriched)"
        if not self.kernel.settled:
            return False, "kernel probes are loading"
        down = [s.name for s in self.kernel.statuses() if s.required and not s.attached]
        if down:
            return True, "ready (degraded: required probes not attached: " + ", ".join(down) + ")"
        return True, "ready"

    def status(self) -> dict[str, Any]:
        """The ``/debug/status`` document: probes, queues, tracked workloads."""
        threads, records = self.timeline.size()
        ok, why = self.ready()
        kernel = self.kernel.status() if self.kernel else {"kernel": None, "probes": [], "runtimes": {}}
        watch = self.watch
        return {
            "version": __version__,
            "ready": ok, "ready_reason": why,
            "uptime_s": round((time.monotonic_ns() - self.started_at) / 1e9, 1),
            "listen": self.listen,
            **kernel,
            "queues": {q.name: q.size() for q in self.queues} | {"enrich": self.pipeline.held()},
            "timeline": {"threads": threads, "records": records,
                         "drained_until_mono_ns": self.kernel.drained_until() if self.kernel else 0},
            "watched": {"tgids": len(watch.tgids), "cgroups": len(watch.cgroups), "all": watch.watch_all},
            "clock": {"offset_ns": self.clock.offset_ns, "steps": self.clock.steps},
        }

    # -- start and stop ---------------------------------------------------------------

    def _begin(self, name: str, start: Callable[[], object], stop: Callable[[], None]) -> object:
        out = start()
        self._started.append(_Started(name, stop))
        return out

    def start(self) -> None:
        """Bring everything up in data-flow order. Raises ``StartupError`` with one operator-readable line."""
        cfg = self.cfg
        self._check_capabilities()
        if self.pods is not None:
            self._begin("kubernetes", self.pods.start, self.pods.shutdown)
        if self.metrics is not None:
            host, port = _split(cfg.metrics.listen)
            admin = AdminServer(host, port, metrics=self.metrics, ready=self.ready, status=self.status,
                                debug_status=cfg.metrics.debug_status)
            try:
                bound = self._begin("metrics", admin.start, admin.shutdown)
            except OSError as exc:
                raise StartupError(f"metrics.listen: cannot listen on {cfg.metrics.listen}: {exc.strerror}") from None
            self.listen["metrics"] = f"{bound[0]}:{bound[1]}"
            if cfg.metrics.otlp_endpoint:
                from isoscope.metrics.otlp_push import OtlpMetricsExporter
                try:
                    push = OtlpMetricsExporter(self.metrics, self.stats, cfg.metrics.otlp_endpoint,
                                               interval_s=cfg.metrics.otlp_interval_s)
                except ValueError as exc:
                    raise StartupError(f"metrics.otlp_endpoint: {exc}") from None
                self._started.append(_Started("otlp_metrics", push.shutdown))
        for q in self.queues:
            self._begin(f"queue {q.name}", q.start, lambda q=q: q.shutdown(5.0))
        self._begin("clock", self.clock.start, self.clock.shutdown)
        if self.steal is not None:
            self._begin("steal", self.steal.start, self.steal.shutdown)
        if self.kernel is not None:
            self._begin("kernel", self.kernel.start, self.kernel.shutdown)
        self._begin("pipeline", self.pipeline.start, lambda: self.pipeline.shutdown(5.0))
        self._replay_receipts()
        for name, r in self.receivers:
            try:
                self.listen[name] = self._begin(name, r.start, lambda r=r: r.shutdown(2.0))
            except (RuntimeError, OSError) as exc:
                listen = getattr(cfg.receivers, name).listen
                raise StartupError(f"receivers.{name}.listen: cannot listen on {listen} "
                                   f"({exc}); is another collector running?") from None
            logger.info("%s listening on %s", name, self.listen[name])
        self._begin("housekeeping", self.housekeeper.start, self.housekeeper.shutdown)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Graceful stop, in reverse start order: stop receiving, enrich and hand on what is held
        (probes still running), detach probes, drain the queues."""
        while self._started:
            part = self._started.pop()
            try:
                part.stop()
            except Exception:
                logger.exception("stopping %s failed", part.name)

    def _check_capabilities(self) -> None:
        if not self.load_probes:
            return
        lacking = capabilities.missing()
        if not lacking:
            return
        line = capabilities.explain(lacking)
        if self.cfg.kernel.strict_capabilities:
            raise StartupError(line)
        logger.error("%s; kernel probes will not attach and spans are forwarded unenriched", line)

    def _replay_receipts(self) -> None:
        """Batches acknowledged before a crash but not yet queued for export go out unenriched."""
        if self.receipts is None:
            return
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        for entry in self.receipts.load():
            req = ExportTraceServiceRequest.FromString(entry.payload)
            self.fanout(TraceBatch(req, "replay", entry.span_count))
            self.stats.inc("enrichment_failures_total", ("restart",), entry.span_count)
            self.receipts.remove(entry.key)

    # -- kernel-side callbacks -------------------------------------------------------

    def _watch_workload(self, wl: Workload) -> None:
        if wl.pid:
            self.watch.add_tgid(wl.pid)
        else:
            for cgid in wl.cgroup_ids or (wl.cgroup_id,):
                if cgid:
                    self.watch.add_cgroup(cgid)

    # -- housekeeping chores ----------------------------------------------------------

    def _evict(self, tick: int) -> None:
        self.timeline.evict()

    def _queue_gauges(self, tick: int) -> None:
        for q in self.queues:
            self.stats.set_gauge("queue_size", (q.name,), q.size())

    def _kernel_chores(self, tick: int) -> None:
        if self.metrics is not None and self.steal is not None:
            for cpu, secs in self.steal.totals().items():
                self.metrics.set_steal_seconds(cpu, secs)
        if self.kernel_metrics is not None and tick % 5 == 0:
            # Kernel maps are cumulative: a pass every few seconds is as exact as every second.
            self.kernel_metrics.collect()
        if self.kernel is not None:
            self.kernel.refresh(tick)

    # -- reload -----------------------------------------------------------------------

    def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without restarting (SIGHUP).

        Attribution thresholds, logging and the watch-all switch change live;
        anything else (listeners, exporters, probes) needs a restart and is
        reported in the returned list.
        """
        old = self.cfg
        needs_restart = [section for section in ("receivers", "metrics", "exporters", "timeline", "kernel",
                                                 "kubernetes", "identity")
                         if getattr(old, section) != getattr(new, section)]
        if old.probes.model_dump(exclude={"watch_all"}) != new.probes.model_dump(exclude={"watch_all"}):
            needs_restart.append("probes")
        self.cfg = new
        setup_logging(new.log_level, new.log_format)
        self.pipeline.set_config(new.attribution)
        if self.kernel is not None and new.probes.watch_all != old.probes.watch_all:
            self.watch.set_watch_all(new.probes.watch_all)
        self.stats.inc("config_reloads_total")
        if needs_restart:
            logger.warning("configuration reloaded; changes to %s take effect at the next restart",
                           ", ".join(needs_restart))
        else:
            logger.info("configuration reloaded")
        return needs_restart


def run(cfg: Config, *, load_probes: bool = True,
        reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration. Returns the exit code."""
    setup_logging(cfg.log_level, cfg.log_format)
    stop = threading.Event()
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    try:
        daemon = Daemon(cfg, load_probes=load_probes)
    except (StartupError, ConfigError) as exc:
        print(f"isoscope: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        daemon.start()
    except (StartupError, ConfigError) as exc:
        daemon.shutdown(2.0)
        print(f"isoscope: {exc}", file=sys.stderr, flush=True)
        return 2
    while not stop.wait(0.2):
        if hup.is_set():
            hup.clear()
            if reload_config is None:
                continue
            try:
                daemon.reload(reload_config())
            except ConfigError as exc:
                # A bad edit must not take the node's tracing down: keep the running configuration.
                daemon.stats.inc("config_reload_failures_total")
                logger.error("configuration not reloaded: %s", exc)
    logger.info("shutting down: draining queues")
    daemon.shutdown()
    return 0
