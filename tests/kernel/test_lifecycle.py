"""Lifecycle events of real processes: exec/exit/fork, clone with CLONE_NEW* and cgroup events from the
lifecycle probe; unshare and setns from the syscalls probe (its raw sys_enter/sys_exit programs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from isoscope.model import LifecycleEvent, LifecycleKind
from isoscope.probes import catalog
from tests.cgroup_helpers import make_cgroup
from tests.kernel.conftest_sysprobes import load_probe  # noqa: F401

pytestmark = pytest.mark.kernel

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

# clone() and clone3() with CLONE_NEW* flags, and a plain fork(), from C: the
# flags must reach the kernel exactly as a container runtime passes them.
CLONER_C = r"""
#define _GNU_SOURCE
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void reap(long pid, const char *what) {
    if (pid == 0) _exit(0);
    if (pid < 0) { perror(what); _exit(2); }
    waitpid((pid_t)pid, NULL, 0);
    printf("%s %ld\n", what, pid);
}

int main(void) {
    char go[8];
    if (read(0, go, sizeof go) <= 0) return 3;
    reap(syscall(SYS_clone, CLONE_NEWUTS | SIGCHLD, 0, 0, 0, 0), "clone");
    struct clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWNET | CLONE_NEWIPC;
    ca.exit_signal = SIGCHLD;
    reap(syscall(SYS_clone3, &ca, sizeof ca), "clone3");
    reap(fork(), "fork");
    fflush(stdout);
    return 0;
}
"""


def _of(events: list, kind: LifecycleKind) -> list[LifecycleEvent]:
    return [e for e in events if isinstance(e, LifecycleEvent) and e.kind == kind]


@pytest.fixture(scope="module")
def cloner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cloner")
    (d / "cloner.c").write_text(CLONER_C)
    subprocess.run(["cc", "-O1", "-o", str(d / "cloner"), str(d / "cloner.c")], check=True)
    return d / "cloner"


def test_no_probe_uses_per_syscall_tracepoints(load_probe):
    # Any syscalls:sys_enter_*/sys_exit_* tracepoint routes every syscall on the node through the
    # syscall-tracing dispatch; namespace events must come without them.
    for spec in (catalog.LIFECYCLE, catalog.SYSCALLS):
        bpf = load_probe(spec).bpf
        assert not [tp for tp in bpf.tracepoint_fds if tp.startswith(b"syscalls:")], spec.name
    assert not [a for s in catalog.ALL_PROBES for a in s.attach if a.target.startswith("syscalls:")]


def test_clone_clone3_fork_exec_exit(load_probe, cloner):
    probe = load_probe(catalog.LIFECYCLE)
    proc = subprocess.Popen([str(cloner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert probe.watch.add_tgid(proc.pid)
    out, _ = proc.communicate("go\n", timeout=20)
    assert proc.returncode == 0
    children = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}

    events = probe.wait_for(lambda evs: any(e.pid == proc.pid for e in _of(evs, LifecycleKind.EXIT)))
    execs = [e for e in _of(events, LifecycleKind.EXEC) if e.pid == proc.pid]
    assert execs and execs[0].path == str(cloner)

    clone_ns = {e.pid: e for e in _of(events, LifecycleKind.CLONE_NS) if e.ppid == proc.pid}
    assert clone_ns[children["clone"]].flags == CLONE_NEWUTS
    assert clone_ns[children["clone3"]].flags == CLONE_NEWNET | CLONE_NEWIPC
    assert children["fork"] not in clone_ns
    assert all(e.comm == "cloner" for e in clone_ns.values())

    # A watched parent's plain fork is reported so the child can be watched too; a child that got
    # new namespaces is announced once, by its clone_ns record.
    forks = [e for e in _of(events, LifecycleKind.FORK) if e.ppid == proc.pid]
    assert {e.pid for e in forks} == {children["fork"]}

    exits = {e.pid for e in _of(events, LifecycleKind.EXIT)}
    assert {proc.pid, *children.values()} <= exits


def test_unwatched_plain_fork_is_not_reported_but_clone_ns_is(load_probe, cloner):
    probe = load_probe(catalog.LIFECYCLE)
    proc = subprocess.Popen([str(cloner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate("go\n", timeout=20)
    assert proc.returncode == 0
    children = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    events = probe.wait_for(lambda evs: any(e.pid == proc.pid for e in _of(evs, LifecycleKind.EXIT)))
    clone_ns = {e.pid for e in _of(events, LifecycleKind.CLONE_NS) if e.ppid == proc.pid}
    assert clone_ns == {children["clone"], children["clone3"]}
    assert not [e for e in _of(events, LifecycleKind.FORK) if e.ppid == proc.pid]


def test_unshare_and_setns(load_probe):
    probe = load_probe(catalog.SYSCALLS)
    lifecycle = load_probe(catalog.LIFECYCLE)
    # Real unshare(1): new net + uts namespaces, then exec sleep in them.
    holder = subprocess.Popen(["unshare", "--net", "--uts", "--", "sleep", "5"])
    try:
        events = probe.wait_for(lambda evs: any(e.pid == holder.pid for e in _of(evs, LifecycleKind.UNSHARE)))
        ev = [e for e in _of(events, LifecycleKind.UNSHARE) if e.pid == holder.pid]
        assert len(ev) == 1 and ev[0].flags == CLONE_NEWNET | CLONE_NEWUTS
        assert ev[0].comm == "unshare"
        # The process is now under the namespaces the event announced.
        events = lifecycle.wait_for(lambda evs: any(e.pid == holder.pid and e.path.endswith("/sleep")
                                                    for e in _of(evs, LifecycleKind.EXEC)))
        assert any(e.pid == holder.pid and e.ts_mono_ns > ev[0].ts_mono_ns for e in _of(events, LifecycleKind.EXEC))
        assert os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net")

        # setns into the holder's network namespace, then unshare, through libc.
        joiner = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                import ctypes, os
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open("/proc/{holder.pid}/ns/net", os.O_RDONLY)
                assert libc.setns(fd, {CLONE_NEWNET}) == 0, ctypes.get_errno()
                assert libc.unshare({CLONE_NEWUTS | CLONE_NEWNS}) == 0, ctypes.get_errno()
                # EINVAL: a failed unshare is not reported.
                assert libc.unshare({CLONE_NEWNET | 0x1}) == -1
                print(os.getpid(), os.readlink("/proc/self/ns/net"))
            """)], capture_output=True, text=True, timeout=20, check=True)
        jpid, jnet = joiner.stdout.split()
        jpid_i = int(jpid)
        assert jnet == os.readlink(f"/proc/{holder.pid}/ns/net")
        events = probe.wait_for(lambda evs: any(e.pid == jpid_i for e in _of(evs, LifecycleKind.UNSHARE)))
        setns = [e for e in _of(events, LifecycleKind.SETNS) if e.pid == jpid_i]
        assert [e.flags for e in setns] == [CLONE_NEWNET]
        unshares = [e for e in _of(events, LifecycleKind.UNSHARE) if e.pid == jpid_i]
        assert [e.flags for e in unshares] == [CLONE_NEWUTS | CLONE_NEWNS]
        assert setns[0].ts_mono_ns < unshares[0].ts_mono_ns
    finally:
        holder.kill()
        holder.wait()


