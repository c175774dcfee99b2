"""Code ranges of sandbox runtimes read from fixture ``/proc/<pid>/maps`` files."""

from __future__ import annotations

import os
from pathlib import Path

from isoscope.probes.sandbox_sampler import MAX_RANGES, code_ranges


def _proc(tmp_path: Path, maps: str, exe: str = "/usr/bin/python3.11") -> str:
    d = tmp_path / "proc" / "42"
    d.mkdir(parents=True)
    (d / "maps").write_text(maps)
    os.symlink(exe, d / "exe")
    return str(tmp_path / "proc")


LIB = "/venv/lib/python3.11/site-packages/wasmtime/linux-x86_64/_libwasmtime.so"
MAPS = f"""\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 100 /usr/bin/python3.11
7f0000000000-7f0000001000 r-xp 00000000 00:00 0 
7f0000001000-7f0000003000 r-xp 00000000 00:00 0 
7f0000010000-7f0000011000 rwxp 00000000 00:00 0 
7f0000020000-7f0000021000 rw-p 00000000 00:00 0 
7f1000000000-7f1000400000 r--p 00000000 fd:01 200 {LIB}
7f1000400000-7f1001000000 r-xp 00400000 fd:01 200 {LIB}
7f2000000000-7f2000100000 r-xp 00000000 fd:01 300 /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_embedded_runtime_guest_and_runtime_ranges(tmp_path: Path) -> None:
    r = code_ranges(42, _proc(tmp_path, MAPS))
    assert r is not None and not r.runtime_is_process
    # adjacent anonymous r-x pages merge; rwx trampolines, data and [vdso] are not guest code
    assert r.guest == ((0x7F0000000000, 0x7F0000003000),)
    # only the library's executable mapping, not its read-only one, not libc or the embedder
    assert r.runtime == ((0x7F1000400000, 0x7F1001000000),)


def test_runtime_executable_is_the_runtime(tmp_path: Path) -> None:
    maps = "5600000000-5600100000 r-xp 00000000 fd:01 1 /usr/local/bin/wasmtime\n" \
           "7f0000000000-7f0000001000 r-xp 00000000 00:00 0 \n"
    r = code_ranges(42, _proc(tmp_path, maps, exe="/usr/local/bin/wasmtime"))
    assert r is not None and r.runtime_is_process
    assert r.runtime == ((0x5600000000, 0x5600100000),) and r.guest == ((0x7F0000000000, 0x7F0000001000),)


def test_many_jit_ranges_keep_the_largest(tmp_path: Path) -> None:
    lines = [f"{0x7f0000000000 + i * 0x100000:x}-{0x7f0000000000 + i * 0x100000 + (i + 1) * 0x1000:x} "
             f"r-xp 00000000 00:00 0 " for i in range(MAX_RANGES + 4)]
    r = code_ranges(42, _proc(tmp_path, "\n".join(lines) + "\n"))
    assert r is not None and len(r.guest) == MAX_RANGES
    sizes = sorted(end - start for start, end in r.guest)
    assert sizes[0] == 5 * 0x1000  # the four smallest were dropped
    assert list(r.guest) == sorted(r.guest)


def test_a_process_that_is_gone(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    assert code_ranges(42, str(tmp_path / "proc")) is None
