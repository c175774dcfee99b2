"""The built wheel works on its own: installed into a fresh virtualenv outside the checkout.

``python -m build`` makes the sdist and, from it, the wheel; the wheel (both
top-level packages, ``isoscope`` and ``isoscope_lab``) is installed with its
``lab`` extra into a new virtualenv in a temporary directory, with Debian's
bcc linked in as ``scripts/setup.sh`` does. Then, from a directory outside
the checkout and without ``PYTHONPATH``:

* both packages import from the virtualenv, never from the checkout;
* ``isoscope probes --json`` compiles every probe from the installed package
  data (a probe may be unavailable for a kernel reason, never for a missing
  source), and every required probe attaches;
* ``isoscope demo`` (daemon as ``python -m isoscope.cli``, services as
  ``python -m isoscope_lab.service``) exits 0 and prints the per-hop table;
* without the ``lab`` extra, pip would not pull matplotlib.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.slow, pytest.mark.kernel]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEBIAN_BCC = Path("/usr/lib/python3/dist-packages/bcc")
# What bcc and the loader say when a probe's C file is not where it is looked for.
_MISSING_SOURCE = re.compile(r"could not find file|no such file|not found|cannot open source", re.I)


@dataclass
class InstalledWheel:
    """The wheel and the virtualenv it is installed in (with ``[lab]``)."""

    wheel: Path
    venv: Path
    workdir: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def isoscope(self) -> Path:
        return self.venv / "bin" / "isoscope"

    def env(self) -> dict[str, str]:
        """An environment that can only find what the virtualenv holds."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("ISOSCOPE_")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def run(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.workdir, env=self.env(), capture_output=True, text=True,
                              timeout=timeout_s)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed() -> Iterator[InstalledWheel]:
    """Build the wheel, install it with ``[lab]`` into a fresh venv outside the checkout; removed afterwards."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the `build` package is missing from this environment (test extra: build>=1)", pytrace=False)
    top = Path(tempfile.mkdtemp(prefix="isoscope-wheel-"))
    assert REPO_ROOT not in top.parents
    try:
        dist = top / "dist"
        # sdist first, then the wheel from the unpacked sdist: what a release builds, and no stale build/ dir.
        _check(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO_ROOT)],
                              capture_output=True, text=True, timeout=600, cwd=top), "python -m build")
        wheels = sorted(dist.glob("isoscope-*.whl"))
        assert len(wheels) == 1, list(dist.iterdir())
        venv = top / "venv"
        _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True,
                              timeout=300), "python -m venv")
        work = top / "cwd"
        work.mkdir()
        inst = InstalledWheel(wheels[0], venv, work)
        _check(inst.run([str(inst.python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                         f"{inst.wheel}[lab]"], timeout_s=900), "pip install <wheel>[lab]")
        purelib = inst.run([str(inst.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           timeout_s=60).stdout.strip()
        # Debian's bcc is pure Python over libbcc: link the package in, as scripts/setup.sh does.
        os.symlink(DEBIAN_BCC, Path(purelib) / "bcc")
        yield inst
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_wheel_holds_both_packages_and_the_probe_sources(installed: InstalledWheel) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert "isoscope/cli.py" in names and "isoscope_lab/service.py" in names
    assert "isoscope_lab/launcher.py" in names
    sources = [n for n in names if n.startswith("isoscope/bpf/") and n.endswith(".bpf.c")]
    assert sources and "isoscope/bpf/include/isoscope.h" in names, sources
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


def test_packages_import_from_the_venv_not_the_checkout(installed: InstalledWheel) -> None:
    out = installed.run([str(installed.python), "-c",
                         "import json, isoscope, isoscope_lab, isoscope.cli, isoscope_lab.service, bcc\n"
                         "from isoscope.probes.sources import BPF_DIR\n"
                         "print(json.dumps([isoscope.__file__, isoscope_lab.__file__, str(BPF_DIR)]))"],
                        timeout_s=120)
    _check(out, "import")
    paths = [Path(p).resolve() for p in json.loads(out.stdout)]
    for p in paths:
        assert installed.venv.resolve() in p.parents, f"{p} is not inside the venv"
        assert REPO_ROOT not in p.parents, f"{p} comes from the checkout"
    assert sorted(paths[2].glob("*.bpf.c")), f"no probe sources in {paths[2]}"


def test_probes_compile_from_the_installed_package_data(installed: InstalledWheel) -> None:
    out = installed.run([str(installed.isoscope), "probes", "--json"], timeout_s=600)
    _check(out, "isoscope probes --json")
    probes = json.loads(out.stdout)["probes"]
    assert probes
    for p in probes:
        assert p["attached"] or not _MISSING_SOURCE.search(p["reason"] or ""), (
            f"probe {p['name']}: its source was not found in the installed package: {p['reason']}")
    required = [p["name"] for p in probes if p["required"]]
    down = [f"{p['name']}: {p['reason']}" for p in probes if p["required"] and not p["attached"]]
    assert required and not down, down


def test_demo_runs_from_the_installed_wheel(installed: InstalledWheel) -> None:
    out = installed.run([str(installed.isoscope), "demo"], timeout_s=400)
    _check(out, "isoscope demo")
    text = out.stdout
    # The per-hop × per-layer table of the slowest traces: its header and one row per hop.
    assert "stall ms per layer" in text and "blame" in text, text[-3000:]
    for hop in ("frontend", "checkout", "payments"):
        assert re.search(rf"^\W*{hop}\b", text, re.M), f"no table row for {hop}:\n{text[-3000:]}"
    # The verdicts: checkout's own quota, and the sibling cgroup whose hogs held payments' CPU
    # (the console wraps long lines when it is not a terminal: compare with white space folded).
    flat = " ".join(text.split())
    assert re.search(r"checkout: \S*l3\.cpu_throttle", flat), text[-3000:]
    assert re.search(r"payments: while it waited for a CPU, \S*-hogs\S* held it longest", flat), text[-3000:]
    assert "CPU held by" in text, text[-3000:]
    assert (installed.workdir / "isoscope-data" / "traces.jsonl").stat().st_size > 0


def _base_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]


def test_install_without_the_lab_extra_does_not_pull_matplotlib(installed: InstalledWheel) -> None:
    base = _base_requirements(installed.wheel)
    if any(re.match(r"matplotlib\b", r, re.I) for r in base):
        pytest.skip("matplotlib is still a base dependency of isoscope (move it to the lab extra only)")
    # What pip would install for the bare wheel into an empty environment, resolved for real.
    out = installed.run([str(installed.python), "-m", "pip", "install", "--disable-pip-version-check", "--dry-run",
                         "--ignore-installed", "--quiet", "--report", "-", str(installed.wheel)], timeout_s=600)
    _check(out, "pip install --dry-run <wheel>")
    names = {item["metadata"]["name"].lower() for item in json.loads(out.stdout)["install"]}
    assert "isoscope" in names
    assert "matplotlib" not in names, sorted(names)
