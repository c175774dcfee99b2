"""Scenarios: a chain of lab services with faults, load, the daemon, and the scoring of its output.

A :class:`Chain` builds, for every hop, a network namespace joined to the root
namespace and to the next hop by veth pairs, a cgroup laid out as a
Kubernetes pod's container (``kubepods/besteffort/pod<uid>/<container id>``;
v2 for a distinct kernel id, v1 ``cpu``/``memory`` for limits), and starts the
hop's service in new PID, mount and UTS namespaces inside them.

The lab takes the path spans take in a cluster: a service exports from its
own network namespace to the node's address (the root-namespace end of its
veth, as a pod reaches a DaemonSet's ``hostPort``), optionally through a relay
(:mod:`isoscope_lab.relay`, a Collector agent's stand-in). :func:`daemon_for_lab`
sets up ``isoscope run`` (:mod:`isoscope_lab.launcher`) on its default
configuration, listening where a DaemonSet pod would. :func:`score` compares
the daemon's verdict on every span with the span's own kernel truth.
"""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import urlsplit

from isoscope_lab import truth as T
from isoscope_lab.faults import Environment, Fault, apply_environment
from isoscope_lab.launcher import IsoscopeDaemon, deep_merge
from isoscope_lab.relay import COMM as RELAY_COMM
from isoscope_lab.service import RUN_ATTR, SERVERS
from isoscope_lab.topology import JANITOR, LAB_CGROUP_PARENT, LabCgroup, LabError, NetNs, VethLink, \
    free_subnet_base, lab_tag
from isoscope.report import SpanRecord, load_spans

logger = logging.getLogger(__name__)

SERVICE_PORT = 8080
NODE = "{node}"
"""Placeholder of an OTLP endpoint: replaced, per hop, by the node address the hop reaches (its veth's root end)."""
RELAY_CGROUP = f"{LAB_CGROUP_PARENT}/relays"
"""Parent cgroup of the lab's relays: the daemon trusts processes below it as relays (``identity.relays``)."""
POD_PARENT = "kubepods/besteffort"
"""Where hop cgroups live below the lab's parent, as a kubelet with the cgroupfs driver lays pods out."""
_counter = itertools.count()


# ---------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class HopSpec:
    """One hop of a chain.

    Attributes:
        faults: faults injected on this hop (several at once are allowed).
        work_ms: CPU time each request burns on this hop.
        cpus: CPUs the hop is pinned to (None: any).
        server: how the service serves requests: ``threads`` (a thread per connection),
            ``pool`` (``workers`` pool threads take turns) or ``asyncio`` (one event loop).
        workers: pool threads when ``server == "pool"``.
        thread_id: record ``thread.id`` on spans (False: ``process.pid`` is the finest claim).
    """

    faults: list[Fault] = field(default_factory=list)
    work_ms: float = 4.0
    cpus: set[int] | None = None
    server: str = "threads"
    workers: int = 4
    thread_id: bool = True

    def __post_init__(self) -> None:
        if self.server not in SERVERS:
            raise ValueError(f"unknown server {self.server!r}; expected one of {', '.join(SERVERS)}")

    @property
    def fault(self) -> Fault:
        """The hop's primary fault (the first), ``none`` when clean."""
        return self.faults[0] if self.faults else Fault("none")


@dataclass(slots=True)
class RunningHop:
    """A started hop and everything it owns."""

    name: str
    spec: HopSpec
    netns: NetNs
    cgroup: LabCgroup
    uplink: VethLink
    ip: str
    pod_uid: str = ""
    container_id: str = ""
    proc: subprocess.Popen[Any] | None = None
    envs: list[Environment] = field(default_factory=list)
    log_path: str = ""

    @property
    def node_ip(self) -> str:
        """The node address this hop reaches: the root-namespace end of its veth."""
        return self.uplink.a_ip


def _is_loopback_url(url: str) -> bool:
    try:
        return ipaddress.ip_address((urlsplit(url).hostname or "").strip("[]")).is_loopback
    except ValueError:
        return (urlsplit(url).hostname or "") == "localhost"


