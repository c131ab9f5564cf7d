"""The Python API (``import runner``): what a notebook or a pipeline does with batchrun, against
the simulator through the real openai client, with the key passed as an argument."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import sys
import threading
from decimal import Decimal
from pathlib import Path

import pytest

import runner
from runner.simulator import SimulatorThread

from .helpers import ROOT, batchrun, query

KEY = "sk-notebook-key"


def _rows(n: int, *, prefix: str = "r") -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Summarise item {i} in one line."}],
                "max_completion_tokens": 24,
            },
        }
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API takes the key as an argument: nothing may come from the environment."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_a_notebook_prices_builds_runs_and_reads_500_rows_and_the_books_equal_the_bill(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    rows = _rows(500)
    plan = runner.price(rows)
    assert plan.requests == 500
    assert isinstance(plan.worst_usd, Decimal) and 0 < plan.floor_usd < plan.worst_usd
    assert set(plan.by_model) == {"gpt-4o-mini"}
    db_path = tmp_path / "nb.db"
    with runner.Database(db_path) as db:
        job = db.import_rows(rows, cap="5.00", name="reviews")
        assert job.requests == 500 and job.worst_usd == plan.worst_usd
        result = job.run(api_key=KEY, base_url=simulator.base_url)
        assert result.ok and result.outcome is runner.RunOutcome.COMPLETE, result.message
        results = list(job.results())
        assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(500)]
        assert all(r["response"]["status_code"] == 200 for r in results)
        status = job.status()
        job_id = job.id
    bill = simulator.ledger_snapshot()["billed_pico"]
    spent = query(db_path, "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger")[0][0]
    assert spent == bill > 0
    assert status["spent_usd"] == result.status["spent_usd"]
    assert Decimal(status["spent_usd"]) * 10**12 == bill
    # the command line sees the same job, exactly as Job.status() said it
    out = batchrun("status", "--db", db_path, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["jobs"] == [status] and status["job"] == job_id


def test_the_same_rows_find_the_same_job_and_nothing_is_paid_twice(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    with runner.Database(tmp_path / "a.db") as db:
        first = db.import_rows(_rows(20), cap="1")
        assert first.run(api_key=KEY, base_url=simulator.base_url).ok
        billed = simulator.ledger_snapshot()["requests_billed"]
        again = db.import_rows(_rows(20), cap="1")
        assert again.id == first.id and len(db.jobs()) == 1
        assert again.run(api_key=KEY, base_url=simulator.base_url).ok
        assert simulator.ledger_snapshot()["requests_billed"] == billed == 20
        # rows that changed under the same name reuse the results of those that did not
        changed = db.import_rows([*_rows(20), *_rows(2, prefix="new")], cap="1")
        assert changed.id != first.id
        assert changed.run(api_key=KEY, base_url=simulator.base_url).ok
        assert simulator.ledger_snapshot()["requests_billed"] == 22


async def test_arun_runs_inside_a_running_event_loop_and_run_there_says_to_await(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    with runner.Database(tmp_path / "loop.db") as db:
        job = db.import_rows(_rows(10), cap="1")
        with pytest.raises(runner.UsageError, match=r"await job\.arun"):
            job.run(api_key=KEY, base_url=simulator.base_url)
        seen: list[int] = []
        result = await job.arun(
            api_key=KEY, base_url=simulator.base_url, progress=lambda s: seen.append(s.done)
        )
        assert result.ok and seen and seen[-1] == 10


async def test_a_stop_event_stops_the_run_in_order_and_the_rest_resumes(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(latency_ms=50)
    with runner.Database(tmp_path / "stop.db") as db:
        job = db.import_rows(_rows(400), cap="5")
        stop = asyncio.Event()
        task = asyncio.ensure_future(
            job.arun(api_key=KEY, base_url=sim.base_url, rpm=120, stop=stop)
        )
        while sim.ledger_snapshot()["requests_received"] < 20:
            await asyncio.sleep(0.01)
        stop.set()
        result = await task
        assert result.outcome is runner.RunOutcome.INTERRUPTED
        by_state = result.status["by_state"]
        assert "reserved" not in by_state and 0 < by_state.get("done", 0) < 400
        rest = await job.arun(api_key=KEY, base_url=sim.base_url)
        assert rest.ok
    bill = sim.ledger_snapshot()
    assert bill["requests_billed"] == 400 and bill["duplicate_bodies"] == 0


async def test_cancelling_the_task_stops_the_run_in_order_and_leaves_nothing_reserved(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(latency_ms=50)
    db_path = tmp_path / "cancel.db"
    with runner.Database(db_path) as db:
        job = db.import_rows(_rows(400), cap="5")
        task = asyncio.ensure_future(job.arun(api_key=KEY, base_url=sim.base_url, rpm=3000))
        while sim.ledger_snapshot()["requests_received"] < 20:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        states = dict(query(db_path, "SELECT state, COUNT(*) FROM requests GROUP BY state"))
        assert "reserved" not in states and states.get("done", 0) > 0
        spent = query(db_path, "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger")[0][0]
        assert spent >= sim.ledger_snapshot()["billed_pico"]  # books never below the bill


def test_a_library_run_by_a_deadline_sends_the_bulk_by_batch_at_batch_prices(
    tmp_path: Path, make_simulator
) -> None:
    """``via="auto"`` with a deadline from Python: quick batches finish the job at batch prices,
    and the books equal the bill."""
    sim = make_simulator(batch_lines_per_s=50_000, rpm=600)
    with runner.Database(tmp_path / "auto.db") as db:
        job = db.import_rows(_rows(40), cap="1")
        result = job.run(
            api_key=KEY,
            base_url=sim.base_url,
            via="auto",
            # The simulator cancels at once: planning the real API's 10 minutes of cancelling
            # against a 10-minute deadline would switch at the first look.
            deadline=runner.Deadline(spec="10m", margin=0.1, slack=2.0, cancel=1.0, tick=0.2),
            batching=runner.Batching(poll_first=0.05, poll_interval=0.25),
        )
        assert result.ok, result.message
        lanes = result.status["lanes"]
    # One request went synchronously first to learn the rate limits (none were given).
    assert lanes["batch"]["results"] == 39 and lanes["sync"]["results"] == 1, lanes
    assert lanes["switched_at"] is None  # the batches were quick: no switch
    spent = query(tmp_path / "auto.db", "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger")[0][0]
    assert spent == sim.ledger_snapshot()["billed_pico"] > 0


def test_a_threading_event_stops_a_run_in_another_thread(tmp_path: Path, make_simulator) -> None:
    sim = make_simulator(latency_ms=50)
    stop = threading.Event()
    with runner.Database(tmp_path / "thread.db") as db:
        job = db.import_rows(_rows(400), cap="5")
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        result = job.run(api_key=KEY, base_url=sim.base_url, rpm=3000, stop=stop)
        timer.join()
        assert result.outcome is runner.RunOutcome.INTERRUPTED
        assert "reserved" not in result.status["by_state"]


def test_to_requests_builds_rows_from_a_table_and_to_pandas_reads_them_back(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"id": ["a", "b", "c"], "review": ["good", "bad", "fine"]})
    rows = list(runner.to_requests(frame, prompt="review", model="gpt-4o-mini",
                                   max_tokens=16, id_column="id"))  # fmt: skip
    assert [r["custom_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["body"]["messages"][-1]["content"] == "good"
    with runner.Database(tmp_path / "pd.db") as db:
        job = db.import_rows(rows, cap="1")
        job.run(api_key=KEY, base_url=simulator.base_url)
        table = job.to_pandas()
    assert list(table["custom_id"]) == ["a", "b", "c"]
    assert list(table["status"]) == ["done"] * 3
    assert table["output_tokens"].dtype.kind == "i" and (table["output_tokens"] > 0).all()
    assert sum(table["cost_usd"]) * 10**12 == simulator.ledger_snapshot()["billed_pico"]


def test_to_pandas_without_pandas_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with runner.Database(tmp_path / "nopd.db") as db:
        job = db.import_rows(_rows(1), cap="1")
        monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails
        with pytest.raises(runner.UsageError, match="pip install pandas"):
            job.to_pandas()


def test_bad_input_is_an_error_of_the_hierarchy_that_names_no_command_line_flag(
    tmp_path: Path,
) -> None:
    with runner.Database(tmp_path / "bad.db") as db:
        for call in (
            lambda: db.import_rows([{"custom_id": "x"}], cap="1"),
            lambda: db.import_rows(["not a dict"], cap="1"),  # type: ignore[list-item]
            lambda: db.import_rows(_rows(1), cap="-1"),
            lambda: db.import_rows(_rows(1), cap="lots"),
            lambda: db.job(42),
        ):
            with pytest.raises(runner.BatchrunError) as caught:
                call()
            assert "--" not in str(caught.value), caught.value
        assert db.jobs() == []  # nothing half-imported
        job = db.import_rows(_rows(1), cap="1")
        with pytest.raises(runner.UsageError, match="via"):
            job.run(api_key=KEY, via="carrier-pigeon")
        with pytest.raises(runner.UsageError, match="empty"):
            job.run(api_key="  ", base_url="http://127.0.0.1:9/v1")
    with (
        runner.Database(tmp_path / "bad.db", readonly=True) as ro,
        pytest.raises(runner.UsageError, match="read-only"),
    ):
        ro.import_rows(_rows(2), cap="1")


def test_import_runner_is_light_and_the_public_names_resolve() -> None:
    code = (
        "import sys, runner; assert 'asyncio' not in sys.modules and 'openai' not in sys.modules;"
        " [getattr(runner, n) for n in runner.__all__]; print('ok')"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# The command line's own concerns: presentation (what it prints and draws), options and errors.
CLI_MAY_IMPORT = {
    "runner",  # the public API
    "runner.errors",
    "runner.settings",
    "runner.money",
    "runner.redact",
    "runner.report",
    "runner.htmlreport",
    "runner.progress",
    "runner.export",
    "runner.simulator.cli",
}


def test_the_command_line_calls_only_the_public_api() -> None:
    tree = ast.parse((ROOT / "runner" / "cli.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            imported.add("runner" + (f".{node.module}" if node.module else ""))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runner"):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("runner"))
    assert imported - CLI_MAY_IMPORT == set()
    assert "runner" in imported
