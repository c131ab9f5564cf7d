"""The simulator's misbehaving-server modes, its outages and its CLI, seen from a client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from click.testing import CliRunner

from runner.endpoints import CHAT, EMBEDDINGS
from runner.pricing import load_price_table
from runner.simulator import SimConfig, SimulatorThread
from runner.simulator.cli import simulate
from runner.tokens import count_request

MakeSim = Callable[..., SimulatorThread]
TABLE = load_price_table()


def chat_body(text: str = "Say hi.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def client_for(sim: SimulatorThread, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


async def status_error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        await call
    return info.value


async def post(sim: SimulatorThread, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{sim.base_url}{path}", json=body) as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


def cost(requested: str, model: str, prompt: int, cached: int, output: int) -> int:
    return TABLE.for_response(requested, model).cost(prompt, cached, output)


async def test_proxy_mode_holds_over_limit_requests(make_simulator: MakeSim) -> None:
    sim = make_simulator(proxy=True, rpm=120)  # a full bucket of 120, refilled at 2 per second

    async def one(http: aiohttp.ClientSession, i: int) -> aiohttp.ClientResponse:
        async with http.post(f"{sim.base_url}/chat/completions", json=chat_body(str(i))) as r:
            await r.read()
            return r

    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(one(http, i) for i in range(121)))
    elapsed = time.monotonic() - started
    assert {r.status for r in answers} == {200}
    assert elapsed >= 0.5  # the 121st waited for the bucket to refill one request
    headers = answers[-1].headers
    assert headers["x-ratelimit-limit-requests"] == "120"
    assert "x-ratelimit-remaining-requests" in headers
    assert not [name for name in headers if name.startswith("x-ratelimit-reset")]
    ledger = sim.ledger_snapshot()
    assert ledger["status_counts"] == {"200": 121} and ledger["rate_limited"] == 0


async def test_proxy_mode_errors_look_like_litellm(make_simulator: MakeSim) -> None:
    sim = make_simulator(proxy=True, api_key="sk-right-key-0000", tpm=100)
    async with client_for(sim, "sk-right-key-0000") as client:
        create = client.chat.completions.create
        bad = await status_error(create(**chat_body("__sim_400__")))
        too_large = await status_error(create(**chat_body(max_tokens=500)))
        sim.configure(p_429=1.0)
        limited = await status_error(create(**chat_body()))
    async with client_for(sim, "sk-wrong-key-1111") as client:
        denied = await status_error(client.chat.completions.create(**chat_body()))
    for err, status in ((bad, 400), (too_large, 429), (limited, 429)):
        assert err.status_code == status and isinstance(err.body, dict)
        assert err.body["code"] == str(status)
    for err in (too_large, limited):
        assert "retry-after" not in err.response.headers
        assert "retry-after-ms" not in err.response.headers
    assert denied.status_code == 400 and isinstance(denied.body, dict)
    assert denied.body["code"] == "no_db_connection"


async def test_usage_can_exceed_the_limit_and_is_billed_as_reported(
    make_simulator: MakeSim,
) -> None:
    sim = make_simulator(usage_ignores_limits=True)
    body = chat_body("Run long.", max_completion_tokens=5, n=2)
    async with client_for(sim) as client:
        r = await client.chat.completions.create(**body)
    assert r.usage is not None and 10 < r.usage.completion_tokens <= 40
    prompt = count_request(CHAT.url, body).tokens
    worst = TABLE.for_response("gpt-4o-mini", r.model).cost(prompt, 0, 10)
    billed = sim.ledger_snapshot()["billed_pico"]
    assert billed == cost("gpt-4o-mini", r.model, prompt, 0, r.usage.completion_tokens) > worst


async def test_conversation_tokens_are_billed_but_not_in_the_body(
    make_simulator: MakeSim,
) -> None:
    sim = make_simulator(conversation_tokens=1000)
    plain = {"model": "gpt-4o-mini", "input": "Go on."}
    bodies = [plain, {**plain, "previous_response_id": "resp_1"}, {**plain, "conversation": "c1"}]
    expected = 0
    async with client_for(sim) as client:
        for i, body in enumerate(bodies):
            r = await client.responses.create(**body)  # type: ignore[call-overload]
            assert r.usage is not None
            extra = 1000 if i else 0
            assert r.usage.input_tokens == count_request("/v1/responses", body).tokens + extra
            expected += cost("gpt-4o-mini", r.model, r.usage.input_tokens, 0, r.usage.output_tokens)
    assert sim.ledger_snapshot()["billed_pico"] == expected


@pytest.mark.parametrize("mode", ["no_usage", "empty_usage", "bad_usage"])
async def test_unreadable_usage_is_still_billed(make_simulator: MakeSim, mode: str) -> None:
    sim = make_simulator(**{f"p_{mode}": 1.0})
    body = chat_body("What did that cost?")
    spoiled = await post(sim, "/chat/completions", body)
    sim.configure(**{f"p_{mode}": 0.0})
    clean = await post(sim, "/chat/completions", body)
    usage = clean["usage"]
    if mode == "no_usage":
        assert "usage" not in spoiled
    elif mode == "empty_usage":
        assert spoiled["usage"] == {}
    else:
        assert spoiled["usage"]["prompt_tokens"] == str(usage["prompt_tokens"])
    assert not CHAT.read_usage(spoiled).complete
    price = cost(
        "gpt-4o-mini", clean["model"], usage["prompt_tokens"], 0, usage["completion_tokens"]
    )
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 2 and ledger["billed_pico"] == 2 * price


async def test_short_embeddings_are_billed(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_short_embeddings=1.0)
    body = {"model": "text-embedding-3-small", "input": ["a", "b", "c"], "encoding_format": "float"}
    data = await post(sim, "/embeddings", body)
    assert len(data["data"]) == 2
    assert EMBEDDINGS.check_response(json.dumps(body), data) == "2 embedding(s) for 3 input(s)"
    assert sim.ledger_snapshot()["billed_pico"] == TABLE.resolve("text-embedding-3-small").cost(
        data["usage"]["prompt_tokens"]
    )


async def test_an_error_code_can_be_an_object(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_code_object=1.0)
    async with client_for(sim) as client:
        err = await status_error(client.chat.completions.create(**chat_body()))
    assert err.status_code == 400 and isinstance(err.body, dict)
    assert err.body["code"] == {"detail": "bad"}
    assert sim.ledger_snapshot()["requests_billed"] == 0


async def test_infinite_rate_limit_headers(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_inf_header=1.0, rpm=100)
    async with client_for(sim) as client:
        raw = await client.chat.completions.with_raw_response.create(**chat_body())
    assert raw.headers["x-ratelimit-limit-requests"] == "inf"
    assert raw.headers["x-ratelimit-remaining-requests"] == "nan"
    assert sim.ledger_snapshot()["requests_billed"] == 1


async def test_slowloris_sends_headers_then_a_byte_a_second(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_slowloris=1.0)
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.post(f"{sim.base_url}/chat/completions", json=chat_body()) as r:
            length = int(r.headers["Content-Length"])
            # The headers come at once: the body, a byte a second, takes `length` seconds
            # (over 100), so even a slow machine has them long before a 30 s deadline.
            assert r.status == 200 and length > 100
            assert time.monotonic() - started < min(30, length / 2)
            assert await asyncio.wait_for(r.content.read(1), 30) == b"{"
            # ... and the rest does not follow at once (only slower on a busy machine).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r.content.read(), 0.3)
    assert sim.ledger_snapshot()["requests_billed"] == 1


async def test_retry_headers_can_be_absurd_or_absent(make_simulator: MakeSim) -> None:
    sim = make_simulator(p_429=1.0, retry_after="inf", retry_after_ms="99999999")
    async with client_for(sim) as client:
        absurd = await status_error(client.chat.completions.create(**chat_body()))
        sim.configure(retry_headers=False)
        absent = await status_error(client.chat.completions.create(**chat_body()))
    assert absurd.response.headers["retry-after"] == "inf"
    assert absurd.response.headers["retry-after-ms"] == "99999999"
    assert absent.status_code == 429
    assert "retry-after" not in absent.response.headers
    assert "retry-after-ms" not in absent.response.headers


async def test_rejections_need_not_spend_capacity(make_simulator: MakeSim) -> None:
    def reset_s(err: openai.APIStatusError) -> float:
        return float(err.response.headers["x-ratelimit-reset-requests"].removesuffix("s"))

    sim = make_simulator(rpm=5, reject_counts_against_limit=False)
    async with client_for(sim) as client:
        await asyncio.gather(
            *(client.chat.completions.create(**chat_body(str(i))) for i in range(5))
        )
        first = await status_error(client.chat.completions.create(**chat_body("six")))
        second = await status_error(client.chat.completions.create(**chat_body("seven")))
    assert first.status_code == second.status_code == 429
    # A spent rejection would add a request's 12 s to the reset; one not spent leaves it as it
    # was, less the time between the two (well under half of that, however busy the machine).
    assert reset_s(first) - 6 < reset_s(second) < reset_s(first) + 6


async def test_echo_key_puts_the_key_in_every_body(make_simulator: MakeSim) -> None:
    key, wrong = "sk-echo-secret-key-123456", "sk-wrong-secret-key-987654"
    sim = make_simulator(echo_key=True, api_key=key)
    async with client_for(sim, key) as client:
        ok = await client.chat.completions.with_raw_response.create(**chat_body())
        bad = await status_error(client.chat.completions.create(**chat_body("__sim_400__")))
        missing = await status_error(client.batches.retrieve("batch_missing"))
        line = {"custom_id": "a", "method": "POST", "url": CHAT.url, "body": chat_body()}
        data = json.dumps(line).encode()
        uploaded = await client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while batch.status != "completed":
            await asyncio.sleep(0.01)
            batch = await client.batches.retrieve(batch.id)
        assert batch.output_file_id is not None
        output = (await client.files.content(batch.output_file_id)).text
    async with client_for(sim, wrong) as client:
        denied = await status_error(client.chat.completions.create(**chat_body()))
    assert json.loads(ok.http_response.text)["echo_api_key"] == key
    for err in (bad, missing):
        assert key in err.response.text
    assert key in output
    assert denied.status_code == 401 and wrong in denied.response.text


async def test_an_outage_refuses_connections_then_recovers_on_the_same_port(
    simulator: SimulatorThread,
) -> None:
    host, port = simulator.base_url.removeprefix("http://").removesuffix("/v1").split(":")
    async with client_for(simulator) as client:
        await client.chat.completions.create(**chat_body())  # leaves a kept-alive connection
        simulator.outage(0.3)
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(**chat_body())
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, int(port))
        await asyncio.sleep(0.4)
        await client.chat.completions.create(**chat_body())
    assert simulator.ledger_snapshot()["requests_billed"] == 2


async def test_an_outage_drops_requests_in_flight(make_simulator: MakeSim) -> None:
    sim = make_simulator(latency_ms=200)
    root = sim.base_url.removesuffix("/v1")
    async with client_for(sim) as client:
        in_flight = asyncio.create_task(client.chat.completions.create(**chat_body()))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{root}/_sim/outage", json={"seconds": 0.2}) as r:
                assert r.status == 200 and await r.json() == {"seconds": 0.2}
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"{root}/_sim/ledger")
        with pytest.raises(openai.APIConnectionError):
            await in_flight
        await asyncio.sleep(0.3)
        await client.chat.completions.create(**chat_body("after"))


def test_the_cli_lists_every_setting_with_its_help() -> None:
    result = CliRunner().invoke(simulate, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Example: batchrun simulate --port 8765 --rpm 600 --p-429 0.1\n" in result.output
    squeezed = "".join(result.output.split())  # help text is rewrapped, even at hyphens
    for option in ("--host", "--port", "--prices"):
        assert option in result.output
    for f in dataclasses.fields(SimConfig):
        assert f"--{f.name.replace('_', '-')} " in result.output
        assert "".join(f.metadata["help"].split()) in squeezed, f.name


@pytest.mark.parametrize(
    "args",
    [
        ["--rpm", "0"],
        ["--p-500", "lots"],
        ["--p-500", "0.7", "--p-503", "0.7"],
        ["--quota-usd", "ten"],
        ["--batch-window-s", "0"],
        ["--port", "70000"],
        ["--prices", "/no/such/prices.toml"],
        ["--proxy", "yes"],
    ],
)
def test_bad_values_are_usage_errors(args: list[str]) -> None:
    result = CliRunner().invoke(simulate, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error" in result.output


def test_the_cli_is_light_and_runs_as_a_module() -> None:
    probe = (
        "import sys, runner.simulator.cli; print(sorted({'aiohttp', 'tiktoken'} & {*sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    shown = subprocess.run(
        [sys.executable, "-m", "runner.simulator", "--help"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--batch-enqueued-tokens" in shown.stdout


def test_the_cli_serves_until_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "runner.simulator", "--port", "0", "--rpm", "7"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        request = urllib.request.Request(
            f"{base_url}/chat/completions",
            data=json.dumps(chat_body()).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "7"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0


def test_the_main_cli_has_the_command() -> None:
    from runner.cli import main

    result = CliRunner().invoke(main, ["simulate", "--help"])
    assert result.exit_code == 0 and "--p-slowloris" in result.output
