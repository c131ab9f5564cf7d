"""How fast batchrun starts: `price` on a 1,000-request job, and `run` from process start to its
first request (a fresh import, and a resume), each against the bare cost of starting Python and
of importing the ``openai`` client, measured in the same run.

Goal (issue "Seams before growth"): first request within 0.5 s of process start, and `price`
answering within 0.5 s, on this machine.

Usage: python bench/startup_bench.py [--repeat 5] [--requests 1000]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from _common import (
    PYTHON,
    Simulator,
    batchrun_exe,
    bench_env,
    git_commit,
    header,
    now_iso,
    run_cmd,
    table,
    workdir,
)
from make_job import write_job


def _wall(cmd: list[str]) -> float:
    result = run_cmd(cmd, env=bench_env())
    if result.rc != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({result.rc}): {result.stderr.strip()[-500:]}")
    return result.wall


def _first_request(job: Path, db: Path, sim: Simulator) -> float:
    """Seconds from starting `batchrun run` to its first request leaving (attempts.started_at
    is the wall clock at send, in the run's own process)."""
    started = time.time()
    _wall([batchrun_exe(), "run", str(job), "--db", str(db), "--cap", "100", "--base-url",
           sim.base_url, "--quiet", "--yes"])  # fmt: skip
    with sqlite3.connect(db) as conn:
        first = conn.execute(
            "SELECT MIN(started_at) FROM attempts WHERE started_at >= ?", (started,)
        ).fetchone()[0]
    return float(first) - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    header("startup")
    rows = []
    with workdir(False, "startup") as tmp, Simulator() as sim:
        job = tmp / "job.jsonl"
        write_job(job, args.requests, seed=1)
        python = [_wall([PYTHON, "-c", "pass"]) for _ in range(args.repeat)]
        openai = [_wall([PYTHON, "-c", "import openai"]) for _ in range(args.repeat)]
        price = [_wall([batchrun_exe(), "price", str(job)]) for _ in range(args.repeat)]
        fresh, resume = [], []
        for i in range(args.repeat):
            db = tmp / f"fresh{i}.db"
            fresh.append(_first_request(job, db, sim))
            with sqlite3.connect(db) as conn:  # queue everything again: a resume sends it all
                conn.execute("DELETE FROM results")
                conn.execute("UPDATE requests SET state = 'pending'")
                conn.execute("UPDATE jobs SET settled_pico = 0")
                conn.execute("DELETE FROM ledger")
            resume.append(_first_request(job, db, sim))
        for name, values in (
            ("python -c pass", python),
            ("python -c 'import openai'", openai),
            (f"batchrun price ({args.requests:,} requests)", price),
            ("run: start -> first request (import)", fresh),
            ("run: start -> first request (resume)", resume),
        ):
            med = statistics.median(values)
            rows.append(
                (
                    name,
                    f"{med:.3f}",
                    f"{min(values):.3f}",
                    f"{med / statistics.median(python):.1f}x",
                )
            )
    print(table(rows, ("what", "median s", "best s", "vs python start")))
    print(f"\n{now_iso()} commit {git_commit()}: python bench/startup_bench.py "
          f"--repeat {args.repeat} --requests {args.requests}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
