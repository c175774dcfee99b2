"""isoscope.host.cgroupfs against real cgroups, namespaces and processes (and documented formats)."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from isoscope.host.cgroupfs import (
    CgroupIdCache, cgroup_id, cgroup_path_by_id, cgroup_v2_root, ns_inodes, nspid,
    parse_cgroup_path, read_cpu_quota, read_cpu_stat, read_proc_cgroups,
)
from tests.cgroup_helpers import cgroup_factory, make_cgroup  # noqa: F401 - fixture

CID = "3f1a" + "0123456789abcdef" * 3 + "cdef0123456789ab"[:12]
POD = "9d3c6b1e-2f4a-4c7b-8e5d-1a2b3c4d5e6f"
POD_US = POD.replace("-", "_")


def _wait_children(pid: int, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            kids = []
        if kids:
            return kids
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} has no children")


# ---------------------------------------------------------------------------
# parse_cgroup_path: the layouts each runtime writes
# ---------------------------------------------------------------------------

PARSE_CASES = [
    (f"/system.slice/docker-{CID}.scope", "docker", CID, "", ""),
    (f"/docker/{CID}", "docker", CID, "", ""),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/cri-containerd-{CID}.scope",
     "containerd", CID, POD, "burstable"),
    (f"/kubepods.slice/kubepods-pod{POD_US}.slice/cri-containerd-{CID}.scope", "containerd", CID, POD, "guaranteed"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/containerd-{CID}.scope",
     "containerd", CID, POD, "burstable"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US.upper()}.slice/cri-containerd-{CID}.scope",
     "containerd", CID, POD, "burstable"),  # upper-case UID: reported in canonical lower case
    (f"/kubepods/besteffort/pod{POD}/{CID}", "containerd", CID, POD, "besteffort"),
    (f"/kubepods/burstable/pod{POD}/{CID}", "containerd", CID, POD, "burstable"),
    (f"/kubepods/pod{POD}/{CID}", "containerd", CID, POD, "guaranteed"),
    (f"/kubepods/pod{POD}/crio-{CID}", "cri-o", CID, POD, "guaranteed"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_US}.slice/crio-{CID}.scope",
     "cri-o", CID, POD, "besteffort"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_US}.slice/crio-conmon-{CID}.scope",
     "cri-o", CID, POD, "besteffort"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice/docker-{CID}.scope",
     "docker", CID, POD, "burstable"),  # cri-dockerd
    (f"/machine.slice/libpod-{CID}.scope", "podman", CID, "", ""),
    (f"/machine.slice/libpod-{CID}.scope/container", "podman", CID, "", ""),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope", "podman", CID, "", ""),
    (f"/machine.slice/libpod-conmon-{CID}.scope", "podman", CID, "", ""),
    (f"/libpod_parent/libpod-{CID}", "podman", CID, "", ""),
    (f"/system.slice/nerdctl-{CID}.scope", "containerd", CID, "", ""),
    ("/system.slice/nginx.service", "systemd", "", "", ""),
    ("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service", "systemd", "", "", ""),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_US}.slice", "none", "", POD, "burstable"),
    ("/", "none", "", "", ""),
    ("/init.scope", "none", "", "", ""),
    ("/user.slice/user-1000.slice/session-3.scope", "none", "", "", ""),
    ("/docker/notanid", "none", "", "", ""),
    ("/system.slice/docker-short.scope", "none", "", "", ""),
]


@pytest.mark.parametrize("path,runtime,cid,pod,qos", PARSE_CASES, ids=range(len(PARSE_CASES)))
def test_parse_cgroup_path(path, runtime, cid, pod, qos):
    info = parse_cgroup_path(path)
    assert (info.path, info.runtime, info.container_id, info.pod_uid, info.qos_class) == (path, runtime, cid, pod, qos)


# ---------------------------------------------------------------------------
# /proc/<pid>/cgroup, v2 root, ids
# ---------------------------------------------------------------------------

def test_v2_root_here_is_unified_hybrid():
    assert cgroup_v2_root() == "/sys/fs/cgroup/unified"
    assert os.path.isfile("/sys/fs/cgroup/unified/cgroup.procs")


@pytest.mark.parametrize("mountinfo,expected", [
    ("25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n",
     "/sys/fs/cgroup"),
    ("31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
     "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
     "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n", "/sys/fs/cgroup/unified"),
    # A container's own namespaced view mounted elsewhere loses to the root view.
    ("50 1 0:38 /kubepods.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
     "51 1 0:38 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "/host/sys/fs/cgroup"),
    ("60 1 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n", "/mnt/with space"),
    ("32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n", None),
])
def test_v2_root_from_mountinfo(tmp_path, mountinfo, expected):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(mountinfo)
    assert cgroup_v2_root(str(tmp_path)) == expected


def test_read_proc_cgroups_of_real_process(cgroup_factory):
    name = f"system.slice/docker-{secrets.token_hex(32)}.scope"
    cg = cgroup_factory(name, v1_controllers=("cpu", "memory"))
    proc = cg.spawn(["sleep", "10"])
    groups = read_proc_cgroups(proc.pid)
    assert groups[""] == cg.path == "/" + name
    assert groups["cpu"] == cg.path and groups["memory"] == cg.path
    assert "name=systemd" in groups  # named hierarchies keep their prefix
    assert proc.pid in cg.pids()


def test_read_proc_cgroups_comounted_and_missing(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text("4:cpu,cpuacct:/a\n1:name=systemd:/b\n0::/c\n")
    assert read_proc_cgroups(7, str(tmp_path)) == {"cpu": "/a", "cpuacct": "/a", "name=systemd": "/b", "": "/c"}
    assert read_proc_cgroups(8, str(tmp_path)) == {}


def test_cgroup_id_roundtrip_on_real_cgroups(cgroup_factory):
    root = cgroup_v2_root()
    a = cgroup_factory(f"isoscope-test-{secrets.token_hex(4)}/a", v1_controllers=())
    b = cgroup_factory(f"isoscope-test-{secrets.token_hex(4)}/b", v1_controllers=())
    assert cgroup_id(a.path, root) == a.id != b.id == cgroup_id(b.path, root)
    assert cgroup_id("/", root) == os.stat(root).st_ino
    assert cgroup_path_by_id(a.id, root) == a.path
    assert cgroup_path_by_id(b.id, root) == b.path
    assert cgroup_path_by_id(os.stat(root).st_ino, root) == "/"


def test_id_cache_sees_new_cgroups_and_forgets_removed_ones():
    root = cgroup_v2_root()
    cache = CgroupIdCache(root, negative_ttl_s=0.0)
    with make_cgroup(f"isoscope-test-{secrets.token_hex(4)}", v1_controllers=()) as cg:
        gone_id = cg.id
        assert cache.lookup(gone_id) == cg.path
    assert not os.path.exists(cg.v2_path)
    assert cache.lookup(gone_id) is None
    with make_cgroup(f"isoscope-test-{secrets.token_hex(4)}", v1_controllers=()) as cg2:
        assert cache.lookup(cg2.id) == cg2.path  # a miss triggers a fresh walk


class _CountingCache(CgroupIdCache):
    walks = 0

    def _walk(self):
        self.walks += 1
        return super()._walk()


def test_negative_cache_suppresses_rewalks(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    y = os.stat(tmp_path / "x" / "y").st_ino
    cache = _CountingCache(str(tmp_path), negative_ttl_s=60.0)
    assert cache.lookup(y) == "/x/y"
    assert cache.lookup(y) == "/x/y" and cache.walks == 1  # hit: no walk
    assert cache.lookup(1) is None and cache.lookup(1) is None
    assert cache.walks == 2  # the second miss is answered from the negative cache
    eager = _CountingCache(str(tmp_path), negative_ttl_s=0.0)
    eager.lookup(1)
    eager.lookup(1)
    assert eager.walks == 2


# ---------------------------------------------------------------------------
# cpu.stat and quota
# ---------------------------------------------------------------------------

BURN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def test_v1_cpu_throttling_is_read_in_ns(cgroup_factory):
    cg = cgroup_factory(f"isoscope-test-{secrets.token_hex(4)}", v1_controllers=("cpu",),
                        cpu_quota_us=10_000, cpu_period_us=100_000)
    before = read_cpu_stat(cg.v1_paths["cpu"])
    assert before["nr_throttled"] == 0 and before["throttled_ns"] == 0
    cg.spawn(["python3", "-c", BURN.format(s=0.6)]).wait(timeout=30)
    after = read_cpu_stat("/" + cg.name, root="/sys/fs/cgroup/cpu")
    assert after["nr_periods"] >= 3
    assert after["nr_throttled"] >= 2
    # Each throttled period holds the task back for most of the 100 ms period.
    assert after["throttled_ns"] >= after["nr_throttled"] * 10_000_000
    assert read_cpu_quota(cg.v1_paths["cpu"]) == (10_000, 100_000)


def test_v2_cpu_stat_root_has_usage():
    stat = read_cpu_stat("/", root=cgroup_v2_root())
    assert stat["usage_ns"] > 0 and stat["usage_ns"] % 1000 == 0
    assert stat["throttled_ns"] == 0


def test_v2_cpu_stat_format_normalised(tmp_path):
    # Documentation/admin-guide/cgroup-v2.rst, "cpu.stat".
    (tmp_path / "cpu.stat").write_text(
        "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\ncore_sched.force_idle_usec 0\n"
        "nr_periods 40\nnr_throttled 7\nthrottled_usec 123456\nnr_bursts 1\nburst_usec 20\n")
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    stat = read_cpu_stat(str(tmp_path))
    assert stat == {"nr_periods": 40, "nr_throttled": 7, "throttled_ns": 123_456_000, "usage_ns": 1_500_000,
                    "user_ns": 1_000_000, "system_ns": 500_000, "burst_ns": 20_000, "nr_bursts": 1}
    assert read_cpu_quota(str(tmp_path)) == (50_000, 100_000)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert read_cpu_quota(str(tmp_path)) == (None, 100_000)


def test_cpu_stat_missing_raises(tmp_path):
    with pytest.raises(OSError):
        read_cpu_stat(str(tmp_path))


# ---------------------------------------------------------------------------
# Namespaces and pid translation
# ---------------------------------------------------------------------------

def test_ns_inodes_match_stat_and_differ_after_unshare():
    proc = subprocess.Popen(["unshare", "--net", "--uts", "sleep", "10"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)
        mine, theirs = ns_inodes("self"), ns_inodes(proc.pid)
        for kind in ("net", "uts", "pid", "mnt"):
            assert theirs[kind] == os.stat(f"/proc/{proc.pid}/ns/{kind}").st_ino
        assert theirs["net"] != mine["net"] and theirs["uts"] != mine["uts"]
        assert theirs["pid"] == mine["pid"] and theirs["mnt"] == mine["mnt"]
    finally:
        proc.kill()
        proc.wait()
    assert ns_inodes(proc.pid) == {}


def test_nspid_in_a_real_pid_namespace():
    script = "sleep 20 & sleep 20 & echo started; wait"
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert outer.stdout.readline().strip() == "started"
        (init,) = _wait_children(outer.pid)
        sleeps = sorted(_wait_children(init))
        assert len(sleeps) == 2
        assert nspid(init) == [init, 1]
        inner = {s: nspid(s)[-1] for s in sleeps}
        assert sorted(inner.values()) == [2, 3]
        for host_pid, ns_pid in inner.items():
            assert nspid(host_pid) == [host_pid, ns_pid]
    finally:
        outer.kill()
        outer.wait()


def test_nspid_in_the_initial_namespace_is_the_pid_alone():
    me = os.getpid()
    assert nspid(me) == [me]


# ---------------------------------------------------------------------------
# The helper itself
# ---------------------------------------------------------------------------

def test_helper_removes_everything_it_created_even_with_added_processes():
    top = f"isoscope-test-{secrets.token_hex(4)}"
    proc = subprocess.Popen(["sleep", "10"])
    original = read_proc_cgroups(proc.pid)
    try:
        with make_cgroup(f"{top}/kubepods/pod{uuid.uuid4()}/{secrets.token_hex(32)}",
                         v1_controllers=("cpu", "memory"), cpu_quota_us=50_000, memory_limit=64 << 20) as cg:
            cg.add(proc.pid)
            spawned = cg.spawn(["sleep", "10"])
            assert sorted(cg.pids()) == sorted([proc.pid, spawned.pid])
            assert read_cpu_quota(cg.v1_paths["cpu"]) == (50_000, 100_000)
            assert Path(cg.v1_paths["memory"], "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
        assert spawned.poll() is not None  # killed
        assert proc.poll() is None  # added, not owned: moved back, still alive
        assert read_proc_cgroups(proc.pid) == original
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"):
            assert not os.path.exists(os.path.join(root, top))
    finally:
        proc.kill()
        proc.wait()
