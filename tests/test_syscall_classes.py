"""isoscope.probes.syscall_classes: the x86_64 syscall number → class table."""

from __future__ import annotations

import platform

import pytest

from isoscope.probes.decode import SYSCALL_CLASSES, header_constants
from isoscope.probes.syscall_classes import CLASS_CODE, MAX_NR, class_table, classify, syscall_names


def test_codes_are_the_headers():
    c = header_constants()
    assert CLASS_CODE == {"other": c["ISO_SC_OTHER"], "net": c["ISO_SC_NET"], "file": c["ISO_SC_FILE"],
                          "lock": c["ISO_SC_LOCK"], "sleep": c["ISO_SC_SLEEP"]}
    assert set(CLASS_CODE.values()) == set(SYSCALL_CLASSES)


@pytest.mark.parametrize("name, cls", [
    ("nanosleep", "sleep"), ("clock_nanosleep", "sleep"), ("futex", "lock"), ("flock", "lock"),
    ("recvfrom", "net"), ("epoll_wait", "net"), ("accept4", "net"), ("read", "file"), ("fsync", "file"),
    ("io_uring_enter", "file"), ("getppid", "other"), ("no_such_syscall", "other"),
])
def test_classify(name, cls):
    assert classify(name) == cls


def test_table_from_bccs_syscall_names():
    if platform.machine() != "x86_64":
        pytest.fail("the syscall numbers below are x86_64's")
    names = syscall_names()
    assert names[0] == "read" and names[35] == "nanosleep" and names[202] == "futex" and names[435] == "clone3"
    table = class_table(names)
    assert len(table) == MAX_NR
    code = CLASS_CODE
    assert table[35] == code["sleep"] and table[230] == code["sleep"]   # nanosleep, clock_nanosleep
    assert table[202] == code["lock"]                                   # futex
    assert table[45] == code["net"] and table[232] == code["net"]       # recvfrom, epoll_wait
    assert table[0] == code["file"] and table[257] == code["file"]      # read, openat
    assert table[110] == code["other"]                                  # getppid
    # Every class is used, and most numbers stay "other".
    assert set(table) == set(code.values())
    assert table.count(code["other"]) > MAX_NR // 2


def test_table_respects_its_size():
    table = class_table({0: "read", 600: "futex"}, max_nr=8)
    assert table == [CLASS_CODE["file"]] + [CLASS_CODE["other"]] * 7
