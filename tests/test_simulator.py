"""The simulator, seen through the real ``openai`` client: what batchrun's tests will rely on."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from runner.money import format_exact
from runner.pricing import load_price_table
from runner.simulator import SimConfig, SimulatorThread, go_duration
from runner.tokens import count_request

GO_DURATION = re.compile(r"^(?:0s|\d+ms|(?:\d+h)?(?:\d+m)?\d+(?:\.\d+)?s)$")
LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."
CHAT = "/v1/chat/completions"
MakeSim = Callable[..., SimulatorThread]


def seconds(duration: str) -> float:
    """Parse a Go duration string (the subset the API emits)."""
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def chat_body(text: str = "Say hi.", model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def client_for(sim: SimulatorThread, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


@pytest.fixture
async def client(simulator: SimulatorThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client_for(simulator) as c:
        yield c


async def status_error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        await call
    return info.value


def test_go_duration() -> None:
    assert [go_duration(s) for s in (0, 0.0004, 0.012, 1, 1.5, 360, 3723.25)] == [
        "0s", "1ms", "12ms", "1s", "1.5s", "6m0s", "1h2m3.25s",
    ]  # fmt: skip


async def test_usage_counts_prompt_tokens_like_runner_tokens(client: openai.AsyncOpenAI) -> None:
    chat = chat_body("Count me exactly, please.", max_completion_tokens=5, n=3)
    resp = await client.chat.completions.create(**chat)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == count_request(CHAT, chat).tokens
    assert len(resp.choices) == 3
    assert 3 <= resp.usage.completion_tokens <= 15  # n choices of 1..max_completion_tokens each

    body = {"model": "gpt-4o-mini", "input": "Hello there", "max_output_tokens": 40}
    r = await client.responses.create(**body)
    assert r.usage is not None
    assert r.usage.input_tokens == count_request("/v1/responses", body).tokens
    assert r.output_text

    emb = {"model": "text-embedding-3-small", "input": ["one", "two words"]}
    e = await client.embeddings.create(**emb)
    assert e.usage.prompt_tokens == count_request("/v1/embeddings", emb).tokens
    assert [d.index for d in e.data] == [0, 1] and len(e.data[0].embedding) == 8


async def test_ledger_bills_exactly_what_the_usage_says(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    table = load_price_table()
    expected = 0
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 150  # > 1024 tokens
    requests = [chat_body(model=m) for m in ("gpt-4o-mini", "gpt-4o", "gpt-4o-2024-05-13")]
    requests += [chat_body(f"{i} {long_prompt}", model="gpt-4o") for i in range(12)]
    cached_seen = 0
    for body in requests:
        r = await client.chat.completions.create(**body)
        usage = r.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        cached_seen += cached
        assert cached == 0 or (cached >= 1024 and cached % 128 == 0)
        price = table.prices.get(r.model) or table.resolve(body["model"])
        expected += price.cost(usage.prompt_tokens, cached, usage.completion_tokens)
    assert cached_seen > 0  # one body in three gets a cache hit (deterministic per body)

    reasoning = await client.responses.create(model="o4-mini", input="Think.")
    assert reasoning.model == "o4-mini" and reasoning.usage is not None
    u = reasoning.usage
    assert u.output_tokens_details.reasoning_tokens == u.output_tokens // 2
    cached = u.input_tokens_details.cached_tokens
    expected += table.resolve("o4-mini").cost(u.input_tokens, cached, u.output_tokens)

    emb = await client.embeddings.create(model="text-embedding-3-large", input="vector")
    expected += table.resolve("text-embedding-3-large").cost(emb.usage.prompt_tokens)

    ledger = simulator.ledger_snapshot()
    assert ledger["requests_billed"] == len(requests) + 2
    assert ledger["billed_pico"] == expected
    assert ledger["billed_usd"] == format_exact(expected)
    assert ledger["by_model"]["gpt-4o"]["requests"] == 13


async def test_snapshot_names_and_determinism(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(**chat_body())
    again = await client.chat.completions.create(**chat_body())
    assert first.model == "gpt-4o-mini-2024-07-18"
    assert first.usage == again.usage
    assert first.choices[0].message.content == again.choices[0].message.content
    big = await client.chat.completions.create(**chat_body(model="gpt-4o"))
    assert big.model == "gpt-4o-2024-08-06"


async def test_rate_limit_headers_and_request_id(make_simulator: MakeSim) -> None:
    sim = make_simulator(rpm=600, tpm=100_000)
    async with client_for(sim) as client:
        raw = await client.chat.completions.with_raw_response.create(**chat_body(max_tokens=50))
    h = raw.headers
    assert re.fullmatch(r"req_[0-9a-f]+", h["x-request-id"])
    assert h["x-ratelimit-limit-requests"] == "600" and h["x-ratelimit-limit-tokens"] == "100000"
    assert h["x-ratelimit-remaining-requests"] == "599"
    weight = count_request(CHAT, chat_body(max_tokens=50)).tokens + 50
    assert int(h["x-ratelimit-remaining-tokens"]) == 100_000 - weight
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert GO_DURATION.match(h[name]), h[name]
    assert seconds(h["x-ratelimit-reset-requests"]) == pytest.approx(0.1, abs=0.01)


async def test_rpm_burst_rejects_the_extra_request_and_rejections_cost_capacity(
    make_simulator: MakeSim,
) -> None:
    sim = make_simulator(rpm=5)
    async with client_for(sim) as client:
        burst = [client.chat.completions.create(**chat_body(f"req {i}")) for i in range(5)]
        await asyncio.gather(*burst)
        create = client.chat.completions.with_raw_response.create
        first = await status_error(create(**chat_body("one too many")))
        second = await status_error(create(**chat_body("and another")))

    assert first.status_code == 429
    error = first.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    pattern = (
        r"Rate limit reached for gpt-4o-mini in organization org-sim on requests per min \(RPM\): "
        r"Limit 5, Used 5, Requested 1\. Please try again in (\S+)\. " + re.escape(LIMITS_URL)
    )
    match = re.fullmatch(pattern, error["message"])
    assert match and GO_DURATION.match(match[1])
    h = first.response.headers
    assert int(h["retry-after-ms"]) > 0 and int(h["retry-after"]) >= 1
    assert h["x-ratelimit-remaining-requests"] == "0"
    # Each rejection spent a request unit: 12 s more to refill at 5 RPM.
    grew = seconds(second.response.headers["x-ratelimit-reset-requests"]) - seconds(
        h["x-ratelimit-reset-requests"]
    )
    assert grew == pytest.approx(12, abs=0.1)
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 5 and ledger["rate_limited"] == 2
    assert ledger["status_counts"] == {"200": 5, "429": 2}


async def test_tpm_limits_and_request_too_large(make_simulator: MakeSim) -> None:
    sim = make_simulator(tpm=1000)
    body = chat_body(max_tokens=600)
    weight = count_request(CHAT, body).tokens + 600
    async with client_for(sim) as client:
        too_large = await status_error(client.chat.completions.create(**chat_body(max_tokens=5000)))
        await client.chat.completions.create(**body)
        limited = await status_error(client.chat.completions.create(**body))
    assert too_large.status_code == 429 and isinstance(too_large.body, dict)
    assert too_large.body["message"].startswith(
        "Request too large for gpt-4o-mini in organization org-sim on tokens per min (TPM): "
        f"Limit 1000, Requested {count_request(CHAT, chat_body()).tokens + 5000}."
    )
    assert too_large.body["type"] == "tokens" and too_large.body["code"] == "rate_limit_exceeded"
    assert isinstance(limited.body, dict) and limited.body["type"] == "tokens"
    assert f"(TPM): Limit 1000, Used {weight}, Requested {weight}." in limited.body["message"]
    assert "retry-after-ms" in limited.response.headers


async def test_insufficient_quota_after_the_quota_is_billed(make_simulator: MakeSim) -> None:
    sim = make_simulator(quota_usd="0.000001")
    async with client_for(sim) as client:
        await client.chat.completions.create(**chat_body(model="gpt-4o"))
        err = await status_error(client.chat.completions.create(**chat_body("more")))
    assert err.status_code == 429 and isinstance(err.body, dict)
    assert err.body["type"] == "insufficient_quota" and err.body["code"] == "insufficient_quota"
    assert err.body["message"].startswith("You exceeded your current quota")
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 1 and ledger["rate_limited"] == 0


async def test_wrong_key_is_401_and_never_echoed(make_simulator: MakeSim) -> None:
    sim = make_simulator(api_key="sk-right-key-0000")
    wrong = "sk-wrong-secret-key-9876"
    async with client_for(sim, wrong) as client:
        err = await status_error(client.chat.completions.create(**chat_body()))
    async with client_for(sim, "sk-right-key-0000") as client:
        await client.chat.completions.create(**chat_body())
    assert err.status_code == 401 and isinstance(err.body, dict)
    assert err.body["code"] == "invalid_api_key" and err.body["type"] == "invalid_request_error"
    assert err.body["message"].startswith("Incorrect API key provided: sk-...9876.")
    everything = err.response.text + json.dumps(dict(err.response.headers))
    assert wrong not in everything and "right-key" not in everything


async def test_sentinel_bodies_and_unknown_models(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    create = client.chat.completions.create
    bad = await status_error(create(**chat_body("__sim_400__")))
    assert isinstance(bad, openai.BadRequestError) and isinstance(bad.body, dict)
    assert bad.body["code"] == "context_length_exceeded"
    assert bad.body["message"].startswith("This model's maximum context length is")
    missing = await status_error(create(**chat_body("__sim_404__")))
    assert isinstance(missing, openai.NotFoundError) and isinstance(missing.body, dict)
    assert missing.body["code"] == "model_not_found"
    unpriced = await status_error(create(**chat_body(model="no-such-model")))
    assert isinstance(unpriced.body, dict) and unpriced.body["code"] == "model_not_found"
    ledger = simulator.ledger_snapshot()
    assert ledger["requests_billed"] == 0 and ledger["status_counts"] == {"400": 1, "404": 2}


async def test_resets_raise_connection_errors_and_bill_only_after_bill(
    make_simulator: MakeSim,
) -> None:
    sim = make_simulator(p_reset=1.0)
    async with client_for(sim) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(**chat_body())
        assert sim.ledger_snapshot()["requests_billed"] == 0
        sim.configure(p_reset=0.0, p_reset_after_bill=1.0)
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(**chat_body())
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 1
    assert ledger["status_counts"] == {"reset": 1, "reset_after_bill": 1}


async def test_truncated_json_is_billed_and_is_not_an_openai_error(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_invalid_json=1.0)
    async with client_for(sim) as client:
        # Surprise: the client raises json's ValueError here, not an openai.APIError.
        with pytest.raises(ValueError):
            await client.chat.completions.create(**chat_body())
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 1 and ledger["status_counts"] == {"200": 1}


async def test_slow_request_is_billed_even_when_the_client_gave_up(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_slow=1.0, slow_s=0.3)
    async with client_for(sim) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(**chat_body(), timeout=0.05)
    await asyncio.sleep(0.5)
    assert sim.ledger_snapshot()["requests_billed"] == 1


async def test_injected_faults_are_seeded_and_counted(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_429=0.3, p_500=0.2, p_html=0.1, seed=7)
    outcomes: list[str] = []
    async with client_for(sim) as client:
        for i in range(30):
            try:
                await client.chat.completions.create(**chat_body(str(i)))
                outcomes.append("200")
            except openai.APIStatusError as exc:
                outcomes.append(str(exc.status_code))
        sim.reset()
        replay = []
        for i in range(30):
            try:
                await client.chat.completions.create(**chat_body(str(i)))
                replay.append("200")
            except openai.APIStatusError as exc:
                replay.append(str(exc.status_code))
    assert outcomes == replay and {"200", "429", "500", "502"} <= set(outcomes)
    ledger = sim.ledger_snapshot()
    assert ledger["rate_limited"] == outcomes.count("429")
    assert ledger["requests_billed"] == outcomes.count("200")


async def test_duplicate_bodies_and_control_endpoints(
    simulator: SimulatorThread, client: openai.AsyncOpenAI
) -> None:
    for text in ("same", "same", "same", "different"):
        await client.chat.completions.create(**chat_body(text))
    root = simulator.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{root}/_sim/ledger") as r:
            ledger = await r.json()
        assert ledger["duplicate_bodies"] == 2 and ledger["requests_received"] == 4
        async with http.post(f"{root}/_sim/config", json={"rpm": 100, "bogus": 1}) as r:
            assert r.status == 400
        async with http.post(f"{root}/_sim/config", json={"rpm": 100}) as r:
            assert (await r.json())["rpm"] == 100
        async with http.post(f"{root}/_sim/reset") as r:
            assert (await r.json())["requests_billed"] == 0
    raw = await client.chat.completions.with_raw_response.create(**chat_body())
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert simulator.config.rpm == 100


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SimConfig(p_500=0.7, p_503=0.7)
    with pytest.raises(ValueError):
        SimConfig(rpm=0)
    config = SimConfig()
    with pytest.raises(ValueError):
        config.update({"latency_ms": -1, "rpm": 5})
    assert config.rpm is None  # all or nothing
