"""Fixtures of the scenario tests: one ``isoscope run`` daemon for the whole session.

The daemon follows every task (``probes.watch_all``) and exports to a file in
the session's temporary directory; each scenario finds its own spans by the
``lab.run`` resource attribute its services carry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from isoscope_lab import Daemon, daemon_available

logger = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def lab_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A running daemon on free loopback ports, stopped (drained) at the end of the session."""
    if not daemon_available():
        pytest.fail("collector/cli.py is missing: the scenario tests need `python -m isoscope.cli run`",
                    pytrace=False)
    out: Path = tmp_path_factory.mktemp("isoscope-lab")
    daemon = Daemon.on_free_ports(str(out / "traces.jsonl"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        logger.info("daemon log: %s", daemon.log_path)
