"""The cap against servers that count tokens their own way (issue 17, point 3).

A server with a tokenizer of its own bills more input tokens than tiktoken counts; a mock model
writes past its output limit. The engine learns each model's ratio of billed to counted and
reserves the requests still to send at that scale (plus a margin), so the cap keeps holding and
sending goes on. A ratio no calibration is honest about (200x: earlier turns billed as input)
still stops the run at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from runner.calibration import PPM, Calibration, ModelCalibration, ratio_ppm, scale_of, scaled
from runner.engine import RunOutcome
from runner.errors import PriceError
from runner.money import usd_to_pico
from runner.pricing import load_price_table
from runner.report import format_status, status_json
from runner.settings import Calibrating, Limits
from runner.simulator import SimulatorThread

from .helpers import ledger_total, query, result_costs, run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]


# -- the arithmetic --------------------------------------------------------------------------


def test_ratios_round_up_so_the_scale_never_under_reserves() -> None:
    assert ratio_ppm(13, 10) == 1_300_000
    assert ratio_ppm(1, 3) == 333_334  # rounded up
    assert ratio_ppm(5, 0) == 0  # nothing expected: nothing learned
    assert scale_of(1_000_000, 900_000, 0.1) == PPM  # counts as batchrun does: no margin
    assert scale_of(1_300_000, 0, 0.1) == 1_430_000
    assert scale_of(900_000, 1_250_000, 0.1) == 1_375_000  # output past its limit
    assert scaled(1000, 1_430_000) == 1430 and scaled(7, 1_500_001) == 11  # 10.5... up


def test_calibration_keeps_the_largest_ratio_per_model_and_refuses_dishonest_ones() -> None:
    cal = Calibration(Calibrating(margin=0.1, most=4.0))
    assert cal.scales() == {}
    learn = cal.learn
    assert learn("m", expected_input=100, output_limit=10, billed_input=130, billed_output=5) == (
        1_300_000
    )
    learn("m", expected_input=100, output_limit=10, billed_input=120, billed_output=5)
    assert cal.models["m"] == ModelCalibration(1_300_000, 500_000, 2)
    assert cal.scales() == {"m": 1_430_000}
    ratio = learn("m", expected_input=10, output_limit=10, billed_input=2000, billed_output=1)
    assert ratio == 200 * PPM and not cal.honest(ratio)
    assert cal.scale("m") == 1_430_000  # a dishonest ratio does not become the scale
    assert cal.scale("other") == PPM


def test_a_price_file_input_factor_scales_worst_cases_exactly(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[models.gpt-4o-mini]\ninput_factor = "1.3"\n')
    table = load_price_table(prices)
    plain = load_price_table().resolve("gpt-4o-mini")
    price = table.resolve("gpt-4o-mini")
    assert price.input_factor_ppm == 1_300_000 and price.expected_input(100) == 130
    floor, worst = price.bounds(1000, 50)
    rate = -(-plain.input * 13 // 10)
    assert floor == 1000 * rate
    assert worst == floor + rate + 50 * plain.output  # one token more, for the server's rounding
    # Linear: a sum prices like its parts.
    assert price.bounds(3000, 150, requests=3) == (3 * floor, 3 * worst)
    assert table.fingerprint() != load_price_table().fingerprint()
    for bad in ('"0.1"', '"lots"', "true", '"nan"'):
        prices.write_text(f"[models.gpt-4o-mini]\ninput_factor = {bad}\n")
        with pytest.raises(PriceError, match="input_factor"):
            load_price_table(prices)


# -- against the simulator ---------------------------------------------------------------------


def _short_job(tmp_path: Path, n: int, **kw: object) -> tuple[Path, Path]:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, n, prompt_words=12, max_tokens=16, seed=17, **kw)  # type: ignore[arg-type]
    return job, db


async def test_a_server_counting_1_3x_input_completes_under_the_cap_and_books_equal_its_bill(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(input_factor=1.3)
    job, db = _short_job(tmp_path, 2000)
    ran = await run_in_process(job, db, sim.base_url, cap="5", limits=Limits(concurrency=32))
    assert ran.report.outcome is RunOutcome.COMPLETE and ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ran.status.states == {"done": 2000}
    assert ran.status.spend.settled_pico == ledger["billed_pico"] == ledger_total(db)
    assert ledger["requests_billed"] == 2000 and ledger["duplicate_bodies"] == 0
    # The calibration is shown where the user looks.
    cal = ran.status.calibration["gpt-4o-mini"]
    assert 1_290_000 < cal.input_ppm <= 1_400_000 and cal.results == 2000
    text = format_status(ran.status)
    assert "gpt-4o-mini: server counts 1.3" in text and "x the input tokens batchrun" in text
    assert status_json(ran.status)["calibration"]["gpt-4o-mini"]["results"] == 2000
    assert any("reserved at 1.4" in line for line in ran.report.stats.notices)
    # After the first results, reservations hold the calibrated worst case: few overruns.
    assert ran.report.stats.overruns < 40


async def test_a_server_counting_1_3x_input_stops_at_a_tight_cap_with_the_bill_under_it(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(input_factor=1.3)
    job, db = _short_job(tmp_path, 2000)
    full = make_simulator(input_factor=1.3)
    probe = await run_in_process(job, tmp_path / "probe.db", full.base_url, cap="5")
    total = probe.status.spend.settled_pico
    cap_pico = total // 3
    cap = str(cap_pico / 10**12)
    ran = await run_in_process(job, db, sim.base_url, cap=cap, limits=Limits(concurrency=32))
    assert ran.report.outcome is RunOutcome.CAPPED and ran.exit_code == 3, ran.message
    billed = sim.ledger_snapshot()["billed_pico"]
    assert billed == ran.status.spend.settled_pico == result_costs(db)
    assert billed <= usd_to_pico(cap)
    assert billed > usd_to_pico(cap) * 9 // 10  # filled, not stopped at the first overrun
    assert 600 < ran.status.states["done"] < 700


async def test_a_server_billing_200x_input_still_stops_at_once(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(input_factor=200, latency_ms=5)
    job, db = _short_job(tmp_path, 500)
    ran = await run_in_process(job, db, sim.base_url, cap="5", limits=Limits(concurrency=4))
    assert ran.report.outcome is RunOutcome.OVERRUN and ran.exit_code == 3
    assert "billed 2" in (ran.message or "") and "more than 4x" in (ran.message or "")
    assert sim.ledger_snapshot()["requests_received"] < 10
    assert ledger_total(db) >= sim.ledger_snapshot()["billed_pico"]


async def test_a_mock_model_writing_past_its_output_limit_completes(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    # As LiteLLM's mock models do: 20 output tokens whatever the limit (16 here).
    sim = make_simulator(fixed_output_tokens=20)
    job, db = _short_job(tmp_path, 40)
    ran = await run_in_process(job, db, sim.base_url, cap="0.01")
    assert ran.report.outcome is RunOutcome.COMPLETE and ran.exit_code == 0, ran.message
    assert ran.status.spend.settled_pico == sim.ledger_snapshot()["billed_pico"]
    assert ran.status.calibration["gpt-4o-mini"].output_ppm == 1_250_000
    assert "output ran to 1.25x its limit" in format_status(ran.status)


async def test_a_resumed_run_reserves_at_the_calibration_of_the_results_before(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(input_factor=1.3)
    job, db = _short_job(tmp_path, 400)
    first = await run_in_process(job, db, sim.base_url, cap="0.0015")
    assert first.report.outcome is RunOutcome.CAPPED, first.message
    done = first.status.states["done"]
    again = await run_in_process(job, db, sim.base_url, cap="5", job_id=1)
    assert again.report.outcome is RunOutcome.COMPLETE, again.message
    assert again.report.stats.overruns == 0  # seeded from the stored results
    assert again.status.states == {"done": 400} and done < 400
    assert again.status.spend.settled_pico == sim.ledger_snapshot()["billed_pico"]


async def test_a_declared_input_factor_means_no_overrun_at_all(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(input_factor=1.3)
    prices = tmp_path / "prices.toml"
    prices.write_text('[models.gpt-4o-mini]\ninput_factor = "1.3"\n')
    job, db = _short_job(tmp_path, 200)
    ran = await run_in_process(job, db, sim.base_url, cap="1", prices=prices)
    assert ran.report.outcome is RunOutcome.COMPLETE, ran.message
    assert ran.report.stats.overruns == 0
    stored = query(db, "SELECT SUM(worst_pico) FROM requests")[0][0]
    plain = load_price_table().resolve("gpt-4o-mini")
    counted = query(db, "SELECT SUM(input_tokens), SUM(output_limit) FROM requests")[0]
    assert stored > plain.bounds(counted[0], counted[1])[1]  # the factor is in the worst case
