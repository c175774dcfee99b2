"""The isoscope daemon: wires receivers → enrichment → exporters, probes → timeline, and metrics.

Start order keeps spans flowing first: exporters, the enrichment pipeline and
the receivers come up before the probes are compiled (which takes seconds);
until then spans are forwarded with ``isolation.coverage`` 0. ``/readyz``
answers 200 once the receivers listen and every probe is attached or known
unavailable.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from isoscope.kernel import capabilities
from isoscope.host import cgroupfs
from isoscope.kernel import env as kernelenv
from isoscope.host import memguard
from isoscope.probes import kvm_reasons
from isoscope.join.attribution import Attributor
from isoscope.kernel.clock import MonoWallClock
from isoscope.config import Config, ConfigError
from isoscope.metrics.kernel import MIRRORED_COMPONENTS, KernelMetrics, fill_u32_set
from isoscope.metadata.resolver import WorkloadResolver
from isoscope.model import LifecycleEvent, LifecycleKind, RunSegment, Stall, Stats, TraceBatch, Workload
from isoscope.pipeline.processor import EnrichPipeline
from isoscope.probes import catalog
from isoscope.probes.loader import ProbeManager
from isoscope.probes.watch import WatchSet
from isoscope.host.stack import detect_host_stack
from isoscope.join.timeline import Timeline
from isoscope.exporters import ExportQueue, FileExporter, exporter_from_url
from isoscope.metrics.prometheus import PrometheusExporter
from isoscope.exporters.queue import DiskSpool

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class StartupError(RuntimeError):
    """The daemon cannot start; ``str()`` is one line for the operator."""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    """Structured (JSON) or plain logs on stderr."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Fanout:
    """Serializes each enriched batch once and hands it to every exporter queue."""

    def __init__(self, queues: list[ExportQueue], stats: Stats) -> None:
        self.queues = queues
        self.stats = stats

    def __call__(self, batch: TraceBatch) -> None:
        payload = batch.request.SerializeToString()
        for q in self.queues:
            q.enqueue(payload, batch.span_count)


