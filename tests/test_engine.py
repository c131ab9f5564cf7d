"""The run engine end to end: the real ``batchrun run`` against the real simulator over HTTP,
with a real SQLite file. The simulator's billing ledger is the independent check of the books."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from runner.simulator import SimulatorThread

from .helpers import batchrun, export_rows, query, write_job

SimFactory = Callable[..., SimulatorThread]


def ledger_total(db: Path) -> int:
    return query(db, "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger")[0][0]


def result_costs(db: Path) -> int:
    return query(db, "SELECT COALESCE(SUM(cost_pico), 0) FROM results")[0][0]


def billed(sim: SimulatorThread) -> int:
    return sim.ledger_snapshot()["billed_pico"]


def run(
    job: Path, db: Path, sim: SimulatorThread, *extra: str, cap: str = "100", **kw: Any
) -> subprocess.CompletedProcess[str]:
    return batchrun(
        "run", job, "--db", db, "--cap", cap, "--base-url", sim.base_url, "--quiet", *extra, **kw
    )


def test_a_2000_request_job_completes_with_books_equal_to_the_servers_bill(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2000, mix=("chat", "responses", "embeddings"), seed=1)
    out = run(job, db, sim, "--concurrency", "64")
    assert out.returncode == 0, out.stderr
    # exactly one result per custom_id
    rows = query(db, "SELECT r.custom_id, COUNT(s.request_id) FROM requests r "
                     "LEFT JOIN results s ON s.request_id = r.id GROUP BY r.id")
    assert len(rows) == 2000 and all(n == 1 for _, n in rows)
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 2000
    assert ledger["duplicate_bodies"] == 0
    assert result_costs(db) == ledger["billed_pico"] == ledger_total(db)
    exported = export_rows(db)
    ids = [json.loads(line)["custom_id"] for line in job.read_text().splitlines()]
    assert [r["custom_id"] for r in exported] == ids
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in exported)


def test_resuming_a_finished_job_sends_nothing(tmp_path: Path, make_simulator: SimFactory) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 50)
    assert run(job, db, sim).returncode == 0
    first = sim.ledger_snapshot()["requests_received"]
    again = run(job, db, sim)
    assert again.returncode == 0, again.stderr
    assert "resuming job 1" in again.stdout
    assert sim.ledger_snapshot()["requests_received"] == first


def test_the_same_content_under_another_path_is_the_same_job(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20)
    assert run(job, db, sim).returncode == 0
    moved = tmp_path / "moved.jsonl"
    job.rename(moved)
    again = run(moved, db, sim)
    assert again.returncode == 0 and "resuming job 1" in again.stdout
    assert query(db, "SELECT COUNT(*) FROM jobs") == [(1,)]


def test_a_job_over_its_cap_stops_with_exit_3_and_never_bills_past_the_cap(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5, latency_jitter=0.5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 600, max_tokens=64, seed=2)
    cap = "0.01"  # about a third of the worst case
    out = run(job, db, sim, "--concurrency", "64", cap=cap)
    assert out.returncode == 3, out.stderr
    assert "spend cap" in out.stderr
    cap_pico = int(Decimal(cap) * 10**12)
    assert 0 < billed(sim) <= cap_pico
    assert ledger_total(db) == billed(sim)  # no unknown outcomes here: books are exact
    done = query(db, "SELECT COUNT(*) FROM requests WHERE state = 'done'")[0][0]
    assert 0 < done < 600
    # A later run with a higher cap continues and never pays for a body twice.
    out = run(job, db, sim, "--concurrency", "64", cap="1")
    assert out.returncode == 0, out.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 600
    assert ledger["duplicate_bodies"] == 0
    assert ledger_total(db) == ledger["billed_pico"]


def test_a_request_bigger_than_the_whole_cap_is_never_sent(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 5, max_tokens=10_000)
    out = run(job, db, sim, cap="0.000001")
    assert out.returncode == 3
    assert sim.ledger_snapshot()["requests_received"] == 0
    assert "0 of 5 pending request(s) fit under the cap" in out.stdout


def test_injected_429s_500s_and_resets_are_retried_and_costs_stay_exact(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_429=0.3, p_500=0.05, p_reset=0.03, p_429_retry_ms=5, seed=7)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 1000, seed=3)
    out = run(job, db, sim, "--concurrency", "32", "--max-attempts", "20",
              "--backoff-base", "0.005", "--backoff-max", "0.05")
    assert out.returncode == 0, out.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["status_counts"].get("429", 0) > 200
    assert ledger["requests_billed"] == 1000
    # Every result's cost is exactly what the server billed for it...
    assert result_costs(db) == ledger["billed_pico"]
    # ...and resets (outcome unknown to the client) are charged on top: never under-reported.
    assert ledger_total(db) >= ledger["billed_pico"]
    attempts = query(db, "SELECT COUNT(*) FROM attempts")[0][0]
    assert attempts > 1300  # every attempt is recorded


def test_responses_billed_but_lost_are_charged_at_worst_case(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_reset_after_bill=0.1, p_invalid_json=0.05, seed=11)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=4)
    out = run(job, db, sim, "--max-attempts", "20", "--backoff-base", "0.005",
              "--backoff-max", "0.05")
    assert out.returncode == 0, out.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["duplicate_bodies"] > 0  # the server billed lost replies, then the retries
    assert ledger_total(db) >= ledger["billed_pico"]
    unknown = query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0]
    assert unknown >= ledger["duplicate_bodies"]


def test_rows_the_api_rejects_fail_with_its_message_and_the_rest_succeed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    lines = []
    for i in range(20):
        text = "__sim_400__ please" if i % 5 == 0 else f"question {i}"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                "max_tokens": 8}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))
    job.write_text("\n".join(lines) + "\n")
    out = run(job, db, sim)
    assert out.returncode == 1, out.stderr
    failed = query(db, "SELECT r.custom_id, s.status_code, s.error_message, r.attempts "
                       "FROM requests r JOIN results s ON s.request_id = r.id "
                       "WHERE r.state = 'failed' ORDER BY r.seq")
    assert [f[0] for f in failed] == ["r0", "r5", "r10", "r15"]
    assert all(f[1] == 400 and "maximum context length" in f[2] and f[3] == 1 for f in failed)
    exported = {r["custom_id"]: r for r in export_rows(db)}
    assert exported["r5"]["response"]["status_code"] == 400
    assert "error" in exported["r5"]["response"]["body"]
    assert exported["r1"]["response"]["status_code"] == 200


SENTINEL = "sk-SENTINEL-abcdefghijklmnop0123456789"


def test_a_rejected_key_stops_the_run_with_exit_4_and_is_never_printed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(api_key="sk-the-right-key-000000000000", latency_ms=20)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 500)
    started = time.monotonic()
    out = run(job, db, sim, "--concurrency", "16", key=SENTINEL)
    assert out.returncode == 4, out.stderr
    assert time.monotonic() - started < 10
    assert "API key" in out.stderr
    assert SENTINEL not in out.stdout + out.stderr
    assert SENTINEL.encode() not in db.read_bytes()
    assert sim.ledger_snapshot()["status_counts"].get("401", 0) <= 16 + 1


def test_exhausted_quota_stops_the_run_with_exit_4(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(quota_usd="0.001")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2000, max_tokens=64)
    started = time.monotonic()
    out = run(job, db, sim)
    assert out.returncode == 4, out.stderr
    assert time.monotonic() - started < 15
    assert "quota" in out.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] < 2000
    assert ledger_total(db) >= ledger["billed_pico"]


@pytest.mark.parametrize("give_limits", [True, False], ids=["flags", "learned-from-headers"])
def test_under_server_rate_limits_fewer_than_2_percent_of_requests_meet_a_429(
    tmp_path: Path, make_simulator: SimFactory, give_limits: bool
) -> None:
    rpm, tpm = 600, 60_000
    sim = make_simulator(rpm=rpm, tpm=tpm, latency_ms=10, latency_jitter=0.5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    # ~64 prompt + 16 output tokens: 700 requests need both buckets past their first minute.
    write_job(job, 700, prompt_words=45, max_tokens=16, seed=5)
    extra = ["--rpm", str(rpm), "--tpm", str(tpm)] if give_limits else []
    out = run(job, db, sim, "--concurrency", "32", *extra)
    assert out.returncode == 0, out.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 700
    assert ledger["rate_limited"] < 0.02 * 700, ledger
