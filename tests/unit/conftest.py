"""Fixtures shared by the unit tests of backend/h2grpc/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.h2server import Running


@pytest.fixture
def server() -> Iterator[Running]:
    running = Running(max_message_bytes=8 * 1024 * 1024)
    yield running
    running.close()
