"""How one request travels: the only code that talks HTTP to the API.

``OpenAITransport.send`` posts a job-file request with the official ``openai`` client and gives
back an ``Outcome``, never an exception for anything the server or the network did. The client
is built with ``max_retries=0``: batchrun owns retries, so every attempt is counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import httpx2
import openai

from .errors import UsageError
from .redact import API_KEY_ENV
from .settings import Transport


@dataclass(slots=True)
class Outcome:
    """What came back for one attempt.

    ``status`` is None when no HTTP response arrived; then ``error`` says why and ``maybe_sent``
    tells whether the server may have received (and billed) the request: a connection that was
    never established (refused, DNS, TLS handshake) sent nothing.
    """

    status: int | None
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None  # "timeout", "connection", "connect"
    maybe_sent: bool = False
    latency: float = 0.0


def is_local(base_url: str | None) -> bool:
    """Whether ``base_url`` is a server on this machine (a simulator, a local proxy)."""
    if not base_url:
        return False
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from_env(base_url: str | None = None) -> str:
    """The API key, from the environment only."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        if is_local(base_url):
            raise UsageError(
                f"{API_KEY_ENV} is not set: {base_url} is a local server, so any value works "
                f"(export {API_KEY_ENV}=anything)"
            )
        raise UsageError(
            f"{API_KEY_ENV} is not set: export your API key, or use --simulate to run on the "
            "built-in simulator"
        )
    return key


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(out) < 16:
        out.append(cause)
        cause = cause.__cause__ or cause.__context__
    return out


def _network_error(exc: BaseException) -> tuple[str, bool]:
    """(kind, maybe_sent) for an exception the client raised instead of a response.

    A connection that was never established (refused, DNS, TLS handshake, connect timeout) sent
    nothing. The aiohttp transport wraps every failure, a dropped connection included, in a
    ``ConnectTimeout``, so its own exception beneath decides.
    """
    chain = _chain(exc)
    for cause in chain:
        if isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return "connect", False
        if isinstance(cause, aiohttp.ClientError):
            return "connection", True  # failed after connecting: the request may have arrived
    for cause in chain:
        if isinstance(cause, httpx2.ConnectError | httpx2.ConnectTimeout):
            return "connect", False
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", True
    return "connection", True


class OpenAITransport:
    """Sends requests with ``openai.AsyncOpenAI``.

    The body is posted as the exact bytes stored from the job file, and the raw HTTP response is
    read without building the client's pydantic models: batchrun stores the JSON as it came.
    The timeout bounds the whole exchange (a server trickling its body out cannot hold a
    request past it).
    """

    def __init__(self, api_key: str, settings: Transport, max_connections: int) -> None:
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        # The client's own timeouts allow the longest request (a flex one); ``send`` bounds each
        # exchange by its own.
        timeout = max(settings.timeout, settings.flex_timeout)
        # Redirects are not followed (the openai client's default follows them): the API
        # never redirects, so a redirect is a base URL pointing elsewhere, said as such
        # (``retry.classify``), instead of a request body sent on to wherever it leads.
        http_client = (
            openai.DefaultAioHttpClient(timeout=timeout, limits=limits, follow_redirects=False)
            if settings.kind == "aiohttp"
            else openai.DefaultAsyncHttpxClient(
                timeout=timeout, limits=limits, follow_redirects=False
            )
        )
        self.timeout = settings.timeout
        self.flex_timeout = settings.flex_timeout
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=settings.base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
        self._headers = {"Content-Type": "application/json"}

    async def send(
        self, path: str, body: str, timeout: float | None = None, *, flex: bool = False
    ) -> Outcome:
        """POST ``body`` to ``path`` (relative to the base URL, e.g. ``/chat/completions``),
        within ``timeout`` seconds if given, never longer than the transport's own timeout (its
        flex timeout for a ``flex`` request)."""
        started = time.monotonic()
        ceiling = self.flex_timeout if flex else self.timeout
        limit = ceiling if timeout is None else max(0.001, min(timeout, ceiling))
        try:
            async with asyncio.timeout(limit):
                response = await self.client.post(
                    path,
                    cast_to=httpx2.Response,
                    content=body.encode(),
                    options={"headers": self._headers},
                )
                content = await response.aread()
        except openai.APIStatusError as exc:
            r = exc.response
            try:
                content = r.content
            except httpx2.ResponseNotRead:  # pragma: no cover - the client reads error bodies
                content = b""
            return Outcome(r.status_code, content, r.headers, latency=time.monotonic() - started)
        except TimeoutError:
            return Outcome(None, error="timeout", maybe_sent=True, latency=limit)
        except (openai.APIError, httpx2.HTTPError, OSError, ValueError) as exc:
            kind, maybe_sent = _network_error(exc)
            return Outcome(
                None, error=kind, maybe_sent=maybe_sent, latency=time.monotonic() - started
            )
        return Outcome(
            response.status_code, content, response.headers, latency=time.monotonic() - started
        )

    async def check_key(self) -> Outcome:
        """One cheap authenticated call (list models): is the key accepted at all?"""
        started = time.monotonic()
        try:
            async with asyncio.timeout(min(self.timeout, 30.0)):
                response = await self.client.get("/models", cast_to=httpx2.Response)
                content = await response.aread()
        except openai.APIStatusError as exc:
            r = exc.response
            return Outcome(r.status_code, r.content, r.headers, latency=time.monotonic() - started)
        except TimeoutError:
            return Outcome(None, error="timeout", latency=time.monotonic() - started)
        except (openai.APIError, httpx2.HTTPError, OSError, ValueError) as exc:
            kind, _ = _network_error(exc)
            return Outcome(None, error=kind, latency=time.monotonic() - started)
        return Outcome(response.status_code, content, response.headers)

    async def aclose(self) -> None:
        await self.client.close()
