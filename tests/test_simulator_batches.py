"""The simulator's Files and Batch APIs, through the real ``openai`` client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import openai
import pytest
from openai.types import Batch

from runner.pricing import load_price_table
from runner.simulator import SimulatorThread
from runner.simulator.answers import _Answers
from runner.tokens import count_request
from tests.books import body_digest, watch_bills

CHAT: Final = "/v1/chat/completions"
EMBEDDINGS: Final = "/v1/embeddings"
MakeSim = Callable[..., SimulatorThread]
# Fields of a reply that differ between two answers to the same body.
VOLATILE = ("id", "created", "created_at", "echo_api_key")


def client_for(sim: SimulatorThread, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


def chat(text: str, model: str = "gpt-4o-mini", **extra: Any) -> str:
    """A chat body as the exact text a job file would hold."""
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}], **extra})


def line(custom_id: str, body: str, url: str = CHAT, method: str = "POST") -> str:
    return f'{{"custom_id": "{custom_id}", "method": "{method}", "url": "{url}", "body": {body}}}'


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


async def upload(client: openai.AsyncOpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return (await client.files.create(file=(name, data), purpose="batch")).id


async def start_batch(
    client: openai.AsyncOpenAI, lines: list[str], endpoint: str = CHAT, **extra: Any
) -> Batch:
    file_id = await upload(client, jsonl(lines))
    return await client.batches.create(
        input_file_id=file_id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        **extra,
    )


async def run_batch(client: openai.AsyncOpenAI, lines: list[str], endpoint: str = CHAT) -> Batch:
    """Start a batch and wait until it ends."""
    return await finished(client, (await start_batch(client, lines, endpoint)).id)


async def wait_until(
    client: openai.AsyncOpenAI, batch_id: str, done: Callable[[Batch], bool], timeout: float = 5
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}: {batch}"
        await asyncio.sleep(0.01)


async def finished(client: openai.AsyncOpenAI, batch_id: str) -> Batch:
    final = {"completed", "failed", "expired", "cancelled"}
    return await wait_until(client, batch_id, lambda b: b.status in final)


async def records(client: openai.AsyncOpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A result file's lines by custom_id."""
    if file_id is None:
        return {}
    content = await client.files.content(file_id)
    out = {}
    for raw in content.content.splitlines():
        record = json.loads(raw)
        out[record["custom_id"]] = record
    return out


def stable(body: dict[str, Any]) -> dict[str, Any]:
    """A reply without the fields that change from one answer to the next."""
    out = {k: v for k, v in body.items() if k not in VOLATILE}
    if "output" in out:
        out["output"] = [{k: v for k, v in o.items() if k != "id"} for o in out["output"]]
    return out


