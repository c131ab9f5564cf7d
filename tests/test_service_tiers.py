"""Price what is actually asked for and billed (issue 17, point 5).

A request's ``service_tier`` is priced from the table (priority at its own prices, flex at its
own or the Batch API's), a tier the table cannot price is refused at its line, and each result
is priced by the tier and the model its response reports. A response naming a model the table
does not know is booked at its worst case, flagged and shown; ``--strict-models`` stops there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import runner
from runner.endpoints import Usage
from runner.engine import RunOutcome
from runner.errors import JobFileError, PriceError, UnknownTierError
from runner.money import price_per_mtok_to_pico_per_token as per_mtok
from runner.pricing import load_price_table
from runner.report import format_plan, format_prices, format_status, plan_json, status_json
from runner.settings import Limits
from runner.simulator import SimConfig, SimulatorThread
from runner.store import ResultFlag

from .helpers import batchrun, ledger_total, query, run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]

# Priority prices for the tests' price file (the bundled table has none: see prices.toml).
PRIORITY = """
[models.gpt-4o-mini]
priority_input = "0.25"
priority_cached_input = "0.125"
priority_output = "1.00"
"""


@pytest.fixture
def priority_prices(tmp_path: Path) -> Path:
    path = tmp_path / "priority.toml"
    path.write_text(PRIORITY)
    return path


def _job(path: Path, tiers: list[str | None], *, model: str = "gpt-4o-mini") -> Path:
    """One chat request per entry of ``tiers`` (None: no service_tier), 32 output tokens each."""
    with path.open("w") as f:
        for i, tier in enumerate(tiers):
            body: dict[str, object] = {
                "model": model,
                "messages": [{"role": "user", "content": f"request {i}: say something short"}],
                "max_completion_tokens": 32,
            }
            if tier is not None:
                body["service_tier"] = tier
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")
    return path


@pytest.fixture
def priced_simulator(priority_prices: Path) -> Iterator[Callable[..., SimulatorThread]]:
    """Factory: a simulator that bills with the tests' priority prices."""
    started: list[SimulatorThread] = []

    def make(**config: object) -> SimulatorThread:
        sim = SimulatorThread(SimConfig(**config), load_price_table(priority_prices))  # type: ignore[arg-type]
        sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


# -- the one place tiers become rates -------------------------------------------------------


def test_each_tier_has_its_rates_and_an_unknown_one_raises(priority_prices: Path) -> None:
    bundled = load_price_table()
    table = load_price_table(priority_prices)
    mini = table.resolve("gpt-4o-mini")
    standard = (mini.input, mini.cached_input, mini.output)
    batch = (mini.batch_input, mini.batch_cached_input, mini.batch_output)
    assert mini.rates() == mini.rates(tier="auto") == mini.rates(tier="default") == standard
    assert mini.rates(tier="priority") == (per_mtok("0.25"), per_mtok("0.125"), per_mtok("1.00"))
    assert mini.rates(tier="flex") == batch  # no flex prices of its own: the Batch API's
    assert mini.rates(batch=True, tier="priority") == batch  # the Batch API bills batch prices
    with pytest.raises(UnknownTierError, match="no priority prices known for model 'gpt-4o'"):
        table.resolve("gpt-4o").rates(tier="priority")
    with pytest.raises(UnknownTierError, match="'scale'"):
        mini.rates(tier="scale")
    # Bounds and costs follow the tier.
    floor, worst = mini.bounds(100, 10, tier="priority")
    assert (floor, worst) == (100 * per_mtok("0.25"), 100 * per_mtok("0.25") + 10 * per_mtok("1"))
    assert mini.cost(100, 40, 10, tier="priority") == (
        60 * per_mtok("0.25") + 40 * per_mtok("0.125") + 10 * per_mtok("1")
    )
    # A table without tier prices keeps its fingerprint; tier prices change it.
    assert bundled.fingerprint() == load_price_table().fingerprint()
    assert table.fingerprint() != bundled.fingerprint()
    assert "gpt-4o-mini priority 0.25 / 0.125 / 1" in format_prices(table)


