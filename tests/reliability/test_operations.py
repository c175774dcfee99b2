"""Operating the daemon: least privilege, fail-fast on a missing capability, SIGHUP reload, /debug/status."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import yaml

from tests.reliability.clients import wait_until
from tests.reliability.test_kernel import _attr, _received_span, _send_window

pytestmark = [pytest.mark.kernel]

# What the DaemonSet grants (deploy/kubernetes/base/daemonset.yaml), nothing else.
LISTED = {"cap_bpf", "cap_perfmon", "cap_sys_resource", "cap_sys_ptrace", "cap_dac_read_search"}


def _bounding_set() -> list[str]:
    out = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Bounding set ="):
            return [c for c in line.split("=", 1)[1].strip().split(",") if c]
    raise AssertionError(out)


def only(caps: set[str]) -> list[str]:
    """A capsh prefix that leaves the daemon with at most ``caps``."""
    drop = [c for c in _bounding_set() if c not in caps]
    return ["capsh", f"--drop={','.join(drop)}", "--"]


def test_listed_capabilities_are_enough_for_the_full_pipeline(daemon_factory, backend):
    d = daemon_factory("leastpriv", probes=True, forward=[backend.grpc_url], wrapper=only(LISTED),
                       config={"kernel": {"strict_capabilities": True}})
    code, reason = d.readyz()
    assert code == 200 and reason.strip() == "ready", reason
    status = d.status()
    required = [p for p in status["probes"] if p["required"]]
    assert required and all(p["attached"] for p in required), status["probes"]
    # A span from this (loopback) sender is joined with kernel data, not just passed through. Its
    # first span makes the daemon watch it (a process it has never seen has no thread records yet,
    # which the first span's coverage 0 says); the next one is joined with its threads' records.
    now = time.time_ns()
    _send_window(d, 4241, now - 1_000_000, now)
    assert backend.wait_for_spans(1, 15), d.log_tail()
    time.sleep(0.5)
    t0 = time.time_ns()
    time.sleep(0.3)
    _send_window(d, 4242, t0, time.time_ns())
    assert backend.wait_for_span_ids([4242], 15), d.log_tail()
    span = _received_span(backend, 4242)
    assert _attr(span, "isolation.scope") in ("thread", "process")
    assert _attr(span, "isolation.coverage") > 0
    assert _attr(span, "isolation.hypervisor") == "kvm"


def test_a_missing_capability_fails_fast_with_one_clear_line(daemon_factory):
    d = daemon_factory("nobpf", probes=True, wrapper=only(LISTED - {"cap_bpf"}),
                       config={"kernel": {"strict_capabilities": True}}, start=False)
    d.write_config()
    t0 = time.monotonic()
    res = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, cwd=str(d.workdir))
    assert res.returncode != 0
    assert time.monotonic() - t0 < 30  # before any probe is compiled
    lines = [line for line in res.stderr.splitlines() if line.startswith("isoscope:")]
    assert len(lines) == 1, res.stderr[-2000:]
    assert "CAP_BPF" in lines[0] and "grant" in lines[0]
    # Without strict_capabilities the same daemon runs on, forwarding spans unenriched
    # (tests/reliability/test_kernel.py::test_no_bpf_capability_forwards_unenriched_and_says_why).


def test_sighup_reloads_what_can_change_live_and_keeps_a_bad_edit_out(daemon_factory):
    d = daemon_factory("reload")
    doc = yaml.safe_load(d.config_path.read_text())
    doc.setdefault("attribution", {})["blame_threshold"] = 0.5
    d.config_path.write_text(yaml.safe_dump(doc))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: d.metric("isoscope_config_reloads_total") == 1, 10), d.log_tail()
    # A change that needs a restart is applied at the next one and said so.
    doc.setdefault("metrics", {})["max_label_values"] = 500
    d.config_path.write_text(yaml.safe_dump(doc))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: d.metric("isoscope_config_reloads_total") == 2, 10)
    assert wait_until(lambda: "take effect at the next restart" in d.log_text(), 5), d.log_tail()
    # A broken edit does not take the daemon down: it keeps the running configuration.
    d.config_path.write_text("attribution: {blame_threshold: lots}\n")
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: d.metric("isoscope_config_reload_failures_total") == 1, 10), d.log_tail()
    assert d.alive() and d.readyz()[0] == 200
    assert "attribution.blame_threshold" in d.log_text()


def test_debug_status_shows_probes_queues_and_tracked_workloads(daemon_factory, backend):
    d = daemon_factory("status", probes=True, forward=[backend.grpc_url])
    _send_window(d, 7, time.time_ns() - 5_000_000, time.time_ns())
    assert backend.wait_for_spans(1, 15)
    st = d.status()
    assert st["ready"] is True
    assert {p["name"] for p in st["probes"]} >= {"sched", "syscalls", "vmscan", "block", "lifecycle"}
    assert all({"attached", "reason", "attach_points", "lost_events"} <= set(p) for p in st["probes"])
    assert "enrich" in st["queues"] and len(st["queues"]) >= 2
    assert st["watched"]["tgids"] >= 1  # the sender is followed in the kernel from its first span
    # Followed, its threads' on-CPU segments reach the timeline (this test's process sleeps and
    # wakes while it polls). Nothing else need be there: on a quiet node no other thread waits long
    # enough to be recorded.
    assert wait_until(lambda: d.status()["timeline"]["threads"] >= 1, 15), d.status()["timeline"]
    assert d.status()["timeline"]["records"] >= 1
    assert st["kernel"]["features"]["raw_tracepoint"] is True
    assert set(st["listen"]) == {"otlp_grpc", "otlp_http", "metrics"}
