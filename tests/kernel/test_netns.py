"""The netns probe: UDP traffic between two network namespaces over a veth pair."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from typing import Iterator

import pytest

from isoscope.model import Stall
from isoscope.probes import catalog
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

ROUND_TRIPS = 50
SERVER_ADDR = "10.231.0.2"
CLIENT_ADDR = "10.231.0.1"

SERVER = r"""
import json, socket, sys, threading
n = int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9000))
print(json.dumps({"tid": threading.get_native_id()}), flush=True)
for _ in range(n):
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

CLIENT = r"""
import json, socket, sys, threading, time
addr, n = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
t0 = time.monotonic_ns()
for i in range(n):
    s.sendto(b"x" * 64, (addr, 9000))
    s.recvfrom(2048)
print(json.dumps({"tid": threading.get_native_id(), "t0": t0, "t1": time.monotonic_ns()}), flush=True)
"""


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def _ifindex(ns: str, dev: str) -> int:
    return int(_ip("-n", ns, "-o", "link", "show", dev).split(":", 1)[0])


@pytest.fixture
def veth_pair() -> Iterator[dict[str, str]]:
    tag = f"{os.getpid() % 100000}"
    names = {"ns_a": f"isons{tag}a", "ns_b": f"isons{tag}b", "dev_a": f"isova{tag}", "dev_b": f"isovb{tag}"}
    made: list[str] = []
    try:
        for ns in (names["ns_a"], names["ns_b"]):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", names["dev_a"], "netns", names["ns_a"], "type", "veth",
            "peer", "name", names["dev_b"], "netns", names["ns_b"])
        for ns, dev, addr in ((names["ns_a"], names["dev_a"], CLIENT_ADDR), (names["ns_b"], names["dev_b"], SERVER_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:  # deleting a namespace deletes the veth end inside it, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_veth_crossings_are_netns_stalls_for_both_sides(load_probe, veth_pair):
    probe = load_probe(catalog.NETNS, defines={"ISO_WATCHED_MIN_STALL_NS": 0})
    ifaces = probe.bpf["veth_ifaces"]
    # Distinct ids per end: both ends may have the same ifindex in their own namespaces.
    ids = {veth_pair["dev_a"]: 1_000_000 + _ifindex(veth_pair["ns_a"], veth_pair["dev_a"]),
           veth_pair["dev_b"]: 2_000_000 + _ifindex(veth_pair["ns_b"], veth_pair["dev_b"])}
    for dev, ident in ids.items():
        key = ifaces.Key()
        key.name = dev.encode()
        ifaces[key] = ctypes.c_uint32(ident)
    id_a, id_b = ids[veth_pair["dev_a"]], ids[veth_pair["dev_b"]]

    tag = f"isoscope-test-netns-{os.getpid()}"
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with make_cgroup(f"{tag}-a", v1_controllers=()) as cg_a, make_cgroup(f"{tag}-b", v1_controllers=()) as cg_b:
        server = cg_b.spawn(["ip", "netns", "exec", veth_pair["ns_b"], sys.executable, "-c", SERVER,
                             SERVER_ADDR, str(ROUND_TRIPS)], **pipes)
        client = cg_a.spawn(["ip", "netns", "exec", veth_pair["ns_a"], sys.executable, "-c", CLIENT,
                             SERVER_ADDR, str(ROUND_TRIPS)], **pipes)
        assert server.stdout is not None
        server_tid = json.loads(server.stdout.readline())["tid"]
        assert probe.watch.add_tgid(server.pid) and probe.watch.add_tgid(client.pid)
        out, err = client.communicate("go\n", timeout=30)
        assert client.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        server.communicate(timeout=10)

        events = probe.wait_for(lambda evs: any(isinstance(e, Stall) and e.tid == server_tid for e in evs)
                                and any(isinstance(e, Stall) and e.tid == report["tid"] for e in evs))
        stalls = [e for e in events if isinstance(e, Stall)]
        assert all(s.component == "netns" for s in stalls)
        a_to_b = [s for s in stalls if s.tid == report["tid"]]
        b_to_a = [s for s in stalls if s.tid == server_tid]
        def direction(s: Stall) -> tuple[int, int]:
            return s.details["net.ifindex"], s.details["net.peer_ifindex"]

        # A watched thread's crossings are summed into bursts (one record per
        # ISO_NETNS_BURST_NS of crossing time), both ways. Packets the kernel itself
        # answers in softirq (the ARP reply from B) are charged to the task that was
        # current, here the client, hence the subset instead of equality.
        assert any(direction(s) == (id_a, id_b) for s in a_to_b)
        assert any(direction(s) == (id_b, id_a) for s in b_to_a)
        assert {direction(s) for s in stalls} <= {(id_a, id_b), (id_b, id_a)}
        assert {(s.pid, s.cgroup_id) for s in a_to_b} == {(client.pid, cg_a.id)}
        assert {(s.pid, s.cgroup_id) for s in b_to_a} == {(server.pid, cg_b.id)}
        for s in a_to_b:
            assert report["t0"] <= s.start_mono_ns <= s.end_mono_ns <= report["t1"]
            assert 0 < s.duration_ns < 50_000_000

        # Per-cgroup histograms count both sides.
        hist = probe.bpf["hist"]
        per_side = {(k.cgroup_id, k.class_id): 0 for k in hist.keys()}
        for k, v in hist.items():
            per_side[(k.cgroup_id, k.class_id)] += v.value
        assert per_side.get((cg_a.id, id_a), 0) >= ROUND_TRIPS
        assert per_side.get((cg_b.id, id_b), 0) >= ROUND_TRIPS
        # The records hold all of the client's crossing time but its last, still open burst.
        totals = {(k.cgroup_id, k.class_id): v for k, v in probe.bpf["totals"].items()}
        recorded = sum(s.duration_ns for s in a_to_b if direction(s) == (id_a, id_b))
        assert 0 <= totals[(cg_a.id, id_a)].sum_ns - recorded < 50_000 + max(s.duration_ns for s in a_to_b)
    assert probe.manager.check_losses()["netns"] == 0
