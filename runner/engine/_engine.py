"""The engine: runs one backend over one runner's books until it finishes or is stopped."""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..errors import BatchrunError
from ..settings import Stopping
from ..store import Beat
from ._books import Books
from ._control import Control, RunOutcome, RunReport, RunStats


class Backend(Protocol):
    """How requests travel. ``run`` sends every request it can claim through ``books`` and
    returns how that ended (COMPLETE or CAPPED); it stops dispatching once ``control`` says so,
    and on cancellation (a hard stop) it must leave its books conservative: a request that may
    have reached the API is charged its worst case."""

    name: str  # "sync", "batch" or "auto"

    async def run(self, books: Books, control: Control) -> RunOutcome: ...

    def on_beat(self, beat: Beat) -> None: ...

    async def aclose(self) -> None: ...


class Engine:
    """Runs one backend over one job's books until it finishes or is stopped; the runner's
    membership beats beside it."""

    def __init__(
        self, books: Books, backend: Backend, control: Control, stopping: Stopping
    ) -> None:
        self.books = books
        self.backend = backend
        self.control = control
        self.stopping = stopping

    @property
    def stats(self) -> RunStats:
        return self.books.stats

    async def run(self) -> RunReport:
        books, control = self.books, self.control
        books.start()
        beats = asyncio.create_task(
            books.members.keep(
                self.stopping.heartbeat_ttl,
                lambda: books.stats.in_flight,
                self.backend.on_beat,
                self._declared_dead,
            )
        )
        work = asyncio.create_task(self.backend.run(books, control))
        hard = asyncio.create_task(control.hard.wait())
        result: RunOutcome | None = None
        try:
            await asyncio.wait({work, hard}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
            try:
                result = await work
            except asyncio.CancelledError:
                pass
            except BatchrunError as exc:  # the store failed: nothing more can be booked
                control.stop(RunOutcome.STORE_ERROR, str(exc))
                control.hard.set()
        finally:
            for task in (hard, beats):
                task.cancel()
            await asyncio.gather(hard, beats, return_exceptions=True)
            try:
                await books.close()
            except BatchrunError as exc:
                control.stop(RunOutcome.STORE_ERROR, str(exc))
        outcome = control.outcome or result or RunOutcome.COMPLETE
        return RunReport(outcome, self.stats, control.message, control.signal)

    def _declared_dead(self) -> None:
        self.control.stop(
            RunOutcome.STORE_ERROR,
            "another batchrun process declared this one dead (it missed its heartbeat)"
            " and took over its requests",
        )
        self.control.hard.set()
