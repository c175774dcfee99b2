"""Fault injectors: how a lab hop is made slow, on the hop's own isolation layer.

A :class:`Fault` has two halves:

* the *environment* half, applied by the lab from outside the service
  (:func:`apply_environment`): a CFS quota or a memory limit on the hop's
  cgroup, CPU hogs pinned next to it;
* the *work* half, run by the service inside every request
  (:class:`RequestWork`): burning CPU (so a quota or a hog has something to
  bite), ``O_DIRECT`` reads from the virtio disk, allocation churn against a
  tight memory limit, datagrams across the veth.

Kinds: ``none``, ``cpu_throttle``, ``cpu_contention``, ``memory_reclaim``,
``virtio_io``, ``netns``, ``steal`` (nothing injected: steal comes from the
host when it does; the hop only burns CPU so that steal can land on it).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FAULT_KINDS: tuple[str, ...] = ("none", "cpu_throttle", "cpu_contention", "memory_reclaim", "virtio_io",
                                "netns", "steal")

EXPECTED_BLAME: dict[str, str] = {
    "cpu_throttle": "l3.cpu_throttle",
    "cpu_contention": "l3.runqueue",
    "memory_reclaim": "l3.memory_reclaim",
    "virtio_io": "l2.virtio_io",
    "netns": "l3.netns",
    "steal": "l1.steal",
}
"""The ``isolation.blame`` value a correct attribution gives a span slowed by each fault."""

_BLOCK = 4096


def _schedstat() -> tuple[int, int]:
    """This thread's cumulative (on-CPU ns, run-queue wait ns) from ``/proc/thread-self/schedstat``."""
    with open("/proc/thread-self/schedstat") as f:
        oncpu, delay, _ = f.read().split()
    return int(oncpu), int(delay)


@dataclass(slots=True)
class Fault:
    """One fault on one hop.

    Attributes:
        kind: one of :data:`FAULT_KINDS`.
        quota_pct: ``cpu_throttle``: CFS quota as % of one CPU.
        period_us: ``cpu_throttle``: CFS period.
        hogs: ``cpu_contention``: busy processes pinned on the hop's CPU.
        cpu: ``cpu_contention``: the CPU the hop and its hogs share.
        io_reads: ``virtio_io``: ``O_DIRECT`` 4 KiB reads per request.
        io_file_mb: ``virtio_io``: size of the file read at random offsets.
        mem_headroom_mb: ``memory_reclaim``: limit = usage after start-up + this.
        mem_file_mb: ``memory_reclaim``: size of the file region written round-robin.
        mem_write_mb: ``memory_reclaim``: buffered writes per request (dirty page cache).
        mem_churn_mb: ``memory_reclaim``: anonymous memory touched and freed per request.
        netns_datagrams: ``netns``: datagrams sent across the veth per request.
    """

    kind: str = "none"
    quota_pct: int = 20
    period_us: int = 100_000
    hogs: int = 2
    cpu: int = 0
    io_reads: int = 160
    io_file_mb: int = 256
    mem_headroom_mb: int = 32
    mem_file_mb: int = 128
    mem_write_mb: int = 32
    mem_churn_mb: int = 8
    netns_datagrams: int = 2000

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {', '.join(FAULT_KINDS)}")

    @property
    def expected_blame(self) -> str | None:
        """What ``isolation.blame`` should say for a span this fault slowed (None for ``none``)."""
        return EXPECTED_BLAME.get(self.kind)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Fault:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------
# Environment half (lab side)
# ---------------------------------------------------------------------------

_HOG_CODE = "import os,sys\nos.sched_setaffinity(0,{int(sys.argv[1])})\nwhile True: pass\n"


@dataclass(slots=True)
class Environment:
    """What :func:`apply_environment` started, so the lab can stop it."""

    hogs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.hogs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("CPU hog %d did not exit", p.pid)
        self.hogs.clear()


