"""Fixtures of the scenario tests: one ``isoscope run`` daemon for the whole session, on its default configuration.

The daemon (:func:`isoscope_lab.daemon_for_lab`) is configured as it ships: it
follows nothing in advance and learns of each service from the connection its
spans arrive on, from the service's own network namespace at the node address.
It exports to a file in the session's temporary directory; each scenario finds
its own spans by the ``lab.run`` resource attribute its services carry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from isoscope_lab import IsoscopeDaemon, daemon_available, daemon_for_lab
from tests.busy import cpu_hog

logger = logging.getLogger(__name__)


def _need_daemon() -> None:
    if not daemon_available():
        pytest.fail("isoscope.cli is not importable: the scenario tests need `python -m isoscope.cli run`",
                    pytrace=False)


@pytest.fixture(scope="session")
def lab_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsoscopeDaemon]:
    """A running daemon on its default configuration, stopped (drained) at the end of the session."""
    _need_daemon()
    out: Path = tmp_path_factory.mktemp("isoscope-lab")
    with daemon_for_lab(out / "traces.jsonl") as daemon:
        yield daemon
    logger.info("daemon log: %s", daemon.log_path)


@pytest.fixture(scope="module", autouse=True)
def busy_node() -> Iterator[None]:
    """An unrelated CPU hog on one core for every scenario module (stopped after it, so the rest of
    the suite runs as before): production nodes are busy, and the
    bars (right verdicts, ns within tolerance, no wrong blame on clean hops) must hold there too.

    It runs outside every lab cgroup on CPU 0 (the reclaim hop, whose oracle needs one CPU, is pinned
    to CPU 1).
    """
    with cpu_hog(0):
        yield
