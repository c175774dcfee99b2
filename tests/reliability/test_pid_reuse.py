"""PID reuse: a new process that gets a dead sender's pid must not inherit its metadata.

Rather than lowering the host's ``pid_max`` (global: every process on the
machine would feel it) and forking tens of thousands of processes to wrap it,
the reuse is made to happen on purpose: ``/proc/sys/kernel/ns_last_pid`` is
set so the next fork gets the dead process's pid (retrying when another
process on the machine forks first). This is the exact situation a wrap
produces, reached in milliseconds. Process A (in a ``docker-…`` cgroup) and
process B (same pid, in a ``crio-…`` cgroup) each send a span; each must be
enriched with its own runtime.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cgroup_helpers import cgroup_factory  # noqa: F401 - fixture
from tests.otlp_backend import span_hex
from tests.reliability.clients import wait_until

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"

SENDER = textwrap.dedent("""
    import os, sys, time
    import grpc
    from tests.otlp_backend import make_request
    sys.stdin.readline()                      # wait until the test has checked our pid
    req = make_request([int(sys.argv[2])], service="pid-reuse")
    kv = req.resource_spans[0].resource.attributes.add()
    kv.key, kv.value.int_value = "process.pid", os.getpid()
    span = req.resource_spans[0].scope_spans[0].spans[0]
    span.start_time_unix_nano = time.time_ns() - 20_000_000
    span.end_time_unix_nano = time.time_ns()
    ch = grpc.insecure_channel(sys.argv[1])
    call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                          request_serializer=None, response_deserializer=None)
    call(req.SerializeToString(), timeout=10)
    print("sent", flush=True)
""")


def _spawn_sender(cg, endpoint: str, span_id: int, want_pid: int | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [sys.executable, "-c", SENDER, endpoint, str(span_id)]
    for _attempt in range(50):
        if want_pid is not None:
            with open(NS_LAST_PID, "w") as f:
                f.write(str(want_pid - 1))
        proc = cg.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(REPO_ROOT), text=True)
        if want_pid is None or proc.pid == want_pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"could not get pid {want_pid} back after 50 tries")


def _runtime(backend, span_id: int) -> str | None:
    for r in backend.requests:
        for rs in r.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    if s.span_id.hex() == span_hex(span_id):
                        for kv in s.attributes:
                            if kv.key == "isolation.runtime":
                                return kv.value.string_value
                        return None
    return None


def test_reused_pid_gets_fresh_metadata(daemon_factory, backend, cgroup_factory):
    d = daemon_factory("pidreuse", probes=True, forward=[backend.grpc_url])
    tag = f"{os.getpid():08x}"
    cg_a = cgroup_factory(f"isoscope-rel-pid/docker-{tag * 8}.scope", v1_controllers=())
    cg_b = cgroup_factory(f"isoscope-rel-pid/crio-{tag[::-1] * 8}.scope", v1_controllers=())

    a = _spawn_sender(cg_a, d.grpc_endpoint, 1, None)
    a.stdin.write("go\n")
    a.stdin.flush()
    assert a.stdout.readline().strip() == "sent"
    pid = a.pid
    a.wait(10)
    assert backend.wait_for_spans(1, 15), d.log_tail()
    assert _runtime(backend, 1) == "docker"

    b = _spawn_sender(cg_b, d.grpc_endpoint, 2, pid)
    try:
        assert b.pid == pid
        b.stdin.write("go\n")
        b.stdin.flush()
        assert b.stdout.readline().strip() == "sent"
    finally:
        b.wait(10)
    assert wait_until(lambda: _runtime(backend, 2) is not None, 15), d.log_tail()
    assert _runtime(backend, 2) == "cri-o", "the new process with the reused pid got the old one's metadata"