def apply_environment(fault: Fault, cgroup: Any, hog_cgroup: Any | None = None) -> Environment:
    """Apply the outside half of ``fault`` to a hop's cgroup.

    Args:
        fault: the fault.
        cgroup: the hop's :class:`isoscope_lab.topology.LabCgroup`.
        hog_cgroup: cgroup the CPU hogs run in (their own "noisy neighbour" container).

    Returns:
        Handles to stop what was started.
    """
    env = Environment()
    if fault.kind == "cpu_throttle":
        cgroup.set_cpu_quota(fault.period_us * fault.quota_pct // 100, fault.period_us)
    elif fault.kind == "memory_reclaim":
        cgroup.set_memory_limit(cgroup.memory_usage() + fault.mem_headroom_mb * 1024 * 1024)
    elif fault.kind == "cpu_contention":
        preexec = hog_cgroup.enter_fn() if hog_cgroup is not None else None
        for _ in range(fault.hogs):
            env.hogs.append(subprocess.Popen([sys.executable, "-c", _HOG_CODE, str(fault.cpu)],
                                             stdin=subprocess.DEVNULL, preexec_fn=preexec))  # noqa: PLW1509
    return env


# ---------------------------------------------------------------------------
# Work half (service side)
# ---------------------------------------------------------------------------

def burn_cpu(cpu_ns: int) -> None:
    """Spin until the calling thread has consumed ``cpu_ns`` of CPU time.

    Counting the thread's own CPU time (not wall time) makes the work the same
    whatever the layers steal, so a stall shows up as added duration.
    """
    end = time.thread_time_ns() + cpu_ns
    x = 0
    while time.thread_time_ns() < end:
        for i in range(200):
            x += i * i


@dataclass(frozen=True, slots=True)
class WorkTruth:
    """What one request's I/O took, by two independent measures.

    Attributes:
        io_ns: the thread's own measure: wall time in the timed ``O_DIRECT`` reads,
            less the run-queue wait inside them.
        device_ns: the disk's measure: its read time (``/sys/dev/block/M:m/stat``
            field 4, the sum of the read requests' times from creation to
            completion, in ms) over the request, when the disk completed exactly
            this request's reads meanwhile; -1 when another reader shared the disk
            or there was no I/O.
    """

    io_ns: int = 0
    device_ns: int = -1


def disk_stat_path(fd: int) -> str | None:
    """``/sys/dev/block/M:m/stat`` of the block device an open file lives on (None if it has none)."""
    st = os.fstat(fd)
    path = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    return path if os.path.exists(path) else None


def read_disk_reads(stat_path: str | None) -> tuple[int, int] | None:
    """(reads completed, ms spent reading) of a block device, from its ``stat`` file."""
    if stat_path is None:
        return None
    try:
        with open(stat_path, encoding="ascii") as fh:
            fields = fh.read().split()
        return int(fields[0]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


class RequestWork:
    """Per-request work of a service for its fault, with prepared state (files, buffers).

    Args:
        fault: the fault of this hop.
        work_ms: CPU time every request burns, whatever the fault.
        data_dir: directory on the virtio disk for the hop's data files.
        peer_ip: an address across this hop's veth (``netns`` datagrams go there).
    """

    def __init__(self, fault: Fault, work_ms: float, data_dir: str, peer_ip: str = "") -> None:
        self.fault = fault
        self.work_ns = int(work_ms * 1e6)
        self.data_dir = data_dir
        self.peer_ip = peer_ip
        self._io_fd = -1
        self._io_blocks = 0
        self._disk_stat: str | None = None
        self._buf: mmap.mmap | None = None
        self._mem_fd = -1
        self._mem_off = 0
        self._chunk = b""
        self._sock: socket.socket | None = None
        if fault.kind == "cpu_contention":
            os.sched_setaffinity(0, {fault.cpu})
        elif fault.kind == "virtio_io":
            self._io_fd, self._io_blocks = self._prepare_file("io.dat", fault.io_file_mb, direct=True)
            self._buf = mmap.mmap(-1, _BLOCK)  # page-aligned, as O_DIRECT requires
            self._disk_stat = disk_stat_path(self._io_fd)
        elif fault.kind == "memory_reclaim":
            os.makedirs(data_dir, exist_ok=True)
            self._mem_fd = os.open(os.path.join(data_dir, "mem.dat"), os.O_RDWR | os.O_CREAT, 0o600)
            self._chunk = os.urandom(1024 * 1024)
        elif fault.kind == "netns":
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def _prepare_file(self, name: str, size_mb: int, *, direct: bool) -> tuple[int, int]:
        os.makedirs(self.data_dir, exist_ok=True)
        path = os.path.join(self.data_dir, name)
        size = size_mb * 1024 * 1024
        if not os.path.exists(path) or os.path.getsize(path) != size:
            chunk = os.urandom(1024 * 1024)
            with open(path, "wb") as fh:
                for _ in range(size_mb):
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        return os.open(path, flags), size // _BLOCK

    def run(self) -> WorkTruth:
        """Do one request's work; returns what its I/O took (the I/O truth, see :class:`WorkTruth`)."""
        io_ns = 0
        device_ns = -1
        burn_cpu(self.work_ns)
        kind = self.fault.kind
        if kind == "virtio_io" and self._buf is not None:
            disk0 = read_disk_reads(self._disk_stat)
            for _ in range(self.fault.io_reads):
                off = random.randrange(self._io_blocks) * _BLOCK
                d0 = _schedstat()[1]
                t0 = time.monotonic_ns()
                os.preadv(self._io_fd, [self._buf], off)
                t1 = time.monotonic_ns()
                # Waiting for a CPU after the completion woke the thread is run-queue
                # time, not the device's: the oracle leaves it out.
                io_ns += max(0, (t1 - t0) - (_schedstat()[1] - d0))
            disk1 = read_disk_reads(self._disk_stat)
            if disk0 is not None and disk1 is not None and disk1[0] - disk0[0] == self.fault.io_reads:
                # The disk completed our reads and no others meanwhile: its read time is ours.
                device_ns = (disk1[1] - disk0[1]) * 1_000_000
        elif kind == "memory_reclaim":
            self._memory_churn()
        elif kind == "netns" and self._sock is not None and self.peer_ip:
            payload = b"x" * 1200
            for _ in range(self.fault.netns_datagrams):
                try:
                    self._sock.sendto(payload, (self.peer_ip, 9))
                except OSError:
                    pass  # ICMP port unreachable reported back: the datagram crossed anyway
        return WorkTruth(io_ns, device_ns)

    def _memory_churn(self) -> None:
        # Buffered writes leave dirty page cache charged to the hop's memcg; once the
        # group is at its limit every new charge enters memcg reclaim, which on
        # cgroup v1 (no writeback throttling) waits there for dirty pages to be
        # written back — the reclaim stall a write-heavy container sees.
        f = self.fault
        size = f.mem_file_mb * 1024 * 1024
        chunk = self._chunk
        want = f.mem_write_mb * 1024 * 1024
        while want > 0:
            if self._mem_off + len(chunk) > size:
                self._mem_off = 0
            os.pwrite(self._mem_fd, chunk, self._mem_off)
            self._mem_off += len(chunk)
            want -= len(chunk)
        if f.mem_churn_mb:
            anon = mmap.mmap(-1, f.mem_churn_mb * 1024 * 1024)
            try:
                for off in range(0, len(anon), 4096):
                    anon[off] = 1
            finally:
                anon.close()

    def close(self) -> None:
        for fd in (self._io_fd, self._mem_fd):
            if fd >= 0:
                os.close(fd)
        if self._sock is not None:
            self._sock.close()
