"""Budgets: one hard spending limit across every job that draws on it, by period.

Store level (periods, the books of a period kept with each claim and settlement, rollover on an
injected clock), runs against the simulator in this process, and the command line: the bill of
several jobs and runners sharing one budget on SQLite and PostgreSQL stays under it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from runner import run_with
from runner.budgets import NO_BUDGET, check_amount, period_of
from runner.cli import exit_status, main
from runner.clock import Clock
from runner.errors import Declined, StoreError, UsageError
from runner.money import pico_to_decimal, usd_to_pico
from runner.pricing import load_price_table
from runner.report import confirm_question
from runner.run import open_or_import
from runner.settings import Retry, RunSettings, Stopping, Transport
from runner.simulator import SimulatorThread
from runner.store import (
    ChargeRecord,
    Outcomes,
    ReleaseRecord,
    RequestState,
    ResultRecord,
    Store,
    open_store,
)

from .helpers import BATCHRUN, Ran, batchrun, batchrun_env, write_job

SimFactory = Callable[..., SimulatorThread]


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class FakeClock(Clock):
    """The run's clock at a wall-clock time the test sets (``at``); once ``flip_when()`` says so,
    it jumps to ``then`` for good. Intervals and sleeps stay real."""

    def __init__(
        self,
        at: float,
        then: float | None = None,
        flip_when: Callable[[], bool] | None = None,
    ) -> None:
        self.at, self.then = at, then
        self.flip_when, self.flipped = flip_when, False

    def now(self) -> float:
        if self.then is None:
            return self.at
        if not self.flipped:
            self.flipped = self.flip_when is not None and self.flip_when()
        return self.then if self.flipped else self.at


# -- periods ------------------------------------------------------------------------------------


# per, zone, the instant, the period's start and end (local times with their offsets)
PERIOD_CASES = [
    "day UTC 2027-03-10T23:59:59+00:00 2027-03-10T00:00+00:00 2027-03-11T00:00+00:00",
    "week UTC 2027-03-10T12:00+00:00 2027-03-08T00:00+00:00 2027-03-15T00:00+00:00",
    "month UTC 2026-12-31T23:00+00:00 2026-12-01T00:00+00:00 2027-01-01T00:00+00:00",
    # Paris: a month from local midnight, the offset changing within it (DST) ...
    "month Europe/Paris 2027-03-31T21:30+00:00 2027-03-01T00:00+01:00 2027-04-01T00:00+02:00",
    # ... and at 22:30 UTC on 31 March it is April there already.
    "month Europe/Paris 2027-03-31T22:30+00:00 2027-04-01T00:00+02:00 2027-05-01T00:00+02:00",
    "day America/New_York 2027-03-14T12:00+00:00 2027-03-14T00:00-05:00 2027-03-15T00:00-04:00",
]


@pytest.mark.parametrize("case", PERIOD_CASES)
def test_a_period_runs_from_local_midnight_to_the_next(case: str) -> None:
    per, tz, at, start, end = case.split()
    period = period_of(per, tz, _epoch(at))
    assert (period.start, period.end) == (int(_epoch(start)), int(_epoch(end)))


def test_a_total_budget_never_resets() -> None:
    assert period_of("total", "UTC", 1e9) == period_of("total", "UTC", 4e9)
    assert period_of("total", "UTC", 1e9).end is None


@pytest.mark.parametrize("text", ["-1", "abc", "1e30", "0.0000000000001", "nan"])
def test_absurd_amounts_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        check_amount(text)


# -- the store ----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "b.db")
    yield s
    s.close()


def _job(store: Store, tmp_path: Path, name: str, n: int = 20, seed: int = 0) -> int:
    path = tmp_path / f"{name}.jsonl"
    write_job(path, n, seed=seed)
    return open_or_import(store, path, load_price_table(), usd_to_pico("5"), False)[0].id


def _period_rows(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.exec_driver_sql(
                "SELECT budget_id, start, settled_pico, reserved_pico, unknown_pico "
                "FROM budget_periods ORDER BY budget_id, start"
            )
        ]


def _ledger_by_period(store: Store) -> dict[tuple[Any, Any], int]:
    with store.engine.connect() as conn:
        return {
            (b, p): int(n)
            for b, p, n in conn.exec_driver_sql(
                "SELECT budget_id, budget_period, SUM(amount_pico) FROM ledger "
                "GROUP BY budget_id, budget_period"
            )
        }


def _result(req: Any, cost: int) -> ResultRecord:
    return ResultRecord(
        request_id=req.id, state=RequestState.DONE, attempts=1, status_code=200, body="{}",
        response_model=req.model, api_request_id=None, prompt_tokens=1, cached_tokens=0,
        completion_tokens=1, reasoning_tokens=0, cost_pico=cost, latency_ms=1, finished_at=0.0,
        reserved_pico=req.worst_pico,
    )  # fmt: skip


def test_budgets_are_set_changed_listed_and_removed(store: Store) -> None:
    team, new = store.set_budget("team", usd_to_pico("100"))
    assert new and (team.per, team.tz, team.is_default) == ("month", "UTC", False)
    lowered, new = store.set_budget("team", usd_to_pico("50"), per="week", tz="Europe/Paris")
    assert not new and lowered.id == team.id
    assert (lowered.amount_pico, lowered.per, lowered.tz) == (
        usd_to_pico("50"),
        "week",
        "Europe/Paris",
    )
    store.set_budget("ops", usd_to_pico("1"), default=True)
    store.set_budget("team", default=True)  # one default at a time
    assert [(b.name, b.is_default) for b in store.budgets()] == [("ops", False), ("team", True)]
    assert store.default_budget() == store.budget_named("team")
    with pytest.raises(UsageError, match="give its amount"):
        store.set_budget("new")
    store.remove_budget("ops")
    assert [b.name for b in store.budgets()] == ["team"]
    with pytest.raises(UsageError, match="no budget 'ops'"):
        store.remove_budget("ops")


def test_claims_of_two_jobs_never_pass_the_budget_together(store: Store, tmp_path: Path) -> None:
    a, b = _job(store, tmp_path, "a", seed=1), _job(store, tmp_path, "b", seed=2)
    worst = store.pending_worst(a) // 20  # about one request's worst case
    team, _ = store.set_budget("team", 5 * worst, per="total")
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    rb = store.register_runner(b, "h", 2, "sync", 30, team.id)
    first = store.claim(ra, 100)
    assert 0 < len(first.requests) < 20 and first.blocked and first.budget_blocked
    held = sum(r.worst_pico for r in first.requests)
    assert first.budget is not None and first.budget.reserved_pico == held <= team.amount_pico
    second = store.claim(rb, 100)  # what is left does not hold b's first request
    assert second.budget_blocked and len(second.requests) <= 1
    # Settled below its worst case, a's requests free room for b.
    out = Outcomes(results=[_result(r, r.worst_pico // 2) for r in first.requests])
    store.record(ra, out)
    third = store.claim(rb, 100)
    assert third.requests
    books = store.budget_books(team)
    assert books.settled_pico == sum(r.worst_pico // 2 for r in first.requests)
    assert books.settled_pico + books.reserved_pico <= team.amount_pico
    assert _ledger_by_period(store) == {(team.id, 0): books.settled_pico}
    draws = {d.job_id: d for d in store.budget_jobs(books)}
    assert draws[a].settled_pico == books.settled_pico and draws[b].reserved_pico > 0


def test_unknown_outcomes_and_recovery_are_booked_in_the_period(
    store: Store, tmp_path: Path
) -> None:
    a = _job(store, tmp_path, "a")
    team, _ = store.set_budget("team", usd_to_pico("1"))
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    taken = store.claim(ra, 4).requests
    one, two, three, four = taken
    store.record(
        ra,
        Outcomes(
            charges=[ChargeRecord(one.id, one.worst_pico, 0.0)],
            releases=[ReleaseRecord(one.id, 1, "timeout", one.worst_pico)],
            results=[_result(two, 7)],
        ),
    )
    books = store.budget_books(team)
    assert (books.settled_pico, books.unknown_pico) == (one.worst_pico + 7, one.worst_pico)
    assert books.reserved_pico == three.worst_pico + four.worst_pico
    # The runner dies: its claims are charged at worst case, in the period they were reserved.
    store.recover(a, "h", lambda pid: False)
    books = store.budget_books(team)
    charged = one.worst_pico + three.worst_pico + four.worst_pico
    assert (books.reserved_pico, books.unknown_pico) == (0, charged)
    assert books.settled_pico == charged + 7 == sum(_ledger_by_period(store).values())


def test_a_batch_claim_reserves_batch_prices_against_the_budget(
    store: Store, tmp_path: Path
) -> None:
    a = _job(store, tmp_path, "a")
    team, _ = store.set_budget("team", usd_to_pico("1"))
    runner = store.register_runner(a, "h", 1, "batch", 30, team.id)
    claim = store.claim(runner, 5, batch=True)
    with store.engine.connect() as conn:
        batch_worst = conn.exec_driver_sql(
            "SELECT SUM(batch_worst_pico) FROM requests WHERE runner_id = ?", (runner,)
        ).scalar()
    assert claim.budget is not None and claim.budget.reserved_pico == batch_worst
    assert batch_worst < sum(r.worst_pico for r in claim.requests) * 2  # half price, not sync


def test_a_request_settles_in_the_period_it_was_reserved_in(store: Store, tmp_path: Path) -> None:
    a = _job(store, tmp_path, "a")
    day1, day2 = _epoch("2027-03-10T23:59:50+00:00"), _epoch("2027-03-11T00:00:10+00:00")
    clock = FakeClock(day1)
    store.clock = clock
    team, _ = store.set_budget("team", usd_to_pico("1"), per="day")
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    before = store.claim(ra, 3).requests
    clock.at = day2  # midnight passes with three requests in flight
    after = store.claim(ra, 2).requests
    new = store.budget_books(team)
    assert new.settled_pico == 0 and new.reserved_pico == sum(r.worst_pico for r in after)
    store.record(ra, Outcomes(results=[_result(r, 5) for r in before + after]))
    old = store.budget_books(team, at=day1)
    assert (old.settled_pico, old.reserved_pico) == (15, 0)
    assert store.budget_books(team).settled_pico == 10
    starts = [int(period_of("day", "UTC", t).start) for t in (day1, day2)]
    assert [(r[1], r[2]) for r in _period_rows(store)] == [(starts[0], 15), (starts[1], 10)]


def test_a_budget_lowered_below_its_spend_stops_new_claims(store: Store, tmp_path: Path) -> None:
    a = _job(store, tmp_path, "a")
    team, _ = store.set_budget("team", usd_to_pico("1"))
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    store.record(
        ra, Outcomes(results=[_result(r, r.worst_pico) for r in store.claim(ra, 3).requests])
    )
    store.set_budget("team", 1)  # one picodollar
    claim = store.claim(ra, 5)
    assert not claim.requests and claim.budget_blocked
    assert claim.budget is not None and claim.budget.left_pico == 0


def test_a_budget_that_requests_are_reserved_under_cannot_be_removed(
    store: Store, tmp_path: Path
) -> None:
    a = _job(store, tmp_path, "a")
    team, _ = store.set_budget("team", usd_to_pico("1"))
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    store.claim(ra, 2)
    with pytest.raises(UsageError, match="draw on it now"):
        store.remove_budget("team")
    assert store.budget_named("team") is not None


# -- runs against the simulator -----------------------------------------------------------------


class _Opened:
    """A store as a context manager."""

    def __init__(self, db: Path | str) -> None:
        self.store = open_store(db)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *_: object) -> None:
        self.store.close()


async def _run(
    job: Path | None, db: Path | str, sim: SimulatorThread, *, clock: Any = None, **settings: Any
) -> Ran:
    run_settings = RunSettings(
        cap_pico=usd_to_pico(settings.pop("cap", "5")),
        jobfile=job,
        db=str(db),
        quiet=True,
        retry=Retry(backoff_base=0.01, backoff_max=0.05),
        transport=Transport(base_url=sim.base_url, timeout=30),
        stopping=Stopping(grace=5),
        **settings,
    )
    printed: list[str] = []
    result = await run_with(run_settings, echo=printed.append, api_key="sk-test", clock=clock)
    assert result.job_status is not None
    return Ran(result, result.job_status, exit_status(result), result.message, printed)


def _billed(sim: SimulatorThread) -> int:
    return int(sim.ledger_snapshot()["billed_pico"])


async def test_a_run_stopped_by_its_budget_exits_3_and_names_it(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 400)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.005"), per="month")
    ran = await _run(job, db, sim, budget="team")
    assert ran.exit_code == 3
    assert ran.message is not None and "stopped at the budget: budget team:" in ran.message
    assert "this month; resets" in ran.message
    assert any("budget team:" in line and "left" in line for line in ran.printed)  # the estimate
    billed = _billed(sim)
    assert 0 < billed <= usd_to_pico("0.005")
    with _Opened(db) as s:
        books = s.budget_books(s.budget_named("team"))  # type: ignore[arg-type]
    assert books.billed_pico == billed and books.reserved_pico == 0
    assert [b.budget.name for b, _ in ran.status.budgets] == ["team"]


async def test_the_question_before_a_run_counts_what_fits_under_the_budget_too(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 400)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.005"), per="month")
    asked: list[str] = []

    def confirm(est: Any) -> bool:
        asked.append(confirm_question(est))
        return False

    run_settings = RunSettings(
        cap_pico=usd_to_pico("5"), jobfile=job, db=str(db), quiet=True, budget="team",
        transport=Transport(base_url=sim.base_url),
    )  # fmt: skip
    with pytest.raises(Declined):
        await run_with(run_settings, confirm=confirm, api_key="sk-test")
    (question,) = asked
    assert question.startswith("Send up to ") and " of 400 requests" in question
    assert question.endswith("of cap $5.00 (budget team: $0.005 left this month)?")
    assert sim.ledger_snapshot()["requests_received"] == 0


async def test_the_default_budget_holds_unless_a_run_says_none(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 200)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.001"), default=True)
    ran = await _run(job, db, sim)
    assert ran.exit_code == 3 and ran.message is not None and "budget team" in ran.message
    ran = await _run(job, db, sim, budget=NO_BUDGET)
    assert ran.exit_code == 0  # no budget: the cap alone
    with _Opened(db) as s:
        books = s.budget_books(s.budget_named("team"))  # type: ignore[arg-type]
    assert books.billed_pico <= usd_to_pico("0.001") < _billed(sim)


async def test_midnight_passes_mid_run_and_the_new_day_starts_from_zero(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 200)
    day1, day2 = _epoch("2027-03-10T23:59:00+00:00"), _epoch("2027-03-11T00:00:30+00:00")
    limit = usd_to_pico("0.004")  # less than the job costs: it needs two days
    with _Opened(db) as s:
        team, _ = s.set_budget("team", limit, per="day")
    # Midnight passes once the server has billed 70% of the day's limit (the job costs about
    # 1.6 limits, so the new day holds the rest): a point in the run, not a number of claims,
    # which depends on how fast the machine is.
    clock = FakeClock(
        day1, then=day2, flip_when=lambda: _billed(sim) >= 0.7 * limit
    )  # fmt: skip
    ran = await _run(job, db, sim, budget="team", clock=clock)
    assert ran.exit_code == 0, ran.message
    assert clock.flipped
    with _Opened(db) as s:
        old = s.budget_books(team, at=day1)
        new = s.budget_books(team, at=day2)
        by_period = _ledger_by_period(s)
    billed = _billed(sim)
    assert billed > limit
    assert 0 < old.settled_pico <= limit and 0 < new.settled_pico <= limit
    assert old.settled_pico + new.settled_pico == billed
    assert by_period == {(team.id, old.period.start): old.settled_pico,
                         (team.id, new.period.start): new.settled_pico}  # fmt: skip


async def test_a_run_stopped_at_the_old_period_runs_on_in_the_new(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 200)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.002"), per="week")
    monday = _epoch("2027-03-14T23:00:00+00:00")  # a Sunday night, then Monday
    first = await _run(job, db, sim, budget="team", clock=FakeClock(monday))
    assert first.exit_code == 3 and "resets 2027-03-15 00:00 UTC" in (first.message or "")
    done = first.status.states.get("done", 0)
    second = await _run(job, db, sim, budget="team", clock=FakeClock(monday + 7200))
    assert second.status.states.get("done", 0) > done


# -- the command line ---------------------------------------------------------------------------


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def _dump(db: Path) -> list[Any]:
    with sqlite3.connect(db) as conn:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("budgets", "budget_periods", "jobs", "alembic_version")
        ]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("budget", "set", "team", "-5"), "must not be negative"),
        (("budget", "set", "team", "99999999999"), "more than the most"),
        (("budget", "set", "team", "ten"), "not a dollar amount"),
        (("budget", "set", "team", "5", "--per", "year"), "'year' is not one of"),
        (("budget", "set", "team", "5", "--tz", "Mars/Olympus"), "no time zone"),
        (("budget", "set", "none", "5"), "not a budget name"),
        (("budget", "set", "team"), "nothing to set"),
        (("budget", "set", "new", "--per", "day"), "give its amount"),
        (("budget", "show", "nosuch"), "no budget 'nosuch'"),
        (("budget", "rm", "nosuch"), "no budget 'nosuch'"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    db = tmp_path / "b.db"
    assert invoke("budget", "set", "team", "1", "--db", db)[0] == 0
    before = _dump(db)
    code, out = invoke(*args, "--db", db)
    assert code == 2 and said in out, out
    assert _dump(db) == before


def test_a_run_naming_an_unknown_budget_imports_nothing(tmp_path: Path) -> None:
    db, job = tmp_path / "b.db", tmp_path / "job.jsonl"
    write_job(job, 5)
    assert invoke("budget", "set", "team", "1", "--db", db)[0] == 0
    before = _dump(db)
    code, out = invoke("run", job, "--db", db, "--simulate", "--budget", "tea")
    assert code == 2 and "no budget 'tea' (budgets: team)" in out
    assert _dump(db) == before


def test_a_database_a_newer_batchrun_wrote_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    assert invoke("budget", "set", "team", "1", "--db", db)[0] == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    before = _dump(db)
    for args in (("set", "team", "2"), ("list",), ("show", "team"), ("rm", "team")):
        code, out = invoke("budget", *args, "--db", db)
        assert code == 2 and "newer batchrun" in out, (args, out)
    assert _dump(db) == before


def test_budget_commands_print_and_json_what_they_keep(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    code, out = invoke("budget", "set", "team", "100", "--per", "month", "--db", db, "--default")
    assert code == 0 and "created budget team: $0 of $100.00 this month; resets" in out
    assert "the default for every run" in out
    code, out = invoke("budget", "list", "--db", db, "--json")
    assert code == 0 and json.loads(out)["budgets"][0]["amount_usd"] == "100.00"
    code, out = invoke("budget", "show", "team", "--db", db, "--json")
    shown = json.loads(out)
    assert shown["spent_usd"] == shown["reserved_usd"] == shown["unknown_outcome_usd"] == "0.00"
    assert shown["left_usd"] == "100.00" and shown["jobs"] == []
    assert shown["resets_at"].endswith("+00:00")
    code, out = invoke("budget", "--help")
    assert code == 0 and "Example: batchrun budget set" in out
    assert invoke("budget", "rm", "team", "--db", db) == (0, "removed budget team\n")


def _show(db: str | Path) -> dict[str, Any]:
    out = batchrun("budget", "show", "team", "--db", db, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _assert_shown_is_the_bill(shown: dict[str, Any], billed: int, limit: str) -> None:
    spent = Decimal(shown["spent_usd"]) - Decimal(shown["unknown_outcome_usd"])
    assert spent == pico_to_decimal(billed)
    assert Decimal(shown["spent_usd"]) <= Decimal(limit)
    assert Decimal(shown["reserved_usd"]) == 0


def _start(sim: SimulatorThread, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BATCHRUN, "run", *map(str, args), "--cap", "5", "--budget", "team", "--base-url",
         sim.base_url, "--quiet"],
        env=batchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        assert "stopped at the budget: budget team:" in err and "this month" in err, err


def test_two_jobs_in_two_processes_on_one_sqlite_file_keep_to_the_budget(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5)
    db = tmp_path / "b.db"
    jobs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for seed, job in enumerate(jobs):
        write_job(job, 2000, seed=seed)  # each alone would spend $0.05-0.10
    assert batchrun("budget", "set", "team", "0.02", "--per", "month", "--db", db).returncode == 0
    _finish([_start(sim, job, "--db", db) for job in jobs])
    billed = _billed(sim)
    assert usd_to_pico("0.015") < billed <= usd_to_pico("0.02")
    shown = _show(db)
    _assert_shown_is_the_bill(shown, billed, "0.02")
    assert sorted(j["job"] for j in shown["jobs"]) == [1, 2]


def test_two_jobs_by_two_runners_each_on_postgresql_keep_to_the_budget(
    tmp_path: Path, make_simulator: SimFactory, pg_url: str
) -> None:
    sim = make_simulator(latency_ms=5)
    ids = []
    store = open_store(pg_url)
    try:
        for seed in range(2):
            job = tmp_path / f"{seed}.jsonl"
            write_job(job, 2000, seed=seed)
            ids.append(
                open_or_import(store, job, load_price_table(), usd_to_pico("5"), False)[0].id
            )
        store.set_budget("team", usd_to_pico("0.02"), per="month")
    finally:
        store.close()
    _finish([_start(sim, "--db", pg_url, "--job", str(i)) for i in ids for _ in range(2)])
    billed = _billed(sim)
    assert usd_to_pico("0.015") < billed <= usd_to_pico("0.02")
    _assert_shown_is_the_bill(_show(pg_url), billed, "0.02")


async def test_runners_of_two_jobs_on_postgresql_in_one_process_share_the_budget(
    tmp_path: Path, make_simulator: SimFactory, pg_url: str
) -> None:
    """Four runs on one event loop, each its own store and connections, a day budget, one
    fake clock: claims of all four serialize on the budget's row."""
    sim = make_simulator()
    jobs = []
    for seed in range(2):
        jobs.append(tmp_path / f"{seed}.jsonl")
        write_job(jobs[-1], 600, seed=seed)
    store = open_store(pg_url)
    try:
        ids = [open_or_import(store, j, load_price_table(), usd_to_pico("5"), False)[0].id
               for j in jobs]  # fmt: skip
        team, _ = store.set_budget("team", usd_to_pico("0.01"), per="day")
    finally:
        store.close()
    clock = FakeClock(_epoch("2027-05-01T12:00:00+00:00"))
    runs = await asyncio.gather(
        *[
            _run(None, pg_url, sim, job_id=i, budget="team", clock=clock)
            for i in ids
            for _ in (0, 1)
        ]
    )
    assert [r.exit_code for r in runs] == [3, 3, 3, 3], [r.message for r in runs]
    billed = _billed(sim)
    assert billed <= usd_to_pico("0.01")
    store = open_store(pg_url)
    try:
        store.clock = clock
        books = store.budget_books(team)
    finally:
        store.close()
    assert books.billed_pico == billed and books.reserved_pico == 0


