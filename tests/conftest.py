"""Shared, generic pytest fixtures.

Kernel tests need root; they fail (never skip) without it, so a CI run
that lost its privileges is red instead of silently green.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"


def _fail_unless_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root (eBPF, mounts, cgroups); run the suite as root, e.g. sudo make test",
                    pytrace=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``kernel`` need root: fail them early and clearly otherwise."""
    if item.get_closest_marker("kernel") is not None:
        _fail_unless_root(item.nodeid)


@pytest.fixture
def requires_root(request: pytest.FixtureRequest) -> None:
    """Fail (not skip) the requesting test when not running as root."""
    _fail_unless_root(request.node.nodeid)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout the tests run from."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``tests/data``: real files the tests load (BPF programs, fixtures)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def kernel_env() -> Iterator[Any]:
    """Kernel access prepared once per session, as the daemon does at start.

    Mounts tracefs if needed and sets ``BCC_KERNEL_SOURCE`` when the headers
    need it, so tests may ``import bcc`` afterwards. Yields
    :class:`isoscope.kernel.env.KernelEnv`.
    """
    _fail_unless_root("kernel_env")
    from isoscope.kernel.env import prepare
    from isoscope.kernel.headers import BCC_ENV

    before = os.environ.get(BCC_ENV)
    env = prepare()
    for line in env.messages:
        logger.info("kernel_env: %s", line)
    yield env
    # Leave the environment as found; tracefs stays mounted (the system's own mount point).
    if before is None:
        os.environ.pop(BCC_ENV, None)
    else:
        os.environ[BCC_ENV] = before
