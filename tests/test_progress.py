"""The progress line: rate and ETA from a recent window, ok and failed apart, narrow terminals."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from runner import progress
from runner.engine import RunStats
from runner.money import usd_to_pico
from runner.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _run(monkeypatch: pytest.MonkeyPatch, total: int) -> tuple[Progress, RunStats, _Clock]:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stats = RunStats(cap_pico=usd_to_pico("0.005"), settled_pico=usd_to_pico("0.0012"))
    return Progress(stats, total, 0, stream=io.StringIO()), stats, clock


def test_rate_and_eta_come_from_the_recent_window_not_the_whole_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20 req/s for a minute, then 10 req/s for a minute: the line says 10 and an ETA at 10,
    where the whole run's average (15 req/s) would promise the end too early."""
    bar, stats, clock = _run(monkeypatch, total=3000)
    for second in range(121):
        clock.now = 1000.0 + second
        stats.done = 20 * second if second <= 60 else 1200 + 10 * (second - 60)
        stats.output_tokens = 100 * stats.done
        bar._sample()
    rate, tokens_per_min = bar.rates()
    assert rate == pytest.approx(10.0) and tokens_per_min == pytest.approx(60_000.0)
    line = bar.line()
    assert "10.0 req/s" in line
    assert "ETA 2:00" in line  # 1,200 left at 10/s (at 15/s it would say 1:20)


def test_ok_and_failed_are_counted_apart_and_money_keeps_its_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bar, stats, _ = _run(monkeypatch, total=100)
    stats.done, stats.failed = 8, 31
    line = bar.line()
    assert line.startswith("39/100 (8 ok, 31 failed)")
    assert "spend $0.0012 of $0.005" in line  # never "$0.01"


def test_a_narrow_line_keeps_the_counts_failures_spend_and_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bar, stats, _ = _run(monkeypatch, total=100)
    stats.done, stats.failed = 8, 31
    line = bar.line(width=60)
    assert len(line) <= 60
    assert "39/100" in line and "31 failed" in line and "$0.0012 of $0.005" in line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _job(tmp_path: Path, n: int) -> Path:
    from .jobgen import write_job

    path = tmp_path / "job.jsonl"
    write_job(path, n)
    return path


def test_reading_a_large_job_shows_a_bar_of_bytes_and_requests_then_clears_it(
    tmp_path: Path,
) -> None:
    from runner.plan import price_job
    from runner.pricing import load_price_table
    from runner.progress import Reading

    path = _job(tmp_path, 20_000)
    screen = _Terminal()
    reading = Reading(path, stream=screen, after=0)
    plan = price_job(path, load_price_table(), reading)
    reading.close()
    assert plan.total.requests == 20_000
    shown = screen.getvalue()
    assert f"reading {path}:" in shown and "4,096 requests" in shown
    assert "%|" in shown  # a bar against the file's size
    assert shown.endswith("\r")  # cleared at the end: the price table takes its place


def test_reading_in_a_log_says_how_far_every_so_often_and_nothing_for_a_quick_file(
    tmp_path: Path,
) -> None:
    from runner.plan import price_job
    from runner.pricing import load_price_table
    from runner.progress import Reading

    path = _job(tmp_path, 9_000)
    size = path.stat().st_size
    log = io.StringIO()
    price_job(path, load_price_table(), Reading(path, stream=log, after=0, log_every=0))
    lines = log.getvalue().splitlines()
    assert len(lines) == 2  # one a chunk of 4,096 requests
    assert re.fullmatch(
        rf"\S+ batchrun: reading {re.escape(str(path))}: [\d.,]+ MiB of "
        rf"{size / 2**20:,.1f} MiB \(\d+%\), 8,192 requests",
        lines[-1],
    ), lines[-1]
    quiet = io.StringIO()
    price_job(path, load_price_table(), Reading(path, stream=quiet))  # read within a second
    assert quiet.getvalue() == ""
