"""Pytest fixtures for the market simulator (registered from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loaders.simulator import Market, SimulatorServer


@pytest.fixture(scope="session")
def market() -> Market:
    """One deterministic market for the whole session (its chain cache is shared)."""
    return Market(seed=7)


@pytest.fixture
def simulator(market: Market) -> Iterator[SimulatorServer]:
    """A started simulator on a free loopback port, api key "test-key"; stopped afterwards."""
    server = SimulatorServer(market, api_key="test-key").start()
    try:
        yield server
    finally:
        server.clear_faults()
        server.stop()