class Daemon:
    """The whole node agent.

    Args:
        cfg: validated configuration.
        load_probes: compile and attach the kernel probes (False runs a pass-through daemon).
    """

    def __init__(self, cfg: Config, *, load_probes: bool = True) -> None:
        self.cfg = cfg
        self.load_probes = load_probes
        self.stats = Stats()
        self.started_at = time.monotonic_ns()
        self.kernel: kernelenv.KernelEnv | None = None
        self.probes: ProbeManager | None = None
        self.watch: WatchSet | None = None
        self.steal: Any = None
        self.timeline = Timeline(cfg.timeline.ttl_s, cfg.timeline.max_threads, cfg.timeline.max_stalls_per_thread,
                                 cfg.timeline.max_records)
        self.clock = MonoWallClock(on_step=lambda d: self.stats.inc("clock_steps_total"))
        self.metrics: PrometheusExporter | None = None
        self.queues: list[ExportQueue] = []
        self.receivers: list[Any] = []
        self.pipeline: EnrichPipeline | None = None
        self.resolver: WorkloadResolver | None = None
        self.listen: dict[str, str] = {}
        self._probes_settled = threading.Event()
        self._stop = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self._probe_thread: threading.Thread | None = None
        self._wal: DiskSpool | None = None
        self._pods: Any = None
        self._otlp_metrics: Any = None
        self.kernel_metrics: KernelMetrics | None = None
        self._virtio_devs: set[int] = set()
        self._veths: set[str] = set()
        self._veth_ids: dict[str, int] = {}
        self._netns_changed = threading.Event()
        self.vms: Any = None
        self.memory = memguard.MemoryGuard(None)
        self.kvm_counter: Any = None
        self.sandbox: Any = None
        self._sandbox_splits: list[dict[str, int | str]] = []

    # -- readiness --------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for ``/readyz``."""
        if len(self.receivers) < self._wanted_receivers():
            return False, "receivers are not listening yet"
        if not self._probes_settled.is_set():
            return False, "kernel probes are loading"
        down = [s.name for s in (self.probes.statuses() if self.probes else []) if s.required and not s.attached]
        if down:
            return True, "ready (degraded: required probes not attached: " + ", ".join(down) + ")"
        if not self.probes:
            return True, "ready (kernel probes off: spans are forwarded unenriched)"
        return True, "ready"

    def _wanted_receivers(self) -> int:
        r = self.cfg.receivers
        return int(r.otlp_grpc.enabled) + int(r.otlp_http.enabled)

    def status(self) -> dict[str, Any]:
        """The ``/debug/status`` document: probes, queues, tracked workloads."""
        threads, records = self.timeline.size()
        ok, why = self.ready()
        return {
            "version": VERSION,
            "ready": ok, "ready_reason": why,
            "uptime_s": round((time.monotonic_ns() - self.started_at) / 1e9, 1),
            "listen": self.listen,
            "kernel": self.kernel.to_dict() if self.kernel else None,
            "probes": [s.to_dict() for s in (self.probes.statuses() if self.probes else [])],
            "queues": {q.name: q.size() for q in self.queues} | (
                {"enrich": self.pipeline.held()} if self.pipeline else {}),
            "timeline": {"threads": threads, "records": records,
                         "drained_until_mono_ns": self.drained_until()},
            "watched": {"tgids": len(self.watch.tgids) if self.watch else 0,
                        "cgroups": len(self.watch.cgroups) if self.watch else 0,
                        "all": bool(self.watch and self.watch.watch_all)},
            "clock": {"offset_ns": self.clock.offset_ns, "steps": self.clock.steps},
            "veth_names": sorted(self._veths),
            "sandbox": self._sandbox_splits,
        }

    def drained_until(self) -> int:
        if self.probes is not None:
            return self.probes.drained_until_mono_ns
        return 0

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up. Raises ``StartupError`` with one operator-readable line."""
        cfg = self.cfg
        self._check_capabilities()
        host_stack = detect_host_stack(cfg.kernel.host_proc, cfg.kernel.host_sys)
        pods = self._start_pods()
        self.resolver = WorkloadResolver(cfg.kernel.host_proc, cfg.kernel.host_sys, host_stack, pods)
        if cfg.metrics.enabled:
            self.metrics = PrometheusExporter(self.stats, max_label_values=cfg.metrics.max_label_values,
                                              version=VERSION)
            host, port = _split(cfg.metrics.listen)
            try:
                bound = self.metrics.serve(host, port, self.ready, self.status)
            except OSError as exc:
                raise StartupError(f"metrics.listen: cannot listen on {cfg.metrics.listen}: {exc.strerror}") from None
            self.listen["metrics"] = f"{bound[0]}:{bound[1]}"
            if cfg.metrics.otlp_endpoint:
                from isoscope.metrics.prometheus import OtlpMetricsExporter
                try:
                    self._otlp_metrics = OtlpMetricsExporter(self.metrics, self.stats, cfg.metrics.otlp_endpoint,
                                                             interval_s=cfg.metrics.otlp_interval_s)
                except ValueError as exc:
                    raise StartupError(f"metrics.otlp_endpoint: {exc}") from None
        limit = (cfg.memory.limit_mb << 20) if cfg.memory.limit_mb else memguard.cgroup_memory_limit()
        self.memory = memguard.MemoryGuard(limit, cfg.memory.high_fraction)
        self._start_exporters()
        attributor = Attributor(self.timeline, None)
        self._attributor = attributor
        self.pipeline = EnrichPipeline(
            resolver=self.resolver, attributor=attributor, clock=self.clock, drained_until=self.drained_until,
            cfg=cfg.attribution, stats=self.stats, output=Fanout(self.queues, self.stats),
            observer=self.metrics, on_workload=self._watch_workload,
            enrich_enabled=lambda: self.probes is not None and self._probes_settled.is_set()
            and any(s.attached for s in self.probes.statuses()),
            spool=self._wal, memory_over=self.memory.over)
        self.pipeline.start()
        self._replay_wal()
        self._start_receivers()
        self.clock.start()
        if self.load_probes:
            self._probe_thread = threading.Thread(target=self._start_probes, name="isoscope-probe-load", daemon=True)
            self._probe_thread.start()
        else:
            self._probes_settled.set()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="isoscope-housekeeping", daemon=True)
        self._housekeeper.start()

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

    def _start_pods(self) -> Any:
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
        pods = KubePodMetadata(api, k.node_name or os.environ.get("NODE_NAME", ""), stats=self.stats)
        pods.start()
        self._pods = pods
        return pods

    def _start_exporters(self) -> None:
        cfg = self.cfg
        qc = cfg.exporters.queue
        persist = qc.persist_dir
        exporters_: list[tuple[str, Any]] = []
        for i, url in enumerate(cfg.exporters.forward):
            try:
                exp = exporter_from_url(url, name=None)
            except ValueError as exc:
                raise StartupError(f"exporters.forward: {exc}") from None
            label = getattr(exp, "name", "otlp")
            exporters_.append((f"{label}_{i}" if len(cfg.exporters.forward) > 1 else label, exp))
        if cfg.file_export_enabled():
            try:
                exporters_.append(("file", FileExporter(cfg.exporters.file.path)))
            except OSError as exc:
                raise StartupError(f"exporters.file.path: cannot write {cfg.exporters.file.path}: "
                                   f"{exc.strerror}") from None
        max_bytes = qc.max_bytes
        if self.memory.limit_bytes and exporters_:
            # Queued payloads must fit beside the daemon itself under its memory limit.
            max_bytes = min(max_bytes, int(self.memory.limit_bytes * 0.3) // len(exporters_))
        for name, exp in exporters_:
            q = ExportQueue(exp, self.stats, name=name, max_batches=qc.max_batches, max_bytes=max_bytes,
                            persist_dir=os.path.join(persist, name) if persist else None,
                            initial_backoff_s=qc.initial_backoff_s, max_backoff_s=qc.max_backoff_s,
                            max_elapsed_s=qc.max_elapsed_s, workers=qc.workers)
            q.start()
            self.queues.append(q)
        if persist:
            self._wal = DiskSpool(os.path.join(persist, "receipt"),
                                  on_quarantine=lambda name, why: self.stats.inc("queue_files_quarantined_total",
                                                                                 ("receipt",)))

    def _replay_wal(self) -> None:
        """Batches acknowledged before a crash but not yet queued for export go out unenriched."""
        if self._wal is None:
            return
        fan = Fanout(self.queues, self.stats)
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
        for entry in self._wal.load():
            req = ExportTraceServiceRequest.FromString(entry.payload)
            fan(TraceBatch(req, "replay", entry.span_count))
            self.stats.inc("enrichment_failures_total", ("restart",), entry.span_count)
            self._wal.remove(entry.key)

    def _security(self) -> Any:
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

    def _start_receivers(self) -> None:
        from isoscope.receivers.otlp import OtlpGrpcReceiver, OtlpHttpReceiver
        cfg = self.cfg.receivers
        security = self._security()
        proc = self.cfg.kernel.host_proc
        assert self.pipeline is not None
        if cfg.otlp_grpc.enabled:
            r = OtlpGrpcReceiver(self.pipeline, self.stats, cfg.otlp_grpc.listen,
                                 max_message_bytes=cfg.otlp_grpc.max_message_bytes, security=security,
                                 proc_root=proc)
            try:
                self.listen["otlp_grpc"] = r.start()
            except (RuntimeError, OSError) as exc:
                raise StartupError(f"receivers.otlp_grpc.listen: cannot listen on {cfg.otlp_grpc.listen} "
                                   f"({exc}); is another collector running?") from None
            self.receivers.append(r)
        if cfg.otlp_http.enabled:
            h = OtlpHttpReceiver(self.pipeline, self.stats, cfg.otlp_http.listen,
                                 max_body_bytes=cfg.otlp_http.max_body_bytes, security=security, proc_root=proc)
            try:
                self.listen["otlp_http"] = h.start()
            except (RuntimeError, OSError) as exc:
                raise StartupError(f"receivers.otlp_http.listen: cannot listen on {cfg.otlp_http.listen} "
                                   f"({exc}); is another collector running?") from None
            self.receivers.append(h)
        for name, addr in self.listen.items():
            logger.info("%s listening on %s", name, addr)

    # -- probes -----------------------------------------------------------------------

    def _start_probes(self) -> None:
        try:
            self.kernel = kernelenv.prepare(self.cfg.kernel.headers_dir, proc_root=self.cfg.kernel.host_proc,
                                            sys_root=self.cfg.kernel.host_sys)
            for msg in self.kernel.messages:
                logger.info("kernel: %s", msg)
            specs = catalog.by_name(self.cfg.probes.enabled)
            specs = [s for s in specs if s.name not in set(self.cfg.probes.disabled)]
            self.probes = ProbeManager(
                specs, self.kernel.features, self._on_kernel_event, self.stats,
                defines={"ISO_MIN_STALL_NS": int(self.cfg.attribution.min_stall_ms * 1e6)},
                on_loss=lambda probe, n, a, b: self.timeline.note_loss(probe, a, b))
            for s in self.probes.load():  # the loader logs each outcome
                if s.attached:
                    self.timeline.set_probe_up(s.name, True)
            self.watch = WatchSet(self.probes.loaded_modules)
            if self.cfg.probes.watch_all:
                self.watch.set_watch_all(True)
            self._watch_existing_cgroups()
            self._start_kvm()
            self._start_sandbox()
            self._fill_kernel_tables()
            if self.metrics is not None:
                self.kernel_metrics = KernelMetrics(self.probes.bpf, self.metrics, self.resolver.cgroup_labels,
                                                    is_virtio_dev=self._virtio_devs.__contains__)
            self._start_steal()
            self.probes.start(poll_interval_s=self.cfg.probes.poll_interval_ms / 1000)
        except Exception:
            logger.exception("kernel probes could not be started; spans are forwarded unenriched")
        finally:
            self._probes_settled.set()

    def _wants_cgroup(self, path: str) -> bool:
        p = self.cfg.probes
        if any(path == pre.rstrip("/") or path.startswith(pre.rstrip("/") + "/") for pre in p.watch_cgroups):
            return True
        if p.watch_containers:
            info = cgroupfs.parse_cgroup_path(path)
            return bool(info.container_id or info.pod_uid)
        return False

    def _watch_existing_cgroups(self) -> None:
        """Configured cgroups are followed before they send any span (and so are those created later)."""
        p = self.cfg.probes
        v2 = self.resolver.v2_root if self.resolver is not None else None
        if not (p.watch_cgroups or p.watch_containers) or v2 is None or self.watch is None:
            return
        for dirpath, _dirs, _files in os.walk(v2):
            rel = "/" + os.path.relpath(dirpath, v2).lstrip(".")
            if rel != "/" and self._wants_cgroup(rel.rstrip("/")):
                try:
                    self.watch.add_cgroup(os.stat(dirpath).st_ino)
                except OSError:
                    continue

    def _watch_new_cgroup(self, path: str) -> None:
        v2 = self.resolver.v2_root if self.resolver is not None else None
        if self.watch is None or v2 is None or not self._wants_cgroup(path):
            return
        try:
            # cgroup_mkdir fires for v1 hierarchies too: the kernel's cgroup id is the v2 directory's.
            self.watch.add_cgroup(os.stat(os.path.join(v2, path.lstrip("/"))).st_ino)
        except OSError:
            pass

    def _fill_kernel_tables(self) -> None:
        """User-space knowledge the probes need: syscall classes, virtio disks, veth names."""
        assert self.probes is not None
        from isoscope.host.blockdev import virtio_dev_ts
        from isoscope.probes.syscall_classes import fill_class_map
        bpf = self.probes.bpf("syscalls")
        if bpf is not None:
            fill_class_map(bpf[b"syscall_class"])
        self._virtio_devs = set(virtio_dev_ts(self.cfg.kernel.host_sys))
        bpf = self.probes.bpf("block")
        if bpf is not None:
            fill_u32_set(bpf, "virtio_devs", self._virtio_devs)
        self._refresh_veths()

    def _refresh_veths(self) -> None:
        bpf = self.probes.bpf("netns") if self.probes is not None else None
        if bpf is None:
            return
        import ctypes

        from isoscope.host.netdevs import veth_names
        table = bpf[b"veth_ifaces"]
        names = veth_names(self.cfg.kernel.host_proc, self.cfg.kernel.host_sys)
        for name in names - self._veths:
            self._veth_ids[name] = self._veth_ids.get(name) or len(self._veth_ids) + 1
            key = table.Key()
            key.name = name.encode()
            table[key] = ctypes.c_uint32(self._veth_ids[name])
        for name in self._veths - names:
            key = table.Key()
            key.name = name.encode()
            try:
                del table[key]
            except KeyError:
                pass
        self._veths = names

    def _start_kvm(self) -> None:
        """Host side of VMs: exit classification into the kernel, VM identity for the exit counters."""
        if self.probes is None or not self.probes.attached("kvm"):
            return
        from isoscope.host.vms import VmRegistry
        try:
            kvm_reasons.fill_kernel_classification(self.probes.bpf("kvm"),
                                                   kvm_reasons.load_classification(self.cfg.kvm.classification))
        except ValueError as exc:
            logger.error("kvm.classification: %s; using the default classification", exc)
            kvm_reasons.fill_kernel_classification(self.probes.bpf("kvm"), kvm_reasons.load_classification(None))
        self.vms = VmRegistry(self.cfg.kernel.host_proc, self.cfg.kernel.host_sys)
        if self.resolver is not None:
            self.resolver.vms = self.vms
        if self.metrics is not None:
            self.kvm_counter = kvm_reasons.KvmExitCounter(self.metrics.add_kvm_exits, self.vms.vm_label)
        self._refresh_vms()

    def _refresh_vms(self) -> None:
        """VMMs come and go: identity for the exit counters, and which of them are microVM sandboxes."""
        if self.vms is None or self.probes is None or not self.probes.attached("kvm"):
            return
        bpf = self.probes.bpf("kvm")
        vms = self.vms.refresh()
        kvm_reasons.sync_sandbox_vmms(bpf, vms)
        if self.kvm_counter is not None:
            self.kvm_counter.update(kvm_reasons.read_exit_totals(bpf))

    def _start_sandbox(self) -> None:
        """Sandbox runtimes (WASM among the span senders, gVisor Sentries) get their CPU samples split."""
        if self.probes is None or not self.probes.attached("sandbox"):
            return
        from isoscope.probes.sandbox_sampler import SandboxTracker
        self.sandbox = SandboxTracker(self.probes.bpf("sandbox"), catalog.SANDBOX_SAMPLE_NS,
                                      self.cfg.kernel.host_proc)
        self.probes.set_sampling("sandbox", False)  # no timer interrupts until there is something to sample

    def _refresh_sandbox(self, ticks: int) -> None:
        if self.sandbox is None or self.watch is None:
            return
        from isoscope.probes.sandbox_sampler import find_sentries
        # New senders every second (their spans get sandbox time from then on); known runtimes'
        # code ranges (newly compiled modules) every few seconds; Sentries by a /proc scan less often.
        sentries = find_sentries(self.cfg.kernel.host_proc) if ticks % 10 == 1 else None
        self.sandbox.refresh(self.watch.tgid_snapshot(), sentries, reread=ticks % 5 == 0)
        if self.probes is not None:
            self.probes.set_sampling("sandbox", bool(self.sandbox.pids))
        self._sandbox_splits = [s.as_dict() for s in self.sandbox.splits()]

    def _start_steal(self) -> None:
        try:
            from isoscope.host.steal import StealSampler
        except ImportError:
            return
        try:
            self.steal = StealSampler(self.cfg.kernel.host_proc, interval_s=self.cfg.probes.steal_sample_ms / 1000)
            self.steal.start()
            self._attributor.steal = self.steal
        except Exception:
            logger.exception("steal sampler unavailable")
            self.steal = None

    def _on_kernel_event(self, ev: Any) -> None:
        if isinstance(ev, Stall):
            self.timeline.add_stall(ev)
            # Components the kernel also totals are counted from those totals (every wait, not only
            # the ones above the threshold), see KernelMetrics.
            if self.metrics is not None and self.resolver is not None and ev.component not in MIRRORED_COMPONENTS:
                ns, pod, container = self.resolver.cgroup_labels(ev.cgroup_id)
                self.metrics.add_stall(ev, ns, pod, container)
        elif isinstance(ev, RunSegment):
            self.timeline.add_run(ev)
        elif isinstance(ev, LifecycleEvent):
            if ev.kind is LifecycleKind.EXIT and ev.pid == ev.tid and self.resolver is not None:
                self.resolver.forget(ev.pid)
                if self.watch is not None and ev.pid in self.watch.tgids:
                    self.watch.remove_tgid(ev.pid)
            elif ev.kind in (LifecycleKind.UNSHARE, LifecycleKind.SETNS, LifecycleKind.CLONE_NS):
                self._netns_changed.set()
                if ev.kind is LifecycleKind.CLONE_NS and self.watch is not None and ev.ppid in self.watch.tgids:
                    self.watch.add_tgid(ev.pid)
            elif ev.kind is LifecycleKind.FORK and self.watch is not None:
                # Children of a watched process are followed from their first instruction.
                if ev.ppid in self.watch.tgids:
                    self.watch.add_tgid(ev.pid)
            elif ev.kind is LifecycleKind.CGROUP_MKDIR:
                self._watch_new_cgroup(ev.path)
            elif ev.kind is LifecycleKind.CGROUP_RMDIR and self.resolver is not None:
                labels = self.resolver.forget_cgroup(ev.cgroup_id)
                if labels is not None and self.metrics is not None and any(labels):
                    self.metrics.forget_workload(*labels)
                if self.watch is not None and ev.cgroup_id in self.watch.cgroups:
                    self.watch.remove_cgroup(ev.cgroup_id)

    def _watch_workload(self, wl: Workload) -> None:
        if self.watch is None:
            return
        if wl.pid:
            self.watch.add_tgid(wl.pid)
        elif wl.cgroup_id:
            self.watch.add_cgroup(wl.cgroup_id)

    # -- housekeeping -------------------------------------------------------------------

    def _housekeeping(self) -> None:
        ticks = 0
        while not self._stop.wait(1.0):
            ticks += 1
            try:
                self.timeline.evict()
                if self._netns_changed.is_set() or ticks % 10 == 0:
                    # New namespaces usually come with new veth pairs (a pod starting).
                    self._netns_changed.clear()
                    self._refresh_veths()
                for q in self.queues:
                    self.stats.set_gauge("queue_size", (q.name,), q.size())
                if self.metrics is not None and self.steal is not None:
                    for cpu, secs in self.steal.totals().items():
                        self.metrics.set_steal_seconds(cpu, secs)
                if self.kernel_metrics is not None and ticks % 5 == 0:
                    # Kernel maps are cumulative: a pass every few seconds is as exact as every second.
                    self.kernel_metrics.collect()
                self._refresh_sandbox(ticks)
                self._refresh_vms()
            except Exception:
                logger.exception("housekeeping failed")

    # -- reload -------------------------------------------------------------------------

    def reload(self, new: Config) -> list[str]:
        """Apply a new configuration without restarting (SIGHUP).

        Attribution thresholds, logging and the watch-all switch change live;
        anything else (listeners, exporters, probes) needs a restart and is
        reported in the returned list.
        """
        old = self.cfg
        needs_restart = [section for section in ("receivers", "metrics", "exporters", "timeline", "kernel",
                                                 "kubernetes")
                         if getattr(old, section) != getattr(new, section)]
        if old.probes.model_dump(exclude={"watch_all"}) != new.probes.model_dump(exclude={"watch_all"}):
            needs_restart.append("probes")
        self.cfg = new
        setup_logging(new.log_level, new.log_format)
        if self.pipeline is not None:
            self.pipeline.set_config(new.attribution)
        if self.watch is not None and new.probes.watch_all != old.probes.watch_all:
            self.watch.set_watch_all(new.probes.watch_all)
        self.stats.inc("config_reloads_total")
        if needs_restart:
            logger.warning("configuration reloaded; changes to %s take effect at the next restart",
                           ", ".join(needs_restart))
        else:
            logger.info("configuration reloaded")
        return needs_restart

    # -- stop ---------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Graceful stop: stop receiving, enrich and hand on what is held, drain the queues, detach probes."""
        self._stop.set()
        for r in self.receivers:
            try:
                r.shutdown(2.0)
            except Exception:
                logger.exception("receiver shutdown failed")
        if self.pipeline is not None:
            self.pipeline.shutdown(timeout_s / 2)
        for q in self.queues:
            q.shutdown(timeout_s / 2)
        if self.probes is not None:
            self.probes.shutdown()
        if self.steal is not None:
            self.steal.shutdown()
        if self._pods is not None:
            self._pods.shutdown()
        self.clock.shutdown()
        if self._otlp_metrics is not None:
            self._otlp_metrics.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()


def run(cfg: Config, *, load_probes: bool = True,
        reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration. Returns the exit code."""
    setup_logging(cfg.log_level, cfg.log_format)
    daemon = Daemon(cfg, load_probes=load_probes)
    stop = threading.Event()
    hup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
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
