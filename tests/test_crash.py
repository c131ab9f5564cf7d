"""kill -9 at random moments, then resume: the real ``batchrun run`` against the real simulator.

Whatever moment a run dies at (importing, recovering, reserving, sending, committing), resuming
must end with exactly one result per custom_id, never send a request whose result was committed,
keep the recorded spend at or above what the server billed (a request in flight at the kill stays
counted at its reservation until its fate is known), and never let billing pass the cap.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from runner.plan import price_job
from runner.pricing import load_price_table
from runner.simulator import SimulatorThread

from .books import (
    BillsByBody,
    assert_consistent,
    assert_covers_bill,
    body_digest,
    books,
    rows,
    scalar,
    wait_quiet,
    watch_bills,
)
from .helpers import BATCHRUN, batchrun_env, export_rows, write_job

SimFactory = Callable[..., SimulatorThread]

REQUESTS = 1200
KILLS = 10
# Latency and faults on: every kind of retry (and of unknown outcome) happens between kills.
FAULTS = {
    "latency_ms": 50,
    "latency_jitter": 0.5,
    "p_429": 0.03,
    "p_429_retry_ms": 20,
    "p_500": 0.02,
    "p_reset": 0.01,
    "p_reset_after_bill": 0.01,
    "p_invalid_json": 0.01,
    "p_html": 0.01,
    "p_slow": 0.005,
    "slow_s": 0.6,
}


def _run_args(job: Path, db: Path, sim: SimulatorThread, cap: str, *extra: str) -> list[str]:
    return [
        BATCHRUN, "run", str(job), "--db", str(db), "--cap", cap, "--base-url", sim.base_url,
        "--quiet", "--timeout", "0.4", "--max-attempts", "40",
        "--backoff-base", "0.01", "--backoff-max", "0.1", *extra,
    ]  # fmt: skip


def _kill_sometime(
    proc: subprocess.Popen[bytes],
    sim: SimulatorThread,
    received: int,
    rng: random.Random,
    anywhere: bool,
) -> bytes | None:
    """SIGKILL ``proc`` at a random moment: ``anywhere`` 0.2-1.5 s after it started (start-up,
    import, recovery and sending alike), else 0.02-0.25 s after its first request reached the
    server (mid-run, with requests in flight and results waiting to be committed).

    Returns its stderr if it exited on its own first, None if it was killed."""
    if not anywhere:
        deadline = time.monotonic() + 15
        while (
            sim.ledger_snapshot()["requests_received"] == received
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
    try:
        _, err = proc.communicate(
            timeout=rng.uniform(0.2, 1.5) if anywhere else rng.uniform(0.02, 0.25)
        )
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        return None
    return err


def _run_to_the_end(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run without a kill: a killed runner on this host is taken over at once."""
    return subprocess.run(args, env=batchrun_env(), capture_output=True, text=True, timeout=120)


def _committed_bills(db: Path, bills: BillsByBody) -> dict[bytes, int]:
    """Times billed so far for every request whose result is committed."""
    return {
        (d := body_digest(body)): bills.times.get(d, 0)
        for (body,) in rows(db, "SELECT body FROM requests WHERE state = 'done'")
    }


def _check(
    db: Path,
    sim: SimulatorThread,
    bills: BillsByBody,
    cap_pico: int,
    committed: dict[bytes, int],
    where: str,
) -> None:
    """Every invariant that must hold between runs, whatever the last one died doing."""
    if not db.exists() or not rows(db, "SELECT 1 FROM sqlite_master WHERE name = 'requests'"):
        assert sim.ledger_snapshot()["requests_received"] == 0, where
        return
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    # Billing never passes the cap. (The books may: a kill before the group commit leaves a
    # settled request's reservation in place while its freed room was already re-reserved, and
    # recovery charges both at worst case. Over-reporting is the safe side.)
    billed = sim.ledger_snapshot()["billed_pico"]
    assert billed <= cap_pico, (where, billed, cap_pico)
    # No request whose result was committed was sent (and billed) again.
    again = [d for d, n in committed.items() if bills.times.get(d, 0) != n]
    assert not again, f"{where}: {len(again)} committed request(s) were billed again"


