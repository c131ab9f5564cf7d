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


def _busy(monkeypatch: pytest.MonkeyPatch) -> Progress:
    """A line with every field at its widest: big counts, a rate, retries, a pause."""
    bar, stats, clock = _run(monkeypatch, total=1_250_000)
    stats.cap_pico = usd_to_pico("12500")
    for second in range(3):
        clock.now = 1000.0 + second
        stats.done = 400_000 + 37 * second
        stats.output_tokens = 1_000_000 * second
        bar._sample()
    stats.failed, stats.retries, stats.rate_limited = 12_345, 67_890, 123_456
    stats.settled_pico = usd_to_pico("4321.98")
    stats.paused_for = 42.0
    stats.projected = (usd_to_pico("9000"), usd_to_pico("8500"), usd_to_pico("9600"))
    return bar


@pytest.mark.parametrize("width", [40, 60, 80, 100, 140])
def test_the_line_fits_every_width_dropping_fields_in_order_spend_and_cap_last(
    monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    bar = _busy(monkeypatch)
    full = bar.line()
    assert len(full) > 140  # every width below drops something
    assert "projected $9,000.00 ($8,500.00-$9,600.00)" in full
    line = bar.line(width)
    assert len(line) <= width
    assert "$4,321.98 of $12,500.00" in line  # the spend and the cap stay
    if width >= 60:  # at 40 these huge counts go too, before the spend and the cap
        assert "12,345 failed" in line and "412,419/1,250,000" in line
    order = [
        "rate-limited", "retries", "tok/min", "ok,", "req/s", "projected", "paused", "ETA",
        "failed", "/",
    ]  # fmt: skip
    kept = [piece in line for piece in order]
    assert kept == sorted(kept), f"a field went before one that drops first: {line!r}"
    # A wider terminal never shows less.
    wider = bar.line(width + 20)
    assert all(piece in wider for piece, k in zip(order, kept, strict=True) if k)


def test_below_what_the_counts_and_spend_need_the_line_is_cut_not_wrapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bar = _busy(monkeypatch)
    assert len(bar.line(20)) == 20


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


@pytest.mark.parametrize("columns", [40, 60, 80, 100, 140])
async def test_the_bar_and_its_line_never_wrap_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    """Drawn by tqdm on a terminal of ``columns``: every redraw fits in one row."""
    import os
    import shutil

    monkeypatch.setattr(
        shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((columns, 24))
    )
    bar = _busy(monkeypatch)
    screen = _Terminal()
    bar.stream, bar.tty = screen, True
    bar.start()
    bar.refresh()
    await bar.close()
    redraws = [r for r in re.split(r"[\r\n]", screen.getvalue()) if r.strip()]
    visible = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", row) for row in redraws]
    assert any("of $12,500.00" in row for row in visible)  # the line was drawn
    for row in visible:
        assert len(row) < columns, row


def test_before_any_rate_is_seen_the_eta_comes_from_the_limits_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server whose headers allow 1 request per minute: not "ETA ?" but the limit's time."""
    bar, stats, _ = _run(monkeypatch, total=400)
    assert "ETA ?" in bar.line()
    stats.limit_rate = 1 / 60
    assert "ETA 6:40:00 at the limit" in bar.line()
    screen = io.StringIO()
    bar.stream = screen
    bar.refresh()
    bar.refresh()
    said = screen.getvalue()
    assert said.count("the rate limits allow 1 request(s) per minute") == 1
    assert "the 400 request(s) left take at least 6:40:00" in said


def test_a_batch_run_counts_what_its_batches_report_and_when_it_polls_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bar, stats, clock = _run(monkeypatch, total=400)
    stats.open_batches, stats.batch_completed = 2, 150
    stats.in_flight = 400
    stats.next_poll = clock.now + 30
    line = bar.line()
    assert "150 completed in 2 open batch(es), next poll in 0:30" in line
    assert "req/s" not in line and "tok/min" not in line and "retries" not in line
    assert bar._finished() == 150  # the bar moves with the batches' own counts
