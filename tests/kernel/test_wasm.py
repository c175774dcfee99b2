"""A real wasmtime workload is detected as L-4 wasmtime and measured, its CPU split into guest and host time.

The split comes from the ``wasm`` probe (cpu-clock samples classified by the
instruction pointer); its oracle is the workload threads' own on-CPU time from
``schedstat``, and two workloads whose split is known by construction: a pure
guest loop, and a guest loop of WASI ``fd_write`` host calls.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import time

import pytest

from collector import wasm
from collector.probes import catalog
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

# A WASM module that spins in a loop for a bounded number of iterations, called
# repeatedly from Python, for at most ``seconds``.
WORKLOAD = r'''
import sys, time, wasmtime
seconds = float(sys.argv[1])
wat = """(module (func (export "spin") (param i32) (result i32) (local i32)
  (loop $l (local.set 1 (i32.add (local.get 1) (i32.const 1)))
    (br_if $l (i32.lt_u (local.get 1) (local.get 0)))) (local.get 1)))"""
store = wasmtime.Store()
inst = wasmtime.Instance(store, wasmtime.Module(store.engine, wat), [])
spin = inst.exports(store)["spin"]
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    spin(store, 2_000_000)
'''

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


def test_wasmtime_workload_detected_and_measured():
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        found = {w.pid: w for w in wasm.find_wasm_processes()}
        assert proc.pid in found
        w = found[proc.pid]
        assert w.runtime == "wasmtime" and w.library.endswith("_libwasmtime.so")
        assert w.stack.sandbox == "wasmtime" and "L-4" in w.stack.layers
        usage = wasm.measure(proc.pid, interval_s=1.0)
        # a busy single-threaded loop: mostly on CPU (2 shared cores, so not all of it)
        assert usage.on_cpu_ns > 0.3e9, usage
        assert usage.cpu_share <= usage.threads + 0.05
    finally:
        proc.kill()
        proc.wait(10)


def test_plain_python_is_not_wasm():
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(5)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert proc.pid not in {w.pid for w in wasm.find_wasm_processes()}
        idle = wasm.measure(proc.pid, interval_s=0.3)
        assert idle.on_cpu_ns < 0.05e9
    finally:
        proc.kill()
        proc.wait(10)


def _start(script: str, seconds: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    words = proc.stdout.readline().split()
    assert words[:1] == ["ready"], words
    return proc, int(words[1]) if len(words) > 1 else proc.pid


def _sampled(load_probe, script: str) -> tuple[wasm.WasmSplit, int, list, int]:
    """Run ``script`` for a while with the probe on: (split, schedstat on-CPU ns, sandbox stalls, tid)."""
    rp = load_probe(catalog.WASM)
    tracker = wasm.WasmTracker(rp.bpf, catalog.WASM_SAMPLE_NS)
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
    finally:
        proc.kill()
        proc.wait(10)
    tracker.refresh([])
    assert tracker.pids == [] and tracker.split(proc.pid).total_ns == 0, "an exited process left map entries"
    split = wasm.WasmSplit(proc.pid, after.guest_ns - before.guest_ns, after.runtime_ns - before.runtime_ns,
                           after.other_ns - before.other_ns)
    stalls = [e for e in events if getattr(e, "pid", None) == proc.pid]
    return split, cpu1 - cpu0, stalls, tid


def test_map_layouts_match_the_header(load_probe):
    rp = load_probe(catalog.WASM)
    assert ctypes.sizeof(rp.bpf[b"wasm_code"].Leaf) == 528  # ISO_WASM_CODE_SIZE
    assert ctypes.sizeof(rp.bpf[b"wasm_samples"].Key) == 8  # ISO_WASM_KEY_SIZE
    assert len(rp.bpf[b"wasm_code"].Leaf().guest) == wasm.MAX_RANGES


def test_guest_loop_is_sampled_as_guest_code(load_probe):
    split, oncpu, stalls, _tid = _sampled(load_probe, WORKLOAD)
    # Every sample is 1 ms of CPU: the samples add up to the threads' own on-CPU time.
    assert abs(split.total_ns - oncpu) <= 0.1 * oncpu + 20e6, (split, oncpu)
    assert split.guest_ns >= 0.8 * split.total_ns, split
    assert split.runtime_ns <= 0.05 * split.total_ns, split
    assert len(stalls) * catalog.WASM_SAMPLE_NS <= split.runtime_ns + 20e6


def test_wasi_host_calls_are_sampled_as_runtime_and_become_sandbox_stalls(load_probe):
    split, oncpu, stalls, tid = _sampled(load_probe, WASI_WORKLOAD)
    assert abs(split.total_ns - oncpu) <= 0.1 * oncpu + 20e6, (split, oncpu)
    # fd_write runs in the runtime library (and in libc/the kernel under it): host time dominates.
    assert split.guest_ns <= 0.15 * split.total_ns, split
    assert split.runtime_ns >= 0.3 * split.total_ns, split
    # Runtime samples cross as one-period sandbox stalls of the calling thread.
    assert stalls and all(s.component == "sandbox" and s.tid == tid for s in stalls), stalls[:3]
    assert all(s.end_mono_ns - s.start_mono_ns == catalog.WASM_SAMPLE_NS for s in stalls)
    runtime_in_window = len(stalls) * catalog.WASM_SAMPLE_NS
    assert runtime_in_window >= 0.8 * split.runtime_ns, (runtime_in_window, split)


def test_a_process_without_a_runtime_is_not_registered(load_probe):
    rp = load_probe(catalog.WASM)
    tracker = wasm.WasmTracker(rp.bpf, catalog.WASM_SAMPLE_NS)
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(5)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        tracker.refresh([proc.pid])
        assert tracker.pids == []
        assert len(rp.bpf[b"wasm_code"]) == 0
    finally:
        proc.kill()
        proc.wait(10)
