"""The OpenAI Batch API: the job's requests in batches, at half the price, up to 24 h each.

A batch is a chunk of pending requests of one endpoint and one model, in file order, under the
API's limits (``--batch-requests``, 200 MB, 50,000 embedding inputs) and the cap: every request
is claimed through ``Books.claim`` at its Batch API worst case, so a batch goes out only if
settled spend + open reservations + its worst case fit under the cap.

Never a chunk twice: the chunk and its requests are recorded (``Store.open_chunk``) before its
file is uploaded, the file id and the batch id as soon as they exist, and the batch carries the
chunk's random tag in its metadata. A runner that starts finds the open chunks no live runner
watches: a chunk with a batch id is polled again; one without is looked up by its tag in the
list of batches (it may have been created just before a crash), and only if no batch carries
it do its requests go back to pending, uncharged. Its uploaded file is deleted first, so a
create still on its way cannot succeed after the lookup. Files named after the job's chunks
that no open batch uses are deleted.

Results are streamed from the output and error files line by line and settled through the
books at batch prices: 429, 5xx, ``batch_expired`` and ``batch_cancelled`` lines go back to
pending (counting toward ``--max-attempts``), other failures fail their row with the API's
message. A batch that fails for the organization's enqueued-token limit is waited out and
resubmitted smaller; one that fails validation has its errors shown as FILE:LINE of the job
file. Ctrl-C detaches: the batches go on at OpenAI, and the same command re-attaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx2
import openai
from openai.types import Batch

from ..clock import SYSTEM, Clock
from ..endpoints import BATCH_WINDOW, endpoint_for
from ..engine import Books, Control, RunOutcome
from ..money import format_money, format_usd
from ..retry import Action, Backoff, classify, fatal_message
from ..settings import Batching, Retry
from ..store import Beat, PendingRequest
from ..store.batches import SUBMITTED
from ..store.records import BatchInfo
from ..transport import OpenAITransport, Outcome

T = TypeVar("T")

_SUB_CLAIM = 2000  # requests claimed per database round trip while a chunk is built
_FLUSH_EVERY = 500  # result lines between group commits while a file is read
_FIND_MARGIN = 600.0  # seconds of clock skew allowed when looking for a batch by its tag
_SUMMARY_EVERY = 30.0  # seconds between progress summaries when nothing changed
_FILE_TIMEOUT = 3600.0  # seconds an upload or a download may take
_LONE_TOKEN_LIMIT = 3  # one-request batches refused for the enqueued-token limit, then stop
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_POLL = "batch_poll"  # the event a poll that saw a batch change records
_ENQUEUED = frozenset({"validating", "in_progress"})
_RETRY_CODES = frozenset({"batch_expired", "batch_cancelled"})
_TRANSIENT = (openai.APIConnectionError, httpx2.HTTPError, aiohttp.ClientError, OSError)
_KILL_AT = "BATCHRUN_KILL_AT"  # crash tests: "point[:n]" kills this process -9 there


class _Stop(Exception):
    """The run must stop: ``outcome`` and why."""

    def __init__(self, outcome: RunOutcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


class _Failpoints:
    """Crash-test hooks: ``BATCHRUN_KILL_AT=created:2`` SIGKILLs this process the 2nd time it
    reaches "created". Points: uploading, uploaded, created, polled, downloading; and for the
    switch of ``--via auto --deadline``: cancelling (after each cancel call), cancelled (every
    batch asked to cancel, before the first synchronous send), finalizing (a poll finds a
    cancelled batch still cancelling)."""

    def __init__(self) -> None:
        point, _, nth = os.environ.get(_KILL_AT, "").partition(":")
        self.point = point or None
        self.left = int(nth) if nth.isdigit() else 1

    def reach(self, point: str) -> None:
        if point != self.point:
            return
        self.left -= 1
        if self.left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "?"
    seconds = max(0, round(now - epoch))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _ChunkFile:
    """The input file of one chunk, written as its requests are claimed, and its limits."""

    def __init__(self, path: Path, batching: Batching, max_inputs: int | None) -> None:
        self.path = path
        self.limit_bytes = batching.bytes_per_batch
        self.max_inputs = max_inputs
        self.size = 0
        self.inputs = 0
        self.tokens = 0
        self.taken: list[PendingRequest] = []
        self._lines: list[bytes] = []
        self._fh = path.open("wb")

    def add(self, req: PendingRequest, token_budget: int | None) -> bool:
        """Add a request's line unless it would pass a limit of the batch."""
        # The body goes in exactly as stored: the line is billed under the bytes the job holds.
        line = (
            f'{{"custom_id": {json.dumps(req.custom_id)}, "method": "POST", '
            f'"url": "{req.url}", "body": {req.body}}}\n'
        ).encode()
        inputs = 0
        if self.max_inputs is not None:
            endpoint = endpoint_for(req.url)
            with contextlib.suppress(ValueError):
                inputs = endpoint.inputs_of(json.loads(req.body)) if endpoint else 1
            if self.inputs + inputs > self.max_inputs:
                return False
        if self.size + len(line) > self.limit_bytes:
            return False
        if token_budget is not None and self.tokens + req.input_tokens > token_budget:
            return False
        self.size += len(line)
        self.inputs += inputs
        self.tokens += req.input_tokens
        self._lines.append(line)
        req.body = ""  # written: the chunk keeps only what settling needs
        self.taken.append(req)
        return True

    async def flush(self) -> None:
        lines, self._lines = self._lines, []
        if lines:
            await asyncio.get_running_loop().run_in_executor(None, self._fh.write, b"".join(lines))

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


class BatchBackend:
    """Runs a job through the Batch API with ``transport``'s client."""

    name = "batch"

    def __init__(
        self,
        transport: OpenAITransport,
        batching: Batching,
        retry: Retry,
        seed: int | None = None,
        *,
        lane: bool = False,
        clock: Clock = SYSTEM,
    ) -> None:
        self.clock = clock
        # ``lane`` (``--via auto``): submit what is pending once, never again what comes back
        # (expired, failed or cancelled lines go to the synchronous tail), and end when no
        # batch is open; ``switch`` cancels the open batches and collects what they finished.
        self.lane = lane
        self._submitting = True
        self._switching = False
        self.cancels_sent = asyncio.Event()  # switching: every open batch was asked to cancel
        self.transport = transport
        self.client = transport.client
        self.batching = batching
        self.retry = retry
        self.backoff = Backoff(retry.backoff_base, retry.backoff_max, retry.max_wait)
        self._rng = random.Random(seed)
        self._open: dict[int, BatchInfo] = {}  # chunk id -> what is known of its batch
        self._cancelled: set[int] = set()
        self._hold: set[str] = set()  # models waiting out the enqueued-token limit
        self._shrunk: dict[str, int] = {}  # model -> most requests per batch after that limit
        self._lone_refusals = 0
        self._building: _ChunkFile | None = None
        self._dir: Path | None = None
        self._wake = asyncio.Event()
        self._interval = min(batching.poll_first, batching.poll_interval)
        self._last_summary = 0.0
        self._seen: dict[int, tuple[Any, ...]] = {}  # chunk id -> last (status, counts) shown
        self._fail = _Failpoints()
        self._books: Books | None = None
        self._control: Control | None = None

    # -- the run --------------------------------------------------------------------------------

    @property
    def books(self) -> Books:
        assert self._books is not None
        return self._books

    async def run(self, books: Books, control: Control) -> RunOutcome:
        self._books, self._control = books, control
        control.listeners.append(self._wake.set)
        try:
            await self._attach()
            await self._sweep()
            result = await self._loop()
            if not self._open:
                await self._sweep()
            return result
        except _Stop as stop:
            control.stop(stop.outcome, stop.message)
            return stop.outcome
        finally:
            if self._building is not None:  # claimed, not yet recorded as a chunk: hand back
                for req in self._building.taken:
                    books.release(req)
                self._building.discard()
                self._building = None
            books.stats.in_flight = 0
            books.stats.open_batches = books.stats.batch_completed = 0
            books.stats.next_poll = None
            if self._open and control.outcome is RunOutcome.INTERRUPTED:
                held = sum(info.requests for info in self._open.values())
                control.outcome = RunOutcome.DETACHED
                ids = [i.batch_id or f"chunk {i.id}" for i in self._open.values()]
                shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3:,} more" if len(ids) > 3 else "")
                control.message = (
                    f"{control.message}: detached from {len(self._open)} open batch(es) holding "
                    f"{held:,} request(s) ({shown}); they keep running at OpenAI and are billed "
                    "there. Run the same command again to re-attach and record their results "
                    "(or `batchrun cancel` to cancel them)"
                )

    async def _loop(self) -> RunOutcome:
        books, control = self.books, self._control
        assert control is not None
        while not control.stopping:
            await self._attach()
            cancelling = self.batching.cancel or self._switching
            if cancelling:
                why = "cancel"
            elif self._submitting:
                why = await self._submit()
                if self.lane and why in ("exhausted", "blocked"):
                    self._submitting = False  # what comes back goes to the synchronous tail
            else:
                why = "exhausted"
            if cancelling:
                await self._cancel_all()
            changed = await self._poll()
            self._progress(changed)
            if control.stopping:
                break
            if not self._open:
                if cancelling or (self.lane and not self._submitting):
                    return RunOutcome.COMPLETE
                if changed:
                    continue  # a batch just ended: what it handed back may be submitted again
                if why in ("blocked", "exhausted"):
                    if await books.open_elsewhere(0, batches=True) > 0:
                        # Other runners hold requests, or watch batches (_attach took every
                        # batch nobody watches): what they hand back is submitted here, and a
                        # watcher that dies is taken over.
                        await books.wait_settlement(1.0)
                        continue
                    return RunOutcome.CAPPED if why == "blocked" else RunOutcome.COMPLETE
                continue  # a hold lifts once nothing is open
            if changed:
                self._interval = min(self.batching.poll_first, self.batching.poll_interval)
            books.stats.next_poll = self.clock.monotonic() + self._interval
            await self._nap(self._interval)
            books.stats.next_poll = None
            self._interval = min(self._interval * 2, self.batching.poll_interval)
        return RunOutcome.COMPLETE

    def switch(self) -> None:
        """``--via auto``: submit nothing more; cancel the open batches and record what they
        finished (the lines they did not run go back to pending, for the synchronous tail)."""
        self._submitting = False
        self._switching = True
        self._wake.set()

    @property
    def open_batches(self) -> list[BatchInfo]:
        """What is known of the batches this backend watches (as last polled)."""
        return list(self._open.values())

    async def _nap(self, seconds: float) -> None:
        """Wait, or less when the run is told to stop."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def on_beat(self, beat: Beat) -> None:
        pass

    async def aclose(self) -> None:
        await self.transport.aclose()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- calls to the API -----------------------------------------------------------------------

    def _refusal(self, what: str, exc: openai.APIStatusError) -> bool:
        """Whether an error answer is worth retrying, as ``retry.classify`` decides for every
        answer of both backends; raises _Stop when nothing can succeed (key, quota)."""
        response = exc.response
        verdict = classify(
            Outcome(exc.status_code, response.content, response.headers), now=self.clock.now()
        )
        if verdict.action is Action.FATAL:
            raise _Stop(RunOutcome.FATAL, fatal_message(verdict.kind, verdict.message))
        return verdict.action is Action.RETRY

    async def _call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        refused: Callable[[openai.APIStatusError], Awaitable[T]] | None = None,
        between: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """``fn()``, retried with backoff while the API is unreachable or answers 429/5xx (up
        to ``--outage-limit``): the one retry loop of the Batch API backend. Any other error
        answer goes to ``refused`` (raised without one); ``between`` runs after each failure
        and its answer, if not None, is taken instead (a create whose answer was lost may have
        happened)."""
        started = self.clock.monotonic()
        attempt = 0
        while True:
            try:
                return await fn()
            except openai.APIStatusError as exc:
                if not self._refusal(what, exc):
                    if refused is None:
                        raise
                    return await refused(exc)
                problem = f"HTTP {exc.status_code}: {exc.message}"
            except _TRANSIENT as exc:
                problem = str(exc) or exc.__class__.__name__
            if between is not None:
                found = await between()
                if found is not None:
                    return found
            attempt += 1
            if self.clock.monotonic() - started > self.retry.outage_limit:
                raise _Stop(
                    RunOutcome.UNREACHABLE,
                    f"{what}: the API failed for {self.clock.monotonic() - started:.0f}s (limit "
                    f"{self.retry.outage_limit:.0f}s): {problem}",
                )
            self.books.event("batch_api_retry", detail=f"{what}: {problem}"[:500])
            await self.clock.sleep(self.backoff.delay(attempt, None, self._rng))

    def _metadata(self, info: BatchInfo) -> dict[str, str]:
        job = self.books.job
        return {
            "batchrun_job": str(job.id),
            "batchrun_job_sha256": job.sha256[:16],
            "batchrun_chunk": str(info.id),
            "batchrun_tag": info.tag,
        }

    def _file_name(self, tag: str) -> str:
        return f"{self._file_prefix()}{tag}.jsonl"

    def _file_prefix(self) -> str:
        return f"batchrun-{self.books.job.sha256[:12]}-"

    async def _find(self, info: BatchInfo) -> Batch | None:
        """The batch carrying this chunk's tag, if one was created (newest first, back to a
        little before the chunk was prepared)."""

        async def scan() -> Batch | None:
            cutoff = info.prepared_at - _FIND_MARGIN
            async for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get("batchrun_tag") == info.tag:
                    return batch
                if batch.created_at < cutoff:
                    break
            return None

        return await self._call("listing batches", scan)

    async def _delete_file(self, file_id: str) -> None:
        """Best effort: a file left behind is found by ``_sweep`` next time."""
        with contextlib.suppress(openai.APIError, *_TRANSIENT):
            await self.client.files.delete(file_id)

    # -- re-attaching and cleaning up ----------------------------------------------------------

    async def _attach(self) -> None:
        """Watch the job's open chunks no live runner watches (left by a run that stopped or
        died); resolve the ones that may never have been created."""
        books = self.books
        for info in await books.chunks.attach():
            if info.id in self._open:
                continue
            if info.state == SUBMITTED:
                self._open[info.id] = info
                books.notice(
                    f"re-attached batch {info.batch_id} (chunk {info.id}, {info.requests:,} "
                    f"requests, {info.status or 'submitted'})"
                )
                continue
            self._open[info.id] = info
            await self._resolve(info)

    async def _resolve(self, info: BatchInfo) -> None:
        """A chunk recorded but maybe never created: find its batch by tag, else hand its
        requests back. Its file is deleted before the second look, so a create that was still
        on its way fails instead of running after we gave up on it."""
        books = self.books
        found = await self._find(info)
        if found is None and info.file_id is not None:
            await self._delete_file(info.file_id)
            found = await self._find(info)
        if found is not None:
            await self._submitted(info, found)
            books.notice(
                f"re-attached batch {found.id} (chunk {info.id}): it was created before the "
                "last run stopped, so it is not submitted again"
            )
            return
        del self._open[info.id]
        n = await books.chunks.abandon(
            info.id, "its batch was never created (the run stopped while preparing it)"
        )
        books.notice(f"chunk {info.id} was never submitted: its {n:,} request(s) are pending again")

    async def _sweep(self) -> None:
        """Delete this job's uploaded files that no open batch uses (a chunk closed, abandoned,
        or uploaded twice). Best effort."""
        books = self.books
        prefix = self._file_prefix()
        stale: list[str] = []

        async def scan() -> None:
            async for f in self.client.files.list(purpose="batch"):
                name = f.filename or ""
                if not (name.startswith(prefix) and name.endswith(".jsonl")):
                    continue
                chunk = await books.chunks.by_tag(name[len(prefix) : -6])
                if chunk is None:  # another database's job with the same content
                    continue
                if chunk.open and chunk.watcher != books.runner_id:
                    continue  # another live runner's, maybe being uploaded right now
                if not chunk.open or chunk.file_id != f.id:
                    stale.append(f.id)

        try:
            await self._call("listing files", scan)
        except (_Stop, openai.APIError) as exc:
            books.notice(f"could not list uploaded files to clean them up: {exc}")
            return
        for file_id in stale:
            await self._delete_file(file_id)
        if stale:
            books.event("batch_files_deleted", detail=f"{len(stale)} unused input file(s)")

    # -- submitting -----------------------------------------------------------------------------

    def _enqueued(self, model: str, besides: int | None = None) -> tuple[int, int]:
        """(batches, input tokens) of this model's open batches that count as enqueued."""
        open_ = [
            i
            for i in self._open.values()
            if i.model == model and i.id != besides and (i.status is None or i.status in _ENQUEUED)
        ]
        return len(open_), sum(i.input_tokens for i in open_)

    async def _submit(self) -> str:
        """Submit batches while requests fit. Why it stopped: "exhausted" (nothing pending),
        "blocked" (the next request does not fit under the cap), "held" (a limit on enqueued
        tokens), "stopped"."""
        books, control = self.books, self._control
        assert control is not None
        while not control.stopping:
            claim = await books.claim(1)
            if not claim.requests:
                return "blocked" if claim.blocked else "exhausted"
            why = await self._submit_chunk(claim.requests[0])
            if why is not None:
                return why
        return "stopped"

    async def _submit_chunk(self, leader: PendingRequest) -> str | None:
        """Build, record and submit the chunk that starts at ``leader`` (claimed): the pending
        requests of its endpoint and model, in file order, up to the batch limits."""
        books, control = self.books, self._control
        assert control is not None
        model, url = leader.model, leader.url
        if model in self._hold:
            if self._enqueued(model)[0]:
                books.release(leader)
                return "held"
            self._hold.discard(model)
        budget = None
        queue = self.batching.queue_tokens
        if queue is not None:
            batches, tokens = self._enqueued(model)
            budget = queue - tokens
            if leader.input_tokens > budget:
                if batches:
                    books.release(leader)
                    return "held"
                books.fail(
                    leader, status=None, body=None, code="batch_queue_tokens",
                    message=f"{leader.input_tokens:,} input tokens: more than "
                    f"--batch-queue-tokens {queue:,} allows in a batch",
                )  # fmt: skip
                return None
        endpoint = endpoint_for(url)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="batchrun-batches-"))
        chunk = self._building = _ChunkFile(
            self._dir / f"{uuid.uuid4().hex}.jsonl",
            self.batching,
            endpoint.batch_max_inputs if endpoint else None,
        )
        if not chunk.add(leader, budget):
            chunk.discard()
            self._building = None
            books.fail(
                leader, status=None, body=None, code="too_large_for_batch",
                message="the request alone passes a Batch API limit (bytes or inputs per batch)",
            )  # fmt: skip
            return None
        limit = min(self.batching.requests_per_batch, self._shrunk.get(model, 1 << 62))
        while len(chunk.taken) < limit and not control.stopping:
            want = min(_SUB_CLAIM, limit - len(chunk.taken))
            claim = await books.claim(want, url=url, model=model)
            full = False
            for req in claim.requests:
                if full or not chunk.add(req, budget):
                    full = True
                    books.release(req)
            await chunk.flush()
            if full or len(claim.requests) < want:
                break
        if control.stopping:
            return "stopped"  # the finally of run() hands the claimed requests back
        chunk.close()
        info = await books.chunks.open(
            [r.id for r in chunk.taken],
            tag=uuid.uuid4().hex,
            url=url,
            model=model,
            size=chunk.size,
            input_tokens=chunk.tokens,
        )
        self._building = None  # the chunk holds its requests now
        self._open[info.id] = info
        try:
            await self._send(info, chunk.path)
        finally:
            chunk.path.unlink(missing_ok=True)
        return None

    async def _send(self, info: BatchInfo, path: Path) -> None:
        """Upload a recorded chunk's file and create its batch, recording each id at once."""
        books = self.books
        self._fail.reach("uploading")
        with path.open("rb") as fh:

            async def upload() -> Any:
                fh.seek(0)
                return await self.client.files.create(
                    file=(self._file_name(info.tag), fh), purpose="batch", timeout=_FILE_TIMEOUT
                )

            uploaded = await self._call("uploading a batch file", upload)
        self._fail.reach("uploaded")
        await books.chunks.update(info.id, file_id=uploaded.id)
        info.file_id = uploaded.id
        batch = await self._create(info)
        self._fail.reach("created")
        await self._submitted(info, batch)
        books.event(BATCH_POLL, 0.0, json.dumps({
            "chunk": info.id, "batch": batch.id, "status": batch.status or "validating",
            "completed": 0, "failed": 0, "total": info.requests,
        }))  # fmt: skip
        books.notice(
            f"submitted batch {batch.id} (chunk {info.id}): {info.requests:,} {info.model} "
            f"request(s), {info.bytes / 1e6:,.1f} MB, worst case {format_usd(info.worst_pico)}"
        )

    async def _create(self, info: BatchInfo) -> Batch:
        """Create the chunk's batch. A create whose answer was lost may have happened: look
        for the tag before trying again."""
        books = self.books
        file_id = info.file_id
        assert file_id is not None

        async def refused(exc: openai.APIStatusError) -> Batch:
            del self._open[info.id]
            await books.chunks.abandon(info.id, exc.message)
            await self._delete_file(file_id)
            raise _Stop(
                RunOutcome.FATAL, f"the Batch API refused to create a batch: {exc.message}"
            ) from None

        return await self._call(
            "creating a batch",
            lambda: self.client.batches.create(
                input_file_id=file_id,
                endpoint=info.url,  # type: ignore[arg-type]
                completion_window=BATCH_WINDOW,
                metadata=self._metadata(info),
            ),
            refused=refused,
            between=lambda: self._find(info),
        )

    async def _submitted(self, info: BatchInfo, batch: Batch) -> None:
        books = self.books
        values = self._batch_values(batch)
        await books.chunks.update(
            info.id,
            state=SUBMITTED,
            batch_id=batch.id,
            created_at=float(batch.created_at),
            expires_at=float(batch.expires_at) if batch.expires_at else None,
            **values,
        )
        info.state, info.batch_id = SUBMITTED, batch.id
        info.created_at = float(batch.created_at)
        info.expires_at = float(batch.expires_at) if batch.expires_at else None
        self._apply(info, values)

    @staticmethod
    def _batch_values(batch: Batch) -> dict[str, Any]:
        counts = batch.request_counts
        return {
            "status": batch.status,
            "total": counts.total if counts else 0,
            "completed": counts.completed if counts else 0,
            "failed": counts.failed if counts else 0,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
        }

    @staticmethod
    def _apply(info: BatchInfo, values: dict[str, Any]) -> None:
        for key, value in values.items():
            setattr(info, key, value)

    # -- watching -------------------------------------------------------------------------------

    async def _cancel_all(self) -> None:
        """``batchrun cancel``: ask OpenAI to cancel every open batch (once each)."""
        for info in list(self._open.values()):
            if info.state != SUBMITTED or info.id in self._cancelled:
                continue
            assert info.batch_id is not None
            batch_id = info.batch_id
            try:
                await self._call(
                    "cancelling a batch", lambda b=batch_id: self.client.batches.cancel(b)
                )
            except openai.APIStatusError as exc:  # already ended: its results are collected
                self.books.notice(f"batch {batch_id} was not cancelled: {exc.message}")
            else:
                self.books.notice(f"cancelling batch {batch_id} (chunk {info.id})")
            self._cancelled.add(info.id)
            self._fail.reach("cancelling")
        if self._switching and not self.cancels_sent.is_set():
            self.cancels_sent.set()
            self._fail.reach("cancelled")

    async def _poll(self) -> bool:
        """Look at every open batch once; settle the ended ones. Whether anything changed."""
        books = self.books
        changed = False
        for info in list(self._open.values()):
            if info.state != SUBMITTED:
                continue
            assert info.batch_id is not None
            batch_id = info.batch_id
            batch = await self._call(
                "polling a batch", lambda b=batch_id: self.client.batches.retrieve(b)
            )
            self._fail.reach("polled")
            if batch.status == "cancelling":
                self._fail.reach("finalizing")
            values = self._batch_values(batch)
            if batch.status != info.status:
                changed = True
            if any(getattr(info, k) != v for k, v in values.items()):
                await books.chunks.update(info.id, **values)
                self._apply(info, values)
                # What the poll saw, for the report's batch timeline (a row per change).
                books.event(BATCH_POLL, 0.0, json.dumps({
                    "chunk": info.id, "batch": batch_id, "status": batch.status,
                    "completed": info.completed, "failed": info.failed,
                    "total": info.total or info.requests,
                }))  # fmt: skip
            if batch.status in _TERMINAL:
                await self._settle(info, batch)
                changed = True
        return changed

    def _progress(self, changed: bool) -> None:
        """Per batch and overall: counts from request_counts, age, spend vs cap."""
        books = self.books
        stats = books.stats
        stats.in_flight = sum(i.requests for i in self._open.values())
        stats.open_batches = len(self._open)
        stats.batch_completed = sum(i.completed for i in self._open.values())
        now = self.clock.monotonic()
        if not self._open or (not changed and now - self._last_summary < _SUMMARY_EVERY):
            return
        self._last_summary = now
        for info in self._open.values():
            key = (info.status, info.completed, info.failed)
            if self._seen.get(info.id) == key:
                continue
            self._seen[info.id] = key
            books.notice(
                f"batch {info.batch_id or '(being submitted)'} (chunk {info.id}): "
                f"{info.status or info.state}, {info.completed:,} completed, {info.failed:,} "
                f"failed of {info.total or info.requests:,}; "
                f"submitted {_ago(info.created_at, self.clock.now())} ago"
            )
        by_status: dict[str, int] = {}
        for info in self._open.values():
            key = info.status or info.state
            by_status[key] = by_status.get(key, 0) + 1
        states = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
        done = sum(i.completed for i in self._open.values())
        total = sum(i.total or i.requests for i in self._open.values())
        books.notice(
            f"{len(self._open)} open batch(es) ({states}): {done:,} of {total:,} requests "
            f"completed; spend {format_money(stats.settled_pico)} + "
            f"{format_money(stats.reserved_pico)} reserved of cap {format_money(stats.cap_pico)}"
        )

    # -- results --------------------------------------------------------------------------------

    async def _settle(self, info: BatchInfo, batch: Batch) -> None:
        """Record an ended batch: every line of its output and error files, or (failed) why."""
        books = self.books
        held = await books.chunks.requests(info.id)
        tally = {"done": 0, "failed": 0, "again": 0, "unreadable": 0}
        error: str | None = None
        if batch.status == "failed":
            errors = list(batch.errors.data or []) if batch.errors else []
            if any(e.code == "token_limit_exceeded" for e in errors):
                error = self._token_limited(info, errors, held)
            else:
                error = self._invalid(info, errors, held, tally)
        else:
            by_id = {r.custom_id: r for r in held}
            lost = False
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id and not await self._read(file_id, by_id, tally):
                    lost = True
            # Lines the API counts as completed were billed: fewer results than that (an output
            # file missing or cut short; those settled before a restart count) leaves billed
            # requests unread.
            completed = batch.request_counts.completed if batch.request_counts else 0
            settled = info.requests - len(held) + tally["done"]
            lost = lost or tally["unreadable"] > 0 or completed > settled
            for req in by_id.values():
                if lost:  # it may be among the lines we could not read, and billed
                    books.charge_unknown(req)
                # An attempt like any other: a batch that never answers a request must not
                # send (and maybe bill) it again without end.
                req.attempts += 1
                books.attempt(req, req.attempts, self.clock.now(), 0.0, None, "no_result")
                self._again(req, "no_result", "the batch returned no result for it", tally)
        await books.flush()
        await books.chunks.close(
            info.id,
            error=error,
            **self._batch_values(batch),
        )
        del self._open[info.id]
        self._seen.pop(info.id, None)
        if info.file_id:
            await self._delete_file(info.file_id)
        books.notice(
            f"batch {info.batch_id} {batch.status}: {tally['done']:,} result(s) recorded, "
            f"{tally['failed']:,} failed, {tally['again']:,} back to pending"
            + (
                f" ({tally['unreadable']:,} unreadable result line(s): the requests left "
                "without a result were charged at worst case)"
                if tally["unreadable"]
                else ""
            )
        )

    def _again(self, req: PendingRequest, code: str, message: str, tally: dict[str, int]) -> None:
        """A line to try again in a later batch, unless its attempts are used up."""
        books = self.books
        books.stats.error(code)
        if req.attempts >= self.retry.max_attempts:
            books.fail(
                req, status=None, body=None, code=code,
                message=f"gave up after {req.attempts} attempts: {message}",
            )  # fmt: skip
            tally["failed"] += 1
            return
        books.stats.retries += 1
        books.release(req, message)
        tally["again"] += 1

    def _token_limited(self, info: BatchInfo, errors: list[Any], held: list[PendingRequest]) -> str:
        """The organization's enqueued-token limit: not the job's fault. Hand the requests
        back, wait for this model's open batches, then resubmit in smaller batches."""
        books = self.books
        message = next(e.message for e in errors if e.code == "token_limit_exceeded")
        for req in held:
            books.release(req, message)
        model = info.model
        others = self._enqueued(model, besides=info.id)[0]
        if info.requests <= 1 and not others:
            self._lone_refusals += 1
            if self._lone_refusals >= _LONE_TOKEN_LIMIT:
                raise _Stop(
                    RunOutcome.FATAL,
                    f"the Batch API refuses even a one-request batch for {model}: {message}",
                )
        self._hold.add(model)
        self._shrunk[model] = max(
            1, min(self._shrunk.get(model, info.requests), info.requests) // 2
        )
        books.event("batch_token_limit", detail=message[:500])
        books.notice(
            f"batch {info.batch_id} hit the organization's enqueued-token limit for {model}; "
            f"waiting for {others} open batch(es) of it, then resubmitting at most "
            f"{self._shrunk[model]:,} request(s) per batch"
        )
        return message

    def _invalid(
        self,
        info: BatchInfo,
        errors: list[Any],
        held: list[PendingRequest],
        tally: dict[str, int],
    ) -> str:
        """A batch that failed validation: each error at its job-file FILE:LINE (line n of
        the batch's file is the chunk's n-th request in file order). The lines named fail;
        the others go back to pending."""
        books = self.books
        path = books.job.path
        shown: list[str] = []
        failed: set[int] = set()
        for e in errors:
            req = held[e.line - 1] if isinstance(e.line, int) and 0 < e.line <= len(held) else None
            where = f"{path}:{req.line}" if req is not None else path
            text = f"{where}: {e.code or 'invalid'}: {e.message or 'rejected by the Batch API'}"
            shown.append(text)
            if req is not None and req.id not in failed:
                failed.add(req.id)
                req.attempts += 1
                books.fail(req, status=None, body=None, code=e.code or "invalid", message=text)
                tally["failed"] += 1
        first = shown[0] if shown else "no reason given"
        for req in held:
            if req.id not in failed:
                req.attempts += 1
                self._again(req, "batch_failed", f"batch {info.batch_id} failed: {first}", tally)
        books.notice(f"batch {info.batch_id} failed validation:")
        for text in shown[:20]:
            books.notice(text)
        if len(shown) > 20:
            books.notice(f"... and {len(shown) - 20} more")
        books.event("batch_failed", detail="\n".join(shown)[:2000])
        return "\n".join(shown)[:10_000]

    async def _read(
        self, file_id: str, by_id: dict[str, PendingRequest], tally: dict[str, int]
    ) -> bool:
        """Stream a result file and settle each line; False if the file could not be read.
        A download cut short is read again: lines already settled are skipped."""

        async def download() -> bool:
            async with self.client.files.with_streaming_response.content(
                file_id, timeout=_FILE_TIMEOUT
            ) as response:
                await self._lines(response.iter_bytes(1 << 16), by_id, tally)
            return True

        async def refused(exc: openai.APIStatusError) -> bool:
            self.books.notice(f"could not read result file {file_id}: {exc.message}")
            return False

        return await self._call("downloading results", download, refused=refused)

    async def _lines(
        self, chunks: Any, by_id: dict[str, PendingRequest], tally: dict[str, int]
    ) -> None:
        """Settle the lines of a byte stream, committing as it goes (never the whole file in
        memory, and a bounded backlog of outcomes)."""
        rest = bytearray()  # the line being received: appended to, never copied whole
        n = 0
        committing: asyncio.Task[Any] | None = None
        async for piece in chunks:
            seen = len(rest)
            rest += piece
            end = rest.rfind(b"\n", seen)
            if end < 0:
                continue
            lines = rest[:end].split(b"\n")
            del rest[: end + 1]
            for raw in lines:
                if raw.strip():
                    self._line(raw, by_id, tally)
                    n += 1
                    if n % _FLUSH_EVERY == 0:
                        if committing is not None:
                            await committing
                        committing = asyncio.ensure_future(self.books.flush())
                        await asyncio.sleep(0)
                        if self._fail.point == "downloading":  # once this commit is durable
                            await committing
                            self._fail.reach("downloading")
        if rest.strip():
            self._line(rest, by_id, tally)
        if committing is not None:
            await committing

    def _line(self, raw: bytes, by_id: dict[str, PendingRequest], tally: dict[str, int]) -> None:
        """Settle one line of a result file against its custom_id."""
        books = self.books
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        custom_id = record.get("custom_id") if isinstance(record, dict) else None
        if not isinstance(custom_id, str):
            # Whose result it was cannot be known: the requests left without one are charged
            # their worst case when the batch is settled (this line may have been billed).
            books.stats.error("unreadable_line")
            tally["unreadable"] += 1
            return
        req = by_id.pop(custom_id, None)
        if req is None:  # settled already (a download read again), or not ours
            return
        req.attempts += 1
        now = self.clock.now()
        response = record.get("response")
        if isinstance(response, dict):
            status = response.get("status_code")
            status = status if isinstance(status, int) else 0
            body = response.get("body")
            api_id = _text(response.get("request_id"))
            if 200 <= status < 300 and isinstance(body, dict):
                books.attempt(req, req.attempts, now, 0.0, status, None)
                books.succeed(req, body, json.dumps(body), status=status, api_request_id=api_id)
                tally["done"] += 1
                return
            # An error line is decided as the synchronous API's answers are (retry.classify):
            # what the sync pool would retry goes back to pending, the rest fails.
            raw = json.dumps(body).encode() if body is not None else b""
            verdict = classify(Outcome(status, raw, {}))
            code = verdict.code or str(status)
            message = verdict.message or f"HTTP {status}"
            books.attempt(req, req.attempts, now, 0.0, status, verdict.kind[:32])
            if verdict.action is Action.RETRY:
                self._again(req, code, message, tally)
                return
            books.fail(
                req, status=status, body=json.dumps(body), code=code, message=message,
                api_request_id=api_id,
            )  # fmt: skip
            tally["failed"] += 1
            return
        err = record.get("error")
        err = err if isinstance(err, dict) else {}
        code = _text(err.get("code")) or "batch_error"
        message = _text(err.get("message")) or code
        books.attempt(req, req.attempts, now, 0.0, None, code[:32])
        if code in _RETRY_CODES:
            self._again(req, code, message, tally)
            return
        books.fail(req, status=None, body=None, code=code, message=message)
        tally["failed"] += 1