class Chain:
    """A chain of lab services ``hop0 → hop1 → …``; a context manager that removes everything it made.

    Args:
        hops: the hop specifications, entry hop first.
        otlp_endpoint: OTLP/HTTP traces URL the services export to. A URL whose host is
            :data:`NODE` (``"{node}"``) is the field path: each service exports from its own
            network namespace to its node address (see :func:`node_endpoint`). A URL on the
            host's loopback (a test backend) is reached by the exporter thread stepping into
            the root network namespace. Any other URL is used as it is, from the service's
            namespace.
        run_id: value of the ``lab.run`` resource attribute on every span (to find this run's spans).
        service_prefix: ``service.name`` of hop ``i`` is ``f"{service_prefix}{i}"``…
        names: … unless explicit names are given, one per hop.
        relay: put an OTLP relay (:mod:`isoscope_lab.relay`, in the root network namespace and
            its own cgroup below :data:`RELAY_CGROUP`) between the services and ``otlp_endpoint``;
            it tags each request with the sending pod's ``k8s.pod.uid``.
    """

    def __init__(self, hops: Sequence[HopSpec], otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces",
                 run_id: str | None = None, service_prefix: str = "hop",
                 names: Sequence[str] | None = None, relay: bool = False) -> None:
        if not 1 <= len(hops) <= 8:
            raise ValueError("a chain has 1..8 hops")
        self.specs = list(hops)
        self.otlp_endpoint = otlp_endpoint
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.prefix = service_prefix
        if names is not None and len(names) != len(self.specs):
            raise ValueError("one name per hop")
        self.names = list(names) if names is not None else None
        self.tag = f"{lab_tag()}{next(_counter) % 16:x}"
        self.hops: list[RunningHop] = []
        self.links: list[VethLink] = []
        self.hog_cgroup: LabCgroup | None = None
        self.relay = relay
        self.relay_cgroup: LabCgroup | None = None
        self.relay_proc: subprocess.Popen[Any] | None = None
        self.relay_port = 0
        self.workdir = tempfile.mkdtemp(prefix=f"isoscope-lab-{self.tag}-", dir="/var/tmp")
        self._host_netns_fd = -1
        self._unregister = JANITOR.register(f"chain {self.tag}", self._teardown)

    @property
    def entry_url(self) -> str:
        """URL of the entry hop's ``/work``, reachable from the root namespace."""
        return f"http://{self.hops[0].ip}:{SERVICE_PORT}/work"

    def service_name(self, i: int) -> str:
        """``service.name`` of hop ``i``."""
        return self.names[i] if self.names else f"{self.prefix}{i}"

    def endpoint_of(self, hop: RunningHop) -> str:
        """The OTLP endpoint hop ``hop`` exports to (the relay's when there is one)."""
        if self.relay:
            return f"http://{hop.node_ip}:{self.relay_port}/v1/traces"
        return self.otlp_endpoint.replace(NODE, hop.node_ip)

    def start(self, ready_timeout_s: float = 30.0) -> Chain:
        """Build namespaces, links and cgroups, start every service, wait until all answer, apply faults."""
        n = len(self.specs)
        base = free_subnet_base(2 * n)
        self.hog_cgroup = LabCgroup(f"{LAB_CGROUP_PARENT}/{self.tag}-hogs")
        for i, spec in enumerate(self.specs):
            ns = NetNs.create(f"isl-{self.tag}-{i}")
            up = VethLink.create(f"il{self.tag}{i}r", f"il{self.tag}{i}n", None, ns, base + i)
            pod_uid, cid = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
            cg = LabCgroup(f"{LAB_CGROUP_PARENT}/{POD_PARENT}/pod{pod_uid}/{cid}")
            self.hops.append(RunningHop(self.service_name(i), spec, ns, cg, up, up.b_ip, pod_uid, cid))
        # hop i reaches hop i+1 over its own veth pair: the request crosses two namespaces.
        down_ips: list[str] = []
        for i in range(n - 1):
            link = VethLink.create(f"il{self.tag}{i}d", f"il{self.tag}{i}u", self.hops[i].netns,
                                   self.hops[i + 1].netns, base + n + i)
            self.links.append(link)
            down_ips.append(link.b_ip)
        if self.relay:
            self._start_relay(ready_timeout_s)
        elif NODE not in self.otlp_endpoint and _is_loopback_url(self.otlp_endpoint):
            self._host_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        for i, hop in enumerate(self.hops):
            downstream = f"http://{down_ips[i]}:{SERVICE_PORT}" if i < n - 1 else ""
            self._launch(i, hop, downstream)
        deadline = time.monotonic() + ready_timeout_s
        for hop in self.hops:
            self._wait_ready(hop, deadline)
        for hop in self.hops:
            for fault in hop.spec.faults:
                hop.envs.append(apply_environment(fault, hop.cgroup, self.hog_cgroup))
        return self

    def _start_relay(self, timeout_s: float) -> None:
        self.relay_cgroup = LabCgroup(f"{RELAY_CGROUP}/{self.tag}")
        argv = [sys.executable, "-m", "isoscope_lab.relay", "--listen", "0.0.0.0:0",
                "--forward", self.otlp_endpoint.replace(NODE, "127.0.0.1")]
        for hop in self.hops:
            argv += ["--pod", f"{hop.ip}={hop.pod_uid}"]
        log = open(os.path.join(self.workdir, "relay.log"), "wb")
        self.relay_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                           cwd=self.workdir, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                           preexec_fn=self.relay_cgroup.enter_fn())  # noqa: PLW1509
        log.close()
        assert self.relay_proc.stdout is not None
        line = self.relay_proc.stdout.readline().decode(errors="replace").split()
        if len(line) != 2 or line[0] != "listening":
            raise LabError(f"relay did not start: {Path(self.workdir, 'relay.log').read_text(errors='replace')}")
        self.relay_port = int(line[1])

    def _launch(self, i: int, hop: RunningHop, downstream: str) -> None:
        spec = hop.spec
        fault = spec.fault
        argv = ["nsenter", f"--net={hop.netns.path}", "--",
                "unshare", "--pid", "--fork", "--kill-child=SIGTERM", "--mount-proc", "--uts", "--",
                sys.executable, "-m", "isoscope_lab.service",
                "--name", hop.name, "--index", str(i), "--run-id", self.run_id,
                "--listen", f"0.0.0.0:{SERVICE_PORT}", "--downstream", downstream,
                "--fault", fault.to_json(), "--work-ms", str(spec.work_ms),
                "--data-dir", os.path.join(self.workdir, hop.name), "--cpu-dir", hop.cgroup.cpu_dir,
                "--v2-dir", hop.cgroup.v2_path, "--peer-ip", hop.uplink.a_ip,
                "--otlp-endpoint", self.endpoint_of(hop),
                "--server", spec.server, "--workers", str(spec.workers)]
        if not spec.thread_id:
            argv.append("--no-thread-id")
        pass_fds: tuple[int, ...] = ()
        if self._host_netns_fd >= 0:
            argv += ["--host-netns-fd", str(self._host_netns_fd)]
            pass_fds = (self._host_netns_fd,)
        if spec.cpus:
            argv[argv.index("unshare"):argv.index("unshare")] = ["taskset", "-c", ",".join(map(str, sorted(spec.cpus)))]
        hop.log_path = os.path.join(self.workdir, f"{hop.name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("OTEL_SDK_DISABLED", None)
        with open(hop.log_path, "wb") as log:
            hop.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir, env=env, pass_fds=pass_fds,
                                        preexec_fn=hop.cgroup.enter_fn())  # noqa: PLW1509

    def _wait_ready(self, hop: RunningHop, deadline: float) -> None:
        while time.monotonic() < deadline:
            if hop.proc is not None and hop.proc.poll() is not None:
                raise LabError(f"{hop.name} exited with {hop.proc.returncode}: {self.log_tail(hop)}")
            try:
                conn = http.client.HTTPConnection(hop.ip, SERVICE_PORT, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise LabError(f"{hop.name} not ready on {hop.ip}:{SERVICE_PORT}: {self.log_tail(hop)}")

    @staticmethod
    def log_tail(hop: RunningHop, chars: int = 2000) -> str:
        try:
            return Path(hop.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop services (they flush their spans), the relay, hogs, and remove namespaces, links and cgroups."""
        self._unregister()

    def _teardown(self) -> None:
        for hop in self.hops:
            for env in hop.envs:
                env.stop()
        for hop in self.hops:
            if hop.proc is not None and hop.proc.poll() is None:
                # unshare --fork ignores SIGTERM itself and waits for its child: signal the
                # service (every other process of the hop's cgroup) directly; it flushes its spans.
                for pid in hop.cgroup.pids():
                    if pid != hop.proc.pid:
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
        for hop in self.hops:
            if hop.proc is None:
                continue
            try:
                hop.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop on SIGTERM, killing", hop.name)
            hop.cgroup.remove()  # kills anything left and removes the directories
            if hop.proc.poll() is None:
                hop.proc.kill()
                hop.proc.wait(timeout=5)
        if self.relay_proc is not None:
            # After the services: their last spans still go through it.
            if self.relay_proc.poll() is None:
                self.relay_proc.terminate()
            try:
                self.relay_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.relay_proc.kill()
                self.relay_proc.wait(timeout=5)
            if self.relay_proc.stdout is not None:
                self.relay_proc.stdout.close()
        if self.relay_cgroup is not None:
            self.relay_cgroup.remove()
        if self.hog_cgroup is not None:
            self.hog_cgroup.remove()
        for link in self.links:
            link.delete()
        for hop in self.hops:
            hop.uplink.delete()
            hop.netns.delete()
        if self._host_netns_fd >= 0:
            os.close(self._host_netns_fd)
            self._host_netns_fd = -1
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._remove_shared_parents()

    def _remove_shared_parents(self) -> None:
        # The pod parents and the lab's parent are shared by this chain's hops (the
        # first hop made them) and by concurrent labs: remove them once empty,
        # deepest first; a parent still in use stays for its last user.
        if not self.hops:
            return
        cg = self.hops[0].cgroup
        roots = [cg.v2_root] if cg.v2_root else []
        roots += [os.path.join(cg.v1_root, c) for c in cg.v1_paths]
        rels = [f"{LAB_CGROUP_PARENT}/{POD_PARENT}", f"{LAB_CGROUP_PARENT}/kubepods", RELAY_CGROUP,
                LAB_CGROUP_PARENT]
        for root in roots:
            for rel in rels:
                try:
                    os.rmdir(os.path.join(root, rel))
                except OSError:
                    pass  # another lab still uses it, or it never existed

    def __enter__(self) -> Chain:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0


def send_load(url: str, duration_s: float, *, pause_s: float = 0.0,
              progress: Callable[[float, LoadResult], None] | None = None) -> LoadResult:
    """Sequential GETs on one kept-alive connection for ``duration_s`` seconds.

    One request at a time keeps every hop's handling thread the only runnable
    thread of its cgroup, which the throttling oracle assumes (see ``truth``).
    """
    from urllib.parse import urlsplit

    u = urlsplit(url)
    res = LoadResult()
    start = time.monotonic()
    conn: http.client.HTTPConnection | None = None
    while (elapsed := time.monotonic() - start) < duration_s:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
            conn.request("GET", u.path or "/")
            resp = conn.getresponse()
            resp.read()
            res.requests += 1
            if resp.status >= 400:
                res.errors += 1
        except (OSError, http.client.HTTPException):
            res.errors += 1
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
        if progress is not None:
            progress(min(elapsed, duration_s), res)
        if pause_s:
            time.sleep(pause_s)
    if conn is not None:
        conn.close()
    res.seconds = time.monotonic() - start
    if progress is not None:
        progress(duration_s, res)
    return res


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

NODE_LISTEN = "0.0.0.0:0"
"""Where the lab's daemon takes spans: every address of the node, as a DaemonSet's ``hostPort`` does.

The daemon starts before the chains whose veths give the node its addresses
(one daemon serves many chains, each with addresses picked when it starts), so
it cannot bind one of them; the lab's addresses live only on veths it made."""

RELAY_POLICY = {"comms": [RELAY_COMM], "cgroup_prefixes": [f"/{RELAY_CGROUP}"]}
"""``identity.relays`` trusting the lab's relays: their process name *and* their cgroup."""


def daemon_for_lab(traces_path: str | os.PathLike[str], *, relays: bool = False, **kwargs: Any) -> IsoscopeDaemon:
    """An ``isoscope run`` launcher for the lab: its default configuration, file export to ``traces_path``.

    Nothing lab-specific is configured (no ``probes.watch_cgroups``, no
    ``watch_all``): the daemon learns of a service when its spans arrive, from
    the connection they arrive on, as it does in a cluster. The OTLP receivers
    listen on :data:`NODE_LISTEN`, where the services reach them at their node
    address; metrics stay on loopback.

    Args:
        traces_path: the file export.
        relays: trust the lab's relays (:data:`RELAY_POLICY` as ``identity.relays``).
        kwargs: go to :class:`~isoscope_lab.launcher.IsoscopeDaemon` (``config`` is merged
            over the lab's, ``listen`` over :data:`NODE_LISTEN`; the working directory defaults
            to the export's directory, where ``daemon.log`` then lands).
    """
    traces = Path(traces_path).absolute()
    config: dict[str, Any] = {"identity": {"relays": RELAY_POLICY}} if relays else {}
    config = deep_merge(config, kwargs.pop("config", None) or {})
    listen = {"otlp_http": NODE_LISTEN, "otlp_grpc": NODE_LISTEN, **(kwargs.pop("listen", None) or {})}
    kwargs.setdefault("workdir", traces.parent)
    return IsoscopeDaemon(file_export=traces, config=config, listen=listen, **kwargs)


def node_endpoint(daemon: IsoscopeDaemon) -> str:
    """The daemon's OTLP/HTTP traces URL as a service reaches it: at its node address (:data:`NODE`)."""
    return f"http://{NODE}:{daemon.http_port}/v1/traces"


def wait_for_spans(path: str, run_id: str, expected: int, timeout_s: float = 20.0,
                   settle_s: float = 3.0, since_ns: int = 0) -> list[SpanRecord]:
    """This run's application spans (started at ``since_ns`` or later) from the file export.

    Returns once ``expected`` arrived or the count settled.
    """
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    spans: list[SpanRecord] = []
    while time.monotonic() < deadline:
        try:
            spans = [s for s in load_spans(path) if s.resource.get(RUN_ATTR) == run_id and not s.is_stall_child
                     and s.start_ns >= since_ns]
        except Exception as exc:  # the file may not exist yet
            logger.debug("reading %s: %s", path, exc)
            spans = []
        if len(spans) >= expected:
            return spans
        if len(spans) != last:
            last, last_change = len(spans), time.monotonic()
        elif time.monotonic() - last_change > settle_s and spans:
            return spans
        time.sleep(0.5)
    return spans


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------

TRUTH_OF_FAULT: dict[str, str | None] = {
    "cpu_throttle": T.THROTTLE,
    "cpu_contention": T.RUNQUEUE,
    "virtio_io": T.IO,
    "steal": T.STEAL,
    "memory_reclaim": T.RECLAIM,
    "netns": None,           # per-packet veth time is invisible to the sender: blame is scored, ns are not
}
COMPONENT_OF_FAULT: dict[str, str] = {"cpu_throttle": "cpu_throttle", "cpu_contention": "runqueue",
                                      "virtio_io": "virtio_io", "steal": "steal",
                                      "memory_reclaim": "memory_reclaim", "netns": "netns"}


@dataclass(slots=True)
class HopScore:
    """How the daemon did on one hop of one scenario; every span of the hop is scored.

    A span's *expected verdict* comes from its own truth, by the product's rule:
    the component the oracle says dominated when the oracle's stalls add up to
    ≥ ``threshold`` of the span, no blame otherwise (:func:`expected_blame`).

    Attributes:
        service: the hop.
        fault: the fault kind on it (``none`` when clean).
        spans: application spans of the hop found in the output (all of them are scored).
        enriched: of those, spans carrying the daemon's attributes.
        stalled: faulted hop: spans whose injected stall (truth) is ≥ ``threshold`` of their
            duration (all spans when the fault has no truth counter) — the fault bit that often.
        blamed_strict: spans whose ``isolation.blame`` is exactly the expected verdict.
        blamed_right: spans whose verdict the oracle cannot tell from the expected one
            (:func:`blame_agrees_with_truth`: a component within the ns tolerance of the
            dominant one, or a span within the tolerance of the threshold either way).
        within_tol: faulted hop: spans whose fault component ns are within ±10 % or ±2 ms
            of the truth.
        false_blame: spans blamed on a component that is not (tolerantly) right, whatever
            their stall — on any hop; the clean hops' bar.
        false_blame_strict: spans blamed on anything but exactly the expected verdict.
        missed: spans not blamed although their truth says a component dominated.
        thread_scope / process_scope: spans matched at thread / process precision.
        truth_ms, measured_ms: mean truth / measured ns of the fault's component over all spans.
        has_truth: False for a fault without a truth counter (``netns``).
        device_spans: ``virtio_io`` hop: spans with the disk's own read time (the request had
            the disk to itself, :data:`isoscope_lab.truth.DEVICE_READ`).
        device_bracketed: of those, spans whose measured ``virtio_io`` ns lie between the disk's
            read time and the reads' time on the thread (each within ±10 % / ±2 ms).
        device_ms: mean disk read time over ``device_spans``.
    """

    service: str
    fault: str
    spans: int = 0
    enriched: int = 0
    stalled: int = 0
    blamed_strict: int = 0
    blamed_right: int = 0
    within_tol: int = 0
    false_blame: int = 0
    false_blame_strict: int = 0
    missed: int = 0
    thread_scope: int = 0
    process_scope: int = 0
    truth_ms: float = 0.0
    measured_ms: float = 0.0
    has_truth: bool = True
    device_spans: int = 0
    device_bracketed: int = 0
    device_ms: float = 0.0

    @property
    def eligible(self) -> int:
        """Spans scored: all of them (kept for callers of the former, thresholded count)."""
        return self.spans

    @property
    def blamed_strict_pct(self) -> float:
        return 100.0 * self.blamed_strict / self.spans if self.spans else 0.0

    @property
    def blamed_right_pct(self) -> float:
        return 100.0 * self.blamed_right / self.spans if self.spans else 0.0

    @property
    def within_tol_pct(self) -> float:
        return 100.0 * self.within_tol / self.spans if self.spans else 0.0

    @property
    def device_bracketed_pct(self) -> float:
        return 100.0 * self.device_bracketed / self.device_spans if self.device_spans else 0.0

    @property
    def false_blame_pct(self) -> float:
        return 100.0 * self.false_blame / self.spans if self.spans else 0.0

    @property
    def false_blame_strict_pct(self) -> float:
        return 100.0 * self.false_blame_strict / self.spans if self.spans else 0.0


def within_tolerance(measured_ns: int, truth_ns: int, rel: float = 0.10, abs_ns: int = 2_000_000) -> bool:
    """``measured`` is within ±``rel`` of ``truth`` or within ±``abs_ns``."""
    diff = abs(measured_ns - truth_ns)
    return diff <= abs_ns or diff <= rel * truth_ns


def bracketed(measured_ns: int, low_ns: int, high_ns: int) -> bool:
    """``low ≤ measured ≤ high``, each bound within :func:`within_tolerance`."""
    return ((measured_ns >= low_ns or within_tolerance(measured_ns, low_ns))
            and (measured_ns <= high_ns or within_tolerance(measured_ns, high_ns)))


def _truth_values(span: SpanRecord) -> dict[str, int]:
    return {c: int(span.attrs.get(k, 0) or 0) for k, c in T.TRUTH_COMPONENT.items()}


def _truth_stall(span: SpanRecord) -> int:
    """Largest isolation stall the span's own oracle recorded."""
    return max(_truth_values(span).values())


def truth_dominant(span: SpanRecord) -> str:
    """The component the span's own oracle says held it back longest (e.g. ``cpu_throttle``)."""
    values = _truth_values(span)
    return max(values, key=lambda c: values[c])


def expected_blame(span: SpanRecord, threshold: float = 0.2) -> str:
    """The verdict the span's oracle calls for: its dominant component, or ``""`` below the threshold.

    The product's rule applied to the truth: blame the largest isolation stall
    when the isolation stalls add up to at least ``threshold`` of the span.
    """
    values = _truth_values(span)
    if sum(values.values()) < threshold * (span.duration_ns or 1) or not any(values.values()):
        return ""
    return truth_dominant(span)


def _blamed(span: SpanRecord) -> str:
    blame = str(span.attrs.get("isolation.blame", "") or "")
    return blame.split(".", 1)[-1] if blame else ""


def _truth_lower_bounds(values: dict[str, int]) -> dict[str, int]:
    """The least each oracle value can be once the overlap the oracle counts twice is taken out.

    A thread preempted while in memcg reclaim is counted by PSI (memory stall) and by
    schedstat (run delay) alike, and nothing the service can read says how much of
    its run delay fell inside reclaim: its run-queue truth may hold up to all of its
    reclaim truth (which the product, by precedence, calls reclaim).
    """
    low = dict(values)
    if values.get("memory_reclaim") and values.get("runqueue"):
        low["runqueue"] = max(0, values["runqueue"] - values["memory_reclaim"])
    return low


def blame_agrees_with_truth(span: SpanRecord, threshold: float = 0.2) -> bool:
    """``isolation.blame`` is a verdict the span's oracle cannot tell apart from the expected one.

    Components overlap (:func:`_truth_lower_bounds`). When the oracle's value for
    the blamed component reaches the least any other component can be (or is
    within the ns tolerance of it), the oracle cannot order them and either
    verdict is right. Likewise a span whose truth is within the tolerance of the
    blame threshold may be blamed or not.
    """
    comp = _blamed(span)
    values = _truth_values(span)
    low = _truth_lower_bounds(values)
    limit = int(threshold * (span.duration_ns or 1))
    if not comp:
        total = sum(low.values())
        return total < limit or within_tolerance(total, limit)
    total = sum(values.values())
    if comp not in values or not (total >= limit or within_tolerance(total, limit)):
        return False
    rival = max((v for c, v in low.items() if c != comp), default=0)
    return values[comp] >= rival or within_tolerance(values[comp], rival)


def score(spans: Iterable[SpanRecord], threshold: float = 0.2) -> list[HopScore]:
    """Score the daemon's verdicts against each span's ``test.truth.*`` oracle, per hop, every span."""
    by_hop: dict[str, HopScore] = {}
    sums: dict[str, list[int]] = {}
    for s in spans:
        if s.is_stall_child or T.FAULT not in s.attrs:
            continue
        fault = str(s.attrs[T.FAULT])
        hs = by_hop.setdefault(s.service, HopScore(s.service, fault))
        hs.spans += 1
        hs.enriched += int(s.enriched)
        scope = s.attrs.get("isolation.scope")
        hs.thread_scope += int(scope == "thread")
        hs.process_scope += int(scope == "process")
        blamed, expected = _blamed(s), expected_blame(s, threshold)
        right = blame_agrees_with_truth(s, threshold)
        hs.blamed_strict += int(blamed == expected)
        hs.blamed_right += int(right)
        hs.false_blame += int(bool(blamed) and not right)
        hs.false_blame_strict += int(bool(blamed) and blamed != expected)
        hs.missed += int(not blamed and bool(expected) and not right)
        if fault == "none":
            continue
        truth_key = TRUTH_OF_FAULT.get(fault)
        measured = s.component_ns().get(COMPONENT_OF_FAULT[fault], 0)
        acc = sums.setdefault(s.service, [0, 0])
        acc[1] += measured
        if truth_key is None:
            hs.has_truth = False
            hs.stalled += 1
            continue
        truth_ns = int(s.attrs.get(truth_key, 0) or 0)
        hs.stalled += int(truth_ns >= threshold * (s.duration_ns or 1))
        hs.within_tol += int(within_tolerance(measured, truth_ns))
        acc[0] += truth_ns
        device_ns = s.attrs.get(T.DEVICE_READ)
        if device_ns is not None:
            device_ns = int(device_ns)
            hs.device_spans += 1
            hs.device_ms += device_ns / 1e6
            hs.device_bracketed += int(bracketed(measured, device_ns, truth_ns))
    for svc, (t_ns, m_ns) in sums.items():
        hs = by_hop[svc]
        if hs.spans:
            hs.truth_ms = t_ns / hs.spans / 1e6
            hs.measured_ms = m_ns / hs.spans / 1e6
        if hs.device_spans:
            hs.device_ms /= hs.device_spans
    return sorted(by_hop.values(), key=lambda h: h.service)


# ---------------------------------------------------------------------------
# Scenario catalogue
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class Scenario:
    """A named chain with faults, and how long to load it.

    Attributes:
        relay: the services export through an OTLP relay (the daemon must trust it:
            :func:`daemon_for_lab` with ``relays=True``).
    """

    name: str
    hops: list[HopSpec]
    load_s: float = 15.0
    description: str = ""
    relay: bool = False


def scenarios() -> dict[str, Scenario]:
    """The lab's standard scenarios: each single fault on the middle hop, two faults on two hops, and paths.

    The hops serve requests in the shapes the daemon meets in the field: a thread
    per connection, a pool of worker threads taking turns, an asyncio loop.
    """
    clean = HopSpec
    throttled = HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=15, server="pool", workers=4)
    return {s.name: s for s in [
        Scenario("cpu_throttle", [clean(server="asyncio"), throttled, clean()],
                 description="CFS quota 20 % of a CPU on hop1 (a pool of 4 workers); hop0 is an asyncio loop"),
        Scenario("cpu_contention", [clean(cpus={1}, server="pool"),
                                    HopSpec([Fault("cpu_contention", hogs=2, cpu=0)], work_ms=10, server="asyncio"),
                                    clean(cpus={1})],
                 description="hop1 (an asyncio loop) shares CPU 0 with two busy neighbours"),
        Scenario("virtio_io", [clean(server="asyncio"),
                               HopSpec([Fault("virtio_io", io_reads=160)], server="pool", workers=4), clean()],
                 description="160 random 4 KiB O_DIRECT reads from the virtio disk per request on hop1 (a pool)"),
        # Pinned to one CPU because the oracle is the cgroup's PSI memory stall, which
        # adds up one thread's stall exactly only while that thread stays on one CPU
        # (see isoscope_lab.truth).
        Scenario("memory_reclaim", [clean(), HopSpec([Fault("memory_reclaim", mem_write_mb=32)], work_ms=1,
                                                     cpus={1}),
                                    clean(work_ms=2)],
                 description="hop1 (on CPU 1) churns page cache and anonymous memory against a tight memcg limit"),
        Scenario("netns", [clean(), HopSpec([Fault("netns")]), clean()],
                 description="hop1 sends 2000 datagrams across its veth per request"),
        Scenario("steal", [clean(), HopSpec([Fault("steal")], work_ms=20), clean()],
                 description="hop1 burns 20 ms of CPU per request; steal is whatever the host takes"),
        Scenario("mixed", [clean(server="asyncio"), throttled,
                           HopSpec([Fault("virtio_io", io_reads=160)])],
                 description="CFS quota on hop1 (a pool) and virtio reads on hop2 of the same chain"),
        Scenario("no_thread_id", [HopSpec(thread_id=False, server="asyncio"),
                                  HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=15, thread_id=False),
                                  HopSpec(thread_id=False)],
                 description="CFS quota on hop1; no span carries thread.id, only process.pid as seen in its "
                             "PID namespace"),
        Scenario("relay", [clean(server="asyncio"), throttled, clean()], relay=True,
                 description="CFS quota on hop1; spans reach the daemon through an OTLP relay that adds "
                             "k8s.pod.uid"),
    ]}


