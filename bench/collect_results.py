#!/usr/bin/env python3
"""Assemble bench/RESULTS.md from the per-benchmark result files in bench/results/.

Each benchmark writes its own file (so they can run separately); this puts the
latest figures in one place, in a fixed order, with where each came from.
"""

from __future__ import annotations

import datetime
import pathlib
import platform
import sys

HERE = pathlib.Path(__file__).resolve().parent
ORDER = [
    ("syscall_tax.md", "bench/syscall_tax.py"),
    ("switch_tax.md", "bench/switch_tax.py"),
    ("sample_tax.md", "bench/sample_tax.py"),
    ("rss.md", "bench/rss.py"),
    ("throughput.md", "bench/throughput.py"),
    ("accuracy.md", "bench/accuracy.py"),
    ("soak.md", "bench/soak.py"),
    ("reliability.md", "tests/reliability (make test)"),
]


def main() -> int:
    parts = [
        "# Benchmark results\n",
        f"Assembled {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on kernel "
        f"{platform.release()}, 2-core KVM guest. Every figure below is measured against a baseline taken in "
        "the same run; re-run a script to refresh its section (`make bench` runs them all).\n",
    ]
    missing = []
    for name, source in ORDER:
        path = HERE / "results" / name
        if not path.exists():
            missing.append(name)
            continue
        body = path.read_text().strip()
        # Demote the section's own top-level heading so the document has one title.
        lines = body.splitlines()
        if lines and lines[0].startswith("# "):
            lines[0] = "#" + lines[0]
        parts.append(f"\n<!-- from {source} -->\n" + "\n".join(lines) + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    if missing:
        print("missing result files: " + ", ".join(missing), file=sys.stderr)
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
