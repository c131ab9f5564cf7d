"""Helpers shared by tests that drive the real ``batchrun`` command against the simulator."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCHRUN = str(Path(sys.executable).with_name("batchrun"))

_spec = importlib.util.spec_from_file_location("make_job", ROOT / "bench" / "make_job.py")
assert _spec and _spec.loader
make_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_job)
write_job = make_job.write_job


def batchrun(
    *args: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    key: str = "sk-test-key",
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; the key comes from the environment only."""
    full_env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    full_env["OPENAI_API_KEY"] = key
    full_env.update(env or {})
    return subprocess.run(
        [BATCHRUN, *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def export_rows(db: Path) -> list[dict[str, Any]]:
    out = batchrun("export", "--db", db)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]
