"""Files the tests make on disk and wait for."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def cold_file(path: str, size_mb: int) -> Iterator[str]:
    """A file of ``size_mb`` MiB of random bytes at ``path``, on disk and none of it in the page cache;
    removed on exit."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(size_mb):
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        yield path
    finally:
        os.unlink(path)


def wait_file(path: Path, proc: subprocess.Popen[Any], timeout_s: float) -> str:
    """The text of ``path`` once ``proc`` has written it; fails early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{path} not written within {timeout_s}s")
