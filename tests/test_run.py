"""``run`` around the engine: finding or importing the job, resuming it, and the files it
depends on changing underneath it (the job file, the price table, the database)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.engine import RunOutcome
from runner.errors import UsageError
from runner.simulator import SimulatorThread

from .books import rows
from .helpers import run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]


async def test_a_changed_job_file_runs_as_a_new_job_that_pays_only_for_changed_rows(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=1)
    original = job.read_bytes()
    assert (await run_in_process(job, db, sim.base_url)).exit_code == 0
    lines = [json.loads(line) for line in original.decode().splitlines()]
    for i in (3, 7):  # two bodies change
        lines[i]["body"]["messages"][-1]["content"] += " (edited)"
    del lines[12]  # one vanishes
    for i in range(3):  # three are added
        extra = json.loads(json.dumps(lines[0]))
        extra["custom_id"] = f"new-{i}"
        extra["body"]["messages"][-1]["content"] += f" (new {i})"
        lines.append(extra)
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sent = sim.ledger_snapshot()["requests_received"]
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.exit_code == 0, ran.message
    assert "imported as job 2" in ran.output
    assert "2 custom_ids changed, 3 added, 1 vanished" in ran.output
    assert "17 unchanged request(s) reuse job 1's results" in ran.output
    assert sim.ledger_snapshot()["requests_received"] - sent == 5  # only what changed
    assert ran.status.reused == 17 and ran.status.states == {"done": 22}
    (spent,) = rows(db, "SELECT SUM(amount_pico) FROM ledger WHERE job_id = 2")[0]
    (paid,) = rows(
        db,
        "SELECT SUM(s.cost_pico) FROM results s JOIN requests r ON r.id = s.request_id "
        "WHERE r.job_id = 2 AND COALESCE(s.flags, '') NOT LIKE '%reused%'",
    )[0]
    assert spent == paid  # the cap of job 2 paid for its 5 new results only
    # The original content under another path is still job 1 (identity is the content).
    elsewhere = tmp_path / "copy of the job.jsonl"
    elsewhere.write_bytes(original)
    ran = await run_in_process(elsewhere, db, sim.base_url)
    assert ran.exit_code == 0 and "resuming job 1" in ran.output
    # Without reuse, a changed file sends everything again.
    lines[0]["body"]["messages"][-1]["content"] += " (again)"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sent = sim.ledger_snapshot()["requests_received"]
    ran = await run_in_process(job, db, sim.base_url, reuse=False)
    assert "every request is sent again (reuse is off)" in ran.output
    assert sim.ledger_snapshot()["requests_received"] - sent == 22
    assert rows(db, "SELECT id, requests FROM jobs ORDER BY id") == [(1, 20), (2, 22), (3, 22)]


async def test_a_job_file_that_changes_while_it_is_read_is_not_committed(
    tmp_path: Path, make_simulator: SimFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 50, seed=2)
    # The bytes read differ from the bytes hashed first, as when a line is appended meanwhile.
    monkeypatch.setattr("runner.run.file_sha256", lambda _path: "0" * 64)
    with pytest.raises(UsageError, match="changed while it was being read"):
        await run_in_process(job, db, sim.base_url)
    assert rows(db, "SELECT COUNT(*) FROM jobs") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM requests") == [(0,)]


async def test_a_changed_price_table_reprices_the_pending_requests_on_resume(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 100, seed=3, max_tokens=64)
    ran = await run_in_process(job, db, sim.base_url, cap="0.0005")
    assert ran.exit_code == 3
    fit_before = ran.status.states["pending"]
    prices = tmp_path / "prices.toml"
    prices.write_text('[models.gpt-4o-mini]\noutput = "6.00"\n')  # ten times the bundled price
    ran = await run_in_process(job, db, sim.base_url, cap="0.0005", prices=prices)
    assert "the price table changed since job 1 was priced" in ran.output
    assert "re-priced" in ran.output
    # The worst cases the cap is checked against are the new ones: far fewer fit.
    (worst,) = rows(db, "SELECT MAX(worst_pico) FROM requests WHERE state = 'pending'")[0]
    assert worst > 64 * 6_000_000
    assert ran.exit_code == 3 and ran.status.states["pending"] <= fit_before


async def test_a_database_deleted_mid_run_stops_the_run(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=20)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2000, seed=4)

    async def delete_it() -> None:
        while sim.ledger_snapshot()["requests_received"] < 50:
            await asyncio.sleep(0.01)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    deleting = asyncio.create_task(delete_it())
    ran = await run_in_process(job, db, sim.base_url)
    await deleting
    assert ran.report.outcome is RunOutcome.STORE_ERROR and ran.exit_code == 2
    assert "deleted or replaced" in (ran.message or "")
    assert sim.ledger_snapshot()["requests_received"] < 2000
