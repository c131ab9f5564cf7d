"""``--via batch`` in-process: the Batch API backend against the simulator's Files and Batch APIs
(the real ``openai`` client over HTTP) and a real SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from runner.endpoints import EMBEDDINGS, ENDPOINTS
from runner.errors import RunnerLostError
from runner.settings import Batching, Retry
from runner.simulator import SimulatorThread
from runner.store import open_store

from .books import (
    BillsByBody,
    assert_consistent,
    assert_covers_bill,
    body_digest,
    books,
    rows,
    scalar,
    watch_bills,
)
from .helpers import Ran, run_in_process, write_job

MakeSim = Callable[..., SimulatorThread]
FAST = {"poll_first": 0.01, "poll_interval": 0.05}


async def run_batch(job: Path | None, db: Path, sim: SimulatorThread, **kw: Any) -> Ran:
    batching = Batching(**{**FAST, **kw.pop("batching", {})})
    kw.setdefault("retry", Retry(max_attempts=20, backoff_base=0.01, backoff_max=0.05))
    return await run_in_process(job, db, sim.base_url, via="batch", batching=batching, **kw)


def assert_billed_once(db: Path, bills: BillsByBody) -> None:
    """Every finished request was billed exactly once, at what its result cost (batch
    prices), and nothing else was billed."""
    done = rows(
        db,
        "SELECT r.body, s.cost_pico FROM requests r JOIN results s ON s.request_id = r.id "
        "WHERE r.state = 'done'",
    )
    for body, cost in done:
        d = body_digest(body)
        assert bills.times.get(d) == 1, body[:80]
        assert bills.pico[d] == cost
    assert sum(bills.times.values()) == len(done)


def input_files(sim: SimulatorThread) -> list[str]:
    client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
    try:
        return [f.filename for f in client.files.list(purpose="batch")]
    finally:
        client.close()


async def test_a_multi_batch_job_settles_at_batch_prices_and_sends_nothing_synchronously(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator(batch_lines_per_s=20_000)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 300, mix=("chat", "responses", "embeddings"), seed=3)
    ran = await run_batch(job, db, sim, batching={"requests_per_batch": 40})
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 300}
    ledger = sim.ledger_snapshot()
    # Nothing went to the synchronous endpoints: every bill is a batch line's.
    assert ledger["requests_billed"] == ledger["batch_lines_billed"] == 300
    assert ledger["status_counts"].get("429", 0) == 0
    b = books(db)
    assert b.ledger_pico == ledger["billed_pico"] == ledger["batch_billed_pico"]
    assert b.reserved_pico == 0
    assert_billed_once(db, bills)
    assert_consistent(db)
    # 100 of each endpoint, one endpoint and model per batch, at most 40 per batch.
    batches = ran.status.batches
    assert ledger["batches_created"] == len(batches) == 9
    assert all(x.state == "closed" and x.status == "completed" for x in batches)
    assert all(x.requests <= 40 for x in batches)
    assert sum(x.requests for x in batches) == 300
    assert scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%batch%'") == 300
    # Results at batch prices are half the synchronous bill of the same usage (rounded up).
    assert b.ledger_pico < rows(db, "SELECT SUM(worst_pico) FROM requests")[0][0] / 2
    assert input_files(sim) == []  # the inputs of finished batches are deleted


async def test_the_cap_stops_submission_at_the_right_batch(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator()
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 60, max_tokens=1, seed=4)  # max_tokens=1: the actual cost is the worst case
    # Import only (cap 0: nothing fits), to learn each request's batch worst case.
    first = await run_batch(job, db, sim, cap="0")
    assert first.exit_code == 3 and sim.ledger_snapshot()["batches_created"] == 0
    worst = [w for (w,) in rows(db, "SELECT batch_worst_pico FROM requests ORDER BY seq")]
    cap_pico = sum(worst[:25]) + worst[25] // 2  # 25 fit; the 26th does not
    cap = f"{cap_pico / 10**12:.12f}"
    ran = await run_batch(job, db, sim, cap=cap, batching={"requests_per_batch": 10})
    assert ran.exit_code == 3, ran.message
    assert "spend cap" in (ran.message or "")
    ledger = sim.ledger_snapshot()
    assert ledger["batches_created"] == 3  # 10 + 10 + 5, then the cap
    assert [x.requests for x in ran.status.batches] == [10, 10, 5]
    assert ran.status.states == {"done": 25, "pending": 35}
    assert ledger["billed_pico"] == sum(worst[:25]) <= cap_pico
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_billed_once(db, bills)
    assert_consistent(db)


async def test_expired_and_failed_lines_go_into_later_batches_and_the_job_finishes(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    # Each batch runs 0.25 s at 200 lines/s: about 50 lines finish, the rest expire.
    sim = make_simulator(batch_lines_per_s=200, batch_window_s=0.25, batch_p_500=0.2, seed=9)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 150, seed=5)
    ran = await run_batch(job, db, sim)
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 150}
    statuses = [x.status for x in ran.status.batches]
    assert statuses[0] == "expired" and len(statuses) >= 3
    expired = ran.status.batches[0]
    assert 0 < expired.completed < expired.requests  # its partial results were kept ...
    assert_billed_once(db, bills)  # ... and never paid for again
    assert books(db).ledger_pico == sim.ledger_snapshot()["billed_pico"]
    kinds = dict(rows(db, "SELECT error_kind, COUNT(*) FROM attempts GROUP BY error_kind"))
    assert kinds.get("batch_expired", 0) > 0 and kinds.get("server", 0) > 0
    assert scalar(db, "SELECT MAX(attempts) FROM requests") > 1
    assert_consistent(db)


async def test_an_unreadable_output_line_is_charged_at_worst_case_and_its_request_sent_again(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """A result line cut short cannot be matched to its request, yet it was billed: the
    request that has no readable line is charged its worst case (never below the bill) and
    goes into a later batch."""
    sim = make_simulator(batch_lines_per_s=20_000, batch_p_garbled=0.1, seed=4)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 120, seed=8)
    ran = await run_batch(job, db, sim)
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 120}
    twice = {d for d, n in bills.times.items() if n > 1}
    assert twice, "no line was garbled: the test proves nothing"
    unknown = {
        body_digest(body)
        for (body,) in rows(
            db,
            "SELECT r.body FROM requests r JOIN ledger l ON l.request_id = r.id "
            "WHERE l.kind = 'unknown'",
        )
    }
    assert twice <= unknown  # each request billed twice was charged for the unread line
    assert_covers_bill(db, sim, bills)
    assert_consistent(db)


async def test_a_completed_batch_without_its_output_file_charges_what_it_billed(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """The API says the lines completed (billed) but no output file comes back: those
    requests are charged their worst case before they are sent again."""
    sim = make_simulator(batch_lines_per_s=20_000, batch_lose_output=True)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 30, seed=9)
    ran = await run_batch(job, db, sim, retry=Retry(max_attempts=2, backoff_base=0.01))
    assert ran.exit_code == 1, ran.message  # nothing ever comes back: out of attempts
    assert sim.ledger_snapshot()["batch_lines_billed"] == 60  # each sent twice, billed twice
    assert scalar(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'") == 60
    assert_covers_bill(db, sim, bills)
    assert_consistent(db)


async def test_lines_out_of_attempts_fail_with_the_apis_message(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator(batch_p_500=1.0)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 12, seed=6)
    ran = await run_batch(job, db, sim, retry=Retry(max_attempts=2))
    assert ran.exit_code == 1
    assert ran.status.states == {"failed": 12}
    assert sim.ledger_snapshot()["batches_created"] == 2  # one try, then one more
    (message,) = {m for (m,) in rows(db, "SELECT error_message FROM results")}
    assert message.startswith("gave up after 2 attempts: The server had an error")
    assert sim.ledger_snapshot()["billed_pico"] == books(db).ledger_pico == 0
    assert_consistent(db)


async def test_the_enqueued_token_limit_is_waited_out_and_batches_resubmitted_smaller(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 80, seed=7)
    tokens = [t for (t,) in rows_of_job(job, tmp_path)]
    limit = sum(tokens[:40]) + sum(tokens[40:80]) // 2  # one batch of 40 fits, two do not
    sim = make_simulator(batch_lines_per_s=60, batch_validate_s=0.02, batch_enqueued_tokens=limit)
    bills = watch_bills(sim)
    ran = await run_batch(job, db, sim, batching={"requests_per_batch": 40})
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 80}
    failed = [x for x in ran.status.batches if x.status == "failed"]
    assert failed and all("Enqueued token limit" in (x.error or "") for x in failed)
    assert max(x.requests for x in ran.status.batches if x.status == "completed") <= 40
    assert any(x.requests <= 20 for x in ran.status.batches if x.status == "completed")
    assert_billed_once(db, bills)
    assert scalar(db, "SELECT MAX(attempts) FROM requests") == 1  # the limit costs no attempt
    assert_consistent(db)


async def test_batch_queue_tokens_keeps_the_enqueued_tokens_under_the_limit(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 80, seed=7)
    tokens = [t for (t,) in rows_of_job(job, tmp_path)]
    limit = sum(tokens[:40]) + sum(tokens[40:80]) // 2
    sim = make_simulator(batch_lines_per_s=400, batch_validate_s=0.02, batch_enqueued_tokens=limit)
    ran = await run_batch(job, db, sim, batching={"requests_per_batch": 40, "queue_tokens": limit})
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 80}
    assert [x.status for x in ran.status.batches] == ["completed"] * len(ran.status.batches)
    assert all(x.input_tokens <= limit for x in ran.status.batches)
    assert_consistent(db)


def rows_of_job(job: Path, tmp_path: Path) -> list[tuple[int]]:
    """Each request's input tokens as batchrun counts them, in file order (a throwaway import)."""
    from runner.plan import open_job, plan_rows
    from runner.pricing import load_price_table

    _, planner = open_job(job, load_price_table())
    return [(r.input_tokens,) for r in plan_rows(planner)]


