"""``--via auto --deadline``: cost and finish time against all-sync and all-batch, over
simulated Batch API delays (fast, 2 lines/s, typical, stuck).

    .venv/bin/python bench/deadline_bench.py            # 2,000 requests, ~7 min
    .venv/bin/python bench/deadline_bench.py --requests 500 --quick
    .venv/bin/python bench/deadline_bench.py --requests 500 --rpm 200 --sweep 120s,240s

Each row is one in-process run (``runner.run_with``) against the simulator on a thread, on a
fresh database: the simulator's ledger gives what was billed (in all, and by batch), and
whether any body was billed twice; the job's books are compared with the bill. The sync API is
limited to --rpm (the run is told the same limit). Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runner import run_with  # noqa: E402
from runner.money import usd_to_pico  # noqa: E402
from runner.settings import (  # noqa: E402
    Batching,
    Deadline,
    Limits,
    Retry,
    RunSettings,
    Stopping,
    Transport,
)
from runner.simulator import SimulatorThread  # noqa: E402
from runner.simulator.config import SimConfig  # noqa: E402
from tests.jobgen import write_job  # noqa: E402

DELAYS: dict[str, dict[str, Any]] = {
    "fast": {"batch_lines_per_s": 50_000.0},
    "2 lines/s": {"batch_shared_lines_per_s": 2.0},
    "typical": {
        "batch_queue_s": 20.0,
        "batch_queue_dist": "exponential",
        "batch_shared_lines_per_s": 40.0,
    },
    "stuck": {"batch_p_stuck": 1.0},
}


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + (" + uncommitted" if dirty else "")


def one(
    job: Path, delay: str, via: str, deadline: str | None, rpm: int, limit_s: float, seed: int
) -> dict[str, Any]:
    flex = via == "auto+flex"  # gpt-4o-mini marked flex-capable: the tail goes flex first
    sim = SimulatorThread(SimConfig(rpm=rpm, seed=seed, batch_finalize_s=1.0, **DELAYS[delay]))
    sim.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.db"
            prices = None
            if flex:
                prices = Path(tmp) / "flex.toml"
                prices.write_text('[models."gpt-4o-mini"]\nflex = true\n')
            settings = RunSettings(
                prices=prices,
                cap_pico=usd_to_pico("100"),
                jobfile=job,
                db=str(db),
                quiet=True,
                via="auto" if flex else via,
                limits=Limits(rpm=rpm),
                retry=Retry(max_attempts=20),
                transport=Transport(base_url=sim.base_url),
                stopping=Stopping(grace=5.0),
                batching=Batching(poll_first=0.5, poll_interval=2.0),
                # The simulator cancels a batch in 1 s (batch_finalize_s): the plan is told
                # so (a real Batch API: --deadline-cancel's default, up to ~10 minutes).
                deadline=Deadline(
                    spec=deadline, margin=0.05, slack=3.0, cancel=2.0, flex_latency=2.0
                ),
            )
            stop = asyncio.Event()

            async def go() -> Any:
                loop = asyncio.get_running_loop()
                loop.call_later(limit_s, stop.set)
                return await run_with(settings, echo=lambda _t: None, api_key="sk-bench", stop=stop)

            start = time.monotonic()
            result = asyncio.run(go())
            took = time.monotonic() - start
            with sqlite3.connect(db) as conn:
                books = conn.execute("SELECT COALESCE(SUM(amount_pico), 0) FROM ledger").fetchone()
                done = conn.execute("SELECT COUNT(*) FROM requests WHERE state = 'done'").fetchone()
        ledger = sim.ledger_snapshot()
    finally:
        sim.stop()
    return {
        "delay": delay,
        "via": via + (f" --deadline {deadline}" if deadline else ""),
        "outcome": result.outcome.value,
        "done": done[0],
        "seconds": took,
        "billed": ledger["billed_pico"],
        "batch_billed": ledger["batch_billed_pico"],
        "batch_lines": ledger["batch_lines_billed"],
        "duplicates": ledger["duplicate_bodies"],
        "books_eq_bill": books[0] == ledger["billed_pico"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="auto rows only")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--sweep",
        metavar="DEADLINES",
        help="instead of the fixed rows: all-sync, then --via auto at each of these deadlines "
        "(comma-separated) against each delay",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.jsonl"
        write_job(job, args.requests, seed=7)
        runs: list[tuple[str, str, str | None, float]] = [
            ("fast", "sync", None, 300),  # all-sync: the delay does not matter
            ("fast", "auto", "120s", 300),
            ("2 lines/s", "auto", "90s", 300),
            ("typical", "auto", "120s", 300),
            ("stuck", "auto", "90s", 300),
            ("stuck", "auto+flex", "90s", 300),  # the flex lane: stuck batches, flex tail
            ("2 lines/s", "auto+flex", "90s", 300),
        ]
        if args.sweep:
            runs = [("fast", "sync", None, 900)]
            for delay in ("fast", "typical", "2 lines/s", "stuck"):
                runs += [(delay, "auto", d, 900) for d in args.sweep.split(",")]
        elif not args.quick:
            runs += [
                ("fast", "batch", None, 300),
                ("typical", "batch", None, 300),
                ("stuck", "batch", None, 60),  # stopped: a stuck batch never finishes
            ]
        rows = []
        for delay, via, deadline, limit in runs:
            row = one(job, delay, via, deadline, args.rpm, limit, seed=1)
            rows.append(row)
            print(row, flush=True)
    sync = next(r["billed"] for r in rows if r["via"] == "sync")
    lines = [
        "",
        f"## `--via auto --deadline` against all-sync and all-batch ({dt.date.today()})",
        "",
        f"Commit {commit()}; `.venv/bin/python bench/deadline_bench.py"
        + (f" --requests {args.requests}" if args.requests != 2000 else "")
        + (f" --rpm {args.rpm}" if args.rpm != 1000 else "")
        + (" --quick" if args.quick else "")
        + (f" --sweep {args.sweep}" if args.sweep else "")
        + f"`. {args.requests:,} chat requests (gpt-4o-mini), the sync API limited to "
        f"{args.rpm:,} RPM (the run told the same), deadline margin 5% + 3 s, cancelling "
        "planned at 2 s (the simulator cancels in 1 s), the simulator on a thread of the same "
        "process; auto+flex = gpt-4o-mini marked flex-capable by a price file (flex answers "
        "planned at 2 s). Delays: fast = 50,000 lines/s per batch; 2 lines/s "
        "= across all open batches; typical = an exponential queue delay (mean 20 s), then 40 "
        "lines/s across open batches; stuck = batches never progress. Cost is the simulator's "
        "bill; x sync = over the all-sync run's bill.",
        "",
        "| delay | via | outcome | done | finished (s) | billed | x sync | by batch (lines) "
        "| billed twice | books == bill |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['delay']} | {r['via']} | {r['outcome']} | {r['done']:,} | "
            f"{r['seconds']:.1f} | ${r['billed'] / 1e12:.6f} | {r['billed'] / sync:.3f} | "
            f"${r['batch_billed'] / 1e12:.6f} ({r['batch_lines']:,}) | {r['duplicates']} | "
            f"{'yes' if r['books_eq_bill'] else 'NO'} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with (REPO / "bench" / "RESULTS.md").open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
