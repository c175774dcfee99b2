"""Run the real ``isoscope run`` daemon as a subprocess, for end-to-end tests and benchmarks.

Usage::

    from tests.e2e.daemon import IsoscopeDaemon

    with OtlpBackend() as backend, IsoscopeDaemon(forward=[backend.grpc_url]) as d:
        d.grpc_endpoint          # "127.0.0.1:PORT"  (OTLP/gRPC receiver, for OTLPSpanExporter(endpoint=...))
        d.http_url               # "http://127.0.0.1:PORT"  (OTLP/HTTP receiver base URL)
        d.http_traces_url        # "http://127.0.0.1:PORT/v1/traces"
        d.metrics_url            # "http://127.0.0.1:PORT/metrics"
        d.metric("isoscope_spans_received_total", protocol="grpc")   # one sample, 0.0 if absent
        d.status()               # the /debug/status document (probes, queues, timeline)
        d.stderr()               # everything the daemon logged so far
        d.kill()                 # SIGKILL (a crash) ...
        d.start()                # ... and up again on the SAME ports
    # leaving the block stops it with SIGTERM (SIGKILL after a timeout)

Options (constructor keywords):
    ``forward``: ``--forward`` URLs. ``file_export``: ``--file-export`` path.
    ``config``: a dict written as the YAML config file (deep-merged over the
    defaults this helper sets: ``log_level: info`` and a temp
    ``exporters.file.path``). ``no_probes``: pass ``--no-probes``.
    ``env``: extra environment (e.g. ``ISOSCOPE_*`` overrides).
    ``ready_timeout_s``: how long :meth:`start` waits for ``/readyz`` 200.
    ``start``: start in the constructor (default True).

Ports: the first start binds port 0 on 127.0.0.1 for the three listeners and
learns the real ports from the daemon's own start-up log lines, so parallel
test runs never collide; later starts (after :meth:`stop` / :meth:`kill`)
reuse those ports so clients reconnect to the same endpoints.

The pytest fixture :func:`isoscope_daemon` returns a factory with the same
keywords and stops every daemon it started when the test ends, pass or fail
(import it into a test module or conftest: ``from tests.e2e.daemon import
isoscope_daemon  # noqa: F401``). Helpers for what a backend received:
:func:`received_spans`, :func:`attributes`, :func:`any_value`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.otlp_backend import OtlpBackend

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
_VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable
"""The interpreter the daemon runs under (the project's virtualenv)."""

# "isoscope.daemon: otlp_grpc listening on 127.0.0.1:33995" — one line per listener.
_LISTEN_RE = re.compile(r"collector\.daemon: (metrics|otlp_grpc|otlp_http) listening on (\S+):(\d+)\s*$", re.M)


class DaemonError(RuntimeError):
    """The daemon did not come up (or died); the message carries the tail of its stderr."""


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a Prometheus text exposition: (name, sorted label pairs) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


class IsoscopeDaemon:
    """One ``isoscope run`` subprocess on loopback (see the module docstring)."""

    def __init__(self, *, forward: list[str] | tuple[str, ...] = (), file_export: str | None = None,
                 config: dict[str, Any] | None = None, no_probes: bool = False,
                 env: dict[str, str] | None = None, ready_timeout_s: float = 120.0,
                 start: bool = True) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="isoscope-e2e-"))
        self.forward = list(forward)
        self.file_export = file_export
        self.no_probes = no_probes
        self.ready_timeout_s = ready_timeout_s
        self.extra_env = dict(env or {})
        base = {"log_level": "info",
                "exporters": {"file": {"path": str(self.workdir / "traces.jsonl")}}}
        self.config = _merge(base, config or {})
        self.config_path = self.workdir / "isoscope.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.stderr_path = self.workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.starts = 0
        self._stderr_offset = 0
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- addresses ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("the daemon is not running")
        return self.proc.pid

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['otlp_grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['otlp_http']}"

    @property
    def http_traces_url(self) -> str:
        return self.http_url + "/v1/traces"

    @property
    def metrics_base(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}"

    @property
    def metrics_url(self) -> str:
        return self.metrics_base + "/metrics"

    # -- lifecycle ---------------------------------------------------------------

    def _argv(self) -> list[str]:
        def listen(name: str) -> str:
            return f"127.0.0.1:{self.ports.get(name, 0)}"

        argv = [PYTHON, "-m", "isoscope.cli", "run", "--config", str(self.config_path),
                "--otlp-grpc-listen", listen("otlp_grpc"), "--otlp-http-listen", listen("otlp_http"),
                "--metrics-listen", listen("metrics")]
        for url in self.forward:
            argv += ["--forward", url]
        if self.file_export:
            argv += ["--file-export", self.file_export]
        if self.no_probes:
            argv.append("--no-probes")
        return argv

    def start(self) -> "IsoscopeDaemon":
        """Start the daemon and wait until ``/readyz`` answers 200."""
        if self.running:
            raise DaemonError("already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISOSCOPE_")}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        # Each start appends to the same log; only this start's lines are searched for ports.
        with open(self.stderr_path, "ab") as log:
            self._stderr_offset = log.tell()
            self.proc = subprocess.Popen(self._argv(), cwd=str(REPO_ROOT), env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        self.starts += 1
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError(f"isoscope exited with {self.proc.returncode} before it was ready:\n"
                                  + self._tail())
            text = self.stderr(since_start=True)
            for name, _host, port in _LISTEN_RE.findall(text):
                self.ports[name] = int(port)
            if "metrics" in self.ports:
                try:
                    with urllib.request.urlopen(self.metrics_base + "/readyz", timeout=2) as resp:
                        if resp.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.1)
        raise DaemonError(f"isoscope not ready after {self.ready_timeout_s:.0f}s:\n" + self._tail())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Send ``sig`` and wait for exit (SIGKILL after ``timeout_s``); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("isoscope pid %d ignored signal %d for %.0fs; killing it", self.proc.pid, sig, timeout_s)
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash, nothing is drained."""
        return self.stop(signal.SIGKILL, timeout_s=10.0)

    def close(self) -> None:
        """Stop (if running) and remove the working directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "IsoscopeDaemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation -------------------------------------------------------------

    def stderr(self, *, since_start: bool = False) -> str:
        """What the daemon logged (all starts, or only the latest one)."""
        try:
            with open(self.stderr_path, "rb") as f:
                if since_start:
                    f.seek(self._stderr_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _tail(self, lines: int = 60) -> str:
        return "\n".join(self.stderr().splitlines()[-lines:])

    def _get(self, path: str, timeout_s: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.metrics_base + path, timeout=timeout_s) as resp:
            return resp.read()

    def metrics_text(self) -> str:
        return self._get("/metrics").decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted label pairs) → value."""
        return parse_prometheus(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0.0 when none)."""
        total = 0.0
        for (n, pairs), v in self.metrics().items():
            if n == name and all(dict(pairs).get(k) == val for k, val in labels.items()):
                total += v
        return total

    def status(self) -> dict[str, Any]:
        """The ``/debug/status`` document."""
        return json.loads(self._get("/debug/status"))

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_base + "/readyz", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture
def isoscope_daemon() -> Iterator[Any]:
    """Factory fixture: ``isoscope_daemon(**IsoscopeDaemon kwargs)``; all are stopped at teardown."""
    made: list[IsoscopeDaemon] = []

    def factory(**kwargs: Any) -> IsoscopeDaemon:
        d = IsoscopeDaemon(**kwargs)
        made.append(d)
        return d

    try:
        yield factory
    finally:
        for d in reversed(made):
            d.close()


