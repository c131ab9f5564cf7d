"""The simulator's HTTP server: the synchronous API endpoints and the control endpoints.

``POST /v1/chat/completions``, ``/v1/responses`` and ``/v1/embeddings`` are answered with bodies
shaped like the real API's, under RPM/TPM limits with the real headers and 429 bodies, with
faults injected from a seeded RNG, and billed into an exact ledger, so that batchrun's own spend
accounting can be checked against what a server actually billed. ``/v1/files`` and
``/v1/batches`` are served by ``files`` and ``batches``.

Control endpoints: ``GET /_sim/ledger`` (the ledger, stored files, batches by status),
``GET|POST /_sim/config`` (POST = JSON patch of ``SimConfig``), ``POST /_sim/reset`` (ledger,
buckets, RNGs, files and batches; not the config) and ``POST /_sim/outage`` with
``{"seconds": S}`` (refuse connections for S seconds).

The server is aiohttp's low-level ``web.Server`` (no router, no access log) to stay fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import signal
import time
from typing import Any

from aiohttp import web

from ..endpoints import ENDPOINTS
from ..money import usd_to_pico
from ..pricing import PriceTable, load_price_table
from .answers import _Answers, _ApiError, _new_id, _Tokens
from .batches import _Batches
from .config import SimConfig
from .faults import _Dice, _spoil
from .files import _FileStore
from .ledger import Ledger
from .limits import _injected_429, _Limiter
from .responses import _HTML_502, _abort, _half_then_reset, _json, _slowly

_RELISTEN_RETRY_S = 0.1


def _mask_key(key: str) -> str:
    """The API's masked form of a key (first 3 + last 4); short keys are hidden entirely."""
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else "***"


def _server_error(status: int = 500) -> _ApiError:
    if status == 503:
        message = "The engine is currently overloaded, please try again later."
    else:
        message = "The server had an error while processing your request. Sorry about that!"
    return _ApiError(status, message, "server_error")


