"""The Batch API: batches created from uploaded files and run in the server's background.

A batch goes ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``; or
``failed`` (its file did not validate), ``expired`` (its completion window passed) or
``cancelling`` -> ``cancelled``. Each line is answered by the same code as the synchronous
endpoint and billed at Batch API prices; results are written to disk line by line and become
the output and error files when the batch ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from ..endpoints import ENDPOINTS
from .answers import _Answers, _ApiError, _new_id, _Tokens
from .batchfile import _check_file, _read_lines, _token_limit_error
from .config import SimConfig
from .files import _FileStore
from .ledger import Ledger
from .responses import _page

_log = logging.getLogger(__name__)
# answer_line(url, body bytes, api key) -> (status, response body, usage when billed)
_AnswerLine = Callable[[str, bytes, str], tuple[int, dict[str, Any], _Tokens | None]]

_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
_ENQUEUED = frozenset({"validating", "in_progress"})  # statuses whose tokens are enqueued
_UNFINISHED = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}
_YIELD_EVERY = 64  # lines between giving the event loop a turn when not pacing


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch: the Batch object's fields and what its background task needs."""

    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    expires_at: int
    deadline: float  # event-loop time when the completion window ends
    key: str  # the API key that created it (echoed into its lines in echo-key mode)
    handle: IO[bytes]  # the input file, open for the batch's life even if the file is deleted
    status: str = "validating"
    model: str | None = None
    tokens: int = 0  # enqueued input tokens, known once validated
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # input, cached, out, reasoning
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)  # "<status>_at" -> unix time
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set on cancel
    queue_s: float = 0.0  # seconds it waits in_progress before its first line runs
    stuck: bool = False  # it never progresses: in_progress until cancelled or expired
    task: asyncio.Task[None] | None = None

    def enter(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())

    def to_dict(self) -> dict[str, Any]:
        input_tokens, cached, output, reasoning = self.usage
        times = {f"{s}_at": self.times.get(f"{s}_at") for s in _STATUSES if s != "validating"}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **times,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            "model": self.model,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": input_tokens + output,
            },
        }


class _ResultFile:
    """An output or error file being written line by line; a stored file once published."""

    def __init__(self, files: _FileStore, name: str) -> None:
        self._files = files
        self._name = name
        self._path: Path | None = None
        self._out: IO[bytes] | None = None

    def write(self, record: dict[str, Any], garbled: bool = False) -> None:
        """Append one line; ``garbled``: only its first half (a storage fault)."""
        if self._out is None:
            self._path = self._files.new_path()
            self._out = self._path.open("wb")
        line = json.dumps(record).encode()
        self._out.write((line[: len(line) // 2] if garbled else line) + b"\n")

    def publish(self) -> str | None:
        """Close the file and store it; None when no line was written."""
        if self._out is None or self._path is None:
            return None
        self._out.close()
        self._out = None
        return self._files.add(self._path, self._name, "batch_output").id

    def discard(self) -> None:
        if self._out is not None and self._path is not None:
            self._out.close()
            self._path.unlink(missing_ok=True)
            self._out = None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    ok = isinstance(value, dict) and len(value) <= 16
    ok = ok and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
        for k, v in value.items()
    )
    if not ok:
        message = (
            "Invalid 'metadata': at most 16 pairs of strings, keys of at most 64 characters "
            "and values of at most 512."
        )
        raise _ApiError(400, message, param="metadata")
    return dict(value)


class _Batches:
    """Every batch by id, newest last, and the tasks that run them."""

    def __init__(
        self,
        config: SimConfig,
        files: _FileStore,
        answers: _Answers,
        answer_line: _AnswerLine,
        ledger: Callable[[], Ledger],
        garbled: Callable[[], bool] = lambda: False,
        timing: Callable[[], tuple[float, bool]] = lambda: (0.0, False),
    ) -> None:
        self._config = config
        self._files = files
        self._answers = answers
        self._answer_line = answer_line
        self._garbled = garbled  # whether the next billed line is written cut short
        self._timing = timing  # (queue delay, stuck) of the next batch to start
        self._next_slot = 0.0  # event-loop time of the next line under a shared line rate
        self._ledger = ledger
        self._batches: dict[str, _Batch] = {}

    def counts(self) -> dict[str, int]:
        """How many batches are in each status."""
        out = dict.fromkeys(_STATUSES, 0)
        for batch in self._batches.values():
            out[batch.status] += 1
        return out

    def clear(self) -> None:
        """Forget every batch, stopping the ones still running (their results are lost)."""
        for batch in self._batches.values():
            if batch.task is not None:
                batch.task.cancel()
            batch.handle.close()
        self._batches.clear()

    async def close(self) -> None:
        """Stop every running batch and wait until their tasks are done."""
        tasks = [b.task for b in self._batches.values() if b.task is not None]
        self.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, request: web.BaseRequest, parts: list[str], key: str) -> dict[str, Any]:
        """Route ``/v1/batches[/{id}[/cancel]]``."""
        method = request.method
        if parts == [] and method == "POST":
            return await self._create(request, key)
        if parts == [] and method == "GET":
            return _page(list(reversed(self._batches.values())), request.query, 20, 100)
        if len(parts) == 1 and method == "GET":
            return self._get(parts[0]).to_dict()
        if len(parts) == 2 and parts[1] == "cancel" and method == "POST":
            batch = self._get(parts[0])
            if batch.status in _ENQUEUED:
                batch.enter("cancelling")
                batch.wake.set()
            elif batch.status != "cancelling":
                message = f"Cannot cancel a batch with status '{batch.status}'."
                raise _ApiError(400, message)
            return batch.to_dict()
        raise _ApiError(404, f"Invalid URL ({method} {request.path})")

    def _get(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise _ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")
        return batch

    async def _create(self, request: web.BaseRequest, key: str) -> dict[str, Any]:
        try:
            payload = json.loads(await request.read())
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise _ApiError(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(payload.get(name), str):
                raise _ApiError(400, f"Missing required parameter: '{name}'.", param=name)
        endpoint = payload["endpoint"]
        if endpoint not in ENDPOINTS:
            supported = ", ".join(f"'{url}'" for url in ENDPOINTS)
            message = f"Invalid value: '{endpoint}'. Supported values are: {supported}."
            raise _ApiError(400, message, param="endpoint")
        if payload["completion_window"] != "24h":
            message = "Invalid value for 'completion_window': only '24h' is supported."
            raise _ApiError(400, message, param="completion_window")
        metadata = _metadata(payload.get("metadata"))
        stored = self._files.get(payload["input_file_id"])
        if stored.purpose != "batch":
            message = f"File {stored.id} has purpose '{stored.purpose}', not 'batch'."
            raise _ApiError(400, message, param="input_file_id")
        loop = asyncio.get_running_loop()
        window = self._config.batch_window_s
        now = int(time.time())
        batch = _Batch(
            id=_new_id("batch_"),
            endpoint=endpoint,
            input_file_id=stored.id,
            metadata=metadata,
            created_at=now,
            expires_at=now + math.ceil(window),
            deadline=loop.time() + window,
            key=key,
            handle=stored.path.open("rb"),
        )
        self._batches[batch.id] = batch
        self._ledger().batches_created += 1
        batch.task = loop.create_task(self._run(batch, stored.bytes))
        return batch.to_dict()

    async def _pause(self, batch: _Batch, seconds: float) -> None:
        """Wait ``seconds``, or less when the batch is cancelled or its window ends."""
        seconds = min(seconds, batch.deadline - asyncio.get_running_loop().time())
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await batch.wake.wait()

    async def _run(self, batch: _Batch, size: int) -> None:
        """The whole life of a batch after it was created."""
        output = _ResultFile(self._files, f"{batch.id}_output.jsonl")
        errors = _ResultFile(self._files, f"{batch.id}_error.jsonl")
        try:
            await self._pause(batch, self._config.batch_validate_s)
            if batch.status == "validating" and not await self._validate(batch, size):
                return
            expired = False
            if batch.status == "in_progress":
                expired = await self._process(batch, output, errors)
            if batch.status == "in_progress" and not expired:
                batch.enter("finalizing")
            if batch.status in ("finalizing", "cancelling"):
                config = self._config
                cancel_s = config.batch_cancel_s
                cancelling = batch.status == "cancelling" and cancel_s is not None
                await asyncio.sleep(cancel_s if cancelling else config.batch_finalize_s)
            if self._config.batch_lose_output:
                output.discard()
            batch.output_file_id = output.publish()
            batch.error_file_id = errors.publish()
            final = {"finalizing": "completed", "cancelling": "cancelled"}
            batch.enter(final.get(batch.status, "expired"))
        except Exception as exc:  # a simulator bug must not leave a client polling forever
            _log.exception("batch %s broke", batch.id)
            message = f"The simulator failed: {exc!r}"
            batch.errors = [
                {"code": "server_error", "message": message, "param": None, "line": None}
            ]
            batch.enter("failed")
        finally:
            output.discard()
            errors.discard()
            batch.handle.close()

    async def _validate(self, batch: _Batch, size: int) -> bool:
        """Check the input file; fail the batch (and return False) when it is not valid, else
        start it unless it was cancelled meanwhile."""
        config = self._config
        checked = await _check_file(batch.handle, size, batch.endpoint, config, self._answers)
        if batch.status != "validating":  # cancelled meanwhile
            return True
        limit = config.batch_enqueued_tokens
        if not checked.errors and checked.model is not None and limit is not None:
            enqueued = sum(
                b.tokens
                for b in self._batches.values()
                if b.model == checked.model and b.status in _ENQUEUED
            )
            if enqueued + checked.tokens > limit:
                checked.errors.append(_token_limit_error(checked.model, limit))
        if checked.errors:
            batch.errors = checked.errors
            batch.enter("failed")
            return False
        batch.model, batch.tokens, batch.total = checked.model, checked.tokens, checked.requests
        batch.queue_s, batch.stuck = self._timing()
        batch.enter("in_progress")
        return True

    async def _process(self, batch: _Batch, output: _ResultFile, errors: _ResultFile) -> bool:
        """Answer every line at the configured pace until done, cancelled or expired; lines
        left unanswered go to the error file with no response. True if the batch expired."""
        loop = asyncio.get_running_loop()
        if batch.stuck:
            await self._pause(batch, math.inf)  # until cancelled or expired
        elif batch.queue_s > 0:
            await self._pause(batch, batch.queue_s)
        start = loop.time()
        done = 0
        expired = False
        for _, fields, raw in _read_lines(batch.handle):
            assert fields is not None  # validated
            unfinished = self._unfinished(batch, loop)
            if unfinished is None:
                wait = self._slot(start, done, loop)
                if wait > 0.001:
                    await self._pause(batch, wait)
                    unfinished = self._unfinished(batch, loop)
                elif done % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            record: dict[str, Any] = {"id": _new_id("batch_req_"), "custom_id": fields["custom_id"]}
            if unfinished is not None:
                record["response"] = None
                record["error"] = {"code": unfinished, "message": _UNFINISHED[unfinished]}
                errors.write(record)
                expired = expired or unfinished == "batch_expired"
                continue
            status, body, tokens = self._answer_line(batch.endpoint, raw, batch.key)
            record["response"] = {
                "status_code": status,
                "request_id": _new_id("req_"),
                "body": body,
            }
            record["error"] = None
            done += 1
            if tokens is None:
                batch.failed += 1
                errors.write(record)
                continue
            batch.completed += 1
            for i, value in enumerate((tokens.input, tokens.cached, tokens.output)):
                batch.usage[i] += value
            batch.usage[3] += tokens.reasoning
            output.write(record, garbled=self._garbled())
        return expired

    def _slot(self, start: float, done: int, loop: asyncio.AbstractEventLoop) -> float:
        """Seconds until this batch may answer its next line: at its own pace, or (a rate
        shared by the open batches) at the next free slot of the shared pace, taken now."""
        shared = self._config.batch_shared_lines_per_s
        if shared is None:
            return start + done / self._config.batch_lines_per_s - loop.time()
        now = loop.time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1 / shared
        return slot - now

    @staticmethod
    def _unfinished(batch: _Batch, loop: asyncio.AbstractEventLoop) -> str | None:
        """Why the remaining lines will not run, or None while they still may."""
        if batch.status == "cancelling":
            return "batch_cancelled"
        if loop.time() >= batch.deadline:
            return "batch_expired"
        return None
