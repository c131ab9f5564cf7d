"""Progress of a running job, and of reading a large job file: a tqdm bar on a terminal,
timestamped log lines otherwise.

A run's progress samples the engine's counters on a timer instead of being told about every
result, so a run of 500 requests/s does not pay for 500 redraws a second. Rate, ETA and
tokens/min come from a recent window, not the whole run: a run that slowed down says so at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import stat
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, TextIO

from .durations import clock
from .money import format_money, format_range

if TYPE_CHECKING:  # asyncio, tqdm and the engine load with a run, not with `price`
    import asyncio

    from tqdm import tqdm

    from .engine import RunStats

WINDOW = 45.0  # seconds of samples behind the rate, the ETA and tokens/min
NARROW = 80  # columns: below this the bar is dropped, never the spend, the cap or the failures


# Which fields of the progress line go first when the terminal is too narrow for all of them.
_DROP_ORDER = (
    "limited", "retries", "tokens", "ok", "speed", "projected", "paused", "batches", "eta",
    "spend:short", "failed", "done",
)  # fmt: skip
_SLOW_LIMIT = 600.0  # seconds: a run the limits hold to at least this long is told so
_BAR = 22  # columns the bar takes in front of the line ("{bar:20}| ")


def _join(fields: dict[str, str], shown: list[str]) -> str:
    """The line from the fields still shown: "39/100 (8 ok, 31 failed), 3.1 req/s, ..."."""
    head = fields["done"] if "done" in shown else ""
    inner = [fields[k] for k in ("ok", "failed") if k in shown]
    if head and inner:
        head = f"{head} ({', '.join(inner)})"
    elif inner:
        head = ", ".join(inner)
    rest = [fields[k] for k in shown if k not in ("done", "ok", "failed")]
    return ", ".join(p for p in (head, *rest) if p)


class Progress:
    """Shows ``stats`` until :meth:`close`; ``finished_before`` counts results of earlier runs."""

    def __init__(
        self,
        stats: RunStats,
        total: int,
        finished_before: int,
        quiet: bool = False,
        stream: TextIO | None = None,
        log_every: float = 10.0,
    ) -> None:
        self.stats = stats
        self.total = total
        self.before = finished_before
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.log_every = log_every
        self._bar: tqdm | None = None
        self._narrow = False  # the terminal was too narrow for a bar when the run started
        self._limit_said = False
        self._task: asyncio.Task[None] | None = None
        self._last_log = 0.0
        self._samples: deque[tuple[float, int, int]] = deque()

    # -- numbers --------------------------------------------------------------------------------

    def _finished(self) -> int:
        """Results recorded, and what open batches report completed (the bar moves with the
        batches' own counts, not only when a batch ends)."""
        s = self.stats
        return self.before + s.done + s.failed + s.batch_completed

    def _sample(self) -> None:
        now = time.monotonic()
        s = self.stats
        self._samples.append((now, s.done + s.failed, s.input_tokens + s.output_tokens))
        while len(self._samples) > 2 and self._samples[1][0] < now - WINDOW:
            self._samples.popleft()

    def rates(self) -> tuple[float | None, float | None]:
        """(requests/s, tokens/min) over the recent window; None until there is one."""
        if len(self._samples) < 2:
            return None, None
        (t0, n0, k0), (t1, n1, k1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0:
            return None, None
        return (n1 - n0) / (t1 - t0), (k1 - k0) / (t1 - t0) * 60

    def _eta(self, left: int, rate: float | None) -> str:
        """From the rate seen; before there is one (or while it is nil), from what the rate
        limits allow, and said so."""
        if rate:
            return f"ETA {clock(left / rate)}"
        limit = self.stats.limit_rate
        if limit:
            return f"ETA {clock(left / limit)} at the limit"
        return "ETA ?"

    def _batches(self) -> str:
        """Batch API: what the open batches say they have completed (their results are
        recorded when a batch ends), how many are open, and when the next poll is."""
        s = self.stats
        if not s.open_batches:
            return ""
        text = f"{s.batch_completed:,} completed in {s.open_batches:,} open batch(es)"
        if s.next_poll is not None:
            text += f", next poll in {clock(max(0.0, s.next_poll - time.monotonic()))}"
        return text

    def _projected(self) -> str:
        p = self.stats.projected
        if p is None:
            return ""
        total, low, high = p
        return f"projected {format_range(total, low, high)}"

    def _say_limit(self) -> None:
        """Once: what the rate limits make of the time left, when they make it long."""
        limit = self.stats.limit_rate
        if self._limit_said or not limit:
            return
        self._limit_said = True
        left = self.total - self._finished()
        if left / limit >= _SLOW_LIMIT:
            per_minute = limit * 60
            self.say(
                f"batchrun: the rate limits allow {per_minute:,.4g} request(s) per minute: the "
                f"{left:,} request(s) left take at least {clock(left / limit)}"
            )

    def line(self, width: int | None = None) -> str:
        """What the run is doing, in one line of at most ``width`` characters: below the width
        it needs, fields drop in ``_DROP_ORDER`` (the counts, the failures, the spend and the
        cap last), and a line that still does not fit is cut, so it never wraps."""
        s = self.stats
        rate, tpm = self.rates()
        left = self.total - self._finished()
        fields = {
            "done": f"{self.before + s.done + s.failed:,}/{self.total:,}",
            "ok": f"{s.done:,} ok",
            "failed": f"{s.failed:,} failed",
            "batches": self._batches(),
            "speed": f"{rate:,.1f} req/s" if rate is not None else "- req/s",
            "eta": self._eta(left, rate),
            "spend": f"spend {format_money(s.settled_pico)} of {format_money(s.cap_pico)}",
            "projected": self._projected(),
            "tokens": f"{tpm:,.0f} tok/min" if tpm is not None else "- tok/min",
            "retries": f"{s.retries:,} retries",
            "limited": f"{s.rate_limited:,} rate-limited",
            "paused": f"paused {s.paused_for:.0f}s" if s.paused_for > 0 else "",
        }
        if s.open_batches and not rate:
            # Only batches are out: request rates, tokens per minute and retries say nothing.
            for name in ("speed", "tokens", "retries", "limited"):
                fields[name] = ""
        shown = [k for k in fields if fields[k]]
        text = _join(fields, shown)
        if width is None:
            return text
        for name in _DROP_ORDER:
            if len(text) <= width:
                return text
            if name == "spend:short":
                fields["spend"] = fields["spend"].removeprefix("spend ")
            elif name in shown:
                shown.remove(name)
            text = _join(fields, shown)
        return text[: max(width, 0)]

    # -- output ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.quiet:
            return
        self._sample()
        if self.tty:
            from tqdm import tqdm

            width = shutil.get_terminal_size((100, 24)).columns
            narrow = self._narrow = width < NARROW
            self._bar = tqdm(
                total=self.total,
                initial=self.before,
                file=self.stream,
                dynamic_ncols=not narrow,
                ncols=width,
                bar_format="{desc}" if narrow else "{bar:20}| {desc}",
            )
        import asyncio

        self._task = asyncio.create_task(self._tick())

    def say(self, text: str) -> None:
        """A message for the user, printed at once above the bar (even when quiet)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    async def _tick(self) -> None:
        import asyncio  # a run has it loaded already; `price` never does

        while True:
            await asyncio.sleep(0.5)
            self.refresh()

    def refresh(self) -> None:
        self._sample()
        notices = self.stats.notices
        while notices:
            self.say(f"batchrun: {notices.popleft()}")
        if not self.quiet:
            self._say_limit()
        if self._bar is not None:
            width = shutil.get_terminal_size((100, 24)).columns
            # The last column is left free (a terminal may wrap at it), and the bar's own.
            room = width - 1 - (0 if self._narrow else _BAR)
            self._bar.n = self._finished()
            self._bar.set_description_str(self.line(room), refresh=False)
            self._bar.refresh()
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last_log >= self.log_every:
                self._last_log = now
                stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                print(f"{stamp} batchrun: {self.line()}", file=self.stream, flush=True)

    async def close(self) -> None:
        import asyncio

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bar is not None:
            self.refresh()
            self._bar.close()
        elif not self.quiet and self._task is not None:
            self._last_log = 0.0  # a log always ends with where the run stopped
            self.refresh()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Reading:
    """Progress of reading a job file (pricing, importing) on standard error, as a
    ``plan.ReadProgress``: nothing for a file read within ``after`` seconds; then a bar on a
    terminal, or a log line every ``log_every`` seconds. :meth:`close` clears the bar."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        after: float = 1.0,
        log_every: float = 10.0,
    ) -> None:
        self.path = os.fspath(path)
        try:  # standard input and pipes have no size: then no percentage
            st = os.stat(path)
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        except (OSError, ValueError):
            size = 0
        self.total = size or None
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.after = after
        self.log_every = log_every
        self._start = time.monotonic()
        self._last_log = self._start
        self._bar: tqdm | None = None
        self._narrow = False  # the terminal was too narrow for a bar when the run started
        self._limit_said = False

    def __call__(self, requests: int, nbytes: int) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._start < self.after:
            return
        if self.tty:
            read = f"{requests:,} requests"
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=self.total, initial=nbytes, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"reading {self.path}", postfix=read, file=self.stream, leave=False,
                    dynamic_ncols=True, mininterval=0.25,
                )  # fmt: skip
                return
            self._bar.set_postfix_str(read, refresh=False)
            self._bar.update(nbytes - self._bar.n)
        elif now - self._last_log >= self.log_every:
            self._last_log = now
            stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
            done = _size(nbytes)
            if self.total:
                done += f" of {_size(self.total)} ({min(nbytes / self.total, 1):.0%})"
            print(
                f"{stamp} batchrun: reading {self.path}: {done}, {requests:,} requests",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