@pytest.fixture(scope="module")
def backend() -> Iterator[OtlpBackend]:
    """A recording OTLP backend (gRPC and HTTP) shared by a test module."""
    with OtlpBackend() as b:
        yield b


@pytest.fixture(scope="module")
def daemon(backend: OtlpBackend) -> Iterator[IsoscopeDaemon]:
    """The daemon with its kernel probes, forwarding over gRPC to the module's recording backend."""
    with IsoscopeDaemon(forward=[backend.grpc_url]) as d:
        yield d


# -- reading what a backend received ---------------------------------------------------

def any_value(v: Any) -> Any:
    """A protobuf ``AnyValue`` as a plain Python value (arrays as lists)."""
    which = v.WhichOneof("value")
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def attributes(kvs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` → dict."""
    return {kv.key: any_value(kv.value) for kv in kvs}


def received_spans(requests: Any) -> dict[str, tuple[dict[str, Any], Any]]:
    """Every span in a list of ``ExportTraceServiceRequest``: hex span id → (resource attributes, span).

    A span id seen twice keeps its last copy (check duplicates with ``OtlpBackend.span_id_counts``).
    """
    out: dict[str, tuple[dict[str, Any], Any]] = {}
    for req in list(requests):
        for rs in req.resource_spans:
            res = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    out[span.span_id.hex()] = (res, span)
    return out