@dataclass(slots=True)
class ScenarioRun:
    """One run of a scenario: the scored load, its spans and scores, and the warm-up before it."""

    scenario: Scenario
    load: LoadResult
    spans: list[SpanRecord]
    scores: list[HopScore]
    warm_up: LoadResult = field(default_factory=lambda: LoadResult())


def warm_up(chain: Chain, traces_path: str, *, timeout_s: float = 120.0) -> LoadResult:
    """Send requests until the daemon has resolved a span of every hop of ``chain``; returns that load.

    The daemon learns of a process from the connection its first spans arrive
    on and only then follows it in the kernel (every block request, every
    blocking syscall); what the process did before that is known only from
    the kernel's aggregates. A service in the field runs for hours, so that
    first moment is no part of what the lab scores: the scored load starts
    once every hop is followed. ``timeout_s`` only bounds a daemon that never
    resolves a hop (then :class:`LabError`).
    """
    names = {chain.service_name(i) for i in range(len(chain.hops))}
    total = LoadResult()
    deadline = time.monotonic() + timeout_s
    while True:
        part = send_load(chain.entry_url, 0.5)
        total.requests += part.requests
        total.errors += part.errors
        total.seconds += part.seconds
        seen = set()
        try:
            for s in load_spans(traces_path):
                if s.resource.get(RUN_ATTR) == chain.run_id and "isolation.scope" in s.attrs:
                    seen.add(s.service)
        except Exception as exc:  # the file may not exist yet
            logger.debug("reading %s: %s", traces_path, exc)
        if names <= seen:
            return total
        if time.monotonic() > deadline:
            raise LabError(f"the daemon resolved no span of {sorted(names - seen)} in {timeout_s:.0f} s")


def run_scenario(scenario: Scenario, daemon: IsoscopeDaemon, *, threshold: float = 0.2,
                 load_s: float | None = None,
                 progress: Callable[[float, LoadResult], None] | None = None) -> ScenarioRun:
    """Build the scenario's chain on the field path, load it, stop it, and score the daemon's output for this run.

    The chain is warmed up first (:func:`warm_up`): the spans scored are those of
    the requests sent once the daemon follows every hop.
    """
    with Chain(scenario.hops, otlp_endpoint=node_endpoint(daemon), service_prefix=f"{scenario.name}-hop",
               relay=scenario.relay) as chain:
        warm = warm_up(chain, str(daemon.traces_path))
        since_ns = time.time_ns()
        load = send_load(chain.entry_url, load_s or scenario.load_s, progress=progress)
        run_id = chain.run_id
    spans = wait_for_spans(str(daemon.traces_path), run_id, expected=load.requests * len(scenario.hops),
                           since_ns=since_ns)
    return ScenarioRun(scenario, load, spans, score(spans, threshold), warm)
