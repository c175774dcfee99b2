"""Fixtures of the reliability tests: the real daemon (started per test) and a real recording backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import pytest

from isoscope_lab.launcher import IsoscopeDaemon, deep_merge

logger = logging.getLogger(__name__)

QUICK_RETRY = {"exporters": {"queue": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0}}}
"""Short backoff keeps outage tests quick; production defaults are longer."""


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """``daemon_factory(name, *, start=True, probes=False, **IsoscopeDaemon kwargs)`` → a daemon in ``tmp_path/name``.

    Probes are off unless asked for (most of these tests are about delivery), and the
    export queue retries quickly. Every daemon is stopped at teardown, pass or fail.
    """
    made: list[IsoscopeDaemon] = []

    def factory(name: str = "d", *, start: bool = True, probes: bool = False,
                config: dict[str, Any] | None = None, **kwargs: Any) -> IsoscopeDaemon:
        d = IsoscopeDaemon(tmp_path / name, probes=probes, config=deep_merge(QUICK_RETRY, config or {}), **kwargs)
        made.append(d)
        if start:
            d.start()
        return d

    yield factory
    for d in made:
        try:
            d.stop(10.0)
        except Exception:  # noqa: BLE001 - keep stopping the others
            logger.exception("stopping daemon failed")


@pytest.fixture
def backend() -> Iterator[Any]:
    """A real recording OTLP backend on free loopback ports."""
    from tests.otlp_backend import OtlpBackend

    b = OtlpBackend()
    try:
        yield b
    finally:
        b.stop(graceful=False)
