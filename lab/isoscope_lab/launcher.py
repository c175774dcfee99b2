"""Run the real ``isoscope run`` daemon as a subprocess: the one launcher of the lab, the tests and the benchmarks.

Usage::

    from isoscope_lab.launcher import IsoscopeDaemon

    with IsoscopeDaemon(forward=["grpc://127.0.0.1:4317"]) as d:   # started, /readyz answered 200
        d.grpc_endpoint          # "127.0.0.1:PORT"   (OTLP/gRPC receiver)
        d.http_traces_url        # "http://127.0.0.1:PORT/v1/traces"
        d.metrics_url            # "http://127.0.0.1:PORT/metrics"
        d.metric("isoscope_spans_received_total", protocol="grpc")
        d.status()               # the /debug/status document
        d.log_tail()             # the end of what the daemon logged
        d.kill9()                # a crash: nothing is drained ...
        d.start()                # ... and up again on the SAME ports and working directory
    # leaving the block: SIGTERM (the daemon drains), SIGKILL of its process group after a timeout

What it writes into its working directory (a fresh temporary one, removed by
:meth:`IsoscopeDaemon.close`, unless ``workdir`` is given): ``isoscope.yaml``
(the defaults below deep-merged with ``config``, rewritten at every start),
``daemon.log`` (stdout and stderr of every start, appended) and, unless told
otherwise, the file export ``traces.jsonl``.

Listeners default to port 0 on 127.0.0.1, so concurrent runs never collide:
the launcher finds the metrics listener among the daemon process's listening
sockets (the one serving ``/debug/status``) and the receivers' ports in that
document; later starts reuse those ports so clients reconnect to the same
endpoints.

The daemon runs in its own session (process group): stopping always kills
whatever is left of the group, also under a ``wrapper`` such as ``capsh``.
A started daemon is registered with the lab's cleanup registry, so it is
stopped even when the caller dies of an exception or exits without stopping it.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from isoscope_lab.net import free_port, port_in_use, split_hostport
from isoscope_lab.topology import JANITOR

logger = logging.getLogger(__name__)

__all__ = ["DaemonError", "IsoscopeDaemon", "LISTENERS", "daemon_available", "deep_merge", "free_port",
           "port_in_use", "parse_prometheus"]

LISTENERS = ("otlp_grpc", "otlp_http", "metrics")
"""The daemon's three listeners, named as in ``/debug/status`` → ``listen``."""

_FLAGS = {"otlp_grpc": "--otlp-grpc-listen", "otlp_http": "--otlp-http-listen", "metrics": "--metrics-listen"}
_POLL_S = 0.1


class DaemonError(RuntimeError):
    """The daemon did not start, died, or did not answer; the message carries its log tail."""


