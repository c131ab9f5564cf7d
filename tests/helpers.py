"""Helpers shared by tests that drive the real ``batchrun`` command against the simulator."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner.simulator import SimulatorThread

ROOT = Path(__file__).resolve().parent.parent
BATCHRUN = str(Path(sys.executable).with_name("batchrun"))

_spec = importlib.util.spec_from_file_location("make_job", ROOT / "bench" / "make_job.py")
assert _spec and _spec.loader
make_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_job)
write_job = make_job.write_job


def batchrun_env(key: str = "sk-test-key", **extra: str) -> dict[str, str]:
    """This environment with ``key`` as the API key: the only way batchrun takes one."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["OPENAI_API_KEY"] = key
    env.update(extra)
    return env


def batchrun(
    *args: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    key: str = "sk-test-key",
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script to completion."""
    return subprocess.run(
        [BATCHRUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=batchrun_env(key, **(env or {})),
        timeout=timeout,
    )


def start_run(
    job: Path, db: Path, sim: SimulatorThread, *extra: str
) -> subprocess.Popen[str]:
    """Start ``batchrun run`` against ``sim`` in the background (to signal or kill it)."""
    return subprocess.Popen(
        [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
         "--quiet", *extra],
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
