"""Pricing a whole job: per-model totals, output limits, floor and worst case, wall time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from runner.cli import error_status
from runner.endpoints import endpoint_for
from runner.errors import JobFileError, PriceError
from runner.plan import Plan, Totals, open_job, plan_rows, price_job
from runner.pricing import PriceTable, load_price_table

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"

# Picodollars per token (USD per 1M tokens x 10**6), from the bundled table.
MINI_IN, MINI_OUT = 150_000, 600_000  # gpt-4o-mini 0.15 / 0.60
MINI41_IN, MINI41_OUT = 400_000, 1_600_000  # gpt-4.1-mini 0.40 / 1.60
EMB_IN = 20_000  # text-embedding-3-small 0.02
MINI_MAX_OUTPUT = 16_384


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return load_price_table()


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat(custom_id: str, content: str = "Hello", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
    }
    body.update(extra)
    return line(custom_id, CHAT, body)


def write(tmp_path: Path, *requests: dict[str, Any] | str, name: str = "job.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests), "utf-8"
    )
    return path


def mixed_job(tmp_path: Path) -> Path:
    """Seven requests whose token counts follow from the chat rule by hand.

    o200k and cl100k both give: "user", "system", "developer", "Hello", "world" 1 token each,
    "Be brief." 3, "Where is my order?" 5. Chat = 3 priming + per message (3 + role + content).
    """
    two_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
    ]
    return write(
        tmp_path,
        # 3 + (3+1+3) + (3+1+5) = 19 tokens; limit 100 x n=2
        line(
            "a",
            CHAT,
            {
                "model": "gpt-4o-mini",
                "messages": two_messages,
                "max_completion_tokens": 100,
                "n": 2,
            },
        ),
        chat("b", max_tokens=50),  # 3 + (3+1+1) = 8 tokens; limit 50
        chat("c"),  # 8 tokens; no limit: priced at max_output 16,384
        chat("d", n=3),  # 8 tokens; no limit, n=3: 3 x 16,384
        # instructions = a developer message, string input = a user message:
        # 3 + (3+1+3) + (3+1+1) = 15 tokens; limit 30
        line(
            "e",
            RESPONSES,
            {
                "model": "gpt-4.1-mini",
                "instructions": "Be brief.",
                "input": "Hello",
                "max_output_tokens": 30,
            },
        ),
        # embeddings: just the inputs, 1 + 1 = 2 tokens, no output
        line("f", EMBEDDINGS, {"model": "text-embedding-3-small", "input": ["Hello", "world"]}),
        # a dated snapshot: priced as gpt-4o-mini, listed under the name it was requested by
        line(
            "g",
            CHAT,
            {
                "model": "gpt-4o-mini-2024-07-18",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_completion_tokens": 10,
            },
        ),
    )


def sync_only(t: Totals) -> Totals:
    """``t`` without its Batch API figures (tested on their own)."""
    return replace(t, batch_floor_pico=0, batch_worst_pico=0)


def test_per_model_totals_follow_the_rules_by_hand(tmp_path: Path, table: PriceTable) -> None:
    plan = price_job(mixed_job(tmp_path), table)
    plan.by_model = {m: sync_only(t) for m, t in plan.by_model.items()}
    plan.total = sync_only(plan.total)
    mini_input = 19 + 8 + 8 + 8
    mini_limit = 200 + 50 + MINI_MAX_OUTPUT + 3 * MINI_MAX_OUTPUT
    assert plan.by_model == {
        "gpt-4o-mini": Totals(
            requests=4,
            input_tokens=mini_input,
            output_limit_tokens=mini_limit,
            unlimited_requests=2,
            floor_pico=mini_input * MINI_IN,
            worst_pico=mini_input * MINI_IN + mini_limit * MINI_OUT,
            # the two without a limit (n=1 and n=3): what they add to the worst case
            unlimited_limit_tokens=4 * MINI_MAX_OUTPUT,
            unlimited_worst_pico=4 * MINI_MAX_OUTPUT * MINI_OUT,
        ),
        "gpt-4o-mini-2024-07-18": Totals(1, 8, 10, 0, 0, 8 * MINI_IN, 8 * MINI_IN + 10 * MINI_OUT),
        "gpt-4.1-mini": Totals(1, 15, 30, 0, 0, 15 * MINI41_IN, 15 * MINI41_IN + 30 * MINI41_OUT),
        "text-embedding-3-small": Totals(1, 2, 0, 0, 0, 2 * EMB_IN, 2 * EMB_IN),
    }
    # the same numbers written out, so a wrong constant above cannot hide a wrong total
    assert plan.by_model["gpt-4o-mini"].worst_pico == 39_478_050_000
    assert plan.total == Totals(
        requests=7,
        input_tokens=68,
        output_limit_tokens=65_826,
        unlimited_requests=2,
        approximate_requests=0,
        floor_pico=13_690_000,
        worst_pico=39_539_290_000,
        unlimited_limit_tokens=65_536,
        unlimited_worst_pico=39_321_600_000,
    )
    assert sum(t.worst_pico for t in plan.by_model.values()) == plan.total.worst_pico


def test_each_priced_request_carries_its_own_floor_and_worst_case(
    tmp_path: Path, table: PriceTable
) -> None:
    _, planner = open_job(mixed_job(tmp_path), table)
    rows = {r.custom_id: r for r in plan_rows(planner)}
    a = rows["a"]
    assert (a.seq, a.line, a.model, a.input_tokens, a.output_limit) == (
        0,
        1,
        "gpt-4o-mini",
        19,
        200,
    )
    assert (a.floor_pico, a.worst_pico) == (19 * MINI_IN, 19 * MINI_IN + 200 * MINI_OUT)
    assert json.loads(a.body)["n"] == 2
    assert rows["c"].output_limit == MINI_MAX_OUTPUT
    assert rows["d"].output_limit == 3 * MINI_MAX_OUTPUT
    assert rows["f"].output_limit == 0 and rows["f"].worst_pico == rows["f"].floor_pico
    assert [r.seq for r in rows.values()] == list(range(7))


def test_plan_records_the_files_sha256(tmp_path: Path, table: PriceTable) -> None:
    path = mixed_job(tmp_path)
    assert price_job(path, table).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("url", "body", "limit"),
    [
        (CHAT, {"max_completion_tokens": 7}, 7),
        (CHAT, {"max_tokens": 7, "n": 4}, 28),
        (CHAT, {"max_completion_tokens": 7, "max_tokens": 99}, 7),  # the newer name wins
        (CHAT, {}, None),
        (CHAT, {"n": 5}, None),
        (RESPONSES, {"max_output_tokens": 9}, 9),
        (RESPONSES, {}, None),
        (EMBEDDINGS, {}, 0),
    ],
)
def test_output_limit_is_the_endpoints_limit_times_n(
    url: str, body: dict[str, Any], limit: int | None
) -> None:
    endpoint = endpoint_for(url)
    assert endpoint is not None and endpoint.output_limit(body) == limit


def test_unlimited_requests_are_priced_at_max_output_and_counted(
    tmp_path: Path, table: PriceTable
) -> None:
    plan = price_job(write(tmp_path, chat("x"), chat("y", max_completion_tokens=5)), table)
    assert plan.total.unlimited_requests == 1
    assert plan.total.output_limit_tokens == MINI_MAX_OUTPUT + 5
    assert plan.total.worst_pico == 2 * 8 * MINI_IN + (MINI_MAX_OUTPUT + 5) * MINI_OUT


def test_embeddings_have_no_output_and_floor_equals_worst(
    tmp_path: Path, table: PriceTable
) -> None:
    emb = {"model": "text-embedding-3-small", "input": "Where is my order?"}
    plan = price_job(write(tmp_path, line("e1", EMBEDDINGS, emb)), table)
    assert sync_only(plan.total) == Totals(1, 5, 0, 0, 0, 5 * EMB_IN, 5 * EMB_IN)


def test_parts_that_are_estimated_are_counted_by_kind(tmp_path: Path, table: PriceTable) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    question = [{"type": "text", "text": "What is in this picture?"}, image]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    path = write(
        tmp_path,
        line(
            "img",
            CHAT,
            {
                "model": "gpt-4o-mini",
                "max_completion_tokens": 20,
                "messages": [{"role": "user", "content": question}],
            },
        ),
        chat("tool", max_completion_tokens=20, tools=[tool]),
        chat("plain", max_completion_tokens=20),
    )
    plan = price_job(path, table)
    assert plan.approximate_parts == {"image": 1, "tools": 1}
    assert plan.total.approximate_requests == 2
    # a remote image of unknown size is charged the formula's maximum: 2833 + 8 x 5667 tokens
    assert plan.total.input_tokens > 2833 + 8 * 5667


def test_unknown_model_is_reported_at_its_line_before_pricing(
    tmp_path: Path, table: PriceTable
) -> None:
    path = write(
        tmp_path,
        chat("ok"),
        line(
            "bad", CHAT, {"model": "gpt-9-ultra", "messages": [{"role": "user", "content": "Hi"}]}
        ),
    )
    with pytest.raises(JobFileError) as info:
        price_job(path, table)
    [problem] = info.value.problems
    assert (problem.line, problem.field) == (2, "body.model")
    assert "gpt-9-ultra" in problem.reason
    assert str(problem).startswith(f"{path}:2: body.model: no price known")


def test_every_invalid_line_is_reported_after_one_pass(tmp_path: Path, table: PriceTable) -> None:
    path = write(tmp_path, chat("r1"), chat("r2", n=0), "{not json", chat("r1"))
    with pytest.raises(JobFileError) as info:
        price_job(path, table)
    assert [(p.line, p.field) for p in info.value.problems] == [
        (2, "body.n"),
        (3, "line"),
        (4, "custom_id"),
    ]
    assert error_status(info.value) == 2


def test_user_model_without_max_output_cannot_price_an_unlimited_request(
    tmp_path: Path,
) -> None:
    prices = tmp_path / "p.toml"
    prices.write_text('[models.my-model]\ninput = "1"\noutput = "2"\n', "utf-8")
    body = {"model": "my-model", "messages": [{"role": "user", "content": "Hi"}]}
    limited = dict(body, max_completion_tokens=4)
    path = write(tmp_path, line("ok", CHAT, limited), line("open", CHAT, body))
    with pytest.raises(
        PriceError, match=rf"^{path}:2: body.model: 'my-model' has no known max_out"
    ):
        price_job(path, load_price_table(prices))


def test_user_prices_change_the_worst_case(tmp_path: Path) -> None:
    prices = tmp_path / "p.toml"
    prices.write_text('[models.gpt-4o-mini]\noutput = "1.00"\n', "utf-8")
    plan = price_job(write(tmp_path, chat("x", max_completion_tokens=10)), load_price_table(prices))
    assert plan.total.worst_pico == 8 * MINI_IN + 10 * 1_000_000


# -- minimum wall time ---------------------------------------------------------------------------


def plan_of(requests: int, input_tokens: int = 0, output_limit_tokens: int = 0) -> Plan:
    return Plan(path="job.jsonl", total=Totals(requests, input_tokens, output_limit_tokens))


@pytest.mark.parametrize(
    ("requests", "rpm", "seconds"),
    [
        (1500, 500, 120.0),  # the first 500 go at once, the other 1,000 take two minutes
        (500, 500, 0.0),
        (10, 500, 0.0),
        (501, 500, 0.12),
        (1_000_000, 30_000, (1_000_000 - 30_000) / 30_000 * 60),
    ],
)
def test_min_seconds_at_an_rpm_limit_starts_with_a_full_bucket(
    requests: int, rpm: int, seconds: float
) -> None:
    assert plan_of(requests).min_seconds(rpm, None) == pytest.approx(seconds)


def test_min_seconds_at_a_tpm_limit_weighs_input_and_output_limits() -> None:
    plan = plan_of(10, input_tokens=100_000, output_limit_tokens=350_000)
    assert plan.min_seconds(None, 150_000) == pytest.approx(120.0)  # (450k - 150k) / 150k min
    assert plan.min_seconds(None, 450_000) == 0.0


def test_min_seconds_is_the_tighter_of_both_limits_or_none() -> None:
    plan = plan_of(1500, input_tokens=100_000, output_limit_tokens=350_000)
    assert plan.min_seconds(500, 150_000) == pytest.approx(120.0)
    assert plan.min_seconds(100, 150_000) == pytest.approx(840.0)  # rpm binds
    assert plan.min_seconds(10_000, 50_000) == pytest.approx(480.0)  # tpm binds
    assert plan.min_seconds(None, None) is None


def test_min_seconds_of_a_priced_job(tmp_path: Path, table: PriceTable) -> None:
    plan = price_job(mixed_job(tmp_path), table)
    assert plan.min_seconds(1, None) == pytest.approx((7 - 1) * 60)
    assert plan.min_seconds(None, 1000) == pytest.approx((68 + 65_826 - 1000) / 1000 * 60)


# -- price_job's fast path adds up to the same plan as pricing line by line ---------------------


def plan_by_rows(path: Path, table: PriceTable) -> Plan:
    _, planner = open_job(path, table)
    for _ in plan_rows(planner):
        pass
    return planner.plan


def varied_job(tmp_path: Path) -> Path:
    prompts = ["Be brief.", "Answer in French.", "You are a support agent for a shop."]
    requests: list[dict[str, Any] | str] = []
    for i in range(300):
        system = {"role": "system", "content": prompts[i % 3]}
        user = {"role": "user", "content": f"#{i}: where is my order  {i * 7}?\n" * (i % 4)}
        kind = i % 5
        if kind == 0:
            requests.append(chat(f"c{i}", messages=[system, user], max_completion_tokens=i + 1))
        elif kind == 1:
            requests.append(chat(f"u{i}", messages=[user], model="gpt-4.1-mini"))  # no limit
        elif kind == 2:
            body = {"model": "gpt-4.1-mini", "instructions": prompts[i % 3], "input": f"Hi {i}"}
            requests.append(line(f"r{i}", RESPONSES, dict(body, max_output_tokens=20)))
        elif kind == 3:
            body = {"model": "text-embedding-3-small", "input": [f"text {i}", "<|endoftext|>"]}
            requests.append(line(f"e{i}", EMBEDDINGS, body))
        else:
            image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
            parts = [{"type": "text", "text": f"What is in picture {i}?"}, image]
            messages = [system, {"role": "user", "content": parts}]
            requests.append(chat(f"i{i}", messages=messages, max_tokens=9, n=2))
    return write(tmp_path, *requests)


@pytest.mark.parametrize("chunk_lines", [1, 7, 4096])
def test_price_job_equals_pricing_every_row(
    tmp_path: Path,
    table: PriceTable,
    monkeypatch: pytest.MonkeyPatch,
    chunk_lines: int,
) -> None:
    path = varied_job(tmp_path)
    expected = plan_by_rows(path, table)
    monkeypatch.setattr("runner.plan.CHUNK_LINES", chunk_lines)
    plan = price_job(path, table)
    assert plan == expected
    assert list(plan.by_model) == list(expected.by_model)  # first-seen order too
    assert plan.total.approximate_requests == 60 and plan.approximate_parts == {"image": 60}


def test_price_job_bounds_the_text_it_holds_by_characters(
    tmp_path: Path, table: PriceTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner import plan as plan_module

    held: list[int] = []
    original = plan_module.TextBatch.count

    def count(self: Any) -> int:
        held.append(self.chars)
        return original(self)

    monkeypatch.setattr(plan_module.TextBatch, "count", count)
    monkeypatch.setattr(plan_module, "CHUNK_CHARS", 1000)
    path = write(tmp_path, *[chat(f"r{i}", content="word " * 100) for i in range(50)])
    assert price_job(path, table) == plan_by_rows(path, table)
    assert len(held) > 10 and max(held) < 1000 + 500


def test_a_model_without_max_output_names_the_line_that_needs_a_limit(tmp_path: Path) -> None:
    prices = tmp_path / "p.toml"
    prices.write_text('[models.my-model]\ninput = "1"\noutput = "2"\n', "utf-8")
    limited = {"model": "my-model", "messages": [{"role": "user", "content": "Hi"}], "n": 1}
    rows = [line(f"ok{i}", CHAT, dict(limited, max_completion_tokens=4)) for i in range(5000)]
    path = write(tmp_path, *rows, line("open", CHAT, limited))
    with pytest.raises(PriceError, match=rf"^{path}:5001: body.model: 'my-model'"):
        price_job(path, load_price_table(prices))


def test_batch_api_prices_are_half_of_input_and_output(tmp_path: Path, table: PriceTable) -> None:
    plan = price_job(write(tmp_path, chat("x", max_completion_tokens=100)), table)
    t = plan.total
    assert (t.batch_floor_pico, t.batch_worst_pico) == (
        8 * MINI_IN // 2,
        8 * MINI_IN // 2 + 100 * MINI_OUT // 2,
    )
    _, planner = open_job(
        write(tmp_path, chat("x", max_completion_tokens=100), name="b.jsonl"), table
    )
    (row,) = plan_rows(planner)
    assert row.batch_worst_pico == t.batch_worst_pico


def test_requests_that_continue_a_stored_conversation_are_unbounded(
    tmp_path: Path, table: PriceTable
) -> None:
    body = {"model": "gpt-4.1-mini", "input": "and then?", "max_output_tokens": 5}
    path = write(
        tmp_path,
        line("a", RESPONSES, dict(body, previous_response_id="resp_1")),
        line("b", RESPONSES, body),
    )
    assert price_job(path, table).total.unbounded_requests == 1
    _, planner = open_job(path, table)
    assert [r.unbounded for r in plan_rows(planner)] == [True, False]


@pytest.mark.parametrize("chunk_lines", [1, 7, 4096])
def test_each_imported_row_counts_exactly_its_own_texts(
    tmp_path: Path, table: PriceTable, monkeypatch: pytest.MonkeyPatch, chunk_lines: int
) -> None:
    """Rows are counted a chunk at a time, and each still gets the tokens of its own line."""
    from runner.tokens import count_request

    monkeypatch.setattr("runner.plan.CHUNK_LINES", chunk_lines)
    _, planner = open_job(varied_job(tmp_path), table)
    rows = list(plan_rows(planner))
    assert len(rows) == 300 and [r.seq for r in rows] == list(range(300))
    for r in rows:
        alone = count_request(r.url, json.loads(r.body)).tokens
        assert r.input_tokens == alone, r.custom_id
        price = table.resolve(r.model)
        assert (r.floor_pico, r.worst_pico) == price.bounds(alone, r.output_limit)
    assert sum(r.input_tokens for r in rows) == planner.plan.total.input_tokens
