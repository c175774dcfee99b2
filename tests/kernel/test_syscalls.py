"""The syscalls probe on the running kernel: classes, blocked intervals, histograms, cleanup."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from collector.model import Stall
from collector.probes import catalog
from collector.probes.decode import SYSCALL_CLASSES
from collector.syscall_classes import CLASS_CODE, fill_class_map
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

HIST_ONLY = 2  # watched_cgroups value ISO_SC_WATCH_HIST in bpf/syscalls.bpf.c

# A workload that blocks in four kinds of syscall and measures each itself.
WORKLOAD = r"""
import json, os, socket, sys, threading, time
sys.stdin.readline()                       # wait until the test has set up the watch
tid = threading.get_native_id()
ops = []
def measure(op, fn):
    t0 = time.monotonic_ns(); fn(); t1 = time.monotonic_ns()
    ops.append({"op": op, "t0": t0, "t1": t1})
for _ in range(3):
    measure("sleep", lambda: time.sleep(0.02))
r, w = os.pipe()
threading.Thread(target=lambda: (time.sleep(0.03), os.write(w, b"x"))).start()
measure("file", lambda: os.read(r, 1))
a, b = socket.socketpair()
threading.Thread(target=lambda: (time.sleep(0.03), b.send(b"y"))).start()
measure("net", lambda: a.recv(1))
lock = threading.Lock(); lock.acquire()
threading.Thread(target=lambda: (time.sleep(0.03), lock.release())).start()
measure("lock", lambda: lock.acquire())
print(json.dumps({"tid": tid, "ops": ops}), flush=True)
"""


def _run_workload(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate("go\n", timeout=20)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _hist_counts(bpf: Any, cgroup_id: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k, v in bpf["hist"].items():
        if k.cgroup_id == cgroup_id:
            name = SYSCALL_CLASSES[k.class_id]
            counts[name] = counts.get(name, 0) + v.value
    return counts


def test_watched_blocking_syscalls_become_classed_stalls(load_probe, tmp_path):
    probe = load_probe(catalog.SYSCALLS)
    assert fill_class_map(probe.bpf["syscall_class"]) > 100

    tag = f"isoscope-test-sc-{os.getpid()}"
    with make_cgroup(f"{tag}-w", v1_controllers=()) as watched_cg, \
            make_cgroup(f"{tag}-u", v1_controllers=()) as unwatched_cg:
        probe.bpf["watched_cgroups"][ctypes.c_uint64(unwatched_cg.id)] = ctypes.c_uint8(HIST_ONLY)
        watched = watched_cg.spawn([sys.executable, "-c", WORKLOAD], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        unwatched = unwatched_cg.spawn([sys.executable, "-c", WORKLOAD], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert probe.watch.add_tgid(watched.pid)
        report = _run_workload(watched)
        _run_workload(unwatched)
        events = probe.wait_for(lambda evs: sum(isinstance(e, Stall) and e.tid == report["tid"]
                                                and e.end_mono_ns <= report["ops"][-1]["t1"]
                                                for e in evs) >= len(report["ops"]))
        stalls = [e for e in events if isinstance(e, Stall)]
        assert all(s.component == "syscall" for s in stalls)

        for op in report["ops"]:
            inside = [s for s in stalls if s.tid == report["tid"]
                      and op["t0"] <= s.start_mono_ns and s.end_mono_ns <= op["t1"]]
            assert len(inside) == 1, (op, inside)
            s = inside[0]
            measured = op["t1"] - op["t0"]
            assert s.details["syscall.class"] == op["op"], (op, s)
            # The process's own measurement includes the Python call around the syscall.
            assert abs(s.duration_ns - measured) <= max(0.03 * measured, 300_000), (op, s.duration_ns, measured)
            assert s.pid == watched.pid
            assert s.cgroup_id == watched_cg.id

        # The unwatched process produced no stall record, but its cgroup histogram counts it.
        assert not [s for s in stalls if s.pid == unwatched.pid]
        uh = _hist_counts(probe.bpf, unwatched_cg.id)
        assert uh.get("sleep", 0) >= 3 and uh.get("net", 0) >= 1 and uh.get("lock", 0) >= 1, uh
        wh = _hist_counts(probe.bpf, watched_cg.id)
        assert wh.get("sleep", 0) >= 3, wh

        totals = {SYSCALL_CLASSES[k.class_id]: (v.count, v.sum_ns) for k, v in probe.bpf["totals"].items()
                  if k.cgroup_id == unwatched_cg.id}
        # Three 20 ms sleeps at least (plus the helper threads' 30 ms sleeps).
        assert totals["sleep"][1] >= 3 * 20_000_000, totals
        # A cgroup nobody asked for is not tracked at all.
        assert _hist_counts(probe.bpf, os.stat("/proc/self").st_ino) == {}
    assert probe.manager.check_losses()["syscalls"] == 0


def test_per_thread_state_is_removed_when_a_blocked_thread_is_killed(load_probe):
    probe = load_probe(catalog.SYSCALLS)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys,time; sys.stdin.readline(); time.sleep(30)"],
                               stdin=subprocess.PIPE, text=True)
    try:
        probe.watch.add_tgid(sleeper.pid)
        sleeper.stdin.write("go\n")
        sleeper.stdin.flush()
        inflight = probe.bpf["inflight"]
        key = ctypes.c_uint32(sleeper.pid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            entry = inflight.get(key)
            if entry is not None and entry.nr == 230:   # clock_nanosleep
                break
            time.sleep(0.02)
        else:
            pytest.fail("the watched sleeper never showed up in the in-flight map")
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait(timeout=5)
        # sys_exit never runs for a killed sleeper; sched_process_exit must drop its entry.
        assert inflight.get(key) is None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_class_codes_match_the_header():
    assert CLASS_CODE == {"other": 0, "net": 1, "file": 2, "lock": 3, "sleep": 4}