def test_a_store_refuses_a_claim_on_a_removed_budget(store: Store, tmp_path: Path) -> None:
    a = _job(store, tmp_path, "a")
    team, _ = store.set_budget("team", usd_to_pico("1"))
    ra = store.register_runner(a, "h", 1, "sync", 30, team.id)
    store.retire_runner(ra)
    store.remove_budget("team")
    rb = store.register_runner(a, "h", 1, "sync", 30, team.id)
    with pytest.raises(StoreError, match="was removed"):
        store.claim(rb, 1)


def test_price_says_whether_the_job_fits_what_the_budget_has_left(tmp_path: Path) -> None:
    db, job = tmp_path / "b.db", tmp_path / "job.jsonl"
    write_job(job, 50)
    assert invoke("budget", "set", "team", "0.0001", "--per", "day", "--db", db)[0] == 0
    code, out = invoke("price", job, "--db", db, "--budget", "team")
    assert code == 0 and "budget team: $0 of $0.0001 today; resets" in out
    assert "does not fit in the $0.0001 left" in out
    code, out = invoke("price", job, "--db", db, "--budget", "team", "--json")
    assert code == 0 and json.loads(out)["budget"]["fits_worst_case"] is False
    assert invoke("budget", "set", "team", "1", "--db", db)[0] == 0
    code, out = invoke("price", job, "--db", db, "--budget", "team", "--via", "batch")
    assert code == 0 and "fits in the $1.00 left" in out
    code, out = invoke("price", job, "--db", db, "--budget", "nosuch")
    assert code == 2 and "no budget 'nosuch'" in out


