"""How answers go out on the wire: JSON bodies, list pages, and deliberately broken bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from aiohttp import web

from .answers import _ApiError

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def _json(status: int, payload: Any, headers: dict[str, str]) -> web.Response:
    headers["Content-Type"] = "application/json"
    return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)


def _abort(request: web.BaseRequest) -> None:
    """Drop the TCP connection with no (further) bytes: the client cannot know the outcome."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _half_then_reset(
    request: web.BaseRequest, data: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """Send the headers and half the body, then drop the connection."""
    headers["Content-Type"] = "application/json"
    response = web.StreamResponse(status=200, headers=headers)
    response.content_length = len(data)
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
    _abort(request)
    return response


async def _slowly(
    request: web.BaseRequest, data: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """Send the status and headers at once, then the body at one byte per second; stop when
    the client goes away."""
    headers["Content-Type"] = "application/json"
    response = web.StreamResponse(status=200, headers=headers)
    response.content_length = len(data)
    try:
        await response.prepare(request)
        for i in range(len(data)):
            await response.write(data[i : i + 1])
            await asyncio.sleep(1.0)
    except ConnectionError:
        _abort(request)
    return response


def _limit(query: Mapping[str, str], default: int, maximum: int) -> int:
    """The ``limit`` query parameter of a list endpoint."""
    raw = query.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise _ApiError(400, f"Invalid 'limit': expected 1 to {maximum}.", param="limit")
    return value


class _Listed(Protocol):
    """An object a list endpoint returns: files and batches."""

    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def _page(
    items: Sequence[_Listed], query: Mapping[str, str], default: int, maximum: int
) -> dict[str, Any]:
    """One page of a cursor-paginated list of ``items`` (in list order), starting after the
    ``after`` cursor, at most ``limit`` long."""
    limit = _limit(query, default, maximum)
    after = query.get("after")
    start = 0
    if after is not None:
        ids = [item.id for item in items]
        if after not in ids:
            raise _ApiError(400, f"Invalid 'after': no object with id {after!r}.", param="after")
        start = ids.index(after) + 1
    chosen = items[start : start + limit]
    data = [item.to_dict() for item in chosen]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }
