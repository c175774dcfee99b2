"""The block probe and isoscope.host.blockdev on the running kernel's virtio disk."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from isoscope.host.blockdev import kernel_dev_t, list_block_devices, split_kernel_dev_t, virtio_dev_ts
from isoscope.model import Stall
from isoscope.probes import catalog
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

logger = logging.getLogger(__name__)

READ_SIZE = 65536
READS = 150
SLACK = 2  # requests that may go unmatched under heavy load (see below)

# O_DIRECT reads at spread offsets (no page cache, no readahead): each is one device request.
READER = r"""
import json, mmap, os, sys, threading, time
path, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.stdin.readline()
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, size)
blocks = os.fstat(fd).st_size // size
ops = []
for i in range(count):
    off = ((i * 7919) % blocks) * size
    t0 = time.monotonic_ns()
    n = os.preadv(fd, [buf], off)
    t1 = time.monotonic_ns()
    assert n == size
    ops.append((t0, t1))
print(json.dumps({"tid": threading.get_native_id(), "ops": ops}), flush=True)
"""


def _root_disk() -> tuple[str, int]:
    """A directory on the virtio root disk and the disk's kernel dev_t."""
    st = os.stat("/")
    whole = {d.name: d for d in list_block_devices()}
    for d in list_block_devices():
        if (d.major, d.minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
            if d.partition:  # requests carry the whole disk's dev_t
                parent = os.path.basename(os.path.dirname(os.path.realpath(f"/sys/dev/block/{d.major}:{d.minor}")))
                d = whole[parent]
            return "/var/tmp", d.dev_t
    pytest.fail("the root file system is not on a block device listed in /sys/dev/block")


@pytest.fixture
def data_file() -> Any:
    directory, dev = _root_disk()
    path = os.path.join(directory, f"isoscope-test-block-{os.getpid()}.dat")
    with open(path, "wb") as fh:
        fh.write(os.urandom(8 * 1024 * 1024))
        fh.flush()
        os.fsync(fh.fileno())
    try:
        yield path, dev
    finally:
        os.unlink(path)


def _read(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_blockdev_finds_the_virtio_disk():
    devs = list_block_devices()
    st = os.stat("/dev/vda")
    vda = kernel_dev_t(os.major(st.st_rdev), os.minor(st.st_rdev))
    assert vda in virtio_dev_ts()
    assert split_kernel_dev_t(vda) == (os.major(st.st_rdev), os.minor(st.st_rdev))
    assert {d.name: d.virtio for d in devs}["vda"] is True
    assert not any(d.virtio for d in devs if d.name.startswith(("loop", "zram")))


def test_odirect_reads_are_virtio_stalls_of_the_reader(load_probe, data_file):
    path, dev = data_file
    probe = load_probe(catalog.BLOCK)
    virtio = probe.bpf["virtio_devs"]
    for d in virtio_dev_ts():
        virtio[ctypes.c_uint32(d)] = ctypes.c_uint8(1)
    assert dev in virtio_dev_ts(), "the root disk of this machine is expected to be virtio"

    tag = f"isoscope-test-blk-{os.getpid()}"
    with make_cgroup(f"{tag}-w", v1_controllers=()) as wcg, make_cgroup(f"{tag}-u", v1_controllers=()) as ucg:
        argv = [sys.executable, "-c", READER, path, str(READ_SIZE), str(READS)]
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watched = wcg.spawn(argv, **pipes)
        assert probe.watch.add_tgid(watched.pid)
        report = _read(watched)
        unwatched = ucg.spawn(argv, **pipes)
        _read(unwatched)

        first, last = report["ops"][0][0], report["ops"][-1][1]
        events = probe.wait_for(lambda evs: sum(isinstance(e, Stall) and e.tid == report["tid"]
                                                for e in evs) >= READS)
        mine = [e for e in events if isinstance(e, Stall) and e.tid == report["tid"]
                and first <= e.start_mono_ns and e.end_mono_ns <= last]
        assert all(s.component == "virtio_io" for s in mine)
        # Completions arrive in interrupts; one that lands while another tracing
        # program runs on that CPU is skipped by the kernel (counted in fdinfo).
        # On a heavily loaded machine (load average > 40) one request in ~150 was
        # also seen charged to another cgroup: SLACK allows for that, no more.
        missed = probe.recursion_misses()
        diag = {k.cgroup_id: v.count for k, v in probe.bpf["totals"].items() if k.class_id == dev}
        assert READS - missed - SLACK <= len(mine) <= READS, (len(mine), READS, missed, diag, wcg.id)
        assert {s.details["block.dev"] for s in mine} == {f"{dev >> 20}:{dev & 0xFFFFF}"}
        assert {s.details["block.bytes"] for s in mine} == {READ_SIZE}
        assert {(s.pid, s.cgroup_id) for s in mine} == {(watched.pid, wcg.id)}
        # Each request lies inside the read that issued it, and accounts for it but for
        # the syscall path, the completion wake-up and Python around it.
        gaps = []
        for t0, t1 in report["ops"]:
            inside = [s for s in mine if t0 <= s.start_mono_ns and s.end_mono_ns <= t1]
            assert len(inside) <= 1
            if inside:
                gaps.append((t1 - t0) - inside[0].duration_ns)
        gaps.sort()
        measured = sum(t1 - t0 for t0, t1 in report["ops"])
        device = sum(s.duration_ns for s in mine)
        # On an idle machine device time is 0.74-0.85 of the reads' time for 64 KiB reads;
        # under CPU contention the reader also waits for a CPU after each completion, so
        # the check is on the median per-read gap rather than on the ratio.
        logger.info("virtio device time / reader-measured time = %.3f, median gap %d ns",
                    device / measured, gaps[len(gaps) // 2])
        assert device <= measured
        assert gaps[len(gaps) // 2] <= 300_000, gaps[len(gaps) // 2]

        # The unwatched reader: only requests >= 1 ms may cross, but its cgroup's histogram counts all.
        assert all(s.duration_ns >= 1_000_000 for s in events if isinstance(s, Stall) and s.pid == unwatched.pid)
        counts = sum(v.value for k, v in probe.bpf["hist"].items() if k.cgroup_id == ucg.id and k.class_id == dev)
        missed = probe.recursion_misses()
        logger.info("unwatched reader: %d requests counted, %d program runs skipped", counts, missed)
        by_cgroup: dict[int, int] = {}
        for k, v in probe.bpf["hist"].items():
            if k.class_id == dev:
                by_cgroup[k.cgroup_id] = by_cgroup.get(k.cgroup_id, 0) + v.value
        assert counts >= READS - missed - SLACK, (counts, READS, missed, by_cgroup, ucg.id, wcg.id)
        tot = [v for k, v in probe.bpf["totals"].items() if k.cgroup_id == ucg.id and k.class_id == dev]
        assert tot and tot[0].count == counts and tot[0].sum_ns > 0
    assert probe.manager.check_losses()["block"] == 0
