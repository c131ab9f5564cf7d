"""``batchrun report``: the timeline queries, the page in a real headless browser, the command.

One job is run once for the whole module, in-process against the simulator with injected 429s,
500s, billed-then-lost replies and requests the API refuses, so every chart has something to
show; a second job in the same database stopped at its cap before sending anything.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from runner.cli import main
from runner.htmlreport import CHARTS, cell_text, render
from runner.money import format_money, format_usd, usd_to_pico
from runner.settings import Retry
from runner.simulator import SimConfig, SimulatorThread
from runner.store import open_store
from runner.store.timeline import MAX_BUCKETS, PERCENTILES, choose_buckets

from .browser import chromium_page, find_chromium
from .helpers import query, run_in_process
from .test_store_faults import _read_only_folder

MODELS = ("gpt-4o-mini", "gpt-4.1-nano")


def _write_job(path: Path, n: int, tag: str) -> None:
    """Chat requests for two models and embeddings; every 25th is one the API refuses (400)."""
    lines = []
    for i in range(n):
        text = f"{tag} question {i}: where is my order and when will it arrive?"
        if i % 25 == 7:
            text = "__sim_400__ " + text
        if i % 3 == 2:
            url, body = "/v1/embeddings", {"model": "text-embedding-3-small", "input": text}
        else:
            url = "/v1/chat/completions"
            body = {"model": MODELS[i % 2], "max_completion_tokens": 16,
                    "messages": [{"role": "user", "content": text}]}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": url,
                                 "body": body}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Job 1 ran with faults of every kind; job 2 stopped at its cap with nothing sent."""
    folder = tmp_path_factory.mktemp("report")
    db, full, empty = folder / "run.db", folder / "full.jsonl", folder / "empty.jsonl"
    _write_job(full, 120, "full")
    _write_job(empty, 5, "empty")
    config = SimConfig(
        p_429=0.1, p_500=0.08, p_reset_after_bill=0.03, p_429_retry_ms=40, latency_ms=15,
        latency_jitter=0.9, seed=12,
    )  # fmt: skip
    retry = Retry(max_attempts=2, backoff_base=0.01, backoff_max=0.05)
    with SimulatorThread(config) as sim:
        ran = asyncio.run(run_in_process(full, db, sim.base_url, retry=retry))
        assert ran.exit_code == 1, ran.message  # the refused rows failed; the rest are done
        stopped = asyncio.run(run_in_process(empty, db, sim.base_url, cap="0.000000001"))
        assert stopped.exit_code == 3, stopped.message
    kinds = dict(query(db, "SELECT kind, COUNT(*) FROM ledger GROUP BY kind"))
    assert kinds.get("unknown"), "no billed-then-lost reply: the spend chart would lack one"
    pauses = query(db, "SELECT COUNT(*) FROM events WHERE kind = 'rate_limit_pause'")[0][0]
    assert pauses, "no rate-limit pause: nothing to mark on the throughput chart"
    return db