def test_kill_9_at_random_moments_then_resume_keeps_every_invariant(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    seed = int(os.environ.get("BATCHRUN_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    sim = make_simulator(seed=seed, **FAULTS)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, REQUESTS, seed=seed, max_tokens=64)
    worst = price_job(job, load_price_table()).total.worst_pico
    # Room for every kill to leave its reservations charged at worst case, and the job to finish.
    cap_pico = 2 * worst
    cap = str(Decimal(cap_pico) / 10**12)
    committed: dict[bytes, int] = {}
    kills = mid_run = 0
    for run_no in range(KILLS * 3):
        if kills >= KILLS:
            break
        received = sim.ledger_snapshot()["requests_received"]
        proc = subprocess.Popen(
            _run_args(job, db, sim, cap),
            env=batchrun_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        err = _kill_sometime(proc, sim, received, rng, anywhere=run_no % 4 == 0)
        if err is None:
            kills += 1
            mid_run += sim.ledger_snapshot()["requests_received"] > received
        else:
            raise AssertionError(
                f"run {run_no} ended on its own with exit {proc.returncode} "
                f"after {kills} kills (seed {seed}): {err.decode()}"
            )
        wait_quiet(sim)
        where = f"after run {run_no} (kill {kills}, seed {seed})"
        _check(db, sim, bills, cap_pico, committed, where)
        if db.exists() and rows(db, "SELECT 1 FROM sqlite_master WHERE name = 'requests'"):
            committed.update(
                {d: n for d, n in _committed_bills(db, bills).items() if d not in committed}
            )
    print(
        f"seed {seed}: {run_no} runs, {kills} kills, {mid_run} while sending; "
        f"{books(db).done} of {REQUESTS} done before the final run"
    )
    assert kills >= KILLS
    assert mid_run >= KILLS // 2, f"only {mid_run} kills landed while requests were sent"
    assert books(db).done < REQUESTS, f"the job was finished before the last kill (seed {seed})"

    # The final resume completes the job.
    final = _run_to_the_end(_run_args(job, db, sim, cap))
    assert final.returncode == 0, final.stderr
    wait_quiet(sim)
    _check(db, sim, bills, cap_pico, committed, f"after the final run (seed {seed})")
    b = books(db)
    assert (b.done, b.reserved, b.pending, b.failed) == (REQUESTS, 0, 0, 0)
    assert scalar(db, "SELECT COUNT(*) FROM results") == REQUESTS
    assert sim.ledger_snapshot()["billed_pico"] <= min(b.ledger_pico, cap_pico)
    # Every request was billed at least once, and its result costs exactly what the server
    # billed for one attempt of it (the simulator bills a body the same every time).
    for body, cost in rows(
        db, "SELECT r.body, s.cost_pico FROM requests r JOIN results s ON s.request_id = r.id"
    ):
        d = body_digest(body)
        assert bills.times.get(d, 0) >= 1
        assert cost * bills.times[d] == bills.pico[d], (body, cost, bills.pico[d])
    exported = export_rows(db)
    assert [r["custom_id"] for r in exported] == [f"req-{i:06d}" for i in range(REQUESTS)]
    assert all(r["response"]["status_code"] == 200 for r in exported)


def test_kills_and_resumes_never_let_billing_pass_the_cap(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    seed = int(os.environ.get("BATCHRUN_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    sim = make_simulator(
        seed=seed,
        latency_ms=30,
        latency_jitter=0.5,
        p_reset_after_bill=0.02,
        p_invalid_json=0.02,
        p_500=0.02,
    )
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=seed, max_tokens=64)
    worst = price_job(job, load_price_table()).total.worst_pico
    cap_pico = worst * 2 // 5  # the actual cost is about 60% of the worst case: the cap binds
    cap = str(Decimal(cap_pico) / 10**12)
    committed: dict[bytes, int] = {}
    kills = 0
    while kills < 4:
        received = sim.ledger_snapshot()["requests_received"]
        proc = subprocess.Popen(
            _run_args(job, db, sim, cap),
            env=batchrun_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        err = _kill_sometime(proc, sim, received, rng, anywhere=False)
        if err is not None:  # it reached the cap before the kill
            assert proc.returncode == 3 and kills > 0, f"exit {proc.returncode}: {err.decode()}"
            break
        kills += 1
        wait_quiet(sim)
        _check(db, sim, bills, cap_pico, committed, f"after kill {kills} (seed {seed})")
        committed.update(
            {d: n for d, n in _committed_bills(db, bills).items() if d not in committed}
        )
    final = _run_to_the_end(_run_args(job, db, sim, cap))
    assert final.returncode == 3, final.stderr
    assert "spend cap" in final.stderr
    wait_quiet(sim)
    _check(db, sim, bills, cap_pico, committed, f"after the capped run (seed {seed})")
    b = books(db)
    assert b.reserved == 0 and b.pending > 0
    assert sim.ledger_snapshot()["billed_pico"] <= min(b.ledger_pico, cap_pico)


def test_a_kill_right_after_a_lost_reply_leaves_every_billed_attempt_recorded(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    """A reply lost after the server billed it (connection reset mid-body) is charged at worst
    case; that charge must be durable before the request is sent (and billed) again, or a kill
    between the retry and the next group commit leaves a billed attempt out of the books."""
    sim = make_simulator(p_reset_after_bill=1.0)  # every attempt is billed and its reply lost
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 1, max_tokens=1)  # actual cost == worst case: no slack to hide a shortfall
    proc = subprocess.Popen(
        _run_args(
            job,
            db,
            sim,
            "1",
            "--concurrency",
            "1",
            "--max-attempts",
            "100000",
            "--backoff-base",
            "0",
            "--backoff-max",
            "0",
        ),
        env=batchrun_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while sim.ledger_snapshot()["requests_billed"] < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_quiet(sim)
    assert sim.ledger_snapshot()["requests_billed"] >= 40
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
