"""Memory-limit reclaim on spans, end to end: every short episode reaches the span it happened in.

A real service (``http.server`` + the OpenTelemetry SDK, OTLP/HTTP to ``isoscope
run`` with its default configuration) runs in its own cgroup (v2 for the id,
v1 ``memory`` for a tight limit) pinned to one CPU. Each request reads its
input, a part of a file not in memory, and maps it, which fills the cgroup up
to its limit with mapped page cache; then, in the request's span, it builds a response
buffer: every page of it is charged to the full cgroup, so the serving thread
reclaims the input's pages in many short memcg episodes (a few to tens of
microseconds each). (The input is read before the span: its page-ins from
disk would put ``l2.virtio_io`` next to the reclaim in the span and make the
blame a coin toss between two real stalls.) The span is run as a SCHED_FIFO
task, so on this shared machine its stalls are its own reclaim rather than
run-queue waits behind other work. The span carries
``isolation.l3.memory_reclaim.ns``.

Whether the episodes fall below the probe's per-record threshold for watched
threads (10 us), i.e. reach the span only through the kernel's per-thread
sums, depends on the machine and the day; ``tests/kernel/test_vmscan.py``
forces every episode through the sums. This test holds the whole path to the
kernel's own accounting, whatever the mix.

Oracle: the cgroup's own memory pressure (``memory.pressure``, ``some
total=`` in microseconds, cgroup v2), read by the service around the
buffer's allocation inside the span; with one thread doing the work, "some" is that thread's
memory-stall time. (On this hybrid host ``memory.pressure`` exists in every v2
cgroup although the memory controller is v1: pressure accounting follows the
task's v2 cgroup.) The kernel counts as memory stall exactly the limit reclaim
the probe measures, plus waits for refaulting working-set pages (none here: the
span reads nothing), so pressure is the truth for the span. Checked:

* per span, reclaim within 20 % of the pressure over the span (median over spans);
* summed over the spans, within 10 % of the kernel's totals over them (the pressure
  totals: the probe's own per-cgroup totals are cumulative and cannot be cut at span edges);
* ``isolation.blame`` is ``l3.memory_reclaim`` on >= 90 % of the spans where
  reclaim is >= 20 % of the span.

The service sets ``thread.id`` on its spans (``ThreadIdSpanProcessor``): this
test is about reclaim accuracy, not about which thread of a process the daemon
picks for a span without one.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from isoscope_lab.launcher import IsoscopeDaemon
from tests.cgroup_helpers import Cgroup, make_cgroup
from tests.e2e.spans import attributes, received_spans
from tests.files import cold_file, wait_file
from tests.otlp_backend import OtlpBackend

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

FILE_MB = 96
"""The mapped file; each request reads LOAD_MB of it, the part least recently read."""
ROOM_MB = 32
"""Page-cache room above the service's own anonymous memory (its limit): the input fills it."""
LOAD_MB = 24
"""Fits in the room: the input is still in memory when it is mapped."""
BUILD_MB = 20
"""The response buffer: less than ROOM_MB (page cache is all it can reclaim: no swap), most of it."""
WARMUP, REQUESTS = 2, 8
PER_SPAN_TOL, SUM_TOL = 0.20, 0.10
BLAME_SHARE, BLAME_MIN_FRACTION = 0.20, 0.90
RECLAIM_KEY = "isolation.l3.memory_reclaim.ns"

SERVICE = r'''
import http.server, json, mmap, os, sys, threading, urllib.parse
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from isoscope.instrumentation import ThreadIdSpanProcessor

path, cpu, endpoint, pressure, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.sched_setaffinity(0, {cpu})
provider = TracerProvider(resource=Resource.create({"service.name": "e2e-reclaim", "process.pid": os.getpid()}))
provider.add_span_processor(ThreadIdSpanProcessor())
# Synchronous export after each span ends: no exporter thread reclaims inside another span's window.
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
tracer = provider.get_tracer("e2e-reclaim")
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)
state = {"next": 0}


def some_total_us():
    with open(pressure) as fh:
        for line in fh:
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1])
    raise RuntimeError("no 'some' line in " + pressure)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        load, build = int(q["load_mb"][0]) << 20, int(q["build_mb"][0]) << 20
        # Read the request's input (before the span: page-ins from disk would share the span
        # with the reclaim it causes), then map it: mapped page cache is what the span reclaims.
        # No readahead, neither by read(2) nor by page faults (POSIX_FADV_RANDOM, MADV_RANDOM):
        # no disk read started here is still running when the span begins.
        start = state["next"]
        off = start
        while off < start + load:
            off += len(os.pread(fd, min(1 << 20, start + load - off), off % size)) or size
        touched = 0
        for off in range(start, start + load, 4096):
            touched += m[off % size]
        state["next"] = (start + load) % size
        # The traced work: a response buffer, charged to the cgroup that is full of the
        # input's page cache, so every page of it is paid for in reclaim. Run as a real-time
        # task meanwhile: on a busy machine the span's stalls are then its own reclaim, not
        # run-queue waits behind other work on the CPU.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        span = tracer.start_span("build", kind=trace.SpanKind.SERVER)
        try:
            before = some_total_us()
            # Anonymous pages of its own mapping (a malloc'd buffer would stay in the heap
            # after the first request and never be charged again), each written: charged now.
            buf = mmap.mmap(-1, build, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for off in range(0, build, 4096):
                buf[off] = 114
            after = some_total_us()
            span.set_attribute("test.truth.memory_some_us", after - before)
        finally:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            span.end()          # exports (SimpleSpanProcessor), no longer real-time
        buf.close()
        body = json.dumps({"span_id": format(span.get_span_context().span_id, "016x"),
                           "tid": threading.get_native_id(), "psi_us": after - before}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(ready + ".tmp", "w") as fh:
    fh.write(str(server.server_address[1]))
os.rename(ready + ".tmp", ready)
server.serve_forever()
'''


