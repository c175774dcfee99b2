"""Spans of a WASM workload carry its sandbox time: WASI host calls are l4.sandbox, guest code is not.

A real wasmtime embedding (the ``wasmtime`` package) instrumented with the
OpenTelemetry SDK sends its spans to a real ``isoscope run`` with its probes.
Each span wraps either a loop of WASI ``environ_sizes_get`` host calls (all
runtime code, no system call) or a pure guest loop, and carries its thread's own CPU time (``CLOCK_THREAD_CPUTIME_ID``) as the oracle:
the sandbox time the daemon attributes can never exceed it, is a large share
of it for host calls and next to nothing for guest code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from isoscope_lab.launcher import IsoscopeDaemon
from tests.e2e.spans import attributes, received_spans
from tests.otlp_backend import OtlpBackend

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

SPANS_PER_KIND = 6

SENDER = r'''
import os, sys, threading, time, wasmtime
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from isoscope.instrumentation import ThreadIdSpanProcessor

endpoint, per_kind = sys.argv[1], int(sys.argv[2])
wat = """(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "calls") (param i32)
    (loop $l
      (drop (call $env_sizes (i32.const 0) (i32.const 8)))
      (local.set 0 (i32.sub (local.get 0) (i32.const 1)))
      (br_if $l (i32.gt_s (local.get 0) (i32.const 0)))))
  (func (export "spin") (param i32) (result i32) (local i32)
    (loop $s (local.set 1 (i32.add (local.get 1) (i32.const 1)))
      (br_if $s (i32.lt_u (local.get 1) (local.get 0)))) (local.get 1)))"""
engine = wasmtime.Engine()
store = wasmtime.Store(engine)
store.set_wasi(wasmtime.WasiConfig())
linker = wasmtime.Linker(engine)
linker.define_wasi()
exports = linker.instantiate(store, wasmtime.Module(engine, wat)).exports(store)
calls, spin = exports["calls"], exports["spin"]

provider = TracerProvider(resource=Resource.create({"service.name": "e2e-wasm", "process.pid": os.getpid()}))
provider.add_span_processor(ThreadIdSpanProcessor())
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
tracer = provider.get_tracer("e2e-wasm")
with tracer.start_as_current_span("warm-up"):  # the first span makes the daemon watch this process
    calls(store, 100)
print("ready", os.getpid(), flush=True)
sys.stdin.readline()  # the test waits until the daemon samples this process
for i in range(per_kind):
    for kind in ("wasi", "guest"):
        with tracer.start_as_current_span(f"{kind}-{i}") as span:
            before = time.thread_time_ns()
            if kind == "wasi":
                calls(store, 600000)
            else:
                spin(store, 60_000_000)
            span.set_attribute("test.truth.oncpu_ns", time.thread_time_ns() - before)
            span.set_attribute("test.kind", kind)
provider.shutdown()
print("done", flush=True)
'''


def _wasm_spans(backend: OtlpBackend) -> list[dict[str, Any]]:
    out = []
    for res, span in received_spans(backend.requests).values():
        if res.get("service.name") == "e2e-wasm" and span.name.startswith(("wasi-", "guest-")):
            attrs = attributes(span.attributes)
            attrs["duration_ns"] = span.end_time_unix_nano - span.start_time_unix_nano
            out.append(attrs)
    return out


def test_wasi_host_calls_are_blamed_on_the_sandbox_and_guest_code_is_not(
        daemon: IsoscopeDaemon, backend: OtlpBackend) -> None:
    status = {p["name"]: p for p in daemon.status()["probes"]}
    assert status["sandbox"]["attached"], status["sandbox"]
    proc = subprocess.Popen([sys.executable, "-c", SENDER, daemon.grpc_endpoint, str(SPANS_PER_KIND)], cwd=REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        words = proc.stdout.readline().split()
        assert words[:1] == ["ready"], (words, proc.stderr.read() if proc.poll() is not None else "")
        pid = int(words[1])
        deadline = time.monotonic() + 15
        while not any(w["pid"] == pid for w in daemon.status()["runtimes"].get("sandbox", [])):
            assert time.monotonic() < deadline, f"the daemon never sampled the wasmtime process: {daemon.status()}"
            time.sleep(0.2)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "done" in out, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 20
    while len(spans := _wasm_spans(backend)) < 2 * SPANS_PER_KIND and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(spans) == 2 * SPANS_PER_KIND, f"got {len(spans)} spans"
    children = [res_span[1] for res_span in received_spans(backend.requests).values()
                if res_span[1].name == "isolation L-4 sandbox"]
    # Samples form one child per stretch of host calls, not one per millisecond.
    assert children and len(children) <= SPANS_PER_KIND * 3, len(children)
    for s in spans:
        assert s.get("isolation.runtime") == "wasmtime", s
        assert s.get("isolation.scope") == "thread", s
        assert "L-4" in s.get("isolation.stack", []), s
        sandbox, oncpu = s.get("isolation.l4.sandbox.ns", 0), s["test.truth.oncpu_ns"]
        # 1 ms samples: the sandbox time is at most the thread's CPU time, give or take one sample per edge.
        assert sandbox <= oncpu + 2_000_000, s
        if s["test.kind"] == "wasi":
            assert sandbox >= 0.5 * oncpu, s
            assert s.get("isolation.blame") == "l4.sandbox", s
        else:
            assert sandbox <= 0.05 * oncpu + 2_000_000, s
            assert s.get("isolation.blame") != "l4.sandbox", s
    sandbox_total = daemon.metric("isoscope_layer_stall_seconds_total", layer="L-4", component="sandbox")
    assert sandbox_total > 0, "sandbox time missing from isoscope_layer_stall_seconds_total"
