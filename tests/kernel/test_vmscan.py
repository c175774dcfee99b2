"""The vmscan probe: memory-cgroup reclaim stalls of a real process under a tight limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from isoscope.model import Stall
from isoscope.probes import catalog
from isoscope.probes.decode import RECLAIM_KINDS
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

LIMIT = 24 * 1024 * 1024
FILE_SIZE = 96 * 1024 * 1024

# Buffered reads of a file whose cached pages were dropped: every page read is
# charged to the reader's memory cgroup, so past the limit the reader itself
# has to reclaim (clean page cache: no swap needed, no OOM).
CHURN = r"""
import json, os, sys, threading, time
path = sys.argv[1]
sys.stdin.readline()
fd = os.open(path, os.O_RDONLY)
t0 = time.monotonic_ns()
for _ in range(2):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    off = 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            break
        off += len(b)
t1 = time.monotonic_ns()
print(json.dumps({"tid": threading.get_native_id(), "t0": t0, "t1": t1}), flush=True)
"""


@pytest.fixture
def big_file():
    path = f"/var/tmp/isoscope-test-vmscan-{os.getpid()}.dat"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(FILE_SIZE >> 20):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        yield path
    finally:
        os.unlink(path)


def test_memcg_reclaim_is_attributed_to_the_reclaiming_process(load_probe, big_file):
    # Every watched reclaim crosses (memcg reclaim rounds are often well under 1 ms).
    probe = load_probe(catalog.VMSCAN, defines={"ISO_WATCHED_MIN_STALL_NS": 0})
    with make_cgroup(f"isoscope-test-vmscan-{os.getpid()}", v1_controllers=("memory",),
                     memory_limit=LIMIT) as cg:
        proc = cg.spawn([sys.executable, "-c", CHURN, big_file], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert probe.watch.add_tgid(proc.pid)
        out, err = proc.communicate("go\n", timeout=60)
        assert proc.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])

        events = probe.wait_for(lambda evs: any(isinstance(e, Stall) and e.tid == report["tid"] for e in evs))
        mine = [e for e in events if isinstance(e, Stall) and e.pid == proc.pid]
        assert mine, "no reclaim stall for a reader 4x over its memory limit"
        assert all(s.component == "memory_reclaim" for s in mine)
        assert {s.tid for s in mine} == {report["tid"]}
        assert {s.cgroup_id for s in mine} == {cg.id}
        assert {s.details["reclaim.kind"] for s in mine} <= {"memcg", "direct"}
        assert any(s.details["reclaim.kind"] == "memcg" for s in mine)
        assert all(report["t0"] <= s.start_mono_ns <= s.end_mono_ns <= report["t1"] for s in mine)
        assert sum(s.details["reclaim.pages"] for s in mine) > 0
        reclaim_ns = sum(s.duration_ns for s in mine)
        assert 0 < reclaim_ns < report["t1"] - report["t0"]

        # The in-kernel aggregates of the cgroup agree with the records that crossed.
        memcg_code = {v: k for k, v in RECLAIM_KINDS.items()}["memcg"]
        totals = {k.class_id: v for k, v in probe.bpf["totals"].items() if k.cgroup_id == cg.id}
        assert totals[memcg_code].count >= sum(1 for s in mine if s.details["reclaim.kind"] == "memcg")
        assert totals[memcg_code].sum_ns >= sum(s.duration_ns for s in mine if s.details["reclaim.kind"] == "memcg")
        hist = sum(v.value for k, v in probe.bpf["hist"].items() if k.cgroup_id == cg.id)
        assert hist == sum(t.count for t in totals.values())
    # Every begin had its end: no per-task entry is left behind.
    assert len(probe.bpf["reclaim_start"]) == 0 or all(
        k.tid != report["tid"] for k in probe.bpf["reclaim_start"].keys())
    assert probe.manager.check_losses()["vmscan"] == 0