async def test_a_batch_that_fails_validation_names_each_line_as_file_line(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    # batchrun knows "my-finetune" from a price file; the Batch API does not serve it.
    prices = tmp_path / "prices.toml"
    prices.write_text('[models.my-finetune]\ninput = "0.30"\noutput = "1.20"\n')
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 6, seed=8)
    lines = job.read_text().splitlines()
    for i in (2, 4):  # job-file lines 3 and 5
        lines[i] = lines[i].replace('"gpt-4o-mini"', '"my-finetune"')
    job.write_text("\n".join(lines) + "\n")
    sim = make_simulator()
    ran = await run_batch(job, db, sim, prices=prices)
    assert ran.exit_code == 1
    assert ran.status.states == {"done": 4, "failed": 2}
    failed = dict(rows(db, "SELECT r.line, s.error_message FROM requests r JOIN results s "
                          "ON s.request_id = r.id WHERE r.state = 'failed'"))  # fmt: skip
    assert set(failed) == {3, 5}
    for line, message in failed.items():
        assert message.startswith(f"{job.resolve()}:{line}: model_not_found: ")
    (bad,) = [x for x in ran.status.batches if x.status == "failed"]
    assert f"{job.resolve()}:3: model_not_found" in (bad.error or "")
    assert_consistent(db)


