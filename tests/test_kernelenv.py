"""Kernel access at daemon start: tracefs, kernel headers, feature detection.

Runs as root against the real kernel: tracefs is really mounted, headers are
really compiled against by bcc, features are cross-checked with what the
kernel (through bcc) actually allows.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isoscope.kernel.btf import BTF
from isoscope.kernel.capabilities import CAP_BPF, CAP_PERFMON
from isoscope.kernel.env import prepare
from isoscope.kernel.features import FEATURES, Features, detect_features
from isoscope.kernel.headers import BCC_ENV, HeadersChoice, find_kernel_headers, link_modules_dir
from isoscope.kernel.tracefs import ensure_tracefs

pytestmark = pytest.mark.kernel

USR_SRC = "/usr/src"
SYSCALL_GETPPID = {"x86_64": 110, "aarch64": 173}


def _tracefs_mounts() -> set[str]:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return {line.split()[1] for line in fh if line.split()[2] == "tracefs"}


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(path.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount {path}")


def _make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


# ---------------------------------------------------------------------------
# tracefs
# ---------------------------------------------------------------------------

def test_tracefs_is_mounted_on_a_fresh_directory(tmp_path: Path) -> None:
    target = tmp_path / "tracing"
    target.mkdir()
    assert str(target) not in _tracefs_mounts()
    path, mounted = ensure_tracefs([str(target)])
    try:
        assert (path, mounted) == (str(target), True)
        assert str(target) in _tracefs_mounts()
        assert (target / "events" / "sched" / "sched_switch").is_dir()
        # Second call finds it and does not mount again.
        assert ensure_tracefs([str(target)]) == (str(target), False)
    finally:
        if str(target) in _tracefs_mounts():
            _umount(str(target))
    assert str(target) not in _tracefs_mounts()


def test_tracefs_not_mounted_when_mounting_is_disallowed(tmp_path: Path) -> None:
    target = tmp_path / "tracing"
    target.mkdir()
    assert ensure_tracefs([str(target)], mount=False) == (None, False)
    assert str(target) not in _tracefs_mounts()


def test_tracefs_skips_missing_candidates(tmp_path: Path) -> None:
    target = tmp_path / "tracing"
    target.mkdir()
    path, mounted = ensure_tracefs([str(tmp_path / "absent"), str(target)])
    try:
        assert (path, mounted) == (str(target), True)
    finally:
        _umount(str(target))


# ---------------------------------------------------------------------------
# kernel headers
# ---------------------------------------------------------------------------

def _generic_dirs() -> tuple[str, str]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    builds = sorted(p for p in os.listdir(USR_SRC) if p.startswith("linux-headers-") and p.endswith(f"-{arch}"))
    assert builds, f"linux-headers-{arch} must be installed (scripts/setup.sh does it)"
    build = builds[-1]
    return os.path.join(USR_SRC, build), os.path.join(USR_SRC, build[: -len(arch)] + "common")


def test_generic_headers_used_when_host_has_none(tmp_path: Path) -> None:
    mods, shim_root = tmp_path / "modules", tmp_path / "shims"
    mods.mkdir()
    choice = find_kernel_headers(modules_root=str(mods), shim_root=str(shim_root))
    build, source = _generic_dirs()
    assert choice.source == "generic"
    assert (choice.build_dir, choice.source_dir) == (build, source)
    assert choice.bcc_kernel_source is not None and choice.bcc_kernel_source.startswith(str(shim_root))
    shim = Path(choice.bcc_kernel_source)
    # One tree that has both halves: bcc compiles inside it.
    assert (shim / "include" / "linux" / "kconfig.h").is_file()
    assert (shim / "include" / "generated" / "autoconf.h").is_file()
    assert (shim / "arch" / "x86" / "include" / "generated").is_dir() or platform.machine() != "x86_64"
    assert build in choice.detail and "generic" in choice.detail
    assert choice.headers_release and choice.headers_release in choice.detail
    # A second lookup reuses the same shim.
    again = find_kernel_headers(modules_root=str(mods), shim_root=str(shim_root))
    assert again.bcc_kernel_source == choice.bcc_kernel_source
    assert (shim / ".isoscope-shim").stat().st_mtime_ns == (Path(again.bcc_kernel_source) / ".isoscope-shim").stat().st_mtime_ns


def test_newest_generic_headers_are_chosen(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for abi in ("6.1.0-9", "6.1.0-27", "5.10.0-30"):
        _make_tree(src / f"linux-headers-{abi}-amd64", {
            "include/generated/utsrelease.h": f'#define UTS_RELEASE "{abi}-amd64"\n'})
        _make_tree(src / f"linux-headers-{abi}-common", {"include/linux/kconfig.h": "/* */\n"})
    # A flavour at the same ABI loses to the plain one; a build without -common is ignored.
    _make_tree(src / "linux-headers-6.1.0-27-cloud-amd64", {"include/generated/utsrelease.h": "\n"})
    _make_tree(src / "linux-headers-6.2.0-1-amd64", {"include/generated/utsrelease.h": "\n"})
    (tmp_path / "mods").mkdir()
    choice = find_kernel_headers(release="6.18.0-test", modules_root=str(tmp_path / "mods"), usr_src=str(src),
                                 shim_root=str(tmp_path / "shims"), machine="x86_64")
    assert choice.source == "generic"
    assert choice.build_dir == str(src / "linux-headers-6.1.0-27-amd64")
    assert choice.source_dir == str(src / "linux-headers-6.1.0-27-common")
    assert choice.headers_release == "6.1.0-27-amd64" and not choice.matches_running
    assert "running 6.18.0-test" in choice.detail
    # Backport naming (no ABI number) is understood too.
    _make_tree(src / "linux-headers-6.12.12+bpo-amd64", {"include/generated/utsrelease.h": "\n"})
    _make_tree(src / "linux-headers-6.12.12+bpo-common", {"include/linux/kconfig.h": "\n"})
    newer = find_kernel_headers(release="6.18.0-test", modules_root=str(tmp_path / "mods"), usr_src=str(src),
                                shim_root=str(tmp_path / "shims"), machine="x86_64")
    assert newer.source_dir == str(src / "linux-headers-6.12.12+bpo-common")


def test_configured_headers_win_over_generic(tmp_path: Path) -> None:
    build, source = _generic_dirs()
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "build").symlink_to(build)
    (configured / "source").symlink_to(source)
    (tmp_path / "mods").mkdir()
    choice = find_kernel_headers(configured_dir=str(configured), modules_root=str(tmp_path / "mods"),
                                 shim_root=str(tmp_path / "shims"))
    assert choice.source == "configured"
    assert choice.build_dir == str(configured / "build")
    assert str(configured) in choice.detail
    assert (Path(choice.bcc_kernel_source) / "include" / "linux" / "kconfig.h").is_file()


def test_configured_single_tree_is_used_directly(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree", {"include/linux/kconfig.h": "\n",
                                          "include/generated/utsrelease.h": '#define UTS_RELEASE "9.9.9"\n'})
    (tmp_path / "mods").mkdir()
    choice = find_kernel_headers(release="9.9.9", configured_dir=str(tree), modules_root=str(tmp_path / "mods"),
                                 shim_root=str(tmp_path / "shims"))
    assert (choice.source, choice.bcc_kernel_source) == ("configured", str(tree))
    assert choice.matches_running and "match the running kernel" in choice.detail
    assert not (tmp_path / "shims").exists()


def test_unusable_configured_dir_falls_through_and_is_named(tmp_path: Path) -> None:
    (tmp_path / "mods").mkdir()
    (tmp_path / "bogus").mkdir()
    choice = find_kernel_headers(configured_dir=str(tmp_path / "bogus"), modules_root=str(tmp_path / "mods"),
                                 shim_root=str(tmp_path / "shims"))
    assert choice.source == "generic"


def test_host_headers_come_first(tmp_path: Path) -> None:
    build, source = _generic_dirs()
    release = "6.18.0-hosttest"
    kdir = tmp_path / "mods" / release
    kdir.mkdir(parents=True)
    (kdir / "build").symlink_to(build)
    (kdir / "source").symlink_to(source)
    tree = _make_tree(tmp_path / "tree", {"include/linux/kconfig.h": "\n"})
    choice = find_kernel_headers(release=release, configured_dir=str(tree), modules_root=str(tmp_path / "mods"),
                                 shim_root=str(tmp_path / "shims"))
    assert choice.source == "host"
    assert choice.build_dir == str(kdir / "build")
    # Not bcc's own /lib/modules, so bcc has to be pointed at a single tree.
    assert choice.bcc_kernel_source and (Path(choice.bcc_kernel_source) / "include/linux/kconfig.h").is_file()


def test_no_headers_at_all_says_so(tmp_path: Path) -> None:
    for d in ("mods", "src", "sys"):
        (tmp_path / d).mkdir()
    choice = find_kernel_headers(modules_root=str(tmp_path / "mods"), usr_src=str(tmp_path / "src"),
                                 shim_root=str(tmp_path / "shims"), sys_root=str(tmp_path / "sys"))
    assert (choice.source, choice.path, choice.bcc_kernel_source) == ("none", None, None)
    assert "no kernel headers found" in choice.detail
    assert "install linux-headers-" in choice.detail and "ISOSCOPE_KERNEL__HEADERS_DIR" in choice.detail
    env = {BCC_ENV: "/stale"}
    choice.apply(env)
    assert BCC_ENV not in env


def test_kernel_builtin_headers_are_the_last_resort(tmp_path: Path) -> None:
    for d in ("mods", "src"):
        (tmp_path / d).mkdir()
    _make_tree(tmp_path / "sys", {"kernel/kheaders.tar.xz": ""})
    choice = find_kernel_headers(modules_root=str(tmp_path / "mods"), usr_src=str(tmp_path / "src"),
                                 shim_root=str(tmp_path / "shims"), sys_root=str(tmp_path / "sys"))
    assert choice.source == "kheaders" and choice.bcc_kernel_source is None


def test_link_modules_dir_installs_fallback_once(tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    choice = find_kernel_headers(release="6.18.0-link", modules_root=str(mods), shim_root=str(tmp_path / "shims"))
    made = link_modules_dir(choice, release="6.18.0-link", modules_root=str(mods))
    assert sorted(made) == [str(mods / "6.18.0-link" / "build"), str(mods / "6.18.0-link" / "source")]
    assert os.readlink(mods / "6.18.0-link" / "build") == choice.build_dir
    assert link_modules_dir(choice, release="6.18.0-link", modules_root=str(mods)) == []
    # Now the host lookup finds them.
    host = find_kernel_headers(release="6.18.0-link", modules_root=str(mods), shim_root=str(tmp_path / "shims"))
    assert host.source == "host"


def test_prepare_sets_bcc_kernel_source(tmp_path: Path) -> None:
    (tmp_path / "mods").mkdir()
    env: dict[str, str] = {}
    kenv = prepare(modules_root=str(tmp_path / "mods"), shim_root=str(tmp_path / "shims"), environ=env)
    assert kenv.headers.source == "generic"
    assert env[BCC_ENV] == kenv.headers.bcc_kernel_source
    assert kenv.tracefs and kenv.features.tracepoint
    assert any(m.startswith("headers[generic]:") and kenv.headers.build_dir in m for m in kenv.messages)
    assert any(m.startswith("tracefs: ") for m in kenv.messages)


# ---------------------------------------------------------------------------
# compile, attach, trigger, read: the chosen headers work on this kernel
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["default", "generic-shim"])
def test_bcc_compiles_and_attaches_with_chosen_headers(where: str, tmp_path: Path, test_data: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BCC_ENV, raising=False)  # restored afterwards, whatever prepare() sets
    kwargs: dict = {}
    if where == "generic-shim":
        (tmp_path / "mods").mkdir()
        kwargs = {"modules_root": str(tmp_path / "mods"), "shim_root": str(tmp_path / "shims")}
    kenv = prepare(**kwargs)
    assert kenv.headers.source != "none", kenv.headers.detail
    if where == "generic-shim":
        assert kenv.headers.source == "generic"
        assert os.environ[BCC_ENV] == kenv.headers.bcc_kernel_source

    from bcc import BPF

    src = test_data / "kernelenv_smoke.bpf.c"
    bpf = BPF(src_file=str(src).encode(), cflags=[f"-DISO_TARGET_TGID={os.getpid()}"])
    try:
        calls = 25
        for _ in range(calls):
            os.getppid()
        # Tracepoint programs run synchronously in the syscall: no waiting needed.
        assert bpf[b"hits"][0].value == calls
        assert bpf[b"last_nr"][0].value == SYSCALL_GETPPID[platform.machine()]
        assert bpf[b"comm_len"][0].value == 16  # TASK_COMM_LEN from the kernel headers
    finally:
        bpf.cleanup()


# ---------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------

def test_features_on_this_machine(kernel_env) -> None:
    f = kernel_env.features
    assert f.bpf and f.raw_tracepoint and f.ringbuf and f.btf and f.tracepoint
    assert not f.kprobes and "kprobes" in f.missing_reason("kprobes") and "CONFIG_KPROBES" in f.missing_reason("kprobes")
    assert not f.fentry and "fentry" in f.missing_reason("fentry")
    assert f.missing_reason("btf") == ""
    assert f.has_tracepoint("sched", "sched_switch") and f.has_tracepoint("raw_syscalls", "sys_enter")
    assert not f.has_tracepoint("sched", "no_such_event")
    assert "sched:no_such_event" in f.missing_reason("tracepoint:sched:no_such_event")
    assert f.missing_reason("tracepoint:sched:sched_switch") == ""


def test_fentry_and_kprobe_detection_agree_with_the_kernel(kernel_env) -> None:
    """Whatever this kernel supports, bcc must succeed exactly where detection says yes."""
    from bcc import BPF

    f = kernel_env.features
    fentry_ok = True
    try:
        b = BPF(text=b"KFUNC_PROBE(do_nanosleep) { return 0; }")
        b.cleanup()
    except Exception:  # bcc raises plain Exception on load/attach failures
        fentry_ok = False
    assert fentry_ok == f.fentry, f.missing_reason("fentry")

    kprobe_ok = True
    b = BPF(text=b"int on_call(void *ctx) { return 0; }")
    try:
        b.attach_kprobe(event=b"do_nanosleep", fn_name=b"on_call")
    except Exception:
        kprobe_ok = False
    finally:
        b.cleanup()
    assert kprobe_ok == f.kprobes, f.missing_reason("kprobes")


def test_ringbuf_detection_agrees_with_bcc(kernel_env) -> None:
    from bcc import BPF

    b = BPF(text=b"BPF_RINGBUF_OUTPUT(events, 1);")
    try:
        assert kernel_env.features.ringbuf
    finally:
        b.cleanup()


def test_features_from_a_prepared_old_unprivileged_kernel(tmp_path: Path) -> None:
    proc = _make_tree(tmp_path / "proc", {
        "sys/kernel/osrelease": "5.4.0-old\n",
        "sys/kernel/unprivileged_bpf_disabled": "2\n",
        "self/status": "Name:\tx\nCapEff:\t0000000000000000\n",
    })
    sys_root = _make_tree(tmp_path / "sys", {"kernel/notes": ""})
    f = detect_features(None, sys_root=str(sys_root), proc_root=str(proc), probe_kernel=False)
    assert f.release == "5.4.0-old"
    assert not any(getattr(f, name) for name in FEATURES)
    assert "CAP_BPF" in f.missing_reason("bpf")
    assert "5.8" in f.missing_reason("ringbuf")
    assert "tracefs is not mounted" in f.missing_reason("tracepoint")
    assert "BTF" in f.missing_reason("btf")
    assert "fentry" in f.missing_reason("fentry")
    assert f.missing_reason("nonsense").startswith("unknown kernel feature")


def test_features_capabilities_without_root_are_enough(tmp_path: Path) -> None:
    caps = (1 << CAP_BPF) | (1 << CAP_PERFMON)
    proc = _make_tree(tmp_path / "proc", {
        "sys/kernel/osrelease": "6.6.0\n",
        "sys/kernel/unprivileged_bpf_disabled": "2\n",
        "self/status": f"CapEff:\t{caps:016x}\n",
    })
    sys_root = _make_tree(tmp_path / "sys", {"kernel/btf/vmlinux": ""})
    f = detect_features(None, sys_root=str(sys_root), proc_root=str(proc), probe_kernel=False)
    assert f.bpf and f.raw_tracepoint and f.ringbuf and f.btf
    assert not f.kprobes and "kprobes" in f.missing_reason("kprobes")


def _btf_blob(types: list[bytes], strings: bytes) -> bytes:
    """A BTF file as the kernel lays it out (include/uapi/linux/btf.h): header, types, strings."""
    import struct

    body = b"".join(types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings)) + body + strings


def test_btf_func_id_counts_type_ids_across_kinds(tmp_path: Path) -> None:
    """Function lookup (what fentry detection attaches by) shares the one BTF parser with struct offsets."""
    import struct

    strings = b"\0int\0foo\0bar\0x\0"
    int_t = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32)                   # [1] int
    proto = struct.pack("<III", 0, (13 << 24) | 1, 1) + struct.pack("<II", 0, 1)        # [2] int (*)(int)
    bar_s = struct.pack("<III", 9, (4 << 24) | 1, 4) + struct.pack("<III", 13, 1, 0)    # [3] struct bar { int x; }
    foo_f = struct.pack("<III", 5, 12 << 24, 2)                                         # [4] int foo(int)
    path = tmp_path / "vmlinux"
    path.write_bytes(_btf_blob([int_t, proto, bar_s, foo_f], strings))
    btf = BTF(str(path))
    assert btf.func_id(["bar", "foo"]) == ("foo", 4)  # "bar" is a struct here, not a function
    assert btf.func_id(["nope"]) is None
    assert btf.member("bar", "x").offset == 0


def test_btf_func_id_on_the_running_kernel() -> None:
    btf = BTF("/sys/kernel/btf/vmlinux")
    name, type_id = btf.func_id(["no_such_function_here", "do_nanosleep", "vfs_read"])
    assert name == "do_nanosleep" and type_id > 0
    assert btf.has_struct("task_struct")


def test_feature_detection_is_fast(kernel_env) -> None:
    start = time.monotonic()
    detect_features(kernel_env.tracefs)
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def test_cli_reports_choices_as_json(repo_root: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "isoscope.kernel.env", "--json"], cwd=repo_root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["headers"]["source"] in ("host", "configured", "generic", "kheaders")
    assert set(FEATURES) <= set(data["features"])
    assert data["features"]["btf"] is True and data["features"]["kprobes"] is False


def test_cli_text_names_every_feature(repo_root: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "isoscope.kernel.env"], cwd=repo_root,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in FEATURES:
        assert any(line.startswith(name + " ") for line in out.stdout.splitlines()), name
    assert "CONFIG_KPROBES" in out.stdout


def test_headers_choice_apply_roundtrip() -> None:
    env: dict[str, str] = {}
    HeadersChoice(path="/x", source="generic", detail="", bcc_kernel_source="/shim").apply(env)
    assert env == {BCC_ENV: "/shim"}
    HeadersChoice(path="/x", source="host", detail="").apply(env)
    assert env == {}
    assert isinstance(Features(True, True, True, True, True, False, False, None).reasons, dict)
