"""The sandbox probe on real runtimes: CPU samples split into guest code, runtime (host calls) and other code.

Oracles: the threads' own on-CPU time from ``schedstat`` (every sample is one
millisecond of CPU), and workloads whose split is known by construction — a
pure wasmtime guest loop, a guest loop of WASI ``fd_write`` host calls, and a
process that is entirely sandbox machinery (gVisor's Sentry cannot run on
these machines, so a process named like it stands in: the probe and tracker
see a real ``runsc-sandbox`` process burning CPU).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
import sys
import time

import pytest

from isoscope.host import wasm
from isoscope.probes import catalog
from isoscope.model import Stats
from isoscope.probes.decode import header_constants
from isoscope.probes.loader import ProbeManager
from isoscope.probes.spec import perf_event
from isoscope.probes.sandbox_sampler import MAX_RANGES, SandboxSplit, SandboxTracker, find_sentries
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401
from tests.kernel.test_wasm import WORKLOAD

pytestmark = pytest.mark.kernel

# The same guest loop, but every iteration is a WASI fd_write of one byte to
# /dev/null: a host call into the runtime (and a write(2) on its behalf).
WASI_WORKLOAD = r'''
import sys, threading, time, wasmtime
seconds = float(sys.argv[1])
wat = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "x")
  (func (export "calls") (param i32)
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 1))
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set 0 (i32.sub (local.get 0) (i32.const 1)))
      (br_if $l (i32.gt_s (local.get 0) (i32.const 0))))))"""
