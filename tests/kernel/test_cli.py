"""`isoscope probes` and `isoscope stack` as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

TRACEPOINT_PROBES = ("sched", "syscalls", "vmscan", "block", "lifecycle", "netns", "kvm")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "isoscope.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_probes_json_reports_every_probe_and_why_not() -> None:
    res = cli("probes", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    by = {p["name"]: p for p in doc["probes"]}
    for name in TRACEPOINT_PROBES:
        assert by[name]["attached"], f"{name}: {by[name]['reason']}"
        assert by[name]["attach_points"]
    # these kernels have neither kprobes nor fentry: the extras say so and name the fallback
    for name, feature in (("cfs_throttle_kprobe", "kprobes"), ("cfs_throttle_fentry", "fentry")):
        if doc["kernel"]["features"][feature]:
            assert by[name]["attached"], by[name]["reason"]
        else:
            assert not by[name]["attached"]
            assert feature in by[name]["reason"]
            assert "CFS throttling measured with the tracepoint method" in by[name]["reason"]
    assert doc["kernel"]["headers"]["source"] in ("host", "configured", "generic", "kheaders")
    assert doc["kernel"]["tracefs"]


def test_probes_table_is_readable() -> None:
    res = cli("probes")
    assert res.returncode == 0, res.stderr
    assert "attached" in res.stdout and "not attached" in res.stdout and "sched" in res.stdout


def test_stack_of_this_kvm_guest() -> None:
    res = cli("stack", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["hypervisor"] == "kvm"
    assert "L-1" in doc["layers"] and "L-2" in doc["layers"]
    assert any("virtio" in e for e in doc["evidence"]["L-2"])


def test_stack_of_a_process_and_of_a_missing_one() -> None:
    res = cli("stack", "--pid", str(os.getpid()), "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pid"] == os.getpid()
    res = cli("stack", "--pid", "999999999", timeout=60)
    assert res.returncode == 2 and "no process with pid 999999999" in res.stderr
    res = cli("stack", timeout=60)
    assert res.returncode == 0 and "hypervisor: kvm" in res.stdout