@pytest.fixture
async def client(simulator: SimulatorThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client_for(simulator) as c:
        yield c


async def test_files_upload_list_retrieve_content_delete(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    first = jsonl([line("a", chat("one"))])
    second = jsonl([line("b", chat("two")), line("c", chat("three"))])
    one = await client.files.create(file=("one.jsonl", first), purpose="batch")
    two = await client.files.create(file=("two.jsonl", second), purpose="batch")
    assert one.id.startswith("file-") and one.object == "file" and one.purpose == "batch"
    assert one.bytes == len(first) and one.filename == "one.jsonl" and one.status == "processed"
    assert (await client.files.retrieve(two.id)).bytes == len(second)
    assert [f.id async for f in client.files.list()] == [two.id, one.id]
    assert [f.id async for f in client.files.list(order="asc")] == [one.id, two.id]

    assert (await client.files.content(one.id)).content == first
    async with client.files.with_streaming_response.content(two.id) as response:
        streamed = b"".join([chunk async for chunk in response.iter_bytes()])
    assert streamed == second

    deleted = await client.files.delete(one.id)
    assert deleted.deleted and deleted.id == one.id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(one.id)
    with pytest.raises(openai.NotFoundError):
        await client.files.content(one.id)
    assert [f.id async for f in client.files.list()] == [two.id]

    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("notes.txt", first), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", first), purpose="assistants")
    state = simulator.ledger_snapshot()
    assert state["files_uploaded"] == 2 and state["files"] == {"stored": 1, "bytes": len(second)}
    assert state["requests_billed"] == 0

    simulator.reset()
    assert [f.id async for f in client.files.list()] == []


async def test_a_batch_answers_each_line_like_the_endpoint_at_batch_prices(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    bills = watch_bills(simulator)
    bodies = {
        "plain": chat("Hello there."),
        "choices": chat("Three, please.", n=3, max_completion_tokens=7),
        "limited": chat("An older limit.", max_tokens=20),
        "long": chat("The quick brown fox jumps over the lazy dog. " * 150),
        "refused": chat("__sim_400__"),
    }
    lines = [line(cid, body) for cid, body in bodies.items()]
    created = await start_batch(client, lines, metadata={"job": "7", "chunk": "1"})
    assert created.status == "validating" and created.id.startswith("batch_")
    assert created.metadata == {"job": "7", "chunk": "1"} and created.completion_window == "24h"
    assert created.expires_at == created.created_at + 86400

    batch = await finished(client, created.id)
    assert batch.status == "completed" and batch.model == "gpt-4o-mini"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (5, 4)
    assert batch.request_counts.failed == 1
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) >= batch.created_at
    assert batch.failed_at is None and batch.errors is None

    output = await records(client, batch.output_file_id)
    errors = await records(client, batch.error_file_id)
    assert set(output) == set(bodies) - {"refused"} and set(errors) == {"refused"}
    refused = errors["refused"]
    assert refused["response"]["status_code"] == 400 and refused["error"] is None
    assert refused["response"]["body"]["error"]["code"] == "context_length_exceeded"

    table = load_price_table()
    expected = 0
    for cid, record in output.items():
        assert record["id"].startswith("batch_req_") and record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        usage = response["body"]["usage"]
        price = table.prices.get(response["body"]["model"]) or table.resolve("gpt-4o-mini")
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        expected += price.cost(
            usage["prompt_tokens"], cached, usage["completion_tokens"], batch=True
        )
        assert bills.times[body_digest(bodies[cid])] == 1  # billed under the body's own bytes
    ledger = simulator.ledger_snapshot()
    assert ledger["billed_pico"] == ledger["batch_billed_pico"] == expected
    assert ledger["batch_lines_billed"] == ledger["requests_billed"] == 4
    assert ledger["batches_created"] == 1 and ledger["batches"]["completed"] == 1
    assert batch.usage is not None and batch.usage.input_tokens == sum(
        r["response"]["body"]["usage"]["prompt_tokens"] for r in output.values()
    )

    # The same bytes sent to the synchronous endpoint get the same reply.
    root = simulator.base_url
    async with aiohttp.ClientSession() as http:
        for cid, record in output.items():
            async with http.post(
                f"{root}/chat/completions",
                data=bodies[cid].encode(),
                headers={"Content-Type": "application/json"},
            ) as r:
                assert stable(await r.json()) == stable(record["response"]["body"])
    sync_billed = simulator.ledger_snapshot()["billed_pico"] - expected
    assert 0 < expected < sync_billed  # batch prices are half of these


async def test_responses_and_embeddings_batches(client: openai.AsyncOpenAI) -> None:
    responses = [
        line(f"r{i}", json.dumps({"model": "o4-mini", "input": f"Think {i}."}), "/v1/responses")
        for i in range(3)
    ]
    created = await start_batch(client, responses, "/v1/responses")
    vectors = json.dumps({"model": "text-embedding-3-small", "input": ["a", "b"]})
    embeds = [line(f"e{i}", vectors, EMBEDDINGS) for i in range(3)]
    embedded = await start_batch(client, embeds, EMBEDDINGS)
    for batch_id, kind in ((created.id, "response"), (embedded.id, "list")):
        batch = await finished(client, batch_id)
        assert batch.status == "completed", batch
        output = await records(client, batch.output_file_id)
        assert len(output) == 3 and batch.error_file_id is None
        assert {r["response"]["body"]["object"] for r in output.values()} == {kind}
    output = await records(client, (await client.batches.retrieve(embedded.id)).output_file_id)
    assert all(len(r["response"]["body"]["data"]) == 2 for r in output.values())


async def test_validation_failures_name_their_lines(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    lines = [
        line("a", chat("fine")),
        '{"custom_id": "b", "method": "POST", "url": ',
        line("c", chat("elsewhere"), url="/v1/responses"),
        line("d", chat("get"), method="GET"),
        line("a", chat("again")),
        line("f", chat("other model", model="gpt-4o")),
        line("g", chat("unknown", model="no-such-model")),
    ]
    batch = await run_batch(client, lines)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    found = [(e.code, e.line, e.param) for e in batch.errors.data]
    assert found == [
        ("invalid_json_line", 2, None),
        ("invalid_url", 3, "url"),
        ("invalid_method", 4, "method"),
        ("duplicate_custom_id", 5, "custom_id"),
        ("mismatched_model", 6, "body.model"),
        ("model_not_found", 7, "body.model"),
    ]
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.in_progress_at is None and batch.request_counts is not None
    assert batch.request_counts.total == 0

    simulator.configure(batch_max_requests=2)
    too_many = await run_batch(client, [line(str(i), chat(str(i))) for i in range(3)])
    assert too_many.errors is not None and too_many.errors.data is not None
    assert [(e.code, e.line) for e in too_many.errors.data] == [("too_many_requests", 3)]

    simulator.configure(batch_max_requests=50_000, batch_max_bytes=100)
    too_big = await run_batch(client, [lines[0]])
    assert too_big.errors is not None and too_big.errors.data is not None
    assert [e.code for e in too_big.errors.data] == ["file_too_large"]

    simulator.configure(batch_max_bytes=10**9)
    many = json.dumps({"model": "text-embedding-3-small", "input": ["x"] * 50_001})
    inputs = await run_batch(client, [line("e", many, EMBEDDINGS)], EMBEDDINGS)
    assert inputs.errors is not None and inputs.errors.data is not None
    assert [(e.code, e.line) for e in inputs.errors.data] == [("too_many_inputs", 1)]
    assert simulator.ledger_snapshot()["billed_pico"] == 0


async def test_create_refuses_bad_parameters(client: openai.AsyncOpenAI) -> None:
    file_id = await upload(client, jsonl([line("a", chat("x"))]))
    create = client.batches.create
    with pytest.raises(openai.BadRequestError):
        await create(input_file_id=file_id, endpoint=CHAT, completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        await create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={str(i): "v" for i in range(17)},
        )
    with pytest.raises(openai.BadRequestError):
        await create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await create(input_file_id="file-missing", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_missing")


async def test_an_expired_batch_keeps_what_it_finished(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_lines_per_s=40, batch_window_s=0.25)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(30)])
        batch = await finished(client, created.id)
        assert batch.status == "expired" and batch.expired_at is not None
        assert batch.completed_at is None and batch.expires_at == batch.created_at + 1
        output = await records(client, batch.output_file_id)
        errors = await records(client, batch.error_file_id)
    assert 1 <= len(output) < 30 and len(output) + len(errors) == 30
    assert batch.request_counts is not None and batch.request_counts.completed == len(output)
    for record in errors.values():
        assert record["response"] is None and record["error"]["code"] == "batch_expired"
    assert sim.ledger_snapshot()["batch_lines_billed"] == len(output)


async def test_a_cancelled_batch_keeps_what_it_finished(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_lines_per_s=50, batch_finalize_s=0.05)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(50)])
        await wait_until(client, created.id, lambda b: (b.request_counts or b).completed >= 3)  # type: ignore[union-attr]
        cancelling = await client.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch = await finished(client, created.id)
        assert batch.status == "cancelled" and batch.cancelled_at is not None
        output = await records(client, batch.output_file_id)
        errors = await records(client, batch.error_file_id)
        with pytest.raises(openai.BadRequestError):
            await client.batches.cancel(created.id)
    assert 3 <= len(output) < 50 and len(output) + len(errors) == 50
    assert {r["error"]["code"] for r in errors.values()} == {"batch_cancelled"}
    assert sim.ledger_snapshot()["batch_lines_billed"] == len(output)


