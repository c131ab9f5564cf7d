"""``--via auto --deadline``'s flex lane (issue 19, point 3) and the time cancelling batches
takes (point 1): the plan on fake time, the runs against the simulator over HTTP through the
real openai client, on a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from runner.deadline import (
    TailLimits,
    flex_fallback_due,
    flex_lane,
    make_plan,
    plan_flex_lane,
    switch_due,
)
from runner.errors import PriceError, UnknownModelError
from runner.pricing import load_price_table
from runner.report import deadline_plan_json, format_deadline_plan, format_status
from runner.settings import Deadline, Limits
from runner.simulator import SimulatorThread

from .books import assert_consistent, assert_covers_bill, books, rows, scalar, watch_bills
from .helpers import BATCHRUN, batchrun, batchrun_env
from .test_deadline import run_auto

MakeSim = Callable[..., SimulatorThread]
FLEX_MODEL, OTHER_MODEL = "gpt-4o-mini", "gpt-4.1-nano"


def flex_prices(path: Path, model: str = FLEX_MODEL) -> Path:
    """A price file marking ``model`` flex-capable (the bundled table marks none)."""
    path.write_text(f'[models."{model}"]\nflex = true\n')
    return path


def mixed_job(path: Path, n: int, models: tuple[str, ...] = (FLEX_MODEL, OTHER_MODEL)) -> None:
    """``n`` chat requests cycling through ``models``, every body unique."""
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": models[i % len(models)], "max_completion_tokens": 16,
                "messages": [{"role": "user", "content": f"request {i}: classify this ticket"}],
            }  # fmt: skip
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")


def deadline_at(db: Path) -> float:
    (detail,) = rows(db, "SELECT detail FROM events WHERE kind = 'deadline'")[0]
    return float(detail.rpartition("|")[2])


def by_model_and_flag(db: Path) -> dict[tuple[str, bool], int]:
    got = rows(
        db,
        "SELECT q.model, COALESCE(s.flags, '') LIKE '%flex%', COUNT(*) FROM results s "
        "JOIN requests q ON q.id = s.request_id GROUP BY 1, 2",
    )
    return {(m, bool(f)): n for m, f, n in got}


# -- the price table ----------------------------------------------------------------------------


def test_a_price_file_marks_a_model_flex_capable_and_the_bundled_table_marks_none(
    tmp_path: Path,
) -> None:
    bundled = load_price_table()
    assert not any(p.flex_capable for p in bundled.prices.values())
    table = load_price_table(flex_prices(tmp_path / "p.toml"))
    assert table.resolve(FLEX_MODEL).flex_capable
    assert not table.resolve(OTHER_MODEL).flex_capable
    assert table.fingerprint() != bundled.fingerprint()  # a job knows the table changed
    # flex prices of its own mark a model too, and `flex = false` opts out.
    priced = tmp_path / "priced.toml"
    priced.write_text('[models.gpt-4o]\nflex_input = "1.25"\nflex_output = "5.00"\n')
    assert load_price_table(priced).resolve("gpt-4o").flex_capable
    priced.write_text('[models.gpt-4o]\nflex_input = "1.25"\nflex_output = "5.00"\nflex = false\n')
    assert not load_price_table(priced).resolve("gpt-4o").flex_capable
    priced.write_text("[models.gpt-4o]\nflex = 1\n")
    with pytest.raises(PriceError, match="flex: must be true or false"):
        load_price_table(priced)


# -- the plan, on fake time ---------------------------------------------------------------------


def test_the_switch_leaves_room_for_cancelling_and_for_the_flex_window() -> None:
    deadline = Deadline(at=1000.0, margin=0.1, slack=2.0, flex_latency=5.0)
    limits = TailLimits(rpm=240, tpm=None)
    # 400 left: planned 47.1 s at the standard tier (see test_deadline); cancelling 60 s more.
    assert not switch_due(1000 - 107.2, deadline, 400, 0, limits, 1.0, cancel=60)
    assert switch_due(1000 - 107.0, deadline, 400, 0, limits, 1.0, cancel=60)
    # 200 of them go flex first: 240 at once, 5 s per answer, x1.1 = 5.5 s more.
    assert not switch_due(1000 - 112.7, deadline, 400, 0, limits, 1.0, cancel=60, flex_left=200)
    assert switch_due(1000 - 112.5, deadline, 400, 0, limits, 1.0, cancel=60, flex_left=200)
    # The flex lane falls back when the time left is down to the standard tail (plus what may
    # be left of the cancelling).
    assert not flex_fallback_due(1000 - 47.2, deadline, 400, 0, limits, 1.0)
    assert flex_fallback_due(1000 - 47.0, deadline, 400, 0, limits, 1.0)
    assert flex_fallback_due(1000 - 50.0, deadline, 400, 0, limits, 1.0, cancel_left=3.0)
    assert not flex_fallback_due(999.0, deadline, 0, 0, limits, 1.0)  # nothing left


def test_the_plan_names_the_flex_lane_its_requests_and_cost_at_flex_prices(
    tmp_path: Path,
) -> None:
    table = load_price_table(flex_prices(tmp_path / "p.toml"))
    deadline = Deadline(spec="1h", at=4600.0, margin=0.1, slack=2.0, cancel=600.0)
    limits = TailLimits(240, None)
    opened = {FLEX_MODEL: (300, 30_000, 4_800), OTHER_MODEL: (100, 10_000, 1_600)}
    flex = plan_flex_lane(opened, table, limits, deadline)
    assert flex is not None and flex.models == (FLEX_MODEL,) and flex.requests == 300
    price = table.resolve(FLEX_MODEL)
    assert (flex.floor_pico, flex.worst_pico) == price.bounds(
        30_000, 4_800, requests=300, tier="flex"
    )
    # Flex without prices of its own is billed at the Batch API's.
    assert flex.worst_pico == price.bounds(30_000, 4_800, requests=300, batch=True)[1]
    plan = make_plan(deadline, 1000.0, 400, 0, limits, (5, 10), (10, 20), cancel=600, flex=flex)
    assert plan.planned is not None and flex.planned is not None
    assert plan.latest_switch == pytest.approx(4600 - plan.planned - 600 - flex.planned)
    assert plan.flex_fallback == pytest.approx(4600 - plan.planned)
    text = format_deadline_plan(plan)
    assert f"flex lane (service_tier flex; {FLEX_MODEL}): 300 request(s) at flex prices" in text
    assert "cancelling the batches: up to 10m00s" in text and "flex window" in text
    out = deadline_plan_json(plan)
    assert out["flex"]["requests"] == 300 and out["flex"]["models"] == [FLEX_MODEL]
    assert out["cancel_seconds"] == 600
    # No flex-capable model: no flex lane; an unknown model is an error, never $0.
    assert plan_flex_lane({OTHER_MODEL: (5, 50, 80)}, table, limits, deadline) is None
    assert flex_lane((), 0, 0, (0, 0), limits, deadline) is None
    with pytest.raises(UnknownModelError):
        plan_flex_lane({"no-such-model": (1, 1, 1)}, table, limits, deadline)
    assert "flex lane" not in format_deadline_plan(
        make_plan(deadline, 1000.0, 400, 0, limits, (5, 10), (10, 20))
    )


def test_price_deadline_names_the_flex_lane_of_a_price_file(tmp_path: Path) -> None:
    job = tmp_path / "job.jsonl"
    mixed_job(job, 90)
    prices = flex_prices(tmp_path / "p.toml")
    out = batchrun("price", job, "--deadline", "2h", "--rpm", "500", "--prices", prices)
    assert out.returncode == 0, out.stderr
    assert f"flex lane (service_tier flex; {FLEX_MODEL}): 45 request(s)" in out.stdout
    data = json.loads(
        batchrun(
            "price", job, "--deadline", "2h", "--rpm", "500", "--prices", prices,
            "--deadline-cancel", "120", "--json",
        ).stdout
    )  # fmt: skip
    plan = data["deadline"]
    assert plan["flex"]["requests"] == 45 and plan["cancel_seconds"] == 120
    bundled = json.loads(batchrun("price", job, "--deadline", "2h", "--json").stdout)
    assert bundled["deadline"]["flex"] is None and bundled["deadline"]["cancel_seconds"] == 600


# -- runs against the simulator -----------------------------------------------------------------


async def test_the_flex_lane_sends_the_tail_of_flex_capable_models_at_flex(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Stuck batches: everything goes to the tail at the switch; the flex-capable model's
    requests at flex (billed at batch prices, as the response reports), the other's at the
    standard tier; status and the report show flex as its own lane."""
    sim = make_simulator(batch_p_stuck=1.0, rpm=600, batch_cancel_s=0.3)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "f.db"
    mixed_job(job, 120)
    ran = await run_auto(
        job, db, sim, "20s", limits=Limits(rpm=600), prices=flex_prices(tmp_path / "p.toml"),
        plan={"flex_latency": 2.0},
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 120}
    assert by_model_and_flag(db) == {(FLEX_MODEL, True): 60, (OTHER_MODEL, False): 60}
    served = rows(
        db, "SELECT s.body FROM results s JOIN requests q ON q.id = s.request_id "
        "WHERE q.model = ?", FLEX_MODEL,
    )  # fmt: skip
    assert all(json.loads(b)["service_tier"] == "flex" for (b,) in served)
    ledger = sim.ledger_snapshot()
    assert ledger["batch_lines_billed"] == 0 and ledger["requests_billed"] == 120
    assert ledger["duplicate_bodies"] == 0
    assert books(db).ledger_pico == ledger["billed_pico"]  # books == bill
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    # Billed at flex (= batch) prices: the flex results cost what their usage costs there.
    table = load_price_table()
    price = table.resolve(FLEX_MODEL)
    for prompt, cached, completion, cost in rows(
        db, "SELECT s.prompt_tokens, s.cached_tokens, s.completion_tokens, s.cost_pico "
        "FROM results s WHERE s.flags LIKE '%flex%'",
    ):  # fmt: skip
        assert cost == price.cost(prompt, cached, completion, batch=True)
    lanes = ran.report.status["lanes"]
    assert lanes["flex"]["results"] == 60 and lanes["sync"]["results"] == 60
    flex_cost = scalar(db, "SELECT SUM(cost_pico) FROM results WHERE flags LIKE '%flex%'")
    assert Decimal(lanes["flex"]["cost_usd"]) == Decimal(flex_cost) / 10**12
    assert "flex: 60 result(s)" in format_status(ran.status)
    assert "flex lane" in ran.output  # the plan shown before sending names it
    # Reserved at standard worst case (a flex request may be served at standard): no overrun.
    assert scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%over_reservation%'") == 0


async def test_flex_falls_back_to_the_standard_tier_near_the_deadline(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Flex never has capacity: its requests wait out the 429s until the time left is down
    to the standard tail, then go at the standard tier, and the job finishes by the deadline
    with nothing billed twice."""
    sim = make_simulator(batch_p_stuck=1.0, rpm=600, flex_p_unavailable=1.0)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "fb.db"
    mixed_job(job, 80)
    ran = await asyncio.wait_for(  # without the fallback the 429s would go on for ever
        run_auto(
            job, db, sim, "14s", limits=Limits(rpm=600),
            prices=flex_prices(tmp_path / "p.toml"), plan={"flex_latency": 4.0},
        ),
        60,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 80}
    assert scalar(db, "SELECT COUNT(*) FROM events WHERE kind = 'flex_fallback'") == 1
    assert by_model_and_flag(db) == {(FLEX_MODEL, False): 40, (OTHER_MODEL, False): 40}
    ledger = sim.ledger_snapshot()
    assert ledger["flex_unavailable"] > 0 and ledger["requests_billed"] == 80
    assert ledger["duplicate_bodies"] == 0
    assert rows(db, "SELECT MAX(finished_at) FROM results")[0][0] <= deadline_at(db)
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    assert "lanes" in ran.report.status and "flex" not in ran.report.status["lanes"]


async def test_a_flex_400_makes_the_model_standard_for_the_rest_of_the_run(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """A provider answering flex with 400 for the model: the request is sent again at the
    standard tier (no attempt used up: two each, one spent by the cancelled batch), flex is
    not asked again for that model, and it is said once."""
    from runner.settings import Retry

    sim = make_simulator(batch_p_stuck=1.0, rpm=600, flex_refuse_models=FLEX_MODEL)
    job, db = tmp_path / "job.jsonl", tmp_path / "r.db"
    mixed_job(job, 60)
    ran = await run_auto(
        job, db, sim, "20s", limits=Limits(rpm=600), prices=flex_prices(tmp_path / "p.toml"),
        plan={"flex_latency": 2.0}, retry=Retry(max_attempts=2, backoff_base=0.01),
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 60}
    refused = scalar(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = 'flex_refused'")
    assert 1 <= refused < 30  # those in flight when the first 400 came, not every request
    assert sim.ledger_snapshot()["status_counts"].get("400", 0) == refused
    assert scalar(db, "SELECT COUNT(*) FROM events WHERE kind = 'flex_refused'") == 1
    notices = [n for n in ran.report.stats.notices if "refused service_tier flex" in n]
    assert len(notices) == 1 and FLEX_MODEL in notices[0]
    assert by_model_and_flag(db) == {(FLEX_MODEL, False): 30, (OTHER_MODEL, False): 30}
    assert books(db).ledger_pico == sim.ledger_snapshot()["billed_pico"]
    assert_consistent(db)


async def test_a_flex_request_served_at_standard_is_billed_standard(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Priced by the tier the response reports: flex asked, "default" served and billed."""
    sim = make_simulator(batch_p_stuck=1.0, rpm=600, response_service_tier="default")
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "d.db"
    mixed_job(job, 40, models=(FLEX_MODEL,))
    ran = await run_auto(
        job, db, sim, "20s", limits=Limits(rpm=600), prices=flex_prices(tmp_path / "p.toml"),
        plan={"flex_latency": 2.0},
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 40}
    assert by_model_and_flag(db) == {(FLEX_MODEL, False): 40}
    price = load_price_table().resolve(FLEX_MODEL)
    for prompt, cached, completion, cost in rows(
        db, "SELECT prompt_tokens, cached_tokens, completion_tokens, cost_pico FROM results"
    ):
        assert cost == price.cost(prompt, cached, completion)  # standard prices
    assert books(db).ledger_pico == sim.ledger_snapshot()["billed_pico"]
    assert_covers_bill(db, sim, bills)
    assert scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%over_reservation%'") == 0


async def test_a_batch_that_takes_long_to_cancel_still_finishes_by_the_deadline(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Issue 19, point 1: a cancelled batch's lines come back to pending only when it has
    cancelled (so no result can arrive after its request went sync). Cancelling takes 15 s
    here; the plan counts it (--deadline-cancel 17), so the switch comes early enough and the
    job still finishes by the deadline, part of it at batch prices. Planned without it, the
    switch would come ~3 s before the deadline and the job would end ~15 s after it."""
    sim = make_simulator(batch_shared_lines_per_s=5.0, rpm=600, batch_cancel_s=15.0)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "c.db"
    mixed_job(job, 200, models=(OTHER_MODEL,))
    ran = await run_auto(
        job, db, sim, "28s", limits=Limits(rpm=600), plan={"cancel": 17.0},
        batching={"requests_per_batch": 100},
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 200}
    at = deadline_at(db)
    (switched,) = rows(db, "SELECT at FROM events WHERE kind = 'deadline_switch'")[0]
    assert switched <= at - 17  # early enough for the cancelling
    assert rows(db, "SELECT MAX(finished_at) FROM results")[0][0] <= at
    ledger = sim.ledger_snapshot()
    assert 0 < ledger["batch_lines_billed"] < 200
    assert ledger["requests_billed"] == 200 and ledger["duplicate_bodies"] == 0
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


@pytest.mark.parametrize("deadline", [None, "60s"])
async def test_the_stragglers_of_batches_that_ended_go_flex_for_flex_capable_models(
    tmp_path: Path, make_simulator: MakeSim, deadline: str | None
) -> None:
    """Batches that expire with lines left (before any switch): without a deadline, and with
    one that leaves time, the flex-capable model's stragglers go at flex, the other's at the
    standard tier."""
    sim = make_simulator(batch_lines_per_s=100, batch_window_s=0.5, rpm=600)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "x.db"
    mixed_job(job, 160)
    ran = await run_auto(
        job, db, sim, deadline, limits=Limits(rpm=600), prices=flex_prices(tmp_path / "p.toml"),
        batching={"requests_per_batch": 200}, plan={"flex_latency": 1.0},
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 160}
    assert scalar(db, "SELECT COUNT(*) FROM events WHERE kind = 'deadline_switch'") == 0
    ledger = sim.ledger_snapshot()
    assert 0 < ledger["batch_lines_billed"] < 160
    lanes = ran.report.status["lanes"]
    straggling = rows(
        db, "SELECT q.model, COUNT(*) FROM results s JOIN requests q ON q.id = s.request_id "
        "WHERE COALESCE(s.flags, '') NOT LIKE '%batch%' GROUP BY 1",
    )  # fmt: skip
    flex_stragglers = dict(straggling).get(FLEX_MODEL, 0)
    assert flex_stragglers > 0 and lanes["flex"]["results"] == flex_stragglers
    assert lanes["sync"]["results"] == dict(straggling).get(OTHER_MODEL, 0)
    assert ledger["duplicate_bodies"] == 0 and books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


def test_kill_9_in_the_flex_phase_then_the_same_command_resumes_and_the_books_cover_the_bill(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Killed while the tail goes out at flex (some results in, more in flight): the same
    command finishes the job; a flex request in flight at the kill is charged its worst case
    (it may have been billed) and is the only kind sent again; the books never fall below the
    bill."""
    # 160 requests at 120 RPM: 120 go at once (the bucket starts full), the rest at 2/s, so the
    # flex phase lasts ~20 s and the kill lands after the burst, with the trickle in flight.
    sim = make_simulator(batch_p_stuck=1.0, rpm=120, batch_cancel_s=0.3, flex_latency_ms=100)
    job, db = tmp_path / "job.jsonl", tmp_path / "k.db"
    mixed_job(job, 160, models=(FLEX_MODEL,))
    args = [
        BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
        "--via", "auto", "--deadline", "90s", "--rpm", "120", "--deadline-margin", "0.1",
        "--deadline-slack", "2", "--deadline-cancel", "1", "--poll-interval", "0.05",
        "--backoff-base", "0.01", "--backoff-max", "0.05",
        "--prices", str(flex_prices(tmp_path / "p.toml")),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args, env=batchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    flex_done = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                with contextlib.suppress(sqlite3.Error):
                    flex_done = scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%flex%'")
            if flex_done >= 125:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert 125 <= flex_done < 160, flex_done  # killed in the flex phase, not before or after it
    assert_consistent(db)
    assert_covers_bill(db, sim)
    resumed = subprocess.run(args, env=batchrun_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    ledger = sim.ledger_snapshot()
    b = books(db)
    assert (b.done, b.pending, b.reserved, b.failed) == (160, 0, 0, 0)
    unknown = scalar(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")
    assert ledger["duplicate_bodies"] <= unknown  # only what may have been billed went again
    assert b.ledger_pico >= ledger["billed_pico"]  # books >= bill
    assert scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%flex%'") == 160
    assert_consistent(db)
