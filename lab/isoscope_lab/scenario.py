"""Scenarios: a chain of lab services with faults, load, the daemon, and the scoring of its output.

A :class:`Chain` builds, for every hop, a network namespace joined to the root
namespace and to the next hop by veth pairs, a cgroup (v2 for a distinct
kernel id, v1 ``cpu``/``memory`` for limits), and starts the hop's service in
new PID, mount and UTS namespaces inside them. :func:`daemon_for_lab` sets up
``isoscope run`` (:mod:`isoscope_lab.launcher`) to watch them. :func:`score`
compares the daemon's verdict on every span with the span's own kernel truth.
"""

from __future__ import annotations

import http.client
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

from isoscope_lab import truth as T
from isoscope_lab.faults import Environment, Fault, apply_environment
from isoscope_lab.launcher import IsoscopeDaemon, deep_merge
from isoscope_lab.service import RUN_ATTR
from isoscope_lab.topology import JANITOR, LAB_CGROUP_PARENT, LabCgroup, LabError, NetNs, VethLink, \
    free_subnet_base, lab_tag
from isoscope.report import SpanRecord, load_spans

logger = logging.getLogger(__name__)

SERVICE_PORT = 8080
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
    """

    faults: list[Fault] = field(default_factory=list)
    work_ms: float = 4.0
    cpus: set[int] | None = None

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
    proc: subprocess.Popen[Any] | None = None
    envs: list[Environment] = field(default_factory=list)
    log_path: str = ""


class Chain:
    """A chain of lab services ``hop0 → hop1 → …``; a context manager that removes everything it made.

    Args:
        hops: the hop specifications, entry hop first.
        otlp_endpoint: OTLP/HTTP traces URL the services export to (reached from the root namespace).
        run_id: value of the ``lab.run`` resource attribute on every span (to find this run's spans).
        service_prefix: ``service.name`` of hop ``i`` is ``f"{service_prefix}{i}"``…
        names: … unless explicit names are given, one per hop.
    """

    def __init__(self, hops: Sequence[HopSpec], otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces",
                 run_id: str | None = None, service_prefix: str = "hop",
                 names: Sequence[str] | None = None) -> None:
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

    def start(self, ready_timeout_s: float = 30.0) -> Chain:
        """Build namespaces, links and cgroups, start every service, wait until all answer, apply faults."""
        n = len(self.specs)
        base = free_subnet_base(2 * n)
        self._host_netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.hog_cgroup = LabCgroup(f"{LAB_CGROUP_PARENT}/{self.tag}-hogs")
        for i, spec in enumerate(self.specs):
            ns = NetNs.create(f"isl-{self.tag}-{i}")
            up = VethLink.create(f"il{self.tag}{i}r", f"il{self.tag}{i}n", None, ns, base + i)
            cg = LabCgroup(f"{LAB_CGROUP_PARENT}/{self.tag}-{self.service_name(i)}")
            self.hops.append(RunningHop(self.service_name(i), spec, ns, cg, up, up.b_ip))
        # hop i reaches hop i+1 over its own veth pair: the request crosses two namespaces.
        down_ips: list[str] = []
        for i in range(n - 1):
            link = VethLink.create(f"il{self.tag}{i}d", f"il{self.tag}{i}u", self.hops[i].netns,
                                   self.hops[i + 1].netns, base + n + i)
            self.links.append(link)
            down_ips.append(link.b_ip)
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

    def _launch(self, i: int, hop: RunningHop, downstream: str) -> None:
        spec = hop.spec
        fault = spec.fault
        argv = ["nsenter", f"--net={hop.netns.path}", "--",
                "unshare", "--pid", "--fork", "--kill-child=SIGTERM", "--mount-proc", "--uts", "--",
                sys.executable, "-m", "isoscope_lab.service",
                "--name", hop.name, "--index", str(i), "--run-id", self.run_id,
                "--listen", f"0.0.0.0:{SERVICE_PORT}", "--downstream", downstream,
                "--fault", fault.to_json(), "--work-ms", str(spec.work_ms),
                "--data-dir", os.path.join(self.workdir, hop.name), "--cpu-dir", hop.cgroup.cpu_dir, "--v2-dir", hop.cgroup.v2_path,
                "--peer-ip", hop.uplink.a_ip, "--otlp-endpoint", self.otlp_endpoint,
                "--host-netns-fd", str(self._host_netns_fd)]
        if spec.cpus:
            argv[argv.index("unshare"):argv.index("unshare")] = ["taskset", "-c", ",".join(map(str, sorted(spec.cpus)))]
        hop.log_path = os.path.join(self.workdir, f"{hop.name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("OTEL_SDK_DISABLED", None)
        with open(hop.log_path, "wb") as log:
            hop.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir, env=env, pass_fds=(self._host_netns_fd,),
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
        """Stop services (they flush their spans), hogs, and remove namespaces, links and cgroups."""
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
        parent = os.path.join(self.hops[0].cgroup.v2_root, LAB_CGROUP_PARENT) if self.hops else ""
        for d in ([parent] + [os.path.join("/sys/fs/cgroup", c, LAB_CGROUP_PARENT) for c in ("cpu", "memory")]
                  if parent else []):
            try:
                os.rmdir(d)
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

def daemon_for_lab(traces_path: str | os.PathLike[str], **kwargs: Any) -> IsoscopeDaemon:
    """An ``isoscope run`` launcher set up for the lab: file export to ``traces_path``, lab cgroups followed.

    The lab's cgroups are followed from their creation (a service's first spans
    arrive in a batch seconds after they happened, too late to start watching
    then); following every task on the node would only add load to a shared
    machine. ``kwargs`` go to :class:`~isoscope_lab.launcher.IsoscopeDaemon`
    (``config`` is merged over the lab's; the working directory defaults to the
    export's directory, where ``daemon.log`` then lands).
    """
    traces = Path(traces_path).absolute()
    config = deep_merge({"probes": {"watch_cgroups": [f"/{LAB_CGROUP_PARENT}"]}}, kwargs.pop("config", None) or {})
    kwargs.setdefault("workdir", traces.parent)
    return IsoscopeDaemon(file_export=traces, config=config, **kwargs)


def wait_for_spans(path: str, run_id: str, expected: int, timeout_s: float = 20.0,
                   settle_s: float = 3.0) -> list[SpanRecord]:
    """This run's application spans from the file export, once ``expected`` arrived or the count settled."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    spans: list[SpanRecord] = []
    while time.monotonic() < deadline:
        try:
            spans = [s for s in load_spans(path) if s.resource.get(RUN_ATTR) == run_id and not s.is_stall_child]
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
    """How the daemon did on one hop of one scenario.

    Attributes:
        service: the hop.
        fault: the fault kind on it (``none`` when clean).
        spans: application spans of the hop found in the output.
        enriched: of those, spans carrying the daemon's attributes.
        eligible: faulted hop: spans whose injected stall (truth) is ≥ ``threshold`` of their duration
            (all spans when the fault has no truth counter).
        blamed_right: eligible spans whose ``isolation.blame`` is the component the span's own
            truth says dominated (the injected one, unless a neighbour's stall was longer; a
            component within the ns tolerance of the dominant one counts, see
            :func:`blame_agrees_with_truth`).
        within_tol: eligible spans whose component ns are within ±10 % or ±2 ms of the truth.
        false_blame: clean hop: spans blamed although their own truth shows no stall ≥ threshold.
        thread_scope: spans matched at thread precision.
        truth_ms, measured_ms: mean truth / measured ns of the fault's component over eligible spans.
    """

    service: str
    fault: str
    spans: int = 0
    enriched: int = 0
    eligible: int = 0
    blamed_right: int = 0
    within_tol: int = 0
    false_blame: int = 0
    thread_scope: int = 0
    truth_ms: float = 0.0
    measured_ms: float = 0.0
    has_truth: bool = True

    @property
    def blamed_right_pct(self) -> float:
        return 100.0 * self.blamed_right / self.eligible if self.eligible else 0.0

    @property
    def within_tol_pct(self) -> float:
        return 100.0 * self.within_tol / self.eligible if self.eligible else 0.0

    @property
    def false_blame_pct(self) -> float:
        return 100.0 * self.false_blame / self.spans if self.spans else 0.0


def within_tolerance(measured_ns: int, truth_ns: int, rel: float = 0.10, abs_ns: int = 2_000_000) -> bool:
    """``measured`` is within ±``rel`` of ``truth`` or within ±``abs_ns``."""
    diff = abs(measured_ns - truth_ns)
    return diff <= abs_ns or diff <= rel * truth_ns


def _truth_stall(span: SpanRecord) -> int:
    """Largest isolation stall the span's own oracle recorded."""
    return max(int(span.attrs.get(k, 0) or 0) for k in T.TRUTH_COMPONENT)


def truth_dominant(span: SpanRecord) -> str:
    """The component the span's own oracle says held it back longest (e.g. ``cpu_throttle``)."""
    key = max(T.TRUTH_COMPONENT, key=lambda k: int(span.attrs.get(k, 0) or 0))
    return T.TRUTH_COMPONENT[key]


def blame_agrees_with_truth(span: SpanRecord) -> bool:
    """``isolation.blame`` names a component the span's oracle cannot tell apart from its dominant one.

    Components overlap: a thread preempted while in memcg reclaim is counted by
    PSI (memory stall) and by schedstat (run delay) alike. When the oracle's
    value for the blamed component is within the ns tolerance of the dominant
    one, the oracle cannot order them and either verdict is right.
    """
    blame = str(span.attrs.get("isolation.blame", "") or "")
    if not blame:
        return False
    comp = blame.split(".", 1)[-1]
    values = {c: int(span.attrs.get(k, 0) or 0) for k, c in T.TRUTH_COMPONENT.items()}
    dominant = max(values.values())
    if comp not in values:
        return False
    return values[comp] == dominant or within_tolerance(values[comp], dominant)


def score(spans: Iterable[SpanRecord], threshold: float = 0.2) -> list[HopScore]:
    """Score the daemon's verdicts against each span's ``test.truth.*`` oracle, per hop."""
    by_hop: dict[str, HopScore] = {}
    sums: dict[str, list[int]] = {}
    for s in spans:
        if s.is_stall_child or T.FAULT not in s.attrs:
            continue
        fault = str(s.attrs[T.FAULT])
        hs = by_hop.setdefault(s.service, HopScore(s.service, fault))
        hs.spans += 1
        if s.enriched:
            hs.enriched += 1
        if s.attrs.get("isolation.scope") == "thread":
            hs.thread_scope += 1
        dur = s.duration_ns or 1
        blame = str(s.attrs.get("isolation.blame", "") or "")
        if fault == "none":
            if blame and _truth_stall(s) < threshold * dur:
                hs.false_blame += 1
            continue
        truth_key = TRUTH_OF_FAULT.get(fault)
        comp = COMPONENT_OF_FAULT[fault]
        measured = s.component_ns().get(comp, 0)
        if truth_key is None:
            hs.has_truth = False
            hs.eligible += 1
            hs.blamed_right += int(blame.endswith("." + comp))
            acc = sums.setdefault(s.service, [0, 0])
            acc[1] += measured
            continue
        truth_ns = int(s.attrs.get(truth_key, 0) or 0)
        if truth_ns < threshold * dur:
            continue
        hs.eligible += 1
        # On a shared machine a neighbour can hold a span back longer than the injected
        # fault did: the right verdict is then what the span's own oracle says dominated.
        hs.blamed_right += int(blame_agrees_with_truth(s))
        hs.within_tol += int(within_tolerance(measured, truth_ns))
        acc = sums.setdefault(s.service, [0, 0])
        acc[0] += truth_ns
        acc[1] += measured
    for svc, (t_ns, m_ns) in sums.items():
        hs = by_hop[svc]
        if hs.eligible:
            hs.truth_ms = t_ns / hs.eligible / 1e6
            hs.measured_ms = m_ns / hs.eligible / 1e6
    return sorted(by_hop.values(), key=lambda h: h.service)


# ---------------------------------------------------------------------------
# Scenario catalogue
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class Scenario:
    """A named chain with faults, and how long to load it."""

    name: str
    hops: list[HopSpec]
    load_s: float = 15.0
    description: str = ""


def scenarios() -> dict[str, Scenario]:
    """The lab's standard scenarios: each single fault on the middle hop, and two faults on two hops."""
    clean = HopSpec
    return {s.name: s for s in [
        Scenario("cpu_throttle", [clean(), HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=15), clean()],
                 description="CFS quota 20 % of a CPU on hop1"),
        Scenario("cpu_contention", [clean(cpus={1}), HopSpec([Fault("cpu_contention", hogs=2, cpu=0)], work_ms=10),
                                    clean(cpus={1})],
                 description="hop1 shares CPU 0 with two busy neighbours"),
        Scenario("virtio_io", [clean(), HopSpec([Fault("virtio_io", io_reads=160)]), clean()],
                 description="160 random 4 KiB O_DIRECT reads from the virtio disk per request on hop1"),
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
        Scenario("mixed", [clean(), HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=15),
                           HopSpec([Fault("virtio_io", io_reads=160)])],
                 description="CFS quota on hop1 and virtio reads on hop2 of the same chain"),
    ]}


@dataclass(slots=True)
class ScenarioRun:
    scenario: Scenario
    load: LoadResult
    spans: list[SpanRecord]
    scores: list[HopScore]


def run_scenario(scenario: Scenario, daemon: IsoscopeDaemon, *, threshold: float = 0.2,
                 load_s: float | None = None,
                 progress: Callable[[float, LoadResult], None] | None = None) -> ScenarioRun:
    """Build the scenario's chain, load it, stop it, and score the daemon's output for this run."""
    with Chain(scenario.hops, otlp_endpoint=daemon.http_traces_url,
               service_prefix=f"{scenario.name}-hop") as chain:
        load = send_load(chain.entry_url, load_s or scenario.load_s, progress=progress)
        run_id = chain.run_id
    spans = wait_for_spans(str(daemon.traces_path), run_id, expected=load.requests * len(scenario.hops))
    return ScenarioRun(scenario, load, spans, score(spans, threshold))