def test_flex_prices_of_its_own_and_half_a_tier_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flex.toml"
    path.write_text('[models.o3]\nflex_input = "1.00"\nflex_output = "4.00"\n')
    o3 = load_price_table(path).resolve("o3")
    assert o3.rates(tier="flex") == (per_mtok("1"), per_mtok("1"), per_mtok("4"))  # cached: input
    path.write_text('[models.o3]\npriority_input = "3.50"\n')
    with pytest.raises(PriceError, match="priority_input and priority_output must be given"):
        load_price_table(path)


def test_a_result_is_priced_by_the_tier_and_model_its_response_reports(
    priority_prices: Path,
) -> None:
    table = load_price_table(priority_prices)
    mini, gpt4o = table.resolve("gpt-4o-mini"), table.resolve("gpt-4o")
    usage = Usage("gpt-4o-mini-2024-07-18", 100, 0, 10, 0)
    assert table.settle("gpt-4o-mini", usage, tier="priority").pico == mini.cost(
        100, 0, 10, tier="priority"
    )
    # The request asked for flex; a response saying "default" is billed at standard prices.
    assert table.settle("gpt-4o-mini", usage, tier="default", asked="flex").pico == mini.cost(
        100, 0, 10
    )
    assert table.settle("gpt-4o-mini", usage, asked="flex").pico == mini.cost(
        100, 0, 10, tier="flex"
    )
    # A dated snapshot of another model is priced as that model.
    other = table.settle("gpt-4o-mini", Usage("gpt-4o-2024-08-06", 100, 0, 10, 0))
    assert other.priced and other.pico == gpt4o.cost(100, 0, 10)
    unknown = table.settle("gpt-4o-mini", Usage("o1-pro", 100, 0, 10, 0))
    assert unknown.unpriced_model == "o1-pro" and unknown.pico == mini.cost(100, 0, 10)
    scale = table.settle("gpt-4o", Usage("gpt-4o", 100, 0, 10, 0), tier="priority")
    assert scale.unpriced_tier == "priority" and scale.pico == gpt4o.cost(100, 0, 10)


# -- price ----------------------------------------------------------------------------------


def test_price_prices_a_priority_request_at_priority_prices(
    tmp_path: Path, priority_prices: Path
) -> None:
    job = _job(tmp_path / "job.jsonl", [None, "priority", "auto", "flex"])
    table = load_price_table(priority_prices)
    plan = runner.price(job, prices=priority_prices)
    plain = runner.price(_job(tmp_path / "plain.jsonl", [None] * 4), prices=priority_prices)
    mini = table.resolve("gpt-4o-mini")
    # Same texts but for their tier: count each request as the plain job counts it.
    per = plain.total.input_tokens // 4
    assert plan.total.input_tokens == plain.total.input_tokens
    expected = (
        2 * mini.bounds(per, 32)[1]
        + mini.bounds(per, 32, tier="priority")[1]
        + mini.bounds(per, 32, tier="flex")[1]
    )
    assert plan.total.worst_pico == expected > plain.total.worst_pico
    assert plan.tiers == {"flex": 1, "priority": 1}
    assert plan.by_model["gpt-4o-mini"].requests == 4
    assert plan.total.batch_worst_pico == plain.total.batch_worst_pico  # batch: batch prices
    text = format_plan(plan, table, None, None)
    assert "service tiers: 1 at flex prices" in text and "1 at priority prices" in text
    assert plan_json(plan, table, None, None)["service_tiers"] == {"flex": 1, "priority": 1}


def test_flex_requests_are_priced_at_batch_prices(tmp_path: Path) -> None:
    flex = runner.price(_job(tmp_path / "flex.jsonl", ["flex"] * 3))
    plain = runner.price(_job(tmp_path / "plain.jsonl", [None] * 3))
    assert flex.total.worst_pico == plain.total.batch_worst_pico < plain.total.worst_pico
    assert flex.total.floor_pico == plain.total.batch_floor_pico