async def test_status_shows_the_budget_a_job_draws_on(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 20)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("1"), per="week")
    ran = await _run(job, db, sim, budget="team")
    assert ran.exit_code == 0
    code, out = invoke("status", "--db", db)
    assert code == 0 and "  budget     team: $" in out and "this week; resets" in out
    code, out = invoke("status", "--db", db, "--json")
    (shown,) = json.loads(out)["jobs"][0]["budgets"]
    assert shown["name"] == "team" and shown["job_spent_usd"] == shown["spent_usd"]
    assert Decimal(shown["spent_usd"]) == pico_to_decimal(_billed(sim))


async def test_the_report_charts_the_period_of_each_budget_with_every_job_stacked(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    import runner
    from runner.htmlreport import render

    sim = make_simulator()
    db = tmp_path / "b.db"
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.004"), per="month")
    for n, name in ((60, "a.jsonl"), (80, "b.jsonl")):
        write_job(tmp_path / name, n, seed=n)
        await _run(tmp_path / name, db, sim, budget="team")
    with runner.Database(db, readonly=True) as database:
        job = database.job(2)
        budgets = job.budget_spend()
        page = render(job.summary(), job.timeline(), db=str(db), generated_at=0.0, budgets=budgets)
    ((books, draws, spend),) = budgets
    assert books.budget.name == "team" and set(draws) == {1, 2}
    assert sum(a for _, _, a in spend) == books.settled_pico == _billed(sim)
    chart = page.split('id="chart-budget-0"', 1)[1].split("</script>", 1)[0]
    assert "job 1 (" in chart and "job 2 (" in chart and "limit $0.004" in chart
    assert "Budget team: this period, every job" in page


def test_price_with_a_sample_says_whether_the_projection_fits_the_budget(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 200, max_tokens=2000)
    with _Opened(db) as s:
        s.set_budget("team", usd_to_pico("0.05"), per="month")
    out = batchrun(
        "price", job, "--sample", "20", "--db", db, "--base-url", sim.base_url,
        "--budget", "team", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    fit = json.loads(out.stdout)["budget"]["fit"]
    # The worst case (every output limit) does not fit; what it will really cost does.
    assert "the job's worst case" in fit and "does not fit in the" in fit
    assert "; projected $" in fit and "fits, even at the high end" in fit
    # The sample drew on the budget like any run.
    with _Opened(db) as s:
        books = s.budget_books(s.budget_named("team"))  # type: ignore[arg-type]
    assert books.settled_pico == _billed(sim) > 0