async def test_embeddings_batches_keep_to_the_inputs_per_batch_limit(
    tmp_path: Path, make_simulator: MakeSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API's 50,000 inputs per batch, scaled down to 7 (the simulator checks the same entry).
    small = dataclasses.replace(EMBEDDINGS, batch_max_inputs=7)
    monkeypatch.setitem(ENDPOINTS, EMBEDDINGS.url, small)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    with job.open("w") as f:
        for i in range(10):
            body = {"model": "text-embedding-3-small", "input": [f"text {i} a", f"text {i} b"]}
            f.write(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": EMBEDDINGS.url,
                                "body": body}) + "\n")  # fmt: skip
    sim = make_simulator()
    ran = await run_batch(job, db, sim)
    assert ran.exit_code == 0, ran.message
    assert [x.requests for x in ran.status.batches] == [3, 3, 3, 1]  # 2 inputs each, <= 7
    assert all(x.status == "completed" for x in ran.status.batches)


async def test_requests_of_a_submitted_batch_belong_to_it_not_to_a_dead_runner(
    tmp_path: Path,
) -> None:
    """Recovery re-queues a dead runner's claims, but never the requests of an open batch:
    they may still run at OpenAI, so the next runner re-attaches them. A Batch API runner's
    claims outside a chunk were never sent (only a chunk's file is), so they cost nothing."""
    from tests.test_store import _job  # a small job of 10 requests

    store = open_store(tmp_path / "b.db")
    try:
        job = _job(store)
        dead = store.register_runner(job, "h", 1, "batch", ttl=-1)
        claimed = store.claim(dead, 5, batch=True).requests
        chunk = store.open_chunk(
            dead, [r.id for r in claimed[:3]], tag="t1", url="/v1/chat/completions",
            model="gpt-4o-mini", size=1, input_tokens=1,
        )  # fmt: skip
        store.update_chunk(dead, chunk.id, state="submitted", batch_id="batch_1")
        live = store.register_runner(job, "h", 2, "batch", ttl=30)
        before = store.spend(job)
        assert store.recover(job, "h", lambda pid: True) == (0, 0)  # nothing charged
        after = store.spend(job)
        assert after.settled_pico == before.settled_pico == 0
        assert before.reserved_pico - after.reserved_pico == sum(r.worst_pico for r in claimed[3:])
        assert store.status(job).states["pending"] == 10 - 3  # the 2 outside the chunk are back
        assert store.in_batches(job) == 3
        attached = store.attach_chunks(live)
        assert [c.batch_id for c in attached] == ["batch_1"]
        held = store.chunk_requests(chunk.id)
        assert [r.id for r in held] == [r.id for r in claimed[:3]]
        assert store.spend(job).reserved_pico == sum(r.worst_pico for r in held)
        # The new watcher settles them; the dead runner can write nothing about the chunk.
        store.close_chunk(live, chunk.id, status="completed")
        with pytest.raises(RunnerLostError):
            store.update_chunk(dead, chunk.id, status="x")
    finally:
        store.close()