def _cli(*args: str | Path) -> Result:
    """The ``batchrun`` command, in-process."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    # Anything but SystemExit would have been a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _status_json(db: Path) -> dict[int, dict[str, Any]]:
    """What ``batchrun status --json`` prints, by job id."""
    out = _cli("status", "--db", db, "--json")
    assert out.exit_code == 0, out.stderr
    return {job["job"]: job for job in json.loads(out.stdout)["jobs"]}


def _nearest_rank(values: list[int], p: int) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


# -- the timeline ---------------------------------------------------------------------------------


def test_bucket_widths_read_well_cover_the_span_and_stay_few() -> None:
    for first, span in [(0.0, 0.0), (1_756_000_000.123, 3.4), (1_756_000_017.5, 8 * 3600.0),
                        (1_756_000_000.0, 86_400 * 3.0), (0.0, 86_400 * 400.0)]:  # fmt: skip
        b = choose_buckets(first, first + span)
        assert b.count <= MAX_BUCKETS
        assert b.start <= first and b.end > first + span
        assert math.isclose(b.start / b.width, round(b.start / b.width), abs_tol=1e-6)
        if b.width > 0.1:  # a narrower readable width would need too many buckets
            assert span / (b.width / 2.5) > MAX_BUCKETS - 2 or b.width >= 86_400


def _bucket(b: Any, at: float) -> int:
    """The oracle: the same bucket rule as the SQL, in Python."""
    width_ms = max(1, round(b.width * 1000))
    return min(max(math.floor((at - b.start) * 1000) // width_ms, 0), b.count - 1)


def test_the_timeline_adds_up_to_the_rows_it_buckets(db: Path) -> None:
    store = open_store(db, readonly=True)
    try:
        t, status = store.timeline(1), store.status(1)
    finally:
        store.close()
    b = t.buckets
    assert b is not None and 1 < b.count <= MAX_BUCKETS
    # Spend: every ledger row in its bucket; the whole is the job's settled spend.
    spent, unknown = [0] * b.count, [0] * b.count
    for at, kind, amount in query(db, "SELECT at, kind, amount_pico FROM ledger WHERE job_id = 1"):
        spent[_bucket(b, at)] += amount
        unknown[_bucket(b, at)] += amount if kind == "unknown" else 0
    assert (t.spent_pico, t.unknown_pico) == (spent, unknown)
    assert sum(t.spent_pico) == status.spend.settled_pico
    # Attempts and errors by kind, by when they started.
    rows = query(
        db,
        "SELECT a.started_at, a.latency_ms, a.error_kind FROM attempts a "
        "JOIN requests r ON r.id = a.request_id WHERE r.job_id = 1",
    )
    sent = [0] * b.count
    errors: dict[str, list[int]] = defaultdict(lambda: [0] * b.count)
    latencies: dict[int, list[int]] = defaultdict(list)
    for at, ms, kind in rows:
        sent[_bucket(b, at)] += 1
        if kind is None:
            latencies[_bucket(b, at)].append(ms)
        else:
            errors[kind][_bucket(b, at)] += 1
    assert t.attempts == sent
    assert t.errors == dict(errors) and {"rate_limit", "server"} <= set(t.errors)
    # Latency percentiles (nearest rank), per bucket and over the whole job.
    for i in range(b.count):
        want = {p: _nearest_rank(latencies[i], p) for p in PERCENTILES} if latencies[i] else None
        assert t.latency[i] == want, i
    everything = [ms for found in latencies.values() for ms in found]
    assert t.latency_overall is not None and t.latency_overall.count == len(everything)
    assert t.latency_overall.values == {p: _nearest_rank(everything, p) for p in PERCENTILES}
    assert t.latency_overall.max == max(everything)
    # Requests finished, and their tokens.
    done, failed, tokens = [0] * b.count, [0] * b.count, [0] * b.count
    for at, state, used in query(
        db,
        "SELECT s.finished_at, r.state, s.prompt_tokens + s.completion_tokens FROM results s "
        "JOIN requests r ON r.id = s.request_id WHERE r.job_id = 1",
    ):
        (done if state == "done" else failed)[_bucket(b, at)] += 1
        tokens[_bucket(b, at)] += used
    assert (t.done, t.failed, t.tokens) == (done, failed, tokens)
    assert sum(t.done) == status.states["done"] and sum(t.failed) == status.states["failed"]
    # Rate-limit pauses, as intervals that cover every recorded pause.
    pauses = query(db, "SELECT at, seconds FROM events WHERE kind = 'rate_limit_pause'")
    spans = t.periods["rate_limited"]
    assert spans and t.periods["unreachable"] == []
    assert all(any(s <= at and at + sec <= e + 1e-6 for s, e in spans) for at, sec in pauses)
    assert all(e1 < s2 for (_s1, e1), (s2, _e2) in itertools.pairwise(spans))


def test_latency_leaves_out_what_came_back_through_the_batch_api(db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    with sqlite3.connect(copy) as conn:  # as if these had come back from a batch
        conn.execute(
            "UPDATE results SET flags = 'batch' WHERE request_id IN "
            "(SELECT id FROM requests WHERE job_id = 1 AND state = 'done' ORDER BY seq LIMIT 10)"
        )
    answered = "SELECT COUNT(*) FROM attempts WHERE error_kind IS NULL AND request_id IN "
    moved = query(copy, answered + "(SELECT request_id FROM results WHERE flags = 'batch')")
    everything = query(copy, answered + "(SELECT id FROM requests WHERE job_id = 1)")
    store = open_store(copy, readonly=True)
    try:
        t = store.timeline(1)
    finally:
        store.close()
    assert t.latency_overall is not None
    assert t.latency_overall.count == everything[0][0] - moved[0][0] < everything[0][0]


def test_a_job_with_nothing_sent_has_an_empty_timeline_and_still_renders(db: Path) -> None:
    store = open_store(db, readonly=True)
    try:
        t, status = store.timeline(2), store.status(2)
    finally:
        store.close()
    assert t.buckets is None and t.latency_overall is None
    page = render(status, t, db=str(db), generated_at=0.0)
    assert all(f'id="{div_id}"' in page for div_id, _heading in CHARTS)
    assert page.count("nothing sent yet") >= 2


def test_text_from_the_job_cannot_break_out_of_the_page(db: Path) -> None:
    store = open_store(db, readonly=True)
    try:
        t, status = store.timeline(1), store.status(1)
    finally:
        store.close()
    evil = "</script><script>alert(1)</script><!--"
    status.job = type(status.job)(**{**_fields(status.job), "path": evil})
    status.by_model[evil] = dict(next(iter(status.by_model.values())))
    page = render(status, t, db=evil, generated_at=0.0)
    assert evil not in page and "<script>alert(1)" not in page


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


# -- the page, in a browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    found, why = find_chromium()
    if found is None:
        pytest.skip(f"no headless Chromium: {why}")
    return found


_INSPECT = """
(async () => {
  const ids = %s;
  const drawn = (id) => {
    const el = document.getElementById(id);
    return el && el._fullLayout && el.querySelector('svg.main-svg');
  };
  for (let i = 0; i < 200 && !ids.every(drawn); i++) {
    await new Promise((ok) => setTimeout(ok, 25));
  }
  const chart = (id) => {
    const el = document.getElementById(id);
    if (!el) return null;
    const marks = [...el.querySelectorAll('.cartesianlayer .trace path')]
      .filter((p) => (p.getAttribute('d') || '').length > 4).length;
    return {
      svg: el.querySelectorAll('svg.main-svg').length,
      marks: marks,
      shapes: el.querySelectorAll('.shapelayer path').length,
      title: el._fullLayout ? el._fullLayout.title.text : null,
      layoutShapes: (el.layout.shapes || []).map((s) => s.name),
      data: (el.data || []).map((d) => ({name: d.name, x: d.x, y: d.y, customdata: d.customdata})),
    };
  };
  const text = (el) => (el ? el.textContent.trim() : null);
  return {
    charts: Object.fromEntries(ids.map((id) => [id, chart(id)])),
    headline: JSON.parse(document.getElementById('headline').textContent),
    table: [...document.querySelectorAll('#headline-table tr')]
      .map((tr) => [tr.dataset.key, text(tr.querySelector('td'))]),
    cards: Object.fromEntries([...document.querySelectorAll('.card')].map((c) => [
      c.dataset.card, text(c.querySelector('.big')) + ' | ' + text(c.querySelector('.small')),
    ])),
  };
})()
""" % json.dumps([div_id for div_id, _heading in CHARTS])  # noqa: UP031 - braces in the JS


def _flatten(value: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, item in value.items():
        if isinstance(item, dict) and item:
            yield from _flatten(item, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", item


def _report(db: Path, out: Path, *args: str) -> Result:
    return _cli("report", "--db", db, "-o", out, *args)


async def test_the_report_opens_offline_with_every_chart_and_the_numbers_of_status_json(
    db: Path, chromium: str, tmp_path: Path
) -> None:
    page_file, empty_file = tmp_path / "report.html", tmp_path / "empty.html"
    made = _report(db, page_file, "--job", "1")
    assert made.exit_code == 0 and made.stderr == "", made.stderr
    assert made.stdout.startswith(f"wrote {page_file}: the report of job 1 ")
    assert _report(db, empty_file).exit_code == 0  # default: the most recent job (2)
    statuses = _status_json(db)
    status = statuses[1]
    latencies = [ms for (ms,) in query(
        db, "SELECT a.latency_ms FROM attempts a JOIN requests r ON r.id = a.request_id "
        "WHERE r.job_id = 1 AND a.error_kind IS NULL")]  # fmt: skip

    async with chromium_page(chromium) as browser:
        page = await browser.open(page_file.as_uri())
        seen = await browser.evaluate(_INSPECT)
        assert page.problems() == []
        assert page.requests == [page_file.as_uri()]  # nothing fetched but the file itself

        # Every chart drawn, with marks in it.
        charts = seen["charts"]
        for div_id, _heading in CHARTS:
            assert charts[div_id] and charts[div_id]["svg"] >= 1, div_id
            assert charts[div_id]["marks"] > 0, div_id
        # Rate-limited periods marked on the throughput chart.
        throughput = charts["chart-throughput"]
        assert {"429s", "paused for rate limits"} <= set(throughput["layoutShapes"])
        assert throughput["shapes"] >= len(throughput["layoutShapes"]) > 0

        # The headline numbers: embedded as JSON, and shown, exactly as `status --json`.
        assert seen["headline"] == status
        assert seen["table"] == [[key, cell_text(value)] for key, value in _flatten(status)]
        spent = usd_to_pico(status["spent_usd"])
        cap = usd_to_pico(status["cap_usd"])
        assert seen["cards"]["spent"] == f"{format_usd(spent)} | of cap {format_money(cap)}"
        states = status["by_state"]
        assert seen["cards"]["requests"].startswith(
            f"{states['done']:,} done | {states['failed']:,} failed"
        )
        assert seen["cards"]["tokens"].startswith(f"{status['input_tokens']:,} in")
        p = {q: _nearest_rank(latencies, q) for q in PERCENTILES}
        assert seen["cards"]["latency"] == f"p50 {p[50]:,} ms | p90 {p[90]:,} ms · p99 {p[99]:,} ms"

        # The charts agree with those numbers.
        traces = {div_id: {d["name"]: d for d in chart["data"]} for div_id, chart in charts.items()}
        spend = traces["chart-spend"]
        assert spend["spent (settled)"]["customdata"][-1] == format_usd(spent)
        assert spend["spent (settled)"]["y"][-1] == pytest.approx(spent / 1e12, rel=1e-12)
        unknown = usd_to_pico(status["unknown_outcome_usd"])
        assert spend["of which unknown outcomes (worst case)"]["customdata"][-1] == format_usd(
            unknown
        )
        assert f"cap {format_usd(cap)}" in spend
        [cost] = traces["chart-cost"].values()
        assert set(cost["y"]) == {*MODELS, "text-embedding-3-small", "(unknown outcomes)"}
        assert sum(cost["x"]) == pytest.approx(spent / 1e12, rel=1e-9)
        flows = traces["chart-throughput"]
        assert sum(flows["requests done /s"]["customdata"]) == states["done"]
        assert sum(flows["requests failed /s"]["customdata"]) == states["failed"]
        assert sum(flows["tokens /min"]["customdata"]) == (
            status["input_tokens"] + status["output_tokens"]
        )
        errors = {k: sum(d["y"]) for k, d in traces["chart-errors"].items()}
        assert errors == {
            k.removeprefix("attempts: "): n
            for k, n in status["errors"].items()
            if k.startswith("attempts: ")
        }
        assert f"p50 {p[50]:,} ms" in charts["chart-latency"]["title"]

        # The job that never sent anything: the same charts, empty, and its own numbers.
        page = await browser.open(empty_file.as_uri())
        seen = await browser.evaluate(_INSPECT)
        assert page.problems() == []
        assert page.requests == [empty_file.as_uri()]
        assert all(seen["charts"][div_id]["svg"] >= 1 for div_id, _heading in CHARTS)
        assert seen["headline"] == statuses[2]


# -- the command ----------------------------------------------------------------------------------


def _clean_failure(out: Result, says: str) -> None:
    assert out.exit_code == 2, (out.stdout, out.stderr)
    assert says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""


def test_the_report_never_overwrites_the_database(db: Path) -> None:
    before = db.read_bytes()
    for target in (db, db.with_name(db.name + "-wal"), db.parent / "." / db.name):
        _clean_failure(_report(db, target), "that is the database itself")
    assert db.read_bytes() == before


def test_a_missing_folder_or_job_is_a_clear_error(db: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no such folder" / "report.html"
    _clean_failure(_report(db, missing), f"no such folder {missing.parent}")
    _clean_failure(_report(db, tmp_path / "r.html", "--job", "9"), "no job 9")
    assert not (tmp_path / "r.html").exists()
    _clean_failure(_report(db, tmp_path), "is a directory")


def test_a_read_only_destination_is_a_clear_error_and_leaves_nothing(
    db: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "report.html").write_text("yesterday's report")
    with _read_only_folder(folder):
        _clean_failure(_report(db, folder / "report.html"), "cannot write")
    assert [p.name for p in folder.iterdir()] == ["report.html"]
    assert (folder / "report.html").read_text() == "yesterday's report"
    # Writable again: the old report is replaced whole.
    assert _report(db, folder / "report.html").exit_code == 0
    assert (folder / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in folder.iterdir()] == ["report.html"]


def test_no_command_but_report_imports_the_charting_library(db: Path) -> None:
    code = (
        "import sys\n"
        "from runner.cli import main\n"
        f"for args in (['status', '--db', {str(db)!r}], ['export', '--db', {str(db)!r}],"
        " ['price', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'plotly'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


async def test_a_batch_jobs_report_draws_its_batches_not_request_rates(
    tmp_path: Path, chromium: str
) -> None:
    """Issue 21, point 3: each batch's statuses and completed counts over time from the polls,
    cost by lane against the sync price of the same work, the batches as a table; no rates
    computed from the download times of their results."""
    from runner.settings import Batching

    from .helpers import run_in_process
    from .jobgen import write_job

    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 120)
    with SimulatorThread(SimConfig(batch_lines_per_s=60)) as sim:
        ran = await run_in_process(
            job, db, sim.base_url, via="batch",
            batching=Batching(requests_per_batch=60, poll_first=0.05, poll_interval=0.2),
        )  # fmt: skip
    assert ran.status.states == {"done": 120}
    page_file = tmp_path / "report.html"
    assert _report(db, page_file).exit_code == 0
    text = page_file.read_text()
    assert 'id="chart-batches"' in text and 'id="chart-throughput"' not in text
    assert 'data-card="by lane"' in text and 'class="records"' in text  # the batches table
    ids = [d for d, _ in CHARTS if d != "chart-throughput"] + ["chart-batches"]
    script = _INSPECT.replace(json.dumps([d for d, _ in CHARTS]), json.dumps(ids))
    async with chromium_page(chromium) as browser:
        page = await browser.open(page_file.as_uri())
        seen = await browser.evaluate(script)
        assert page.problems() == []
        batches = seen["charts"]["chart-batches"]
        assert batches["svg"] >= 1 and batches["marks"] > 0
        names = {d["name"] for d in batches["data"]}
        assert {"completed"} <= names and sum(n.endswith(": completed") for n in names) == 2
        # Each batch was seen before it completed (its first status) and at the end.
        firsts = [d for d in batches["data"] if d["name"] not in ("completed",)]
        assert any(d["name"] in ("validating", "in_progress") for d in firsts)
        assert "2 batch(es): 120 of 120 requests completed" in batches["title"]
        assert seen["cards"]["by lane"].startswith(f"{format_usd(ran.status.spend.settled_pico)}")
