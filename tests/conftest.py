"""Shared fixtures: a real OpenAI-compatible simulator server per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from runner.simulator import SimConfig, SimulatorThread


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    """A started simulator with the default config (unlimited, no faults, no latency)."""
    with SimulatorThread() as sim:
        yield sim


@pytest.fixture
def make_simulator() -> Iterator[Callable[..., SimulatorThread]]:
    """Factory: ``make_simulator(rpm=5, p_reset=1.0)`` starts one; all are stopped afterwards."""
    started: list[SimulatorThread] = []

    def make(**config: Any) -> SimulatorThread:
        sim = SimulatorThread(SimConfig(**config))
        sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()
