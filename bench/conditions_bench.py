"""Throughput under real conditions (issue "No retry storms..."): three cases, each against its
own simulator process, with batchrun's elapsed time set against a baseline measured in the same
run.

- exhausted: the key's RPM limit is used up by another client before the run starts; the
  simulator counts rejected requests against the limit and sends retry-after. Baseline: the
  least time the limit allows for the job from an empty bucket. Goal: <= 1.3x, few 429s after
  the first pause.
- slow: every response takes 2 s, under a 6,000 RPM limit. Baseline: the least time the limit
  allows (and, for comparison, batchrun held to 32 in flight, its old default). Goal:
  >= 80 requests/s (the cookbook's parallel processor: 47 req/s).
- sporadic: 5% 429s (with headroom), 5% 500s and 1% connection resets under a 3,000 RPM limit.
  Baseline: the same job on a fault-free simulator. Goal: <= 1.5x (the cookbook script: 4.3 s).

Usage: python bench/conditions_bench.py [--quick] [--case exhausted,slow,sporadic]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    Simulator,
    bench_env,
    git_commit,
    header,
    now_iso,
    run_args,
    run_cmd,
    shown,
    table,
    workdir,
)
from make_job import write_job


def _spend_limit(sim: Simulator, n: int) -> None:
    """Another client on the same key sends ``n`` requests at once."""
    import aiohttp

    async def burst() -> None:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> None:
                body = {"model": "gpt-4o-mini", "max_tokens": 1,
                        "messages": [{"role": "user", "content": f"other {i}"}]}  # fmt: skip
                async with session.post(f"{sim.base_url}/chat/completions", json=body) as r:
                    await r.read()

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(burst())


def _rate_limited(sim: Simulator) -> int:
    return int(sim.ledger()["rate_limited"])


def _run(job: Path, db: Path, sim: Simulator, *extra: str, **kw: Any) -> tuple[float, str]:
    cmd = [*run_args(job, db, sim.base_url, **kw), *extra]
    result = run_cmd(cmd, env=bench_env())
    if result.rc != 0:
        raise RuntimeError(f"batchrun failed ({result.rc}): {result.stderr[-800:]}")
    return result.wall, shown(cmd)


def exhausted(tmp: Path, quick: bool) -> list[tuple[Any, ...]]:
    rpm, n = (600, 100) if quick else (120, 100)
    job = tmp / "exhausted.jsonl"
    write_job(job, n, seed=1, max_tokens=8)
    least = n / (rpm / 60)  # from an empty bucket: n requests at the limit's rate
    with Simulator(rpm=rpm) as sim:
        _spend_limit(sim, rpm)
        before = _rate_limited(sim)
        wall, cmd = _run(job, tmp / "exhausted.db", sim, "--max-attempts", "1")
        after = _rate_limited(sim) - before
        billed = sim.ledger()["requests_billed"] - rpm
    return [("exhausted", f"{n} req at RPM {rpm}, limit used up", f"{least:.1f}",
             f"{wall:.1f}", f"{wall / least:.2f}x", "<= 1.3x", f"{after} 429s, {billed} billed",
             cmd)]  # fmt: skip


def slow(tmp: Path, quick: bool) -> list[tuple[Any, ...]]:
    n = 600 if quick else 2000
    job = tmp / "slow.jsonl"
    write_job(job, n, seed=2, max_tokens=8)
    rows = []
    for label, extra in (("adaptive (default)", ()), ("--concurrency 32", ("--concurrency", "32"))):
        with Simulator(rpm=6000, latency_ms=2000) as sim:
            wall, cmd = _run(job, tmp / f"slow{len(rows)}.db", sim, *extra)
        rows.append(("slow", f"{n} req, 2 s each, RPM 6,000, {label}", "-", f"{wall:.1f}",
                     f"{n / wall:.1f} req/s", ">= 80 req/s", "", cmd))  # fmt: skip
    return rows


def sporadic(tmp: Path, quick: bool) -> list[tuple[Any, ...]]:
    n = 600 if quick else 2000
    job = tmp / "sporadic.jsonl"
    write_job(job, n, seed=3, max_tokens=8)
    with Simulator(rpm=3000) as sim:
        clean, _ = _run(job, tmp / "clean.db", sim)
    with Simulator(rpm=3000, p_429=0.05, p_500=0.05, p_reset=0.01, seed=3) as sim:
        wall, cmd = _run(job, tmp / "faulty.db", sim)
        counts = sim.ledger()["status_counts"]
    faults = (
        f"{counts.get('429', 0)} 429s, {counts.get('500', 0)} 500s, {counts.get('reset', 0)} resets"
    )
    return [("sporadic", f"{n} req, RPM 3,000, 5% 429 + 5% 500 + 1% reset", f"{clean:.1f}",
             f"{wall:.1f}", f"{wall / clean:.2f}x", "<= 1.5x", faults, cmd)]  # fmt: skip


CASES = {"exhausted": exhausted, "slow": slow, "sporadic": sporadic}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller jobs, higher limits")
    parser.add_argument("--case", default=",".join(CASES), help="comma list of cases")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    header("conditions")
    rows: list[tuple[Any, ...]] = []
    started = time.monotonic()
    with workdir(False, "conditions") as tmp:
        for name in args.case.split(","):
            rows += CASES[name.strip()](tmp, args.quick)
    headers = ("case", "setting", "baseline s", "batchrun s", "ratio", "goal", "notes")
    print(table([r[:-1] for r in rows], headers))
    print()
    for r in rows:
        print(f"{r[0]}: {r[-1]}")
    print(f"\n{now_iso()} commit {git_commit()}, {time.monotonic() - started:.0f} s: "
          f"python bench/conditions_bench.py{' --quick' if args.quick else ''}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([list(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
