"""A real Prometheus server for tests.

Starts ``/usr/bin/prometheus`` (Debian package) on a free loopback port with a
temporary config and data directory, waits until it is ready, and offers a small
client for the HTTP API. Exemplar storage is enabled so exemplar queries work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

logger = logging.getLogger(__name__)

PROMETHEUS_BIN = shutil.which("prometheus") or "/usr/bin/prometheus"


class PromQLError(Exception):
    """The Prometheus API answered with an error (``errorType``/``error``)."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrometheusServer:
    """A Prometheus process scraping the given targets.

    Args:
        targets: ``host:port`` scrape targets (``/metrics`` path, job ``isoscope``).
        scrape_interval: scrape and evaluation interval, e.g. ``"1s"``.
        rule_files: rule files to load (evaluated every ``scrape_interval``).
        target_labels: labels attached to every scraped series by relabeling, the way
            Kubernetes service discovery does it (the Prometheus Operator sets ``namespace``,
            ``pod``, ``container``, ``service``, ``endpoint`` and ``job`` from the target).
            A scraped label of the same name is renamed ``exported_<name>`` unless
            ``honor_labels``.
        honor_labels: keep scraped labels that clash with target labels (and drop the target's).
    """

    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s",
                 rule_files: Sequence[str | os.PathLike[str]] = (),
                 target_labels: Mapping[str, str] | None = None, honor_labels: bool = False) -> None:
        self.targets = list(targets)
        self.target_labels = dict(target_labels or {})
        self.honor_labels = honor_labels
        self.scrape_interval = scrape_interval
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        """Start the server and wait until ``/-/ready`` answers 200."""
        self._dir = tempfile.TemporaryDirectory(prefix="isoscope-prom-")
        root = Path(self._dir.name)
        config = {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [{
                "job_name": "isoscope",
                "honor_labels": self.honor_labels,
                "static_configs": [{"targets": self.targets}],
                # A replace rule without source labels writes its replacement: the same
                # mechanism the Operator's generated config uses for __meta_kubernetes_* values.
                "relabel_configs": [{"action": "replace", "target_label": name, "replacement": value}
                                    for name, value in self.target_labels.items()],
            }],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self._log_path = root / "prometheus.log"
        log = open(self._log_path, "wb")
        self._proc = subprocess.Popen(
            [PROMETHEUS_BIN,
             f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--enable-feature=exemplar-storage",
             "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("prometheus did not become ready")

    def log(self) -> str:
        """The server's log so far (for failure messages)."""
        return self._log_path.read_text(errors="replace") if self._log_path and self._log_path.exists() else ""

    def stop(self) -> None:
        """Terminate the server and remove its data directory."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ----------------------------------------------------------

    def _api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        url = f"{self.url}/api/v1/{path}"
        data = urllib.parse.urlencode(params or {}).encode() if params is not None else None
        req = urllib.request.Request(url, data=data)  # POST when params given: long queries fit
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PromQLError(body.get("errorType", "unknown"), body.get("error", repr(body)))
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """Instant query. Returns ``{"resultType": ..., "result": [...]}``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self._api("query", params)

    def query_range(self, expr: str, start: float, end: float, step: float) -> dict[str, Any]:
        """Range query over ``[start, end]`` (unix seconds)."""
        return self._api("query_range", {"query": expr, "start": start, "end": end, "step": step})

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """Exemplars of the series selected by ``expr`` in ``[start, end]``."""
        return self._api("query_exemplars", {"query": expr, "start": start, "end": end})

    def targets_active(self) -> list[dict[str, Any]]:
        """Active scrape targets with ``health``, ``lastError`` …"""
        return self._api("targets", None)["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        """Loaded rule groups with their rules' health."""
        return self._api("rules", None)["groups"]

    def wait_for(self, expr: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll an instant query until it returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)["result"]
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr!r} after {timeout}s")
            time.sleep(0.25)