def daemon_available() -> bool:
    """True when ``python -m isoscope.cli run`` can be started from this interpreter."""
    return importlib.util.find_spec("isoscope.cli") is not None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``over`` merged in, section by section (``over`` wins)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
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
    """One ``isoscope run`` subprocess (see the module docstring).

    Args:
        workdir: config, log and default file export go here; None: a temporary
            directory that :meth:`close` removes (a given one is kept).
        forward: ``exporters.forward`` URLs (OTLP backends).
        file_export: the file export path (turned on even with ``forward``);
            None: ``<workdir>/traces.jsonl``, on only without ``forward``.
        probes: load the kernel probes (False passes ``--no-probes``).
        config: configuration deep-merged over the defaults this launcher writes
            (``log_level: info``, the forward targets, the file export path).
        env: extra environment, e.g. ``ISOSCOPE_*`` overrides.
        inherit_env_overrides: keep the caller's ``ISOSCOPE_*`` variables
            (off by default so a developer's shell cannot change a test's daemon).
        listen: ``HOST:PORT`` per listener name (``otlp_grpc``, ``otlp_http``,
            ``metrics``); missing ones are port 0 on 127.0.0.1.
        wrapper: argv prefix such as ``["capsh", "--drop=cap_bpf", "--"]``; the
            daemon command is then passed to it as one ``-c`` shell string.
        preexec: run in the child before exec (e.g. join a cgroup).
        python: interpreter of the daemon (default: this one).
        ready_timeout_s: how long :meth:`start` waits for ``/readyz`` 200.
    """

    def __init__(self, workdir: str | Path | None = None, *, forward: Sequence[str] = (),
                 file_export: str | Path | None = None, probes: bool = True,
                 config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 inherit_env_overrides: bool = False, listen: Mapping[str, str] | None = None,
                 wrapper: Sequence[str] | None = None, preexec: Callable[[], None] | None = None,
                 python: str | None = None, ready_timeout_s: float = 120.0) -> None:
        unknown = set(listen or {}) - set(LISTENERS)
        if unknown:
            raise ValueError(f"unknown listener(s) {sorted(unknown)}; known: {', '.join(LISTENERS)}")
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="isoscope-daemon-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.forward = list(forward)
        self.probes = probes
        self.extra_env = dict(env or {})
        self.inherit_env_overrides = inherit_env_overrides
        self.wrapper = list(wrapper) if wrapper else None
        self.preexec = preexec
        self.python = python or sys.executable
        self.ready_timeout_s = ready_timeout_s
        self.listen: dict[str, str] = {name: "127.0.0.1:0" for name in LISTENERS}
        self.listen.update(listen or {})
        file_cfg: dict[str, Any] = {"path": str(file_export or self.workdir / "traces.jsonl")}
        if file_export is not None:
            file_cfg["enabled"] = True
        defaults = {"log_level": "info", "metrics": {"debug_status": True}, "exporters": {"forward": self.forward, "file": file_cfg}}
        self.config: dict[str, Any] = deep_merge(defaults, config or {})
        self.config_path = self.workdir / "isoscope.yaml"
        self.log_path = self.workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._reaped = True
        self._log_offset = 0
        self._unregister: Callable[[], None] = _noop

    # -- addresses ------------------------------------------------------------------

    @property
    def traces_path(self) -> Path:
        """Where the file export writes (when it is on)."""
        return Path(self.config["exporters"]["file"]["path"])

    def port(self, name: str) -> int:
        """The bound port of listener ``name`` (known once the daemon was ready)."""
        port = split_hostport(self.listen[name])[1]
        if port == 0:
            raise DaemonError(f"the {name} port is not known before the daemon is ready")
        return port

    def _addr(self, name: str) -> str:
        host = split_hostport(self.listen[name])[0]
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.port(name)}"

    @property
    def grpc_port(self) -> int:
        return self.port("otlp_grpc")

    @property
    def http_port(self) -> int:
        return self.port("otlp_http")

    @property
    def metrics_port(self) -> int:
        return self.port("metrics")

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` of the OTLP/gRPC receiver (for ``OTLPSpanExporter(endpoint=…)``)."""
        return self._addr("otlp_grpc")

    @property
    def http_url(self) -> str:
        """Base URL of the OTLP/HTTP receiver, ``http://host:port``."""
        return f"http://{self._addr('otlp_http')}"

    @property
    def http_traces_url(self) -> str:
        """The OTLP/HTTP traces URL, ``http://host:port/v1/traces``."""
        return self.http_url + "/v1/traces"

    @property
    def metrics_base(self) -> str:
        """Base URL of the metrics server (``/metrics``, ``/readyz``, ``/debug/status``)."""
        return f"http://{self._addr('metrics')}"

    @property
    def metrics_url(self) -> str:
        return self.metrics_base + "/metrics"

    @property
    def pid(self) -> int:
        """Pid of the started process (under a ``wrapper``, the wrapper's; see :meth:`process`)."""
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        return self.proc.pid

    # -- lifecycle --------------------------------------------------------------------

    def write_config(self) -> Path:
        """Write :attr:`config` to :attr:`config_path` (every start does)."""
        import yaml

        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def argv(self) -> list[str]:
        """The command line of the daemon (with the wrapper, when there is one)."""
        argv = [self.python, "-m", "isoscope.cli", "run", "--config", str(self.config_path)]
        for name in LISTENERS:
            argv += [_FLAGS[name], self.listen[name]]
        if not self.probes:
            argv.append("--no-probes")
        if self.wrapper:
            # capsh runs its -c argument through /bin/sh; exec keeps the daemon the wrapper's process.
            return self.wrapper + ["-c", "exec " + shlex.join(argv)]
        return argv

    def child_env(self) -> dict[str, str]:
        """The daemon's environment."""
        env = {k: v for k, v in os.environ.items()
               if self.inherit_env_overrides or not k.startswith("ISOSCOPE_")}
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, timeout_s: float | None = None) -> IsoscopeDaemon:
        """Start the daemon (again on the same ports) and wait until ``/readyz`` answers 200.

        Raises:
            DaemonError: it is already running, exited, or was not ready in time
                (it is killed then).
        """
        if self.alive():
            raise DaemonError("the daemon is already running")
        self.write_config()
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1}: {shlex.join(argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(argv, cwd=str(self.workdir), env=self.child_env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=self.preexec)  # noqa: PLW1509
        self._reaped = False
        self.starts += 1
        self._unregister = JANITOR.register(f"isoscope daemon pid {self.proc.pid}", self.stop)
        try:
            self._wait_ready(self.ready_timeout_s if timeout_s is None else timeout_s)
        except BaseException:
            self.kill9()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise DaemonError(f"isoscope run exited with {self._exit_code()} before it was ready:\n"
                                  + self.log_tail())
            if split_hostport(self.listen["metrics"])[1] == 0:
                port = self._find_metrics_port()
                if port:
                    self.listen["metrics"] = f"{split_hostport(self.listen['metrics'])[0]}:{port}"
            if split_hostport(self.listen["metrics"])[1] != 0:
                try:
                    if self.readyz(timeout_s=2.0)[0] == 200:
                        self._learn_listeners()
                        return
                except (OSError, ValueError, http.client.HTTPException, DaemonError):
                    pass  # not answering (yet): try again until the deadline
            time.sleep(_POLL_S)
        raise DaemonError(f"isoscope run not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def _find_metrics_port(self) -> int | None:
        """The port-0 metrics listener: the daemon's listening socket that serves ``/debug/status``.

        Read from the process's own sockets rather than its log, so neither the
        log level, the log format nor a reworded line can hide it.
        """
        import psutil

        try:
            conns = self.process().net_connections(kind="inet")
        except psutil.Error:
            return None
        host = split_hostport(self.listen["metrics"])[0]
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = f"[{host}]" if ":" in host else host
        for port in sorted({c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}):
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/debug/status", timeout=1.0) as resp:
                    if resp.status == 200 and "listen" in json.loads(resp.read()):
                        return port
            except (OSError, ValueError, http.client.HTTPException):
                continue  # a receiver (or not answering yet)
        return None

    def _learn_listeners(self) -> None:
        # /readyz is 200 only once every enabled receiver listens, so the status lists them all.
        for name, addr in self.status().get("listen", {}).items():
            if name in self.listen and split_hostport(self.listen[name])[1] == 0:
                self.listen[name] = f"{split_hostport(self.listen[name])[0]}:{split_hostport(addr)[1]}"

    def alive(self) -> bool:
        """True while the daemon process runs (checked without reaping it)."""
        return self.proc is not None and not self._reaped and self._exit_code() is None

    def _exit_code(self) -> int | None:
        """Exit status of the process if it has exited, without reaping it (its pid stays ours)."""
        assert self.proc is not None
        if self._reaped:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere (e.g. SIGCHLD ignored): poll() is all that is left
            code = self.proc.poll()
            self._reaped = code is not None
            return code
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def _wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._exit_code() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM: the daemon drains), wait, then SIGKILL the whole process group.

        Returns:
            The exit code (negative: the signal that ended it), None if never started.
        """
        if self.proc is None:
            return None
        if not self._reaped and self._exit_code() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            if not self._wait_exit(timeout_s):
                logger.warning("isoscope run pid %d did not exit within %.0f s of signal %d; killing it",
                               self.proc.pid, timeout_s, sig)
        self._reap()
        unregister, self._unregister = self._unregister, _noop
        unregister()
        return self.proc.returncode

    def kill9(self) -> int | None:
        """A crash: SIGKILL to the whole process group, nothing is drained; returns the exit code."""
        if self.proc is None:
            return None
        self._reap()
        unregister, self._unregister = self._unregister, _noop
        unregister()
        return self.proc.returncode

    def _reap(self) -> None:
        # The leader is not reaped yet, so its pid (= the group id) cannot have been reused:
        # the group kill reaches only what this launcher started.
        assert self.proc is not None
        if self._reaped:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("isoscope run pid %d did not die after SIGKILL", self.proc.pid)
            return
        self._reaped = True

    def close(self) -> None:
        """Stop the daemon and remove the working directory if the launcher made it."""
        try:
            self.stop()
        finally:
            if self._owns_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> IsoscopeDaemon:
        if not self.alive():
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ---------------------------------------------------------------------

    def log_text(self, *, since_start: bool = False) -> str:
        """What the daemon logged: every start, or only the latest one."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.metrics_base + path, timeout=timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def readyz(self, timeout_s: float = 5.0) -> tuple[int, str]:
        """``/readyz``: (HTTP status, reason)."""
        code, body = self._get("/readyz", timeout_s)
        return code, body.decode(errors="replace")

    def status(self) -> dict[str, Any]:
        """The ``/debug/status`` document."""
        code, body = self._get("/debug/status")
        if code != 200:
            raise DaemonError(f"/debug/status answered {code}")
        return json.loads(body)

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        code, body = self._get("/metrics", timeout_s)
        if code != 200:
            raise DaemonError(f"/metrics answered {code}")
        return body.decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted label pairs) → value."""
        return parse_prometheus(self.metrics_text())

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """Every sample of ``/metrics`` as (name, labels, value)."""
        for (name, pairs), value in self.metrics().items():
            yield name, dict(pairs), value

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` (the full sample name) whose labels include ``labels``; 0.0 if none."""
        return sum(v for n, lab, v in self.samples()
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def metric_by(self, name: str, label: str) -> dict[str, float]:
        """Samples of ``name`` summed per value of ``label``."""
        out: dict[str, float] = {}
        for n, lab, value in self.samples():
            if n == name:
                out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + value
        return out

    def process(self) -> Any:
        """The daemon's own Python process as a ``psutil.Process`` (under a wrapper, its child)."""
        import psutil

        p = psutil.Process(self.pid)
        if self.wrapper and "isoscope.cli" not in " ".join(p.cmdline()):
            for child in p.children(recursive=True):
                if "isoscope.cli" in " ".join(child.cmdline()):
                    return child
        return p

    def rss_bytes(self) -> int:
        return int(self.process().memory_info().rss)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the daemon used so far."""
        t = self.process().cpu_times()
        return float(t.user + t.system)


def _noop() -> None:
    pass