def test_a_tier_the_table_cannot_price_is_a_problem_at_its_line(tmp_path: Path) -> None:
    job = _job(tmp_path / "job.jsonl", [None, "priority", "turbo", None])
    with open(job, "a") as f:  # a tier that is not a string
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        f.write(json.dumps({"custom_id": "r9", "method": "POST", "url": "/v1/chat/completions",
                            "body": {**body, "service_tier": 3}}) + "\n")  # fmt: skip
    with pytest.raises(JobFileError) as info:
        runner.price(job)
    found = [(p.line, p.field) for p in info.value.problems]
    assert found == [(2, "body.service_tier"), (3, "body.service_tier"), (5, "body.service_tier")]
    assert "no priority prices known for model 'gpt-4o-mini'" in str(info.value)
    assert "must be one of auto, default, flex, priority, got 'turbo'" in str(info.value)


def test_a_priority_request_without_priority_prices_exits_2_naming_its_line(
    tmp_path: Path,
) -> None:
    job = _job(tmp_path / "job.jsonl", [None, "priority"])
    out = batchrun("price", job)
    assert out.returncode == 2, out.stderr
    assert f"{job}:2: body.service_tier: no priority prices known for model" in out.stderr


# -- run, against the simulator ---------------------------------------------------------------


async def test_a_priority_run_books_what_the_server_bills_at_priority_prices(
    tmp_path: Path, priority_prices: Path, priced_simulator: Callable[..., SimulatorThread]
) -> None:
    sim = priced_simulator()
    job = _job(tmp_path / "job.jsonl", ["priority"] * 20)
    db = tmp_path / "run.db"
    ran = await run_in_process(job, db, sim.base_url, cap="1", prices=priority_prices)
    assert ran.report.outcome is RunOutcome.COMPLETE and ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ran.status.spend.settled_pico == ledger["billed_pico"] == ledger_total(db)
    # Every result at priority prices: recompute from the usage the server reported.
    mini = load_price_table(priority_prices).resolve("gpt-4o-mini")
    rows = query(db, "SELECT prompt_tokens, cached_tokens, completion_tokens, cost_pico "
                     "FROM results")  # fmt: skip
    assert len(rows) == 20
    for prompt, cached, completion, cost in rows:
        assert cost == mini.cost(prompt, cached, completion, tier="priority")
        assert cost > mini.cost(prompt, cached, completion)
    # The reservations were priority worst cases too: nothing billed over its reservation.
    assert ran.report.stats.overruns == 0


async def test_a_response_reporting_another_tier_is_priced_at_that_tier(
    tmp_path: Path, priority_prices: Path, priced_simulator: Callable[..., SimulatorThread]
) -> None:
    sim = priced_simulator(response_service_tier="flex")
    job = _job(tmp_path / "job.jsonl", [None] * 10)
    db = tmp_path / "run.db"
    ran = await run_in_process(job, db, sim.base_url, prices=priority_prices)
    assert ran.report.outcome is RunOutcome.COMPLETE, ran.message
    billed = sim.ledger_snapshot()["billed_pico"]
    assert ran.status.spend.settled_pico == billed
    mini = load_price_table(priority_prices).resolve("gpt-4o-mini")
    for prompt, cached, completion, cost in query(
        db, "SELECT prompt_tokens, cached_tokens, completion_tokens, cost_pico FROM results"
    ):
        assert cost == mini.cost(prompt, cached, completion, batch=True)


