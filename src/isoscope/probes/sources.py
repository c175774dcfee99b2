"""Where the probes' C sources are: ``isoscope/bpf`` shipped as package data.

Found through :mod:`importlib.resources`, so an installed wheel loads its probes
exactly as a checkout does (bcc compiles from real files, so the package must be
installed unzipped, which pip always does).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BPF_DIR = Path(str(resources.files("isoscope") / "bpf"))
INCLUDE_DIR = BPF_DIR / "include"
HEADER = INCLUDE_DIR / "isoscope.h"
"""The one header of event structs: the single source of truth for record layouts."""
