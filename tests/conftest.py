"""Shared fixtures: a real OpenAI-compatible simulator server per test."""

from __future__ import annotations

import os
import secrets
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


# -- PostgreSQL ----------------------------------------------------------------------------------
# Tests that need PostgreSQL get a database of their own for the test session on the server
# named by BATCHRUN_TEST_POSTGRES (a URL whose database the tests may connect to, to create and
# drop theirs). Without a reachable server they are skipped, and the reason is printed at the
# end; with BATCHRUN_TEST_POSTGRES_REQUIRED=1 (what .ci/run sets) they fail instead.

POSTGRES_ENV = "BATCHRUN_TEST_POSTGRES"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_REQUIRED_ENV = "BATCHRUN_TEST_POSTGRES_REQUIRED"
_postgres_skipped: list[str] = []


def _admin_connect(url: str) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres_server_db() -> Iterator[str]:
    """The URL of a fresh database created for this test session; dropped afterwards."""
    from sqlalchemy.engine import make_url

    admin = os.environ.get(POSTGRES_ENV) or POSTGRES_DEFAULT
    shown = make_url(admin).render_as_string(hide_password=True)
    try:
        conn = _admin_connect(admin)
    except Exception as exc:  # ImportError too: the test extra was not installed
        reason = f"PostgreSQL at {shown} ({POSTGRES_ENV}) is not reachable: {exc}".strip()
        if os.environ.get(POSTGRES_REQUIRED_ENV) == "1":
            pytest.fail(reason)
        if not _postgres_skipped:
            _postgres_skipped.append(reason)
        pytest.skip(reason)
    name = f"batchrun_test_{os.getpid()}_{secrets.token_hex(4)}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connect(admin) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(postgres_server_db: str) -> str:
    """The session's PostgreSQL database, emptied of every job (its schema stays)."""
    with _admin_connect(postgres_server_db) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename != 'alembic_version'"
            )
        ]
        if tables:
            names = ", ".join(f'"{t}"' for t in tables)
            conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    return postgres_server_db


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in _postgres_skipped:
        terminalreporter.write_line(f"PostgreSQL tests skipped: {reason}", yellow=True)
