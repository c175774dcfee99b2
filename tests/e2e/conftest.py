"""Fixtures of the end-to-end tests: a recording OTLP backend and the real daemon forwarding to it."""

from __future__ import annotations

import logging
from typing import Iterator

import pytest

from isoscope_lab.launcher import IsoscopeDaemon
from tests.otlp_backend import OtlpBackend

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def backend() -> Iterator[OtlpBackend]:
    """A recording OTLP backend (gRPC and HTTP) shared by a test module."""
    with OtlpBackend() as b:
        yield b


@pytest.fixture(scope="module")
def daemon(backend: OtlpBackend) -> Iterator[IsoscopeDaemon]:
    """The daemon with its kernel probes, forwarding over gRPC to the module's recording backend."""
    with IsoscopeDaemon(forward=[backend.grpc_url]) as d:
        yield d
