"""An unrelated CPU hog, for tests whose bars must hold on a busy node (production nodes are busy)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def cpu_hog(cpu: int = 0) -> Iterator[subprocess.Popen]:
    """A process spinning on ``cpu`` outside every test cgroup, killed on exit.

    It is nobody's fault: a thread that runs on that CPU waits for it as it would for
    any other tenant of the node, and a test's own truth records that wait.
    """
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))  # noqa: PLW1509
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait(timeout=10)