def test_cgroup_mkdir_attach_rmdir(load_probe):
    probe = load_probe(catalog.LIFECYCLE)
    name = f"isoscope-test-lc-{os.getpid()}"
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        cg = make_cgroup(name, v1_controllers=())
        cg_id = cg.id
        try:
            cg.add(sleeper.pid)
        finally:
            sleeper.kill()
            sleeper.wait()
            cg.remove()
        events = probe.wait_for(lambda evs: any(e.cgroup_id == cg_id for e in _of(evs, LifecycleKind.CGROUP_RMDIR)))
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    mk = [e for e in _of(events, LifecycleKind.CGROUP_MKDIR) if e.cgroup_id == cg_id]
    assert len(mk) == 1 and mk[0].path.endswith(name) and mk[0].pid == os.getpid()
    att = [e for e in _of(events, LifecycleKind.CGROUP_ATTACH) if e.cgroup_id == cg_id]
    assert [e.pid for e in att] == [sleeper.pid] and att[0].ppid == os.getpid()
    rm = [e for e in _of(events, LifecycleKind.CGROUP_RMDIR) if e.cgroup_id == cg_id]
    assert len(rm) == 1 and rm[0].path == mk[0].path
    assert mk[0].ts_mono_ns < att[0].ts_mono_ns < rm[0].ts_mono_ns
