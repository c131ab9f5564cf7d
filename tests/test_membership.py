"""Runner membership on virtual time: heartbeats, take-overs of a silent runner's claims and
shared pauses, against a real SQLite file, with minutes of heartbeats in milliseconds."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.clock import VirtualClock
from runner.engine import Membership
from runner.money import usd_to_pico
from runner.pricing import load_price_table
from runner.run import open_or_import
from runner.store import Beat, RequestState, Store, open_store

from .helpers import write_job
from .virtual import clock, on_virtual_time

__all__ = ["clock"]  # the fixture

TTL = 30.0


@pytest.fixture
def store(tmp_path: Path, clock: VirtualClock) -> Iterator[Store]:
    s = open_store(tmp_path / "m.db")
    s.clock = clock  # heartbeats and their expiry go by the run's clock
    yield s
    s.close()


def _job(store: Store, tmp_path: Path, n: int = 10) -> int:
    path = tmp_path / "job.jsonl"
    write_job(path, n)
    return open_or_import(store, path, load_price_table(), usd_to_pico("5"), False)[0].id


@on_virtual_time
async def test_a_silent_runners_claims_are_taken_over_only_once_its_heartbeat_expired(
    store: Store, tmp_path: Path, clock: VirtualClock
) -> None:
    job = _job(store, tmp_path)
    # The silent runner's process is this one (alive), so only the expiry can declare it dead.
    silent = store.register_runner(job, "elsewhere", 1, "sync", TTL)
    claimed = store.claim(silent, 4).requests
    worst = sum(r.worst_pico for r in claimed)
    beating = store.register_runner(job, "elsewhere", 1, "sync", TTL)
    members = Membership(store, job, beating, clock)
    beats: list[Beat] = []
    keep = asyncio.create_task(members.keep(TTL, lambda: 0, beats.append, lambda: None))
    try:
        await asyncio.sleep(TTL - 1)
        assert store.state_counts(job).get(RequestState.RESERVED) == 4  # not yet: it may live
        assert beats[-1].live_runners == 2
        await asyncio.sleep(3)  # past its expiry: a beat takes its claims over
    finally:
        keep.cancel()
        await asyncio.gather(keep, return_exceptions=True)
        await members.close()
    assert beats[-1].live_runners == 1
    counts = store.state_counts(job)
    assert counts.get(RequestState.RESERVED, 0) == 0 and counts[RequestState.PENDING] == 10
    # Their fate is unknown: each is charged its worst case, never less than a bill could be.
    assert store.spend(job).settled_pico == worst


@on_virtual_time
async def test_a_runner_beats_at_once_then_every_third_of_its_ttl_at_most_twice_a_second(
    store: Store, tmp_path: Path, clock: VirtualClock
) -> None:
    job = _job(store, tmp_path)
    runner = store.register_runner(job, "here", 1, "sync", TTL)
    members = Membership(store, job, runner, clock)
    at: list[float] = []
    started = clock.monotonic()
    keep = asyncio.create_task(
        members.keep(TTL, lambda: 0, lambda beat: at.append(clock.monotonic() - started), print)
    )
    await asyncio.sleep(10.2)
    keep.cancel()
    await asyncio.gather(keep, return_exceptions=True)
    await members.close()
    assert at[0] < 0.1  # the first beat comes at once
    gaps = [b - a for a, b in itertools.pairwise(at)]
    # Half a second apart (plus what each beat's transaction took in virtual time).
    assert 15 <= len(at) <= 21 and all(0.5 <= g < 0.6 for g in gaps), gaps


@on_virtual_time
async def test_a_runner_declared_dead_by_another_stops_beating_and_says_so(
    store: Store, tmp_path: Path, clock: VirtualClock
) -> None:
    job = _job(store, tmp_path)
    runner = store.register_runner(job, "here", 1, "sync", TTL)
    members = Membership(store, job, runner, clock)
    dead = asyncio.Event()
    keep = asyncio.create_task(members.keep(TTL, lambda: 0, lambda beat: None, dead.set))
    await asyncio.sleep(1)
    assert not dead.is_set()
    clock.advance(TTL + 1)  # this process stalled past its expiry; another runner recovers
    store.recover(job, "elsewhere", lambda pid: True)
    async with asyncio.timeout(5):
        await dead.wait()
    await keep  # the loop ended by itself
    await members.close()


@on_virtual_time
async def test_a_shared_pause_reaches_the_other_runners_next_beat_once(
    store: Store, tmp_path: Path, clock: VirtualClock
) -> None:
    job = _job(store, tmp_path)
    a = Membership(store, job, store.register_runner(job, "h", 1, "sync", TTL), clock)
    b_id = store.register_runner(job, "h", 1, "sync", TTL)
    for _ in range(50):  # many workers meet the same 429: one write
        a.share_pause(20.0)
    assert len(a._sharing) == 1
    await a.close()
    beat = store.heartbeat(b_id, TTL, 0)
    assert beat.paused_until == pytest.approx(clock.now() + 20.0, abs=0.5)
