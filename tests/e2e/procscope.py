"""Process-scope end-to-end checks: run a :mod:`tests.e2e.poolapp` server, compare its spans with its own truth.

Per request the server reports the serving thread's run delay over the span's
window (the truth). The daemon, told only ``process.pid``, must find the
serving thread and attribute ``l3.cpu_throttle`` + ``l3.runqueue`` equal to it.

Error of one request: ``|attributed - truth| / max(truth, RESOLUTION_NS)``. The
floor is the probe's resolution, not slack: the sched probe reports waits of
watched threads from 100 µs on, the truth counts every wait, so a request whose
whole truth is a few sub-threshold waits has no meaningful relative error.

Expected blame, decided from the truth alone and only where it is clear-cut:
a truth ratio (run delay / window) of at least ``HIGH_RATIO`` must be blamed on
an L-3 CPU component (``l3.cpu_throttle`` when the cgroup was throttled in the
window for at least the run delay, since the thread cannot have waited longer
for contention than it waited in all), a ratio of at most ``LOW_RATIO`` must not
be blamed at all. Requests in between are not judged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import median
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

from tests.e2e.spans import attributes, received_spans

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESOLUTION_NS = 1_000_000
BLAME_THRESHOLD = 0.2
"""The daemon's default ``attribution.blame_threshold``."""
HIGH_RATIO, LOW_RATIO = 0.35, 0.1


class Downstream:
    """An HTTP server in the test process answering ``GET /sleep?ms=N`` after N ms (outside any quota)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                q = parse_qs(urlsplit(self.path).query)
                time.sleep(float(q.get("ms", ["10"])[0]) / 1000)
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Downstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class AppServer:
    """A :mod:`tests.e2e.poolapp` server started in a cgroup."""

    def __init__(self, cg: Any, tmp: Path, kind: str, endpoint: str, extra: Sequence[str] = (),
                 preexec: Any = None) -> None:
        self.tmp = tmp
        ready = tmp / f"{kind}.port"
        stat = os.path.join(cg.v1_paths["cpu"], "cpu.stat") if "cpu" in cg.v1_paths \
            else os.path.join(cg.v2_path, "cpu.stat")
        self.log = tmp / f"{kind}.log"
        with open(self.log, "wb") as log:
            kwargs: dict[str, Any] = {"cwd": REPO_ROOT, "stdout": log, "stderr": log}
            self.proc = cg.spawn([sys.executable, "-m", "tests.e2e.poolapp", "--kind", kind, "--endpoint", endpoint,
                                  "--ready-file", str(ready), "--cgroup-stat", stat, *extra], **kwargs)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(ready.read_text())}"

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=300) as resp:
            return json.loads(resp.read())

    def stop(self) -> int:
        """SIGTERM (the batch processor flushes), then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def run_concurrently(server: AppServer, paths: Sequence[str], clients: int) -> list[dict[str, Any]]:
    """Send ``paths`` from ``clients`` threads at once (each takes the next path); the responses."""
    out: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = list(paths)

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop(0)
            try:
                r = server.get(path)
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                return
            r["path"] = path
            with lock:
                out.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@dataclass
class Row:
    """One request: the truth the server measured and what the daemon attributed."""

    cls: str
    truth_ns: int
    cg_throttled_ns: int
    duration_ns: int
    got_ns: int
    blame: str
    scope: str
    coverage: float

    @property
    def error(self) -> float:
        return abs(self.got_ns - self.truth_ns) / max(self.truth_ns, RESOLUTION_NS)

    def expected_blame(self) -> set[str] | None:
        """The right values of ``isolation.blame`` ("" for none), or None when not clear-cut."""
        ratio = self.truth_ns / self.duration_ns
        if ratio >= HIGH_RATIO:
            return {"l3.cpu_throttle"} if self.cg_throttled_ns >= self.truth_ns else {"l3.cpu_throttle", "l3.runqueue"}
        if ratio <= LOW_RATIO:
            return {""}
        return None


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def by_class(self) -> dict[str, list[Row]]:
        out: dict[str, list[Row]] = {}
        for r in self.rows:
            out.setdefault(r.cls, []).append(r)
        return out

    def median_errors(self) -> dict[str, float]:
        return {c: median(r.error for r in rows) for c, rows in self.by_class().items()}

    def blame_judged(self) -> list[tuple[Row, bool]]:
        return [(r, r.blame in want) for r in self.rows if (want := r.expected_blame()) is not None]

    def table(self) -> str:
        return "\n".join(f"{r.cls:5} truth={r.truth_ns / 1e6:8.2f}ms got={r.got_ns / 1e6:8.2f}ms "
                         f"dur={r.duration_ns / 1e6:8.2f}ms cg_thr={r.cg_throttled_ns / 1e6:8.2f}ms "
                         f"err={r.error:6.2f} blame={r.blame or '-':16} scope={r.scope} cov={r.coverage}"
                         for r in self.rows)


def collect(backend: Any, responses: Sequence[dict[str, Any]], timeout_s: float = 60) -> Result:
    """Wait for the responses' spans at the backend and pair each with its truth."""
    want = {r["span_id"]: r for r in responses}
    deadline = time.monotonic() + timeout_s
    got: dict[str, tuple[dict[str, Any], Any]] = {}
    while time.monotonic() < deadline:
        got = received_spans(backend.requests)
        if set(want) <= set(got):
            break
        time.sleep(0.2)
    res = Result()
    for sid, r in want.items():
        if sid not in got:
            res.missing.append(sid)
            continue
        attrs = attributes(got[sid][1].attributes)
        res.rows.append(Row(
            cls=attrs.get("test.class", "?"), truth_ns=int(attrs["test.truth.run_delay_ns"]),
            cg_throttled_ns=int(attrs["test.truth.cg_throttled_ns"]), duration_ns=r["end"] - r["start"],
            got_ns=int(attrs.get("isolation.l3.cpu_throttle.ns", 0)) + int(attrs.get("isolation.l3.runqueue.ns", 0)),
            blame=str(attrs.get("isolation.blame", "")), scope=str(attrs.get("isolation.scope", "")),
            coverage=float(attrs.get("isolation.coverage", -1.0))))
    return res


def wait_watched(server: AppServer, backend: Any, path: str, count: int = 3) -> None:
    """Warm up: the first spans of a process make the daemon watch it (on-CPU segments, fine thresholds)."""
    responses = [server.get(path) for _ in range(count)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if {r["span_id"] for r in responses} <= set(received_spans(backend.requests)):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("warm-up spans never reached the backend")
    time.sleep(0.5)  # the sched probe re-reads a thread's watch state every 10 ms


def iter_rows(result: Result) -> Iterator[str]:
    yield from result.table().splitlines()
