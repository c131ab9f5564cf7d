"""Helpers shared by the tests: running jobs in-process or through the real ``batchrun``
command, against the simulator, and reading the database they leave."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import RunResult, run_with
from runner.cli import exit_status
from runner.money import usd_to_pico
from runner.settings import Limits, Retry, RunSettings, Stopping, Transport
from runner.simulator import SimulatorThread
from runner.store import JobStatus

from .jobgen import write_job

__all__ = ["write_job"]

ROOT = Path(__file__).resolve().parent.parent
BATCHRUN = str(Path(sys.executable).with_name("batchrun"))
TEST_KEY = "sk-test-key"


def batchrun_env(key: str = TEST_KEY, **extra: str) -> dict[str, str]:
    """This environment with ``key`` as the API key: the only way batchrun takes one."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["OPENAI_API_KEY"] = key
    env.update(extra)
    return env


def batchrun(
    *args: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    key: str = TEST_KEY,
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script to completion."""
    return subprocess.run(
        [BATCHRUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=batchrun_env(key, **(env or {})),
        timeout=timeout,
    )


def start_run(job: Path, db: Path, sim: SimulatorThread, *extra: str) -> subprocess.Popen[str]:
    """Start ``batchrun run`` against ``sim`` in the background (to signal or kill it)."""
    return subprocess.Popen(
        [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
         *extra],
        env=batchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_received(sim: SimulatorThread, n: int, proc: subprocess.Popen[str]) -> None:
    """Wait until the simulator has received ``n`` requests from a running ``proc``."""
    deadline = time.monotonic() + 20
    while sim.ledger_snapshot()["requests_received"] < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.005)


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def export_rows(db: Path) -> list[dict[str, Any]]:
    out = batchrun("export", "--db", db)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def ledger_total(db: Path) -> int:
    """What the job's books say was spent (results and unknown outcomes)."""
    return query(db, "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger")[0][0]


def result_costs(db: Path) -> int:
    return query(db, "SELECT COALESCE(SUM(cost_pico), 0) FROM results")[0][0]


@dataclass
class Ran:
    """What an in-process run left: its report, the job's status, what it printed."""

    report: RunResult
    status: JobStatus
    exit_code: int
    message: str | None
    printed: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(self.printed)


async def run_in_process(
    job: Path | None,
    db: Path,
    base_url: str,
    *,
    cap: str = "100",
    key: str = TEST_KEY,
    job_id: int | None = None,
    limits: Limits | None = None,
    retry: Retry | None = None,
    timeout: float = 30.0,
    flex_timeout: float = 900.0,
    grace: float = 10.0,
    **settings: Any,
) -> Ran:
    """Run a job with the library, on the test's event loop (no subprocess, no signals)."""
    run_settings = RunSettings(
        cap_pico=usd_to_pico(cap),
        jobfile=job,
        db=str(db),
        job_id=job_id,
        quiet=True,
        limits=limits or Limits(),
        retry=retry or Retry(backoff_base=0.01, backoff_max=0.05),
        transport=Transport(base_url=base_url, timeout=timeout, flex_timeout=flex_timeout),
        stopping=Stopping(grace=grace),
        **settings,
    )
    printed: list[str] = []
    result = await run_with(run_settings, echo=printed.append, api_key=key)
    assert result.job_status is not None
    return Ran(result, result.job_status, exit_status(result), result.message, printed)
