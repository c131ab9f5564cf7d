"""The simulator's batch timing (queue delays, a line rate the open batches share, stuck
batches) and flex capacity 429s: what the deadline planner is tested against."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import openai
import pytest

from runner.simulator import SimulatorThread
from runner.simulator.config import SimConfig
from runner.simulator.faults import _Dice

from .test_simulator_batches import chat, client_for, finished, line, start_batch, wait_until

MakeSim = Callable[..., SimulatorThread]


def test_queue_delays_are_drawn_from_the_named_distribution() -> None:
    fixed = _Dice(1)
    config = SimConfig(batch_queue_s=2.0)
    assert {fixed.batch_timing(config) for _ in range(5)} == {(2.0, False)}
    config = SimConfig(batch_queue_s=2.0, batch_queue_dist="exponential", seed=3)
    dice = _Dice(3)
    draws = [dice.batch_timing(config)[0] for _ in range(4000)]
    assert 1.8 < sum(draws) / len(draws) < 2.2 and min(draws) < 0.2 and max(draws) > 8
    again = _Dice(3)
    assert [again.batch_timing(config)[0] for _ in range(4000)] == draws  # seeded
    config = SimConfig(batch_queue_s=2.0, batch_queue_dist="lognormal")
    dice = _Dice(0)
    median = sorted(dice.batch_timing(config)[0] for _ in range(4001))[2000]
    assert 1.7 < median < 2.3
    config = SimConfig(batch_p_stuck=0.25)
    dice = _Dice(0)
    stuck = sum(dice.batch_timing(config)[1] for _ in range(4000))
    assert 850 < stuck < 1150


def test_timing_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_queue_dist"):
        SimConfig(batch_queue_dist="uniform")
    with pytest.raises(ValueError, match="batch_shared_lines_per_s"):
        SimConfig(batch_shared_lines_per_s=0)
    with pytest.raises(ValueError, match="batch_p_stuck"):
        SimConfig(batch_p_stuck=1.5)
    with pytest.raises(ValueError, match="flex_p_unavailable"):
        SimConfig(flex_p_unavailable=-0.1)


async def test_a_batch_waits_out_its_queue_delay_before_any_line(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_queue_s=0.6, batch_lines_per_s=10_000)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(20)])
        start = time.monotonic()
        early = await wait_until(client, created.id, lambda b: b.status == "in_progress")
        assert early.request_counts is not None and early.request_counts.completed == 0
        batch = await finished(client, created.id)
        assert time.monotonic() - start >= 0.5
    assert batch.status == "completed" and batch.request_counts.completed == 20  # type: ignore[union-attr]


async def test_open_batches_share_one_line_rate(make_simulator: MakeSim) -> None:
    """Two batches at a shared 40 lines/s take about as long as one batch of both."""
    sim = make_simulator(batch_shared_lines_per_s=40.0, batch_lines_per_s=1_000_000)
    async with client_for(sim) as client:
        start = time.monotonic()
        a = await start_batch(client, [line(f"a{i}", chat(f"a{i}")) for i in range(20)])
        b = await start_batch(client, [line(f"b{i}", chat(f"b{i}")) for i in range(20)])
        await asyncio.sleep(0.5)  # 20 lines at 40/s, between the two
        mid = [await client.batches.retrieve(x.id) for x in (a, b)]
        done = [(m.request_counts.completed if m.request_counts else 0) for m in mid]
        assert 10 <= sum(done) <= 30 and min(done) >= 4  # both progress, at the shared pace
        ends = [await finished(client, x.id) for x in (a, b)]
        elapsed = time.monotonic() - start
    assert all(e.status == "completed" for e in ends)
    assert elapsed >= 0.9  # 40 lines at 40/s in all


async def test_a_stuck_batch_never_progresses_until_cancelled(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_p_stuck=1.0, batch_lines_per_s=10_000)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(10)])
        await wait_until(client, created.id, lambda b: b.status == "in_progress")
        await asyncio.sleep(0.3)
        still = await client.batches.retrieve(created.id)
        assert still.status == "in_progress" and still.request_counts.completed == 0  # type: ignore[union-attr]
        await client.batches.cancel(created.id)
        batch = await finished(client, created.id)
    assert batch.status == "cancelled" and batch.output_file_id is None
    assert sim.ledger_snapshot()["batch_lines_billed"] == 0


async def test_a_stuck_batch_expires_with_nothing_billed(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_p_stuck=1.0, batch_window_s=0.3)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(5)])
        batch = await finished(client, created.id)
    assert batch.status == "expired" and batch.request_counts.completed == 0  # type: ignore[union-attr]
    assert sim.ledger_snapshot()["billed_pico"] == 0


async def test_flex_requests_meet_capacity_429s_that_are_not_billed(
    make_simulator: MakeSim,
) -> None:
    sim = make_simulator(flex_p_unavailable=0.5, seed=5)
    async with client_for(sim) as client:
        refused = ok = 0
        for i in range(40):
            try:
                reply = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"q{i}"}],
                    service_tier="flex",
                )
            except openai.RateLimitError as exc:
                assert exc.code == "resource_unavailable" and exc.status_code == 429
                refused += 1
                continue
            assert reply.service_tier == "flex"
            ok += 1
        # Standard requests never meet flex's 429.
        for i in range(10):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"s{i}"}]
            )
    ledger = sim.ledger_snapshot()
    assert 8 <= refused <= 32 and ledger["flex_unavailable"] == refused
    assert ledger["requests_billed"] == ok + 10 and ledger["rate_limited"] == 0
