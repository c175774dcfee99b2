"""The lab itself: real namespaces, cgroups, trace propagation, per-span truth, serving shapes, the relay, cleanup.

These run without the daemon (spans go to a recording OTLP backend), so the
lab can be trusted before it is used to judge the daemon.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from isoscope.host.cgroupfs import parse_cgroup_path, read_proc_cgroups
from isoscope_lab import Chain, Fault, HopSpec, LabError, send_load
from isoscope_lab import truth as T
from isoscope_lab.truth import read_cpu_stat
from isoscope.otlpjson import encode_request
from isoscope.report import build_traces, parse_lines
from tests.otlp_backend import OtlpBackend

pytestmark = pytest.mark.kernel


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _service_pid(chain: Chain, i: int) -> int:
    hop = chain.hops[i]
    pids = [p for p in hop.cgroup.pids() if hop.proc is not None and p != hop.proc.pid]
    assert len(pids) == 1, pids
    return pids[0]


def _lab_leftovers(tag: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return ([line for line in out.splitlines() if tag in line]
            + [line for line in links.splitlines() if f"il{tag}" in line])


def test_chain_services_are_isolated_traced_and_carry_their_truth() -> None:
    with OtlpBackend(grpc_enabled=False) as backend:
        hops = [HopSpec(), HopSpec([Fault("cpu_throttle", quota_pct=20)], work_ms=10)]
        chain = Chain(hops, otlp_endpoint=backend.http_url + "/v1/traces", service_prefix="lab-hop")
        with chain:
            pids = [_service_pid(chain, i) for i in range(2)]
            for kind in ("net", "pid", "mnt", "uts"):
                seen = {_ns("self", kind), *(_ns(p, kind) for p in pids)}
                assert len(seen) == 3, f"{kind} namespaces not distinct: {seen}"
            cgroups = [read_proc_cgroups(p) for p in pids]
            assert cgroups[0][""] != cgroups[1][""], "hops share a v2 cgroup"
            for hop, c in zip(chain.hops, cgroups):
                # Laid out as a pod's container: the daemon reads the same identity from it.
                ident = parse_cgroup_path(c[""])
                assert (ident.pod_uid, ident.container_id) == (hop.pod_uid, hop.container_id), c[""]
            hostname = subprocess.run(["nsenter", "-t", str(pids[1]), "-u", "hostname"], capture_output=True,
                                      text=True, check=True).stdout.strip()
            assert hostname == "lab-hop1"
            before = read_cpu_stat(chain.hops[1].cgroup.cpu_dir)
            load = send_load(chain.entry_url, 3.0)
            after = read_cpu_stat(chain.hops[1].cgroup.cpu_dir)
            tag = chain.tag
        assert load.requests > 5 and load.errors == 0
        assert backend.wait_for_spans(2 * load.requests, timeout_s=15)
        spans = parse_lines([encode_request(r) for r in backend.requests])
    assert not _lab_leftovers(tag), "namespaces or veths left behind"
    for p in pids:
        assert not os.path.exists(f"/proc/{p}"), f"service {p} still running"
    traces = build_traces(spans)
    assert len(traces) == load.requests
    for t in traces:
        assert [h.service for h in t.hops] == ["lab-hop0", "lab-hop1"]
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.service == "lab-hop1":
            assert by_id[s.parent_span_id].service == "lab-hop0", "traceparent not propagated over the veth"
        assert s.resource["process.pid"] == 1, "a service is PID 1 of its own PID namespace"
        assert isinstance(s.attrs["thread.id"], int)
        assert s.attrs[T.RUNQUEUE] + s.attrs[T.THROTTLE] == s.attrs[T.RUN_DELAY]
    clean = [s for s in spans if s.service == "lab-hop0"]
    throttled = [s for s in spans if s.service == "lab-hop1"]
    assert {s.attrs[T.FAULT] for s in clean} == {"none"}
    assert {s.attrs[T.FAULT] for s in throttled} == {"cpu_throttle"}
    assert all(s.attrs[T.THROTTLE] == 0 for s in clean), "an unlimited cgroup was throttled"
    assert all(s.attrs[T.ONCPU] >= 9_000_000 for s in throttled), "the hop did not burn its CPU"
    # 10 ms of CPU per request against 20 ms per 100 ms: the group is throttled, and the
    # per-request oracle accounts for the group's throttled time (one request at a time;
    # the exporter thread, also in the group, may take a little of it).
    group_ns = after.throttled_ns - before.throttled_ns
    spans_ns = sum(s.attrs[T.THROTTLE] for s in throttled)
    assert after.nr_throttled > before.nr_throttled and group_ns > 0
    assert 0.6 * group_ns <= spans_ns <= 1.05 * group_ns + 2_000_000, (
        f"spans' throttle truth {spans_ns / 1e6:.1f} ms vs the group's {group_ns / 1e6:.1f} ms")
    assert sum(1 for s in throttled if s.attrs[T.THROTTLE] > 0) >= 0.3 * len(throttled)


def test_virtio_truth_times_the_direct_reads() -> None:
    with OtlpBackend(grpc_enabled=False) as backend:
        with Chain([HopSpec([Fault("virtio_io", io_reads=64, io_file_mb=64)], work_ms=1)],
                   otlp_endpoint=backend.http_url + "/v1/traces") as chain:
            load = send_load(chain.entry_url, 2.0)
        assert backend.wait_for_spans(load.requests, timeout_s=15)
        spans = parse_lines([encode_request(r) for r in backend.requests])
    assert spans and all(0 < s.attrs[T.IO] < s.duration_ns for s in spans)


def test_a_hop_that_cannot_start_leaves_nothing_behind() -> None:
    chain = Chain([HopSpec(), HopSpec(cpus={4096})], otlp_endpoint="http://127.0.0.1:9/v1/traces")
    with pytest.raises(LabError, match="hop1"):
        with chain:
            pass
    assert not _lab_leftovers(chain.tag)
    assert not any(os.path.exists(h.cgroup.v2_path) for h in chain.hops)
    assert not os.path.exists(chain.workdir)


def test_unknown_fault_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("bogus")


def _threads(spans: list, service: str) -> set[int]:
    return {s.attrs["thread.id"] for s in spans if s.service == service}


def test_field_path_through_the_relay_with_pool_asyncio_and_no_thread_id() -> None:
    # The services export from their own network namespaces to their node address,
    # where the relay listens; it tags each request with the sender's pod by its source
    # address and forwards to the backend.
    hops = [HopSpec(server="asyncio"), HopSpec(server="pool", workers=4), HopSpec(thread_id=False)]
    with OtlpBackend(grpc_enabled=False) as backend:
        chain = Chain(hops, otlp_endpoint=backend.http_url + "/v1/traces", service_prefix="relay-hop", relay=True)
        with chain:
            assert chain.relay_proc is not None
            assert open(f"/proc/{chain.relay_proc.pid}/comm").read().strip() == "isoscope-relay"
            assert read_proc_cgroups(chain.relay_proc.pid)[""] == chain.relay_cgroup.path
            endpoints = [chain.endpoint_of(h) for h in chain.hops]
            load = send_load(chain.entry_url, 3.0)
            pods = {h.name: h.pod_uid for h in chain.hops}
        assert load.requests > 5 and load.errors == 0
        assert backend.wait_for_spans(3 * load.requests, timeout_s=15)
        spans = parse_lines([encode_request(r) for r in backend.requests])
    for hop, url in zip(chain.hops, endpoints):
        assert url == f"http://{hop.node_ip}:{chain.relay_port}/v1/traces"
    assert len(build_traces(spans)) == load.requests
    for s in spans:
        assert s.resource["k8s.pod.uid"] == pods[s.service], "the relay tagged the wrong pod"
        assert s.resource["process.pid"] == 1
    assert len(_threads(spans, "relay-hop0")) == 1, "an asyncio service handles every request on its loop thread"
    assert len(_threads(spans, "relay-hop1")) == 4, "the pool's four workers take turns"
    assert all("thread.id" not in s.attrs for s in spans if s.service == "relay-hop2")
