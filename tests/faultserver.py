"""A tiny HTTP server that answers every API request with one fixed, hand-written response:
for faults the simulator has no setting for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def fault_server(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """Serve ``body`` (JSON) with ``status`` on 127.0.0.1; yields the base URL (``.../v1``)."""
    received: list[bytes] = []

    async def handle(request: web.BaseRequest) -> web.Response:
        received.append(await request.read())
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
