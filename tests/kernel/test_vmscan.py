"""The vmscan probe: memory-cgroup reclaim stalls of a real process under a tight limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from isoscope.model import Stall
from isoscope.probes import catalog
from isoscope.probes.decode import RECLAIM_KINDS
from tests.cgroup_helpers import make_cgroup
from tests.files import cold_file
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
    with cold_file(f"/var/tmp/isoscope-test-vmscan-{os.getpid()}.dat", FILE_SIZE >> 20) as path:
        yield path


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


# ---------------------------------------------------------------------------------------
# Short episodes: summed per thread in the kernel, every nanosecond still crosses
# ---------------------------------------------------------------------------------------

# A reader scanning a mapped file 4x its memory limit, pinned to one CPU: each
# page-in is charged to the memory cgroup, so the reader reclaims in many short
# memcg episodes between its page-ins. After the scan it reports its run and
# then either sleeps reading stdin (an interruptible sleep: the thread's last
# group of short episodes must cross now) or exits (its last switch).
SCAN = r"""
import json, mmap, os, sys, threading, time
path, cpu, ending = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.sched_setaffinity(0, {cpu})
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
print(json.dumps({"tid": threading.get_native_id()}), flush=True)
sys.stdin.readline()
t0 = time.monotonic_ns()
touched = 0
for _ in range(2):
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for off in range(0, size, 4096):
        touched += m[off]
t1 = time.monotonic_ns()
print(json.dumps({"t0": t0, "t1": t1}), flush=True)
if ending == "sleep":
    sys.stdin.readline()
"""


def _thread_state(pid: int, tid: int) -> str:
    """One-letter scheduler state of a thread (``S`` = interruptible sleep), ``""`` once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _wait_state(pid: int, tid: int, states: str, timeout_s: float = 30.0) -> None:
    """Wait until the thread is in one of ``states`` (``/proc`` one-letter states)."""
    deadline = time.monotonic() + timeout_s
    while _thread_state(pid, tid) not in states:
        assert time.monotonic() < deadline, f"thread {tid} never reached state {states!r}"
        time.sleep(0.01)


def _cgroup_totals(probe, cgroup_id: int) -> tuple[int, int]:
    """(episodes, ns) of every reclaim kind the probe counted for a cgroup."""
    rows = [v for k, v in probe.bpf["totals"].items() if k.cgroup_id == cgroup_id]
    return sum(int(v.count) for v in rows), sum(int(v.sum_ns) for v in rows)


@pytest.mark.parametrize("watched_min_ns,ending,flush_on_sleep", [
    (None, "sleep", True),      # the probe as shipped: episodes >= 10 us alone, shorter ones summed
    (1_000_000, "sleep", True),  # every sub-millisecond episode goes through the summing path
    (1_000_000, "exit", True),  # ... and the last group crosses at the thread's last switch
    (1_000_000, "exit", False),  # built without the sched_switch program: at sched_process_exit
], ids=["default", "all-summed-sleep", "all-summed-exit", "all-summed-exit-no-switch-hook"])
def test_short_reclaim_episodes_reach_the_records(load_probe, big_file, watched_min_ns, ending, flush_on_sleep):
    """The records of a watched thread carry all of its reclaim: their summed length matches the
    kernel's own per-cgroup totals for the run (within 10 %), not only the episodes long enough to
    cross one by one; summed groups never overlap and stay inside the run; nothing stays behind."""
    defines: dict[str, int] = {} if watched_min_ns is None else {"ISO_RECLAIM_WATCHED_MIN_NS": watched_min_ns}
    if not flush_on_sleep:
        defines["ISO_RECLAIM_FLUSH_ON_SLEEP"] = 0
    probe = load_probe(catalog.VMSCAN, defines=defines)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with make_cgroup(f"isoscope-test-vmscan-short-{os.getpid()}", v1_controllers=("memory",),
                     memory_limit=LIMIT) as cg:
        proc = cg.spawn([sys.executable, "-c", SCAN, big_file, str(cpu), ending], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert probe.watch.add_tgid(proc.pid)
        tid = json.loads(proc.stdout.readline())["tid"]
        _wait_state(proc.pid, tid, "S")           # started, mapped, waiting for go
        probe.drain()
        count0, ns0 = _cgroup_totals(probe, cg.id)
        go = time.monotonic_ns()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        run = json.loads(proc.stdout.readline())
        if ending == "sleep":
            _wait_state(proc.pid, tid, "S")       # back in an interruptible sleep: its last group crossed
        else:
            proc.communicate(timeout=60)
            assert proc.returncode == 0
        events = probe.drain()
        count1, ns1 = _cgroup_totals(probe, cg.id)
        mine = sorted((e for e in events if isinstance(e, Stall) and e.tid == tid and e.end_mono_ns > go),
                      key=lambda s: s.start_mono_ns)
        episodes, kernel_ns = count1 - count0, ns1 - ns0

        assert episodes >= 20, f"only {episodes} reclaim episodes: the scenario did not happen"
        record_ns = sum(s.duration_ns for s in mine)
        assert abs(record_ns - kernel_ns) <= 0.10 * kernel_ns, (
            f"records carry {record_ns} ns of reclaim, the kernel counted {kernel_ns} ns "
            f"in {episodes} episodes ({len(mine)} records)")
        assert all(s.component == "memory_reclaim" and s.cgroup_id == cg.id and s.pid == proc.pid for s in mine)
        assert all(run["t0"] <= s.start_mono_ns <= s.end_mono_ns <= run["t1"] for s in mine), \
            "a record lies outside the run it sums"
        assert all(a.end_mono_ns <= b.start_mono_ns for a, b in zip(mine, mine[1:])), \
            "records of one thread overlap: the join would count their reclaim once"
        assert len(mine) <= episodes
        if watched_min_ns is not None:
            # All of it went through the summing path: groups of several episodes crossed as one record.
            assert len(mine) < episodes, (len(mine), episodes)
        if ending == "sleep":
            proc.stdin.write("bye\n")
            proc.stdin.flush()
            proc.communicate(timeout=60)
    # Nothing outlives the thread: no pending group, the gate counter back in step.
    pending = {k.value for k in probe.bpf["reclaim_acc"].keys()}
    assert tid not in pending
    assert probe.bpf["acc_pending"][0].value == len(pending)
    assert probe.manager.check_losses()["vmscan"] == 0
