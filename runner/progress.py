"""Progress of a running job: a tqdm bar on a terminal, plain log lines otherwise.

It samples the engine's counters on a timer instead of being told about every result, so a run
of 500 requests/s does not pay for 500 redraws a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TextIO

from tqdm import tqdm

from .engine import RunStats
from .money import format_usd


class Progress:
    """Shows ``stats`` until :meth:`close`; ``done_before`` counts results of earlier runs."""

    def __init__(
        self,
        stats: RunStats,
        total: int,
        done_before: int,
        quiet: bool = False,
        stream: TextIO | None = None,
        log_every: float = 10.0,
    ) -> None:
        self.stats = stats
        self.total = total
        self.done_before = done_before
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.log_every = log_every
        self._bar: tqdm | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_log = 0.0

    def start(self) -> None:
        if self.quiet:
            return
        if self.tty:
            self._bar = tqdm(
                total=self.total,
                initial=self.done_before,
                file=self.stream,
                unit="req",
                dynamic_ncols=True,
                smoothing=0.1,
            )
        self._task = asyncio.create_task(self._tick())

    def _finished(self) -> int:
        return self.done_before + self.stats.done + self.stats.failed

    def line(self) -> str:
        s = self.stats
        minutes = max(time.monotonic() - s.started, 1e-9) / 60
        tpm = (s.input_tokens + s.output_tokens) / minutes
        spend = f"{format_usd(s.settled_pico, 4)}+{format_usd(s.reserved_pico, 4)} reserved"
        return (
            f"spend {spend} / cap {format_usd(s.cap_pico, 2)}, {tpm:,.0f} tok/min, "
            f"{s.retries} retries, {s.rate_limited} rate-limited, {s.failed} failed"
        )

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.refresh()

    def _notices(self) -> None:
        notices = self.stats.notices
        while notices:
            text = f"batchrun: {notices.popleft()}"
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            elif not self.quiet:
                print(text, file=self.stream, flush=True)

    def refresh(self) -> None:
        self._notices()
        if self._bar is not None:
            self._bar.n = self._finished()
            self._bar.set_postfix_str(self.line(), refresh=False)
            self._bar.refresh()
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last_log >= self.log_every:
                self._last_log = now
                done = f"{self._finished():,}/{self.total:,} done"
                print(f"batchrun: {done}, {self.line()}", file=self.stream, flush=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bar is not None:
            self.refresh()
            self._bar.close()
        elif not self.quiet:
            self._last_log = 0.0  # a log always ends with where the run stopped
            self.refresh()
