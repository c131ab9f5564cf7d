"""The group-commit writer: one runner's outcomes, committed in groups on a thread of its own.

Results, releases, attempts, charges and events are appended in memory (``out``) as they
happen; the writer commits them every ``Writer.interval`` seconds, or sooner when
``Writer.rows`` wait or a caller asks, so the event loop never waits on disk per result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import BatchrunError
from ..settings import Writer
from ..store import Outcomes, Spend, Store

T = TypeVar("T")


class GroupWriter:
    """Commits one runner's outcomes to the store in groups.

    ``on_commit`` sees the job's books after each commit; ``on_failure`` hears why the store
    could not be written (the writer stops: nothing more can be booked).
    """

    def __init__(
        self,
        store: Store,
        runner_id: int,
        settings: Writer,
        *,
        on_commit: Callable[[Spend], None],
        on_failure: Callable[[str], None],
    ) -> None:
        self.store = store
        self.runner_id = runner_id
        self.settings = settings
        self.out = Outcomes()  # what waits for the next commit
        self._on_commit = on_commit
        self._on_failure = on_failure
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-db")
        # Held while outcomes are being committed: a flush waits for a commit under way, so
        # "flushed" means durable (a crash test kills right after it).
        self._committing = asyncio.Lock()
        self._spend: Spend | None = None  # the books as the last commit left them
        self._now = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the writer's thread (after or before a commit, never during)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def wrote(self) -> None:
        """Rows were added to ``out``: commit early when enough wait."""
        if self.out.rows() >= self.settings.rows:
            self._now.set()

    def soon(self) -> None:
        """Commit at the next chance rather than at the next interval."""
        self._now.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.interval):
                    await self._now.wait()
            self._now.clear()
            try:
                await self.flush()
            except BatchrunError as exc:
                self._on_failure(str(exc))
                return

    async def flush(self) -> Spend | None:
        """Commit what is waiting: when this returns, everything recorded before the call is
        durable, also what a commit already under way had taken. The job's books as the store
        has them afterwards; None when there was nothing to commit."""
        waited = self._committing.locked()
        async with self._committing:
            if not self.out:
                return self._spend if waited else None
            out, self.out = self.out, Outcomes()
            spend = await self.call(self.store.record, self.runner_id, out)
            self._spend = spend
        self._on_commit(spend)
        return spend

    async def close(self) -> None:
        """Stop the loop and commit everything left (also after a hard stop)."""
        self._closing = True
        self._now.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.flush()
        finally:
            self._db.shutdown(wait=True)
