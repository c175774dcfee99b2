"""The syscalls probe on the running kernel: classes, blocked intervals, histograms, cleanup."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from isoscope.host.cgroupfs import cgroup_id, cgroup_v2_root, read_proc_cgroups
from isoscope.model import Stall
from isoscope.probes import catalog
from isoscope.probes.decode import SYSCALL_CLASSES
from isoscope.probes.syscall_classes import CLASS_CODE, fill_class_map
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
    measure("sleep", lambda: time.sleep(0.05))
r, w = os.pipe()
threading.Thread(target=lambda: (time.sleep(0.05), os.write(w, b"x"))).start()
measure("file", lambda: os.read(r, 1))
a, b = socket.socketpair()
threading.Thread(target=lambda: (time.sleep(0.05), b.send(b"y"))).start()
measure("net", lambda: a.recv(1))
lock = threading.Lock(); lock.acquire()
threading.Thread(target=lambda: (time.sleep(0.05), lock.release())).start()
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
            # One blocking call per operation, possibly with short ones around it (the
            # interpreter may wait briefly on its own lock, a futex, while it blocks).
            inside = [x for x in inside if x.details["syscall.class"] == op["op"]] or inside
            assert inside and all(x.details["syscall.class"] == op["op"] for x in inside), (op, inside)
            measured = op["t1"] - op["t0"]
            total = sum(x.duration_ns for x in inside)
            # The process's own measurement also covers the Python call around the
            # syscall (and, on a loaded machine, waiting for a CPU before entering it).
            assert total <= measured
            assert measured - total <= 0.04 * measured, (op, total, measured)
            for s in inside:
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
        # Three 50 ms sleeps at least (plus the helper threads' sleeps).
        assert totals["sleep"][1] >= 3 * 50_000_000, totals
        # A cgroup nobody asked for (the test's own) is not tracked at all.
        own = cgroup_id(read_proc_cgroups("self")[""], cgroup_v2_root())
        assert own not in (watched_cg.id, unwatched_cg.id)
        assert _hist_counts(probe.bpf, own) == {}
    assert probe.manager.check_losses()["syscalls"] == 0


# Sleeps of 5 ms for a while, each measured; watched and unwatched from outside meanwhile.
SLEEPER = r"""
import json, sys, threading, time
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
ops = []
while time.monotonic() < end:
    t0 = time.monotonic_ns(); time.sleep(0.005); ops.append((t0, time.monotonic_ns()))
print(json.dumps({"tid": threading.get_native_id(), "ops": ops}), flush=True)
"""


def test_cached_decision_follows_watch_changes_and_cgroup_moves(load_probe):
    """A task already known as unwatched is tracked from the moment it is watched, and no longer."""
    probe = load_probe(catalog.SYSCALLS)
    fill_class_map(probe.bpf["syscall_class"])
    with make_cgroup(f"isoscope-test-sc-move-{os.getpid()}", v1_controllers=()) as cg:
        assert probe.watch.add_cgroup(cg.id)
        proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "1.6"], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            time.sleep(0.3)                       # dozens of syscalls: decision cached as unwatched
            # Each change is bracketed by timestamps: a sleep overlapping a change may go either way.
            w1a = time.monotonic_ns()
            assert probe.watch.add_tgid(proc.pid)
            w1b = time.monotonic_ns()
            time.sleep(0.4)
            w2a = time.monotonic_ns()
            probe.watch.remove_tgid(proc.pid)
            w2b = time.monotonic_ns()
            time.sleep(0.4)
            w3a = time.monotonic_ns()
            cg.add(proc.pid)                      # into a watched cgroup: tracked again
            w3 = time.monotonic_ns()
            out, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        report = json.loads(out.strip().splitlines()[-1])
        events = probe.wait_for(lambda evs: any(isinstance(e, Stall) and e.start_mono_ns > w3 for e in evs))
        stalls = [e for e in events if isinstance(e, Stall) and e.tid == report["tid"]]

        def seen(t0: int, t1: int) -> bool:
            return any(t0 <= s.start_mono_ns and s.end_mono_ns <= t1 for s in stalls)

        phases = {"before": (0, w1a), "watched": (w1b, w2a), "unwatched": (w2b, w3a), "in_cgroup": (w3, 1 << 63)}
        for phase, (lo, hi) in phases.items():
            ops = [(t0, t1) for t0, t1 in report["ops"] if lo < t0 and t1 < hi]
            assert len(ops) >= 10, (phase, len(ops))
            hits = sum(seen(*op) for op in ops)
            if phase in ("watched", "in_cgroup"):
                assert hits == len(ops), (phase, hits, len(ops))
            else:
                assert hits == 0, (phase, hits, len(ops))
        assert {s.cgroup_id for s in stalls if s.start_mono_ns > w3} == {cg.id}


def test_class_codes_match_the_header():
    assert CLASS_CODE == {"other": 0, "net": 1, "file": 2, "lock": 3, "sleep": 4}
