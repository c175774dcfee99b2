"""An asyncio server without ``thread.id``, serving overlapping requests under CPU contention.

One event loop serves every request; each request burns CPU, awaits (the loop
serves other requests meanwhile), and burns again, so requests overlap. The
server shares CPU 0 with a busy-looping process, so the loop waits for the CPU
(run-queue contention, ``l3.runqueue``). Spans carry ``process.pid`` only; the
process also runs the exporter's threads. Every wait of the loop delays every
request it is serving, so each span must get the loop thread's waits inside
its own window: median error ≤ 15 %, blame right on ≥ 90 % of the clear-cut
requests (:mod:`tests.e2e.procscope`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from statistics import median
from typing import Iterator

import pytest

from isoscope_lab.launcher import IsoscopeDaemon
from tests.cgroup_helpers import make_cgroup
from tests.e2e.procscope import AppServer, Result, collect, run_concurrently, wait_watched
from tests.e2e.test_otlp_path import sched_attached
from tests.otlp_backend import OtlpBackend

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

REQUESTS = 24
CLIENTS = 4
CPU_MS, WAIT_MS = 8, 30
MAX_MEDIAN_ERROR = 0.15
MIN_BLAME_RIGHT = 0.9
CPU = 0

HOG = "import os, time\nend = time.monotonic() + float(os.environ['HOG_S'])\nwhile time.monotonic() < end:\n    pass\n"


def _pin(cpu: int):
    def preexec() -> None:
        os.sched_setaffinity(0, {cpu})
    return preexec


@pytest.fixture(scope="module")
def daemon(backend: OtlpBackend) -> Iterator[IsoscopeDaemon]:
    with IsoscopeDaemon(forward=[backend.grpc_url], config={"attribution": {"hold_max_ms": 10000}}) as d:
        yield d


@pytest.fixture(scope="module")
def result(daemon: IsoscopeDaemon, backend: OtlpBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Result]:
    attached, why = sched_attached()
    if not attached:
        pytest.fail(f"sched probe not attached ({why}): nothing to attribute")
    tmp: Path = tmp_path_factory.mktemp("asyncio")
    cg = make_cgroup(f"isoscope-e2e-loop-{tmp.name}/loop", v1_controllers=("cpu",))
    hog = None
    try:
        server = AppServer(cg, tmp, "asyncio", daemon.http_traces_url)
        try:
            os.sched_setaffinity(server.proc.pid, {CPU})
            for task in os.listdir(f"/proc/{server.proc.pid}/task"):
                os.sched_setaffinity(int(task), {CPU})
            wait_watched(server, backend, "/mix?cpu=1&wait=1")
            # The contender: a busy loop on the same CPU, bounded in time by itself.
            hog = subprocess.Popen([sys.executable, "-c", HOG], env={**os.environ, "HOG_S": "120"},
                                   preexec_fn=_pin(CPU))  # noqa: PLW1509
            paths = [f"/mix?cpu={CPU_MS}&wait={WAIT_MS}"] * REQUESTS
            responses = run_concurrently(server, paths, clients=CLIENTS)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait(timeout=10)
            assert server.stop() == 0, server.log.read_text()[-3000:]
        res = collect(backend, responses)
        logger.info("asyncio loop, (class, truth, attributed):\n%s", res.table())
        res.tids = {r["tid"] for r in responses}  # type: ignore[attr-defined]
        res.windows = [(r["start"], r["end"]) for r in responses]  # type: ignore[attr-defined]
        yield res
    finally:
        cg.remove()


def test_requests_overlapped_on_one_loop_thread(result: Result) -> None:
    assert not result.missing, f"{len(result.missing)} spans never reached the backend"
    assert len(result.rows) == REQUESTS and {r.scope for r in result.rows} == {"process"}
    assert len(result.tids) == 1  # type: ignore[attr-defined]
    windows = sorted(result.windows)  # type: ignore[attr-defined]
    assert any(b[0] < a[1] for a, b in zip(windows, windows[1:])), "no two requests overlapped"
    # The contention happened: the loop waited for the CPU for a real part of the requests.
    assert median(r.truth_ns / r.duration_ns for r in result.rows) >= 0.2, result.table()


def test_each_request_gets_the_loops_waits_in_its_window(result: Result) -> None:
    errors = result.median_errors()
    assert all(e <= MAX_MEDIAN_ERROR for e in errors.values()), f"median errors {errors}:\n{result.table()}"


def test_blame_is_right(result: Result) -> None:
    judged = result.blame_judged()
    assert len(judged) >= REQUESTS // 2, result.table()
    right = sum(ok for _, ok in judged) / len(judged)
    assert right >= MIN_BLAME_RIGHT, f"blame right on {right:.0%} of {len(judged)}:\n{result.table()}"
    assert all(r.coverage >= 0.9 for r in result.rows), result.table()
