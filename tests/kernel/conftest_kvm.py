"""A real KVM guest for tests: a tiny VMM process written against /dev/kvm.

The VMM creates one VM with 64 KiB of memory and one vCPU run from a thread
named like QEMU's vCPU threads (``CPU 0/KVM``). The guest (16-bit real mode)
writes ``count`` bytes to the serial port 0x3f8 — every ``out`` is a port-I/O
exit handled by the VMM — and halts. The VMM then keeps its VM and vCPU fds
open for ``hold_s`` seconds so tests can inspect it, and exits on its own.

Import with ``from tests.kernel.conftest_kvm import run_guest``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

logger = logging.getLogger(__name__)

VCPU_THREAD_NAME = "CPU 0/KVM"

GUEST_VMM = r'''
import fcntl, json, mmap, ctypes, os, struct, sys, threading, time
count, hold_s, name = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_RUN, KVM_GET_VCPU_MMAP_SIZE = 0xAE01, 0xAE41, 0xAE80, 0xAE04
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_GET_SREGS, KVM_SET_SREGS, KVM_GET_REGS, KVM_SET_REGS = 0x8138AE83, 0x4138AE84, 0x8090AE81, 0x4090AE82
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
mem = mmap.mmap(-1, 0x10000)
# mov cx, count; mov dx, 0x3f8; mov al, 'A'; l: out dx, al; loop l; hlt
code = bytes([0xB9]) + struct.pack("<H", count) + bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xE2, 0xFD, 0xF4])
mem[0x1000:0x1000 + len(code)] = code
addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, 0x10000, addr))
vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
sregs = bytearray(0x138); fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
struct.pack_into("Q", sregs, 0, 0); struct.pack_into("H", sregs, 12, 0)   # cs.base = 0, cs.selector = 0
fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
regs = bytearray(0x90); fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
struct.pack_into("Q", regs, 16 * 8, 0x1000); struct.pack_into("Q", regs, 17 * 8, 2)  # rip, rflags
fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
result = {"io_exits": 0, "hlt": False, "vcpu_tid": 0, "error": ""}
ready = threading.Event()
def vcpu_thread():
    tid = threading.get_native_id()
    with open(f"/proc/self/task/{tid}/comm", "w") as fh:
        fh.write(name)
    result["vcpu_tid"] = tid
    ready.set()
    time.sleep(0.2)   # let the test look at the named thread before the guest runs
    try:
        for _ in range(count + 16):
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("I", run, 8)[0]
            if reason == KVM_EXIT_IO:
                result["io_exits"] += 1
            elif reason == KVM_EXIT_HLT:
                result["hlt"] = True
                break
            else:
                result["error"] = f"unexpected exit {reason}"
                break
    except OSError as exc:
        result["error"] = str(exc)
t = threading.Thread(target=vcpu_thread)
t.start(); ready.wait(5)
print(json.dumps({"vcpu_tid": result["vcpu_tid"]}), flush=True)
t.join(30)
print(json.dumps(result), flush=True)
time.sleep(hold_s)
'''


@dataclass
class Guest:
    """A running tiny VMM."""

    proc: subprocess.Popen
    vcpu_tid: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self, timeout_s: float = 30.0) -> dict:
        """Wait for the guest to halt; returns ``{"io_exits", "hlt", "vcpu_tid", "error"}``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line:
                return json.loads(line)
        raise TimeoutError("guest did not finish")


@contextmanager
def run_guest(count: int = 100, hold_s: float = 5.0, name: str = VCPU_THREAD_NAME) -> Iterator[Guest]:
    """Start the tiny VMM; it is killed on exit from the context.

    Args:
        count: port-I/O writes the guest performs before halting.
        hold_s: how long the VMM keeps its VM open after the guest halted.
        name: the vCPU thread's name.
    """
    assert os.path.exists("/dev/kvm"), "/dev/kvm is missing: no KVM on this machine"
    proc = subprocess.Popen([sys.executable, "-c", GUEST_VMM, str(count), str(hold_s), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first:
            raise RuntimeError(f"tiny VMM failed to start: {proc.stderr.read() if proc.stderr else ''}")
        yield Guest(proc, json.loads(first)["vcpu_tid"])
    finally:
        proc.kill()
        proc.wait(10)