engine = wasmtime.Engine()
store = wasmtime.Store(engine)
cfg = wasmtime.WasiConfig()
cfg.stdout_file = "/dev/null"
store.set_wasi(cfg)
linker = wasmtime.Linker(engine)
linker.define_wasi()
calls = linker.instantiate(store, wasmtime.Module(engine, wat)).exports(store)["calls"]
print("ready", threading.get_native_id(), flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    calls(store, 20000)
'''


def _start(script: str, seconds: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    words = proc.stdout.readline().split()
    assert words[:1] == ["ready"], words
    return proc, int(words[1]) if len(words) > 1 else proc.pid


def _sampled(load_probe, script: str) -> tuple[SandboxSplit, int, list, int, set[int]]:
    """Run ``script`` for a while with the probe on.

    Returns:
        (split, schedstat on-CPU ns, sandbox stalls, the calling thread, every thread of the process).
    """
    rp = load_probe(catalog.SANDBOX)
    tracker = SandboxTracker(rp.bpf, catalog.SANDBOX_SAMPLE_NS)
    proc, tid = _start(script, 8)
    try:
        tracker.refresh([proc.pid])
        assert tracker.pids == [proc.pid], "the wasmtime process was not registered"
        before = tracker.split(proc.pid)
        cpu0 = wasm.sample(proc.pid)[0]
        time.sleep(2.0)
        cpu1 = wasm.sample(proc.pid)[0]
        after = tracker.split(proc.pid)
        events = rp.drain()
        threads = {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
    finally:
        proc.kill()
        proc.wait(10)
    tracker.refresh([])
    assert tracker.pids == [] and tracker.split(proc.pid).total_ns == 0, "an exited process left map entries"
    split = SandboxSplit(proc.pid, "wasm", after.guest_ns - before.guest_ns, after.runtime_ns - before.runtime_ns,
                           after.other_ns - before.other_ns)
    stalls = [e for e in events if getattr(e, "pid", None) == proc.pid]
    return split, cpu1 - cpu0, stalls, tid, threads


def test_map_layouts_match_the_header(load_probe):
    rp = load_probe(catalog.SANDBOX)
    c = header_constants()
    assert ctypes.sizeof(rp.bpf[b"sandbox_code"].Leaf) == c["ISO_SBX_CODE_SIZE"]
    assert ctypes.sizeof(rp.bpf[b"sandbox_samples"].Key) == c["ISO_SBX_KEY_SIZE"]
    assert len(rp.bpf[b"sandbox_code"].Leaf().guest) == MAX_RANGES == c["ISO_SBX_MAX_RANGES"]


def test_guest_loop_is_sampled_as_guest_code(load_probe):
    split, oncpu, stalls, _tid, _threads = _sampled(load_probe, WORKLOAD)
    # Every sample is 1 ms of CPU: the samples add up to the threads' own on-CPU time.
    assert abs(split.total_ns - oncpu) <= 0.1 * oncpu + 20e6, (split, oncpu)
    assert split.guest_ns >= 0.8 * split.total_ns, split
    assert split.runtime_ns <= 0.05 * split.total_ns, split
    assert len(stalls) * catalog.SANDBOX_SAMPLE_NS <= split.runtime_ns + 20e6


def test_wasi_host_calls_are_sampled_as_runtime_and_become_sandbox_stalls(load_probe):
    split, oncpu, stalls, tid, threads = _sampled(load_probe, WASI_WORKLOAD)
    assert abs(split.total_ns - oncpu) <= 0.1 * oncpu + 20e6, (split, oncpu)
    # fd_write runs in the runtime library (and in libc/the kernel under it): host time dominates.
    assert split.guest_ns <= 0.15 * split.total_ns, split
    assert split.runtime_ns >= 0.3 * split.total_ns, split
    # Runtime samples cross as one-period sandbox stalls of the thread that ran the runtime: the
    # calling thread, almost always (wasmtime's WASI also keeps tokio worker threads, which may
    # run part of a host call on a busy node; their samples are the sandbox's too).
    assert stalls and all(s.component == "sandbox" and s.tid in threads for s in stalls), (
        tid, threads, sorted({(s.component, s.tid) for s in stalls}))
    on_caller = sum(s.tid == tid for s in stalls)
    assert on_caller >= 0.9 * len(stalls), (on_caller, len(stalls), sorted({s.tid for s in stalls}))
    assert all(s.end_mono_ns - s.start_mono_ns == catalog.SANDBOX_SAMPLE_NS for s in stalls)
    runtime_in_window = len(stalls) * catalog.SANDBOX_SAMPLE_NS
    assert runtime_in_window >= 0.8 * split.runtime_ns, (runtime_in_window, split)


def test_a_process_without_a_runtime_is_not_registered(load_probe):
    rp = load_probe(catalog.SANDBOX)
    tracker = SandboxTracker(rp.bpf, catalog.SANDBOX_SAMPLE_NS)
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(5)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        tracker.refresh([proc.pid])
        assert tracker.pids == []
        assert len(rp.bpf[b"sandbox_code"]) == 0
    finally:
        proc.kill()
        proc.wait(10)


# A stand-in for gVisor's Sentry: a process under the names the Sentry uses
# (argv[0] and comm "runsc-sandbox") that burns CPU in two threads.
SENTRY = r'''
import ctypes, sys, threading, time
ctypes.CDLL(None).prctl(15, b"runsc-sandbox", 0, 0, 0)  # PR_SET_NAME, before the second thread inherits it
def burn():
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        pass
threading.Thread(target=burn, daemon=True).start()
print("ready", threading.get_native_id(), flush=True)
burn()
'''


def test_a_gvisor_sentry_is_found_and_all_its_time_is_sandbox(load_probe):
    rp = load_probe(catalog.SANDBOX)
    tracker = SandboxTracker(rp.bpf, catalog.SANDBOX_SAMPLE_NS)
    proc = subprocess.Popen(["bash", "-c", 'exec -a runsc-sandbox "$0" -c "$1" 6', sys.executable, SENTRY],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().split()[:1] == ["ready"]
        assert find_sentries() == [proc.pid]
        tracker.refresh([], find_sentries())
        assert tracker.pids == [proc.pid]
        cpu0 = wasm.sample(proc.pid)[0]
        before = tracker.split(proc.pid)
        time.sleep(1.5)
        after = tracker.split(proc.pid)
        cpu1 = wasm.sample(proc.pid)[0]
        events = rp.drain()
        threads = {int(t) for t in os.listdir(f"/proc/{proc.pid}/task")}
    finally:
        proc.kill()
        proc.wait(10)
    runtime = after.runtime_ns - before.runtime_ns
    assert after.kind == "gvisor" and after.guest_ns == after.other_ns == 0, after
    assert abs(runtime - (cpu1 - cpu0)) <= 0.1 * (cpu1 - cpu0) + 20e6, (runtime, cpu1 - cpu0)
    tids = {e.tid for e in events if getattr(e, "pid", None) == proc.pid and e.component == "sandbox"}
    assert len(tids) == 2, f"both Sentry threads' time is sandbox time: {tids}"
    tracker.refresh([], [])
    assert tracker.pids == [] and len(rp.bpf[b"sandbox_code"]) == 0


def test_a_perf_event_that_cannot_be_opened_leaves_the_probe_down_with_the_reason(kernel_env):
    spec = dataclasses.replace(catalog.SANDBOX, attach=(perf_event("hardware:cycles", 100_000),))
    pm = ProbeManager([spec], kernel_env.features, lambda ev: None, Stats())
    try:
        (status,) = pm.load()
        assert not status.attached
        assert "could not open perf events" in status.reason and "hardware:cycles" in status.reason
        assert "sandbox time is not measured" in status.reason
        assert pm.bpf("sandbox") is None
    finally:
        pm.shutdown()


def test_sampling_can_be_switched_off_and_on(load_probe):
    """With nothing to sample the probe's perf events are closed: no program runs at all."""
    rp = load_probe(catalog.SANDBOX)
    fd = rp.bpf.funcs[b"on_cpu_clock"].fd

    def runs() -> int:  # samples of registered processes: one per millisecond of their CPU while on
        return sum(int(v.value) for v in rp.bpf[b"sandbox_samples"].values())

    tracker = SandboxTracker(rp.bpf, catalog.SANDBOX_SAMPLE_NS)
    proc = subprocess.Popen([sys.executable, "-c", SENTRY, "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().split()[:1] == ["ready"]
        tracker.register_sentry(proc.pid)
        assert rp.manager.set_sampling("sandbox", False) is False
        n0 = runs()
        time.sleep(0.5)
        assert runs() == n0, "samples arrived with sampling off"
        assert rp.manager.set_sampling("sandbox", True) is True
        time.sleep(0.5)
        assert runs() - n0 >= 200, "a busy registered process must be sampled once sampling is back on"
        assert fd == rp.bpf.funcs[b"on_cpu_clock"].fd  # the program stayed loaded throughout
    finally:
        proc.kill()
        proc.wait(10)