class Simulator:
    """An OpenAI-compatible server on one port, with its state on ``config`` and ``ledger``.

    ``start`` and ``stop`` run on the caller's event loop; every request and every batch is
    handled on that loop, so state needs no locks. ``SimulatorThread`` runs one from
    synchronous code.
    """

    def __init__(self, config: SimConfig | None = None, prices: PriceTable | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.prices = prices if prices is not None else load_price_table()
        self.ledger = Ledger()
        self.base_url = ""
        self._limiter = _Limiter()
        self._dice = _Dice(self.config.seed)
        self._answers = _Answers(self.config, self.prices)
        self._files = _FileStore(lambda: self.ledger)
        self._batches = _Batches(
            self.config,
            self._files,
            self._answers,
            self._answer_line,
            lambda: self.ledger,
            lambda: self._dice.batch_line_garbled(self.config),
            lambda: self._dice.batch_timing(self.config),
        )
        self._quota: tuple[str, int] | None = None
        self._server: web.Server | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.TCPSite | None = None
        self._address: tuple[str, int] = ("127.0.0.1", 0)
        self._relisten: asyncio.Task[None] | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = any free port) and return the base URL (``.../v1``)."""
        self._server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(self._server, shutdown_timeout=0.5)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port)
        await self._site.start()
        bound = self._runner.addresses[0][1]
        self._address = (host, bound)
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound}/v1"
        return self.base_url

    async def stop(self) -> None:
        """Stop running batches, close every connection, delete the stored files."""
        if self._relisten is not None:
            self._relisten.cancel()
            self._relisten = None
        await self._batches.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._server = self._site = None
        self._files.clear()

    def reset(self) -> None:
        """Forget everything billed, seen, stored and batched; refill the buckets; reseed."""
        self.ledger.clear()
        self._limiter = _Limiter()
        self._dice.reseed(self.config.seed)
        self._answers.clear()
        self._batches.clear()
        self._files.clear()

    def state(self) -> dict[str, Any]:
        """The ledger, plus what the Files and Batch APIs hold now."""
        files = {"stored": len(self._files), "bytes": self._files.total_bytes()}
        return {**self.ledger.to_dict(), "files": files, "batches": self._batches.counts()}

    async def outage(self, seconds: float, *, keep: asyncio.BaseTransport | None = None) -> None:
        """Refuse connections for ``seconds``: close the listening socket and drop every open
        connection (but ``keep``), then listen again on the same port."""
        if self._runner is None or self._server is None:
            raise RuntimeError("the simulator is not running")
        if self._relisten is not None:
            self._relisten.cancel()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for connection in self._server.connections:
            transport = connection.transport
            if transport is not None and transport is not keep:
                transport.abort()
        self._relisten = asyncio.get_running_loop().create_task(self._listen_after(seconds))

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self._runner is not None
        while True:
            site = web.TCPSite(self._runner, *self._address)
            try:
                await site.start()
            except OSError:  # the port is not free yet
                await asyncio.sleep(_RELISTEN_RETRY_S)
                continue
            self._site = site
            return

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/"):
            return await self._control(request, path)
        self.ledger.requests_received += 1
        headers = {"x-request-id": _new_id("req_")}
        status, response = await self._route(request, path, headers)
        self.ledger.count(status)
        return response

    async def _route(
        self, request: web.BaseRequest, path: str, headers: dict[str, str]
    ) -> tuple[str, web.StreamResponse]:
        """Answer one API request; returns the status label for the ledger and the response."""
        if path in ENDPOINTS:
            return await self._api(request, path, headers)
        section, _, rest = path.removeprefix("/v1/").partition("/")
        if path == "/v1/models" and request.method == "GET":
            key, denied = self._authorize(request)
            if denied is not None:
                return self._fail(denied, headers, key)
            models = [
                {"id": name, "object": "model", "created": 0, "owned_by": "system"}
                for name in sorted(self.prices.prices)
            ]
            return "200", _json(200, {"object": "list", "data": models}, headers)
        if not path.startswith("/v1/") or section not in ("files", "batches"):
            return self._fail(_ApiError(404, f"Invalid URL ({request.method} {path})"), headers)
        key, denied = self._authorize(request)
        if denied is not None:
            return self._fail(denied, headers, key)
        parts = [p for p in rest.split("/") if p]
        try:
            if section == "files":
                result = await self._files.handle(request, parts)
            else:
                result = await self._batches.handle(request, parts, key)
        except _ApiError as err:
            return self._fail(err, headers, key)
        if isinstance(result, web.StreamResponse):
            result.headers.update(headers)
            return str(result.status), result
        return "200", _json(200, self._echo(result, key), headers)

    def _authorize(self, request: web.BaseRequest) -> tuple[str, _ApiError | None]:
        """The bearer key sent, and the error to answer when the key is required and wrong."""
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else ""
        expected = self.config.api_key
        if expected is None or (given and hmac.compare_digest(given.encode(), expected.encode())):
            return given, None
        if self.config.proxy:  # LiteLLM without a database answers any bad key this way
            message = "Authentication Error, No connected db."
            return given, _ApiError(
                400, message, "no_db_connection", "no_db_connection", verbatim=True
            )
        if not given:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return given, _ApiError(401, message)
        message = (
            f"Incorrect API key provided: {_mask_key(given)}. You can find your API key at "
            "https://platform.openai.com/account/api-keys."
        )
        return given, _ApiError(401, message, code="invalid_api_key")

    def _fail(
        self, err: _ApiError, headers: dict[str, str], key: str = "", retry_s: float | None = None
    ) -> tuple[str, web.StreamResponse]:
        """An error response, shaped by the proxy and echo-key modes; 429s get retry headers."""
        config = self.config
        if err.status == 429 and config.retry_headers and not config.proxy:
            ms = config.retry_after_ms
            if ms is None and retry_s is not None:
                ms = str(math.ceil(retry_s * 1000))
            secs = config.retry_after
            if secs is None and retry_s is not None:
                secs = str(max(1, math.ceil(retry_s)))
            if ms is not None:
                headers["retry-after-ms"] = ms
            if secs is not None:
                headers["retry-after"] = secs
        body = err.body(proxy=config.proxy, key=key if config.echo_key else "")
        return str(err.status), _json(err.status, body, headers)

    def _echo(self, payload: dict[str, Any], key: str) -> dict[str, Any]:
        """In echo-key mode, put the client's key into a 200 body."""
        if self.config.echo_key and key:
            payload["echo_api_key"] = key
        return payload

    def _check_quota(self) -> None:
        quota = self.config.quota_usd
        if quota is None:
            return
        if self._quota is None or self._quota[0] != quota:
            self._quota = (quota, usd_to_pico(quota))
        if self.ledger.billed_pico >= self._quota[1]:
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            raise _ApiError(429, message, "insufficient_quota", "insufficient_quota")

    async def _api(
        self, request: web.BaseRequest, path: str, headers: dict[str, str]
    ) -> tuple[str, web.StreamResponse]:
        """One synchronous API request: checks, limits, faults, the reply and its bill."""
        config, limiter = self.config, self._limiter
        limiter.sync(config, time.monotonic())
        headers.update(limiter.headers(resets=not config.proxy))
        if request.method != "POST":
            return self._fail(_ApiError(404, f"Invalid URL ({request.method} {path})"), headers)
        raw = await request.content.read()  # unlike request.read(), no 1 MB cap
        key, denied = self._authorize(request)
        if denied is not None:
            return self._fail(denied, headers, key)
        try:
            req = self._answers.prepare(path, raw)
            self._check_quota()
        except _ApiError as err:
            return self._fail(err, headers, key)

        flex = req.body.get("service_tier") == "flex"
        refused = config.flex_refuse_models
        if flex and refused and req.model in {m.strip() for m in refused.split(",")}:
            # A provider without flex for this model: a 400 naming the tier, not a fallback.
            unsupported = _ApiError(
                400,
                f"Invalid value for 'service_tier': 'flex' is not supported for model "
                f"'{req.model}'.",
                param="service_tier",
            )
            return self._fail(unsupported, headers, key)
        if flex and self._dice.flex_unavailable(config):
            # Flex capacity is short: a 429 of its own, before the rate limits, never billed.
            self.ledger.flex_unavailable += 1
            unavailable = _ApiError(
                429,
                "Resource Unavailable: flex processing capacity is temporarily short; retry "
                "later or send the request with service_tier 'auto'.",
                "resource_unavailable",
                "resource_unavailable",
            )
            return self._fail(unavailable, headers, key, 1.0)
        fault = self._dice.fault(config)
        if config.proxy:
            rejection = await limiter.admit_when_ready(config, req.model, req.weight)
        else:
            rejection = limiter.admit(
                req.model,
                req.weight,
                spend_tokens=fault != "429",
                reject_spends=config.reject_counts_against_limit,
            )
        headers.update(limiter.headers(resets=not config.proxy))
        if rejection is None and fault == "429":
            rejection = _injected_429(req.model, config.rpm, config.p_429_retry_ms / 1000)
        if rejection is not None:
            self.ledger.rate_limited += 1
            limited = _ApiError(429, rejection.message, rejection.kind, "rate_limit_exceeded")
            return self._fail(limited, headers, key, rejection.retry_s)

        delay = self._dice.latency(config) + (config.slow_s if fault == "slow" else 0.0)
        if flex:
            delay += config.flex_latency_ms / 1000
        if delay > 0:
            await asyncio.sleep(delay)  # never cancelled: slow work is still billed
        if fault == "reset":
            _abort(request)
            return "reset", web.Response()
        if fault in ("500", "503"):
            return self._fail(_server_error(int(fault)), headers, key)
        if fault == "code_object":
            odd = _ApiError(400, "Invalid request.", code={"detail": "bad"}, verbatim=True)
            return self._fail(odd, headers, key)
        if fault == "html":
            headers["Content-Type"] = "text/html"
            return "502", web.Response(status=502, body=_HTML_502, headers=headers)

        payload, tokens = self._answers.reply(req)
        self.ledger.bill(req.model, req.digest, tokens.billed, req.cost(tokens))
        _spoil(payload, fault, req.endpoint)
        data = json.dumps(self._echo(payload, key)).encode()
        if fault == "inf_header":
            headers["x-ratelimit-limit-requests"] = "inf"
            headers["x-ratelimit-remaining-requests"] = "nan"
        if fault == "invalid_json":
            headers["Content-Type"] = "application/json"
            return "200", web.Response(status=200, body=data[: len(data) // 2], headers=headers)
        if fault == "reset_after_bill":
            return "reset_after_bill", await _half_then_reset(request, data, headers)
        if fault == "slowloris":
            return "200", await _slowly(request, data, headers)
        headers["Content-Type"] = "application/json"
        return "200", web.Response(status=200, body=data, headers=headers)

    def _answer_line(
        self, url: str, raw: bytes, key: str
    ) -> tuple[int, dict[str, Any], _Tokens | None]:
        """One batch line, answered as the synchronous endpoint would answer its body and
        billed at Batch API prices: (status, response body, usage when billed)."""
        try:
            req = self._answers.prepare(url, raw)
            self._check_quota()
            if self._dice.batch_line_fails(self.config):
                raise _server_error()
        except _ApiError as err:
            return err.status, err.body(key=key if self.config.echo_key else ""), None
        payload, tokens = self._answers.reply(req)
        pico = req.cost(tokens, batch=True)
        self.ledger.bill(req.model, req.digest, tokens.billed, pico)
        self.ledger.count_batch_line(pico)
        return 200, self._echo(payload, key), tokens

    async def _control(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        method = request.method
        headers: dict[str, str] = {}
        if path == "/_sim/ledger" and method == "GET":
            return _json(200, self.state(), headers)
        if path == "/_sim/config" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    patch = json.loads(await request.read())
                    if not isinstance(patch, dict):
                        raise ValueError("expected a JSON object")
                    self.config.update(patch)
                except ValueError as exc:
                    return self._fail(_ApiError(400, str(exc)), headers)[1]
            return _json(200, dataclasses.asdict(self.config), headers)
        if path == "/_sim/reset" and method == "POST":
            self.reset()
            return _json(200, self.state(), headers)
        if path == "/_sim/outage" and method == "POST":
            try:
                seconds = json.loads(await request.read()).get("seconds")
            except (ValueError, AttributeError):
                seconds = None
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                seconds = -1
            if not 0 <= seconds < math.inf:
                message = 'expected {"seconds": S} with S a non-negative number'
                return self._fail(_ApiError(400, message), headers)[1]
            await self.outage(seconds, keep=request.transport)
            response = _json(200, {"seconds": seconds}, headers)
            response.force_close()
            return response
        return self._fail(_ApiError(404, f"Invalid URL ({method} {path})"), headers)[1]


async def _serve(config: SimConfig | None, host: str, port: int, prices: PriceTable | None) -> None:
    simulator = Simulator(config, prices)
    try:
        print(await simulator.start(host, port), flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
    finally:
        await simulator.stop()


def serve(
    config: SimConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    prices: PriceTable | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, printing the base URL first (for ``batchrun simulate``)."""
    asyncio.run(_serve(config, host, port, prices))
