"""Start the real ``isoscope run`` daemon as a subprocess on free loopback ports.

Reliability tests drive the assembled daemon from the outside: real sockets,
a real OTLP backend, real signals. :class:`DaemonProcess` writes a YAML config,
starts ``python -m isoscope.cli run``, waits for ``/readyz`` and offers the
few things the tests read back (``/metrics`` samples, ``/debug/status``, RSS,
CPU time). Stopping always kills the whole process group, even after a failed
test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


class DaemonError(RuntimeError):
    """The daemon did not start or answer; the message carries its log tail."""


class DaemonProcess:
    """One ``isoscope run`` subprocess.

    Args:
        workdir: where the config, logs and file export go.
        forward: ``--forward`` URLs (OTLP backends); empty means file export only.
        probes: load the kernel probes (False passes ``--no-probes``).
        config: extra configuration merged over the defaults written here.
        env: extra environment variables (``ISOSCOPE_*`` overrides …).
        wrapper: argv prefix, e.g. ``["capsh", "--drop=cap_bpf", "--"]``; the
            daemon command is then passed to it as one ``-c`` shell string.
        preexec: run in the child before exec (e.g. join a cgroup).
    """

    def __init__(self, workdir: Path, *, forward: Sequence[str] = (), probes: bool = False,
                 config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 wrapper: Sequence[str] | None = None, preexec: Any = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.forward = list(forward)
        self.probes = probes
        self.extra_config = dict(config or {})
        self.extra_env = dict(env or {})
        self.wrapper = list(wrapper) if wrapper else None
        self.preexec = preexec
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.config_path = self.workdir / "isoscope.yaml"
        self.log_path = self.workdir / "daemon.log"
        self.export_path = self.workdir / "traces.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.starts = 0

    # -- addresses ----------------------------------------------------------------

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- lifecycle ------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "receivers": {"otlp_grpc": {"listen": self.grpc_endpoint},
                          "otlp_http": {"listen": f"127.0.0.1:{self.http_port}"}},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "exporters": {"forward": self.forward,
                          "file": {"path": str(self.export_path), "enabled": not self.forward},
                          # Short backoff keeps outage tests quick; production defaults are longer.
                          "queue": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}},
            "log_level": "info",
        }
        return _deep_merge(doc, self.extra_config)

    def command(self) -> list[str]:
        argv = [sys.executable, "-m", "isoscope.cli", "run", "--config", str(self.config_path)]
        if not self.probes:
            argv.append("--no-probes")
        if self.wrapper:
            # capsh runs its argument through /bin/sh -c.
            return self.wrapper + ["-c", "exec " + " ".join(_shell_quote(a) for a in argv)]
        return argv

    def start(self, *, wait_ready: bool = True, timeout_s: float = 90.0) -> "DaemonProcess":
        """Start the daemon (again, on the same ports) and wait until it answers ``/readyz`` with 200."""
        if self.proc is not None and self.proc.poll() is None:
            raise DaemonError("daemon already running")
        self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ISOSCOPE_")}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"--- start #{self.starts + 1}: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.workdir), env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=self.preexec)
        self.starts += 1
        if wait_ready:
            self.wait_ready(timeout_s)
        else:
            self.wait_listening(timeout_s)
        return self

    def _get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=timeout_s) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        """Until ``/healthz`` answers (the metrics server is up)."""
        self._wait(lambda: self._get("/healthz", 1.0)[0] == 200, timeout_s, "answer /healthz")

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until ``/readyz`` answers 200."""
        self._wait(lambda: self._get("/readyz", 1.0)[0] == 200, timeout_s, "become ready")

    def _wait(self, check: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise DaemonError(f"daemon exited with {self.proc and self.proc.returncode} before it could "
                                  f"{what}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise DaemonError(f"daemon did not {what} within {timeout_s:g} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL of the whole group; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("daemon did not stop within %.0f s; killing it", timeout_s)
            except ProcessLookupError:
                pass
        code = self._reap()
        return code

    def kill9(self) -> None:
        """Crash: SIGKILL with no chance to drain."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> int | None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            logger.error("daemon pid %d did not die after SIGKILL", self.proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading back -----------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def readyz(self) -> tuple[int, str]:
        code, body = self._get("/readyz")
        return code, body.decode(errors="replace")

    def status(self) -> dict[str, Any]:
        code, body = self._get("/debug/status")
        if code != 200:
            raise DaemonError(f"/debug/status answered {code}")
        return json.loads(body)

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        code, body = self._get("/metrics", timeout_s)
        if code != 200:
            raise DaemonError(f"/metrics answered {code}")
        return body.decode()

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                yield s.name, dict(s.labels), float(s.value)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (full sample name, e.g. ``isoscope_spans_dropped_total``)
        whose labels include ``labels``."""
        total = 0.0
        for n, lab, value in self.samples():
            if n == name and all(lab.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def metric_by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, lab, value in self.samples():
            if n == name:
                out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + value
        return out

    def process(self) -> psutil.Process:
        """The daemon's own Python process (under a wrapper, the child of it)."""
        p = psutil.Process(self.pid)
        if self.wrapper:
            for child in p.children(recursive=True):
                if "isoscope.cli" in " ".join(child.cmdline()):
                    return child
        return p

    def rss_bytes(self) -> int:
        return int(self.process().memory_info().rss)

    def cpu_seconds(self) -> float:
        t = self.process().cpu_times()
        return float(t.user + t.system)


def _shell_quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


# ---------------------------------------------------------------------------
# Clients: real gRPC and HTTP, raw bytes in, status out
# ---------------------------------------------------------------------------

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class GrpcClient:
    """A raw-bytes OTLP/gRPC client: sends any bytes, returns ``(code, details, trailers)``."""

    def __init__(self, endpoint: str, *, max_send_bytes: int = 64 * 1024 * 1024) -> None:
        import grpc

        self._grpc = grpc
        self.channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.max_send_message_length", max_send_bytes)])
        self._call = self.channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                              response_deserializer=None)

    def export(self, payload: bytes, timeout_s: float = 10.0) -> tuple[Any, str, dict[str, Any]]:
        try:
            _resp, call = self._call.with_call(payload, timeout=timeout_s)
            return call.code(), call.details() or "", dict(call.trailing_metadata() or ())
        except self._grpc.RpcError as exc:
            return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())

    def close(self) -> None:
        self.channel.close()


def http_post(url: str, body: bytes, *, content_type: str = "application/x-protobuf",
              headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """POST one request on a fresh connection; returns ``(status, headers, body)``."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_until(check: Any, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``check()`` until it is true or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return True
        except Exception:  # noqa: BLE001 - a check that cannot be read yet is "not yet"
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


# ---------------------------------------------------------------------------
# pytest fixtures (imported by the test modules)
# ---------------------------------------------------------------------------

import pytest  # noqa: E402 - fixtures below; the launcher itself is usable without pytest


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """``daemon_factory(name, **DaemonProcess kwargs)`` → a started daemon, stopped at teardown."""
    made: list[DaemonProcess] = []

    def factory(name: str = "d", *, start: bool = True, wait_ready: bool = True,
                **kwargs: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / name, **kwargs)
        made.append(d)
        if start:
            d.start(wait_ready=wait_ready)
        return d

    yield factory
    for d in made:
        try:
            d.stop(10.0)
        except Exception:  # noqa: BLE001 - keep stopping the others
            logger.exception("stopping daemon failed")


@pytest.fixture
def backend() -> Iterator[Any]:
    """A real recording OTLP backend on free loopback ports."""
    from tests.otlp_backend import OtlpBackend

    b = OtlpBackend()
    try:
        yield b
    finally:
        b.stop(graceful=False)