async def test_the_enqueued_token_limit_fails_a_batch(make_simulator: MakeSim) -> None:
    body = chat("Count these tokens.")
    tokens = count_request(CHAT, json.loads(body)).tokens
    sim = make_simulator(batch_enqueued_tokens=tokens * 15, batch_lines_per_s=10)
    async with client_for(sim) as client:
        running = await start_batch(client, [line(f"a{i}", body) for i in range(10)])
        await wait_until(client, running.id, lambda b: b.status == "in_progress")
        refused = await run_batch(client, [line(f"b{i}", body) for i in range(10)])
        assert refused.status == "failed" and refused.errors is not None
        assert refused.errors.data is not None
        [error] = refused.errors.data
        assert error.code == "token_limit_exceeded" and error.line is None
        assert error.message == (
            "Enqueued token limit reached for gpt-4o-mini in organization org-sim. "
            f"Limit: {tokens * 15:,} enqueued tokens. Please try again once some in_progress "
            "batches have been completed."
        )
        fits = await run_batch(client, [line("c", body)])
        assert fits.status == "completed"
        await client.batches.cancel(running.id)
        assert (await finished(client, running.id)).status == "cancelled"
        sim.configure(batch_lines_per_s=1000)
        again = await run_batch(client, [line(f"b{i}", body) for i in range(10)])
        assert again.status == "completed"