@pytest.fixture(scope="module")
def mapped_file() -> Iterator[str]:
    """A file of FILE_MB on disk, none of it in the page cache."""
    with cold_file(f"/var/tmp/isoscope-e2e-reclaim-{os.getpid()}.dat", FILE_MB) as path:
        yield path


def _anon_bytes(cg: Cgroup) -> int:
    """Anonymous memory charged to the cgroup (v1 ``memory.stat`` ``rss``, v2 ``anon``)."""
    if "memory" in cg.v1_paths:
        stat, key = Path(cg.v1_paths["memory"], "memory.stat"), "rss"
    else:
        stat, key = Path(cg.v2_path, "memory.stat"), "anon"
    fields = dict(line.split() for line in stat.read_text().splitlines() if line.strip())
    return int(fields[key])


def test_short_reclaim_episodes_reach_spans(daemon: IsoscopeDaemon, backend: OtlpBackend, mapped_file: str,
                                            tmp_path: Path) -> None:
    cg = make_cgroup(f"isoscope-e2e-reclaim-{os.getpid()}-{uuid.uuid4().hex[:8]}", v1_controllers=("memory",))
    try:
        pressure = Path(cg.v2_path, "memory.pressure")
        if not pressure.exists():
            pytest.fail(f"{pressure} is missing: the kernel keeps no per-cgroup pressure (PSI off?)")
        cpu = sorted(os.sched_getaffinity(0))[-1]
        ready = tmp_path / "port"
        log = tmp_path / "service.log"
        with open(log, "wb") as out:
            proc = cg.spawn([sys.executable, "-c", SERVICE, mapped_file, str(cpu), daemon.http_traces_url,
                             str(pressure), str(ready)], cwd=REPO_ROOT, stdout=out, stderr=out)
        try:
            url = f"http://127.0.0.1:{int(wait_file(ready, proc, 60))}/scan"
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}: {log.read_text(errors='replace')[-3000:]}") from exc

        def call() -> dict[str, Any]:
            r = requests.get(url, params={"load_mb": LOAD_MB, "build_mb": BUILD_MB}, timeout=120)
            r.raise_for_status()
            return r.json()

        # Warm-up: the first spans of a process make the daemon watch it (finer kernel thresholds).
        for _ in range(WARMUP):
            call()
        assert backend.wait_for_spans(WARMUP, timeout_s=30), "warm-up spans never reached the backend"
        # Tight, but above what the service itself holds once it has served (its heap and the
        # exporter's): page cache is reclaimed, its anonymous memory never (there is no swap).
        cg.set_memory_limit(_anon_bytes(cg) + (ROOM_MB << 20))
        measured = [call() for _ in range(REQUESTS)]
        want = {m["span_id"] for m in measured}
        deadline = time.monotonic() + 30
        got: dict[str, tuple[dict[str, Any], Any]] = {}
        while time.monotonic() < deadline:
            got = received_spans(backend.requests)
            if want <= set(got):
                break
            time.sleep(0.2)
        missing = want - set(got)
        assert not missing, f"{len(missing)} spans never arrived; daemon log:\n{daemon.log_text()[-3000:]}"
    finally:
        cg.remove()

    rows = []
    for m in measured:
        _, span = got[m["span_id"]]
        attrs = attributes(span.attributes)
        duration = span.end_time_unix_nano - span.start_time_unix_nano
        truth = attrs["test.truth.memory_some_us"] * 1000
        rows.append({"span": m["span_id"], "truth_ns": truth, "reclaim_ns": attrs.get(RECLAIM_KEY, 0),
                     "duration_ns": duration, "blame": attrs.get("isolation.blame", ""),
                     "thread": attrs.get("thread.id"), "scope": attrs.get("isolation.scope"),
                     "isolation": {k: v for k, v in attrs.items()
                                   if k.startswith("isolation.") and k.endswith(".ns")}})
    logger.info("(span, pressure ns, reclaim ns, span ns, blame, isolation.*.ns): %s",
                [(r["span"], r["truth_ns"], r["reclaim_ns"], r["duration_ns"], r["blame"], r["isolation"])
                 for r in rows])
    # The scenario happened: the kernel saw the service stall on memory in every request.
    assert all(r["truth_ns"] > 0 for r in rows), rows
    assert all(r["thread"] == measured[0]["tid"] and r["scope"] == "thread" for r in rows), rows

    errors = [abs(r["reclaim_ns"] - r["truth_ns"]) / r["truth_ns"] for r in rows]
    assert statistics.median(errors) <= PER_SPAN_TOL, f"per-span error {errors}: {rows}"

    total_truth = sum(r["truth_ns"] for r in rows)
    total_spans = sum(r["reclaim_ns"] for r in rows)
    assert abs(total_spans - total_truth) <= SUM_TOL * total_truth, (total_spans, total_truth, rows)

    heavy = [r for r in rows if r["reclaim_ns"] >= BLAME_SHARE * r["duration_ns"]]
    assert heavy, f"no span spent {BLAME_SHARE:.0%} of its time in reclaim: the scenario did not happen: {rows}"
    blamed = [r for r in heavy if r["blame"] == "l3.memory_reclaim"]
    assert len(blamed) >= BLAME_MIN_FRACTION * len(heavy), rows