async def test_a_job_capped_on_the_batch_api_goes_on_synchronously_with_its_pending_rows(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator()
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 40, max_tokens=1, seed=14)
    first = await run_batch(job, db, sim, cap="0.0001", batching={"requests_per_batch": 10})
    assert first.exit_code == 3 and 0 < first.status.states["done"] < 40
    ran = await run_in_process(job, db, sim.base_url, cap="1")  # --via sync, the default
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 40}
    ledger = sim.ledger_snapshot()
    assert 0 < ledger["batch_lines_billed"] < ledger["requests_billed"] == 40
    assert_billed_once(db, bills)
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)


async def test_runners_joining_a_job_whose_batches_another_runner_watches(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """A synchronous runner that joins says who watches the open batches; a second Batch API
    runner waits for them (it would submit what they hand back, and take them over if their
    watcher died) and ends when the job does. Nothing is submitted or billed twice."""
    sim = make_simulator(batch_lines_per_s=15)  # each batch runs ~4 s
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 120, seed=21, prompt_words=8)
    per_batch = {"requests_per_batch": 60}
    first = asyncio.ensure_future(run_batch(job, db, sim, batching=per_batch))
    while sim.ledger_snapshot()["batches_created"] < 2:
        assert not first.done(), first.result()
        await asyncio.sleep(0.01)
    joined_sync = await run_in_process(None, db, sim.base_url, job_id=1)
    assert joined_sync.exit_code == 1
    assert "watched by another runner (pid " in (joined_sync.message or "")
    joined_batch = await run_batch(None, db, sim, job_id=1, batching=per_batch)
    assert not first.done() or first.result().exit_code == 0
    assert joined_batch.exit_code == 0, joined_batch.message
    assert (await first).exit_code == 0
    b = books(db)
    assert (b.done, b.pending, b.reserved, b.failed) == (120, 0, 0, 0)
    assert sim.ledger_snapshot()["batches_created"] == 2
    assert b.ledger_pico == sim.ledger_snapshot()["billed_pico"]
    assert all(n == 1 for n in bills.times.values())


async def test_result_lines_are_split_exactly_whatever_the_download_pieces() -> None:
    """Lines cut anywhere by the download (a long embeddings line over many pieces, a newline
    at a piece's end, a last line without one) reach the settling code whole and in order."""
    from runner.backends.batch import BatchBackend, _Failpoints

    lines = [b'{"a": 1}', b"x" * 300_000, b"", b'{"b": 2}', b"y" * 7, b'{"c": 3}']
    data = b"\n".join(lines)
    seen: list[bytes] = []

    class Books:
        async def flush(self) -> None:
            pass

    backend = BatchBackend.__new__(BatchBackend)
    backend._fail = _Failpoints()
    backend._books = Books()  # type: ignore[assignment]
    backend._line = lambda raw, by_id, tally: seen.append(bytes(raw))  # type: ignore[method-assign]

    async def pieces(size: int) -> Any:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    for size in (1, 5, 8, 9, 4096, len(data)):
        seen.clear()
        await backend._lines(pieces(size), {}, {})
        assert seen == [line for line in lines if line], size