async def test_injected_line_failures_go_to_the_error_file(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_p_500=0.4, seed=3)
    async with client_for(sim) as client:
        batch = await run_batch(client, [line(f"r{i}", chat(str(i))) for i in range(40)])
        output = await records(client, batch.output_file_id)
        errors = await records(client, batch.error_file_id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.failed == len(errors) > 0
    assert batch.request_counts.completed == len(output) > 0
    for record in errors.values():
        assert record["response"]["status_code"] == 500 and record["error"] is None
        assert record["response"]["body"]["error"]["type"] == "server_error"
    assert sim.ledger_snapshot()["batch_lines_billed"] == len(output)


async def test_batches_are_listed_newest_first_page_by_page(client: openai.AsyncOpenAI) -> None:
    file_id = await upload(client, jsonl([line("a", chat("x"))]))
    ids = []
    for i in range(5):
        batch = await client.batches.create(
            input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"n": str(i)}
        )
        ids.append(batch.id)
    page = await client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:2:-1][:2] and page.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == ids[::-1]
    after = await client.batches.list(limit=10, after=ids[2])
    assert [b.id for b in after.data] == ids[1::-1] and not after.has_more
    assert [b.metadata for b in after.data] == [{"n": "1"}, {"n": "0"}]


async def test_stop_ends_running_batches(make_simulator: MakeSim) -> None:
    sim = make_simulator(batch_lines_per_s=1, batch_validate_s=0.01)
    async with client_for(sim) as client:
        created = await start_batch(client, [line(f"r{i}", chat(str(i))) for i in range(100)])
        await wait_until(client, created.id, lambda b: b.status == "in_progress")
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 2


async def test_file_content_is_streamed_not_held(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    row = line("x" * 20, chat("y" * 900)).encode() + b"\n"
    with path.open("wb") as out:
        for _ in range(32 * 1024 * 1024 // len(row)):
            out.write(row)
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            with path.open("rb") as fh:
                form.add_field("file", fh, filename="big.jsonl")
                async with http.post(
                    f"{simulator.base_url}/files",
                    data=form,
                    headers={"Authorization": "Bearer sk-test"},
                ) as r:
                    assert r.status == 200, await r.text()
                    file_id = (await r.json())["id"]
        async with client_for(simulator) as client:
            received = hashlib.sha256()
            async with client.files.with_streaming_response.content(file_id) as response:
                async for chunk in response.iter_bytes():
                    received.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received.hexdigest() == digest
    assert simulator.ledger_snapshot()["files"]["bytes"] == size
    assert peak < size // 4, f"peak {peak} bytes for a {size}-byte file"


async def test_a_broken_batch_fails_instead_of_hanging(
    client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(_Answers, "reply", boom)
    batch = await run_batch(client, [line("a", chat("x"))])
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "server_error"
