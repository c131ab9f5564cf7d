"""How one request is executed: the engine's only contact with the network.

The engine sees an ``Executor``: give it a job-file url and body, get an ``Outcome`` back, never
an exception for anything the server or the network did. ``OpenAIExecutor`` sends each request
synchronously with the official ``openai`` client; a Batch-API executor can replace it without
touching the engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import httpx2
import openai

from .errors import UsageError

API_KEY_ENV = "OPENAI_API_KEY"


@dataclass(slots=True)
class Outcome:
    """What came back for one attempt.

    ``status`` is None when no HTTP response arrived; then ``error`` says why and ``maybe_sent``
    tells whether the server may have received (and billed) the request.
    """

    status: int | None
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None  # "timeout", "connection", "connect"
    maybe_sent: bool = False
    latency: float = 0.0


class Executor(Protocol):
    async def send(self, url: str, body: str) -> Outcome: ...

    async def aclose(self) -> None: ...


def api_key_from_env() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise UsageError(
            f"{API_KEY_ENV} is not set: export your API key, or use --simulate to run on the "
            "built-in simulator"
        )
    return key


def _dropped(exc: BaseException) -> bool:
    """Whether a "timeout" was really the server closing the connection: the aiohttp transport
    reports aiohttp's ServerDisconnectedError as httpx's ConnectTimeout, and "timed out" would
    send the user off raising --timeout."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class OpenAIExecutor:
    """Sends requests with ``openai.AsyncOpenAI`` (``max_retries=0``: batchrun owns retries).

    The body is posted as the exact bytes stored from the job file, and the raw HTTP response is
    read without building the client's pydantic models: batchrun stores the JSON as it came.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        concurrency: int = 64,
        transport: str = "aiohttp",
    ) -> None:
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http_client = (
            openai.DefaultAioHttpClient(timeout=timeout, limits=limits)
            if transport == "aiohttp"
            else openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)
        )
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
        self._headers = {"Content-Type": "application/json"}

    async def send(self, url: str, body: str) -> Outcome:
        path = url[3:] if url.startswith("/v1/") else url  # the client's base_url ends in /v1
        started = time.monotonic()
        try:
            response = await self.client.post(
                path,
                cast_to=httpx2.Response,
                content=body.encode(),
                options={"headers": self._headers},
            )
        except openai.APIStatusError as exc:
            r = exc.response
            return Outcome(
                status=r.status_code,
                body=r.content,
                headers=r.headers,
                latency=time.monotonic() - started,
            )
        except openai.APITimeoutError as exc:
            latency = time.monotonic() - started
            kind = "connection" if _dropped(exc) else "timeout"
            return Outcome(None, error=kind, maybe_sent=True, latency=latency)
        except openai.APIConnectionError as exc:
            # A refused connection never reached the server; anything later might have.
            connect = isinstance(exc.__cause__, httpx2.ConnectError)
            return Outcome(
                None,
                error="connect" if connect else "connection",
                maybe_sent=not connect,
                latency=time.monotonic() - started,
            )
        except (httpx2.HTTPError, OSError, ValueError):
            # Anything else the transport or the client's error parsing raised mid-exchange.
            latency = time.monotonic() - started
            return Outcome(None, error="connection", maybe_sent=True, latency=latency)
        try:
            content = await response.aread()
        except (httpx2.HTTPError, OSError):
            return Outcome(
                None, error="connection", maybe_sent=True, latency=time.monotonic() - started
            )
        return Outcome(
            status=response.status_code,
            body=content,
            headers=response.headers,
            latency=time.monotonic() - started,
        )

    async def aclose(self) -> None:
        await self.client.close()
