"""Spans of a pod whose workload runs inside a VM (Kata-style: the VMM sits in the pod's cgroup) join at VM scope."""

from __future__ import annotations

import uuid

import pytest

from isoscope.metadata.resolver import WorkloadResolver
from isoscope.host.stack import detect_host_stack
from isoscope.host.vms import VmRegistry
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_kvm import run_guest

pytestmark = pytest.mark.kernel


def test_pod_span_resolves_to_the_vmm_in_that_pod() -> None:
    pod_uid = str(uuid.uuid4())
    cid = uuid.uuid4().hex + uuid.uuid4().hex
    cg = make_cgroup(f"kubepods/burstable/pod{pod_uid}/{cid}")
    try:
        with run_guest(count=5, hold_s=20) as guest:
            cg.add(guest.proc.pid)
            host = detect_host_stack()
            vms = VmRegistry()
            found = {vm.pid: vm for vm in vms.refresh()}
            assert guest.proc.pid in found, found
            assert found[guest.proc.pid].pod_uid == pod_uid
            resolver = WorkloadResolver(host_stack=host, vms=vms)
            # Named by a trusted relay (an agent authenticated by the receiver): no socket owner to check.
            wl = resolver.resolve({"k8s.pod.uid": pod_uid, "service.name": "in-vm"}, None, 0, relay=True)
            assert wl is not None
            assert wl.scope == "process" and wl.pid == guest.proc.pid
            assert wl.stack is not None and wl.stack.hypervisor in ("kvm", "firecracker")
            assert {"L-1", "L-2", "L-3"} <= set(wl.stack.layers)
            # a pod with no VMM is not mistaken for one
            assert resolver.resolve({"k8s.pod.uid": str(uuid.uuid4())}, None, 0, relay=True) is None
            # an unproven sender names nothing
            assert resolver.resolve({"k8s.pod.uid": pod_uid}, None, 0) is None
    finally:
        cg.remove()
