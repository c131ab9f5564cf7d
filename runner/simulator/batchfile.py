"""Reading a Batch API input file: one request per line, checked the way the Batch API does.

Each line's ``body`` is kept as the exact text it has in the file, so a line is answered and
billed under the same bytes (and digest) as that body sent to the synchronous endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from ..endpoints import ENDPOINTS
from .answers import _Answers
from .config import SimConfig
from .limits import _ORG

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_MAX_ERRORS = 100  # errors reported per failed batch
_YIELD_EVERY = 256  # lines between giving the event loop a turn


def _skip(text: str, idx: int) -> int:
    match = _SPACE.match(text, idx)
    return match.end() if match else idx


def _split_line(text: str) -> tuple[dict[str, Any], str | None]:
    """A line's fields, and the exact text of its ``body`` value (None when it has none).

    Raises ValueError when the line is not one JSON object.
    """
    fields: dict[str, Any] = {}
    raw_body: str | None = None
    idx = _skip(text, 0)
    if text[idx : idx + 1] != "{":
        raise ValueError("not a JSON object")
    idx = _skip(text, idx + 1)
    if text[idx : idx + 1] == "}":
        idx += 1
    else:
        while True:
            if text[idx : idx + 1] != '"':
                raise ValueError("expected a key")
            key, idx = _DECODER.raw_decode(text, idx)
            idx = _skip(text, idx)
            if text[idx : idx + 1] != ":":
                raise ValueError("expected ':'")
            start = _skip(text, idx + 1)
            fields[key], idx = _DECODER.raw_decode(text, start)
            if key == "body":
                raw_body = text[start:idx]
            idx = _skip(text, idx)
            sep = text[idx : idx + 1]
            idx += 1
            if sep == "}":
                break
            if sep != ",":
                raise ValueError("expected ',' or '}'")
            idx = _skip(text, idx)
    if _skip(text, idx) != len(text):
        raise ValueError("extra data after the object")
    return fields, raw_body


def _read_lines(handle: IO[bytes]) -> Iterator[tuple[int, dict[str, Any] | None, bytes]]:
    """(1-based line number, fields or None when the line is not a JSON object, body bytes)
    for every non-blank line, from the start of the file."""
    handle.seek(0)
    for number, raw in enumerate(handle, 1):
        if not raw.strip():
            continue
        try:
            fields, body = _split_line(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            yield number, None, b""
            continue
        yield number, fields, (body or "").encode()


@dataclass(slots=True)
class _Checked:
    """What validating an input file found."""

    requests: int = 0
    model: str | None = None
    tokens: int = 0  # input tokens, for the enqueued-token limit
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, code: str, message: str, param: str | None, line: int | None) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


async def _check_file(
    handle: IO[bytes], size: int, url: str, config: SimConfig, answers: _Answers
) -> _Checked:
    """Check every line of an input file for ``url``; the result lists the errors found."""
    checked = _Checked()
    if size > config.batch_max_bytes:
        message = f"The input file is {size} bytes; a batch input file may be at most "
        checked.error("file_too_large", message + f"{config.batch_max_bytes} bytes.", None, None)
        return checked
    endpoint = ENDPOINTS[url]
    seen: set[str] = set()
    inputs = 0
    for number, fields, raw in _read_lines(handle):
        if number % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if len(checked.errors) >= _MAX_ERRORS:
            break
        checked.requests += 1
        if checked.requests > config.batch_max_requests:
            message = f"A batch may hold at most {config.batch_max_requests} requests."
            checked.error("too_many_requests", message, None, number)
            break
        if fields is None:
            checked.error(
                "invalid_json_line", "This line is not parseable as valid JSON.", None, number
            )
            continue
        custom_id = fields.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            message = "Missing required parameter: 'custom_id'."
            checked.error("missing_required_parameter", message, "custom_id", number)
        elif custom_id in seen:
            message = (
                "The custom_id for this request is a duplicate of another request. The "
                "custom_id parameter must be unique for each request in a batch."
            )
            checked.error("duplicate_custom_id", message, "custom_id", number)
        else:
            seen.add(custom_id)
        if fields.get("method") != "POST":
            message = "The method provided for this request is not supported. Only POST is."
            checked.error("invalid_method", message, "method", number)
        if fields.get("url") != url:
            message = f"The URL provided for this request does not match the batch endpoint {url}."
            checked.error("invalid_url", message, "url", number)
        body = fields.get("body")
        if not isinstance(body, dict):
            message = "Missing required parameter: 'body' (a JSON object)."
            checked.error("missing_required_parameter", message, "body", number)
            continue
        model = body.get("model")
        if not isinstance(model, str) or not model:
            message = "Missing required parameter: 'body.model'."
            checked.error("missing_required_parameter", message, "body.model", number)
            continue
        if answers.price(model) is None:
            message = f"The provided model '{model}' is not supported by the Batch API."
            checked.error("model_not_found", message, "body.model", number)
        elif checked.model is None:
            checked.model = model
        elif model != checked.model:
            message = (
                f"The provided model '{model}' does not match the model '{checked.model}' of "
                "the other requests in this batch; a batch may use one model only."
            )
            checked.error("mismatched_model", message, "body.model", number)
        most = endpoint.batch_max_inputs
        if most is not None and inputs <= most:
            inputs += endpoint.inputs_of(body)
            if inputs > most:
                message = f"A batch may hold at most {most} embedding inputs in all."
                checked.error("too_many_inputs", message, "body.input", number)
        if config.batch_enqueued_tokens is not None and fields.get("url") == url:
            # A body the counter refuses adds nothing: it fails on its own line later.
            with contextlib.suppress(Exception):
                checked.tokens += answers.prompt_tokens(url, body, hashlib.sha256(raw).digest())
    if checked.requests == 0 and not checked.errors:
        checked.error("empty_file", "The input file holds no requests.", None, None)
    return checked


def _token_limit_error(model: str, limit: int) -> dict[str, Any]:
    message = (
        f"Enqueued token limit reached for {model} in organization {_ORG}. Limit: {limit:,} "
        "enqueued tokens. Please try again once some in_progress batches have been completed."
    )
    return {"code": "token_limit_exceeded", "message": message, "param": None, "line": None}