async def test_a_response_naming_a_priced_model_is_billed_as_that_model(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(response_model="gpt-4o-2024-08-06")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 10, max_tokens=16)
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.report.outcome is RunOutcome.COMPLETE, ran.message
    assert ran.status.spend.settled_pico == sim.ledger_snapshot()["billed_pico"]
    assert ran.status.unpriced_models == {} and not ran.report.stats.unpriced
    gpt4o = load_price_table().resolve("gpt-4o")
    for prompt, cached, completion, cost in query(
        db, "SELECT prompt_tokens, cached_tokens, completion_tokens, cost_pico FROM results"
    ):
        assert cost == gpt4o.cost(prompt, cached, completion)


async def test_a_response_from_an_unpriced_model_is_booked_at_worst_case_and_shown(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(response_model="o1-pro")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 12, max_tokens=16)
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.report.outcome is RunOutcome.COMPLETE and ran.exit_code == 0, ran.message
    rows = query(
        db,
        "SELECT r.cost_pico, q.worst_pico, r.flags, r.response_model FROM results r "
        "JOIN requests q ON q.id = r.request_id",
    )
    assert len(rows) == 12
    for cost, worst, flags, model in rows:
        assert cost == worst and model == "o1-pro"
        assert ResultFlag.UNPRICED_MODEL in flags.split(",")
    # Booked above what the server billed (at the requested model's prices): never below.
    assert ran.status.spend.settled_pico == ledger_total(db) > sim.ledger_snapshot()["billed_pico"]
    # Said in the run (once), in status and in its JSON (the report's headline too).
    notices = [n for n in ran.report.stats.notices if "o1-pro" in n]
    assert len(notices) == 1 and "booked at its worst case" in notices[0]
    assert ran.report.stats.unpriced == {"o1-pro": 12}
    assert ran.status.unpriced_models == {"o1-pro": 12}
    text = format_status(ran.status)
    assert "unpriced   12 response(s) named a model the price table does not know: 'o1-pro'" in (
        text
    )
    assert status_json(ran.status)["unpriced_models"] == {"o1-pro": 12}


async def test_strict_models_stops_the_run_at_an_unpriced_model(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(response_model="o1-pro", latency_ms=20)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, max_tokens=16)
    ran = await run_in_process(
        job, db, sim.base_url, strict_models=True, limits=Limits(concurrency=4)
    )
    assert ran.report.outcome is RunOutcome.UNPRICED and ran.exit_code == 3
    assert ran.message is not None and "o1-pro" in ran.message and "--strict-models" in ran.message
    done = ran.status.states.get("done", 0)
    assert 1 <= done < 300 and ran.status.states.get("pending", 0) > 0
    assert ran.status.unpriced_models == {"o1-pro": done}
    # The books hold every result the server billed, each at its worst case.
    assert ran.status.spend.settled_pico >= sim.ledger_snapshot()["billed_pico"]


async def test_a_changed_table_reprices_tiered_requests_at_their_tier(
    tmp_path: Path, priced_simulator: Callable[..., SimulatorThread], priority_prices: Path
) -> None:
    """Resuming under another price table prices a priority request at priority prices."""
    sim = priced_simulator()
    job, db = _job(tmp_path / "job.jsonl", [None, "priority"] * 5), tmp_path / "run.db"
    ran = await run_in_process(job, db, sim.base_url, cap="0.000001", prices=priority_prices)
    assert ran.exit_code == 3 and ran.status.states == {"pending": 10}
    dearer = tmp_path / "dearer.toml"
    dearer.write_text(PRIORITY.replace('"1.00"', '"2.00"'))
    ran = await run_in_process(job, db, sim.base_url, cap="0.000001", prices=dearer)
    assert "re-priced" in ran.output
    mini = load_price_table(dearer).resolve("gpt-4o-mini")
    rows = query(db, "SELECT body, input_tokens, output_limit, worst_pico, batch_worst_pico, "
                     "floor_pico FROM requests")  # fmt: skip
    for body, tokens, limit, worst, batch_worst, floor in rows:
        tier = "priority" if "priority" in body else None
        assert (floor, worst) == mini.bounds(tokens, limit, tier=tier)
        assert batch_worst == mini.bounds(tokens, limit, batch=True)[1]
