"""A real wasmtime workload is detected as L-4 wasmtime and measured at process level.

(Its split into guest code and host calls is tested with the ``sandbox`` probe
in ``test_sandbox_probe.py``.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from isoscope.host import wasm

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

