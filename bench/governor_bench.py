"""Governor efficiency: how close ``batchrun run`` gets to the least time the rate limits allow.

    /tmp/venv/bin/python bench/governor_bench.py            # full: 6,000 requests, ~10 min
    /tmp/venv/bin/python bench/governor_bench.py --quick    # 1,200 requests at 600 RPM, ~6 min

The simulator (its own process) enforces RPM/TPM buckets that start full, answers after a
jittered latency and sends the real ``x-ratelimit-*`` headers. Two jobs: short prompts, so the
requests bucket binds (RPM-bound), and long prompts with large output limits, so the tokens
bucket binds (TPM-bound). Each runs twice: limits given (``--rpm/--tpm``) and limits learned
from the headers. Figures per run:

- elapsed / minimum, where minimum = max((N - RPM) / (RPM/60), (W - TPM) / (TPM/60)) and W is
  the counted tokens (input + output limit) from ``batchrun price --json``: the buckets start
  full, so one minute's worth may go at once. Elapsed is the run phase (first attempt started
  to last result, from the db); the whole command (import and pricing included) is shown too.
- the share of requests that met a 429 (distinct requests with a 429 attempt in the db; the
  simulator's ledger count of 429 responses is shown beside it);
- the longest stall: the longest gap between consecutive completions (``results.finished_at``).

Goals: RPM-bound <= 1.05x, TPM-bound <= 1.03x, < 0.5% of requests meeting a 429.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    Simulator,
    bench_env,
    guarded,
    header,
    price_totals,
    read_timeline,
    run_args,
    run_cmd,
    shown,
    table,
    verdict,
    workdir,
    write_json,
)
from make_job import write_job

GOAL_RATIO = {"rpm": 1.05, "tpm": 1.03}
GOAL_429_SHARE = 0.005


@dataclass(frozen=True, slots=True)
class Case:
    """One job shape: which bucket it is meant to be bound by, and how it is made."""

    name: str  # "rpm" or "tpm"
    requests: int
    prompt_words: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Setting:
    """Limits and service time of the simulated account."""

    rpm: int
    tpm: int
    latency_ms: float
    jitter: float
    cases: tuple[Case, ...]


FULL = Setting(
    rpm=3000,
    tpm=1_000_000,
    latency_ms=150,
    jitter=0.3,
    cases=(
        Case("rpm", 6000, prompt_words=10, max_tokens=16),  # ~57 tokens: W/TPM 0.35 << N/RPM 2
        Case("tpm", 6000, prompt_words=290, max_tokens=300),  # ~350 + 300: W/TPM ~3.9
    ),
)
QUICK = Setting(
    rpm=600,
    tpm=200_000,
    latency_ms=150,
    jitter=0.3,
    cases=(
        Case("rpm", 1200, prompt_words=10, max_tokens=16),
        Case("tpm", 1200, prompt_words=170, max_tokens=200),  # ~215 + 200: W/TPM ~2.5
    ),
)


def minimum_seconds(n: int, weight: int, rpm: int, tpm: int) -> float:
    return max(max(0, n - rpm) / (rpm / 60), max(0, weight - tpm) / (tpm / 60))


def one_run(
    setting: Setting,
    case: Case,
    mode: str,
    job: Path,
    db: Path,
    weight: int,
    concurrency: int | None,
    seed: int,
) -> dict[str, Any]:
    """One ``batchrun run`` against a fresh simulator (full buckets, empty ledger)."""
    minimum = minimum_seconds(case.requests, weight, setting.rpm, setting.tpm)
    given = mode == "given"
    with Simulator(
        rpm=setting.rpm,
        tpm=setting.tpm,
        latency_ms=setting.latency_ms,
        latency_jitter=setting.jitter,
        seed=seed,
    ) as sim:
        cmd = run_args(
            job,
            db,
            sim.base_url,
            rpm=setting.rpm if given else None,
            tpm=setting.tpm if given else None,
            concurrency=concurrency,
        )
        print(f"  [{case.name}/{mode}] simulator: {sim.command()}")
        print(f"  [{case.name}/{mode}] {shown(cmd)}", flush=True)
        r = run_cmd(cmd, env=bench_env(), timeout=3 * minimum + 300)
        ledger = sim.ledger()
    tl = read_timeline(db)
    run_s = tl.run_seconds
    stall, stall_at = tl.longest_stall()
    row: dict[str, Any] = {
        "case": case.name,
        "mode": mode,
        "rc": r.rc,
        "requests": case.requests,
        "weight": weight,
        "minimum_s": minimum,
        "run_s": run_s,
        "wall_s": r.wall,
        "ratio_run": run_s / minimum if run_s and minimum else None,
        "ratio_wall": r.wall / minimum if minimum else None,
        "results": tl.results,
        "attempts": tl.attempts,
        "requests_429": tl.requests_429,
        "share_429": tl.requests_429 / case.requests,
        "ledger_received": ledger["requests_received"],
        "ledger_billed": ledger["requests_billed"],
        "ledger_429": ledger["rate_limited"],
        "status_counts": ledger["status_counts"],
        "stall_s": stall,
        "stall_at_s": stall_at,
        "cpu_s": r.cpu,
        "command": shown(cmd),
    }
    print(
        f"  [{case.name}/{mode}] exit {r.rc}: run {run_s or 0:.1f} s = "
        f"{row['ratio_run'] or 0:.3f} x minimum, {tl.requests_429} requests met a 429, "
        f"longest stall {stall:.2f} s",
        flush=True,
    )
    if r.rc != 0 or ledger["requests_billed"] != case.requests:
        row["problem"] = (
            f"exit {r.rc}, {ledger['requests_billed']} billed of {case.requests}; "
            f"stderr tail: {r.stderr.strip()[-600:]}"
        )
        print(f"  !! PROBLEM: {row['problem']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,200 requests at 600 RPM / 200k TPM")
    p.add_argument("--cases", default="rpm,tpm", help="comma list of rpm,tpm")
    p.add_argument("--modes", default="given,learned", help="comma list of given,learned")
    p.add_argument("--repeat", type=int, default=1, help="runs per case and mode (median shown)")
    p.add_argument("--concurrency", type=int, help="batchrun --concurrency (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="simulator latency-jitter seed")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep job files and databases")
    args = p.parse_args(argv)
    setting = QUICK if args.quick else FULL
    wanted = set(args.cases.split(","))
    modes = [m for m in ("given", "learned") if m in args.modes.split(",")]
    header("governor efficiency" + (" (quick)" if args.quick else ""))
    print(
        f"simulator: {setting.rpm:,} RPM, {setting.tpm:,} TPM, latency "
        f"{setting.latency_ms:.0f} ms +-{setting.jitter:.0%}"
    )
    rows: list[dict[str, Any]] = []
    with guarded(), workdir(args.keep, "batchrun-govbench-") as tmp:
        for case in setting.cases:
            if case.name not in wanted:
                continue
            job = tmp / f"{case.name}.jsonl"
            write_job(
                job,
                case.requests,
                seed=7,
                prompt_words=case.prompt_words,
                max_tokens=case.max_tokens,
            )
            totals, _ = price_totals(job)
            weight = totals["input_tokens"] + totals["output_limit_tokens"]
            print(
                f"{case.name}-bound job: {case.requests:,} requests, "
                f"{totals['input_tokens'] / case.requests:.0f} input tokens + "
                f"{case.max_tokens} output limit each, W = {weight:,} counted tokens; minimum "
                f"{minimum_seconds(case.requests, weight, setting.rpm, setting.tpm):.1f} s"
            )
            for k in range(args.repeat):
                for mode in modes:
                    db = tmp / f"{case.name}-{mode}-{k}.db"
                    rows.append(
                        one_run(
                            setting, case, mode, job, db, weight, args.concurrency, args.seed + k
                        )
                    )
    print()
    print(
        table(
            [
                (
                    f"{r['case']}-bound",
                    r["mode"],
                    r["rc"],
                    r["minimum_s"],
                    r["run_s"],
                    r["ratio_run"],
                    r["wall_s"],
                    r["ratio_wall"],
                    f"{100 * r['share_429']:.2f}%",
                    r["ledger_429"],
                    r["stall_s"],
                    r["stall_at_s"],
                    r["cpu_s"],
                )
                for r in rows
            ],
            [
                "case",
                "limits",
                "exit",
                "min s",
                "run s",
                "run/min",
                "cmd s",
                "cmd/min",
                "reqs w/429",
                "429s",
                "stall s",
                "stall at",
                "cpu s",
            ],
        )
    )
    print("\ngoals:")
    for r in rows:
        goal = GOAL_RATIO[r["case"]]
        print(
            f"  {r['case']}-bound, limits {r['mode']}: run/min {r['ratio_run']:.3f} "
            f"(goal <= {goal}) {verdict(r['ratio_run'], goal, False)}; "
            f"requests meeting a 429 {100 * r['share_429']:.2f}% (goal < "
            f"{100 * GOAL_429_SHARE:.1f}%) {verdict(r['share_429'], GOAL_429_SHARE, False)}"
        )
    problems = [r for r in rows if "problem" in r]
    for r in problems:
        print(f"PROBLEM {r['case']}/{r['mode']}: {r['problem']}\n  reproduce: {r['command']}")
    write_json(
        args.json,
        {
            "mode": "quick" if args.quick else "full",
            "rpm": setting.rpm,
            "tpm": setting.tpm,
            "runs": rows,
        },
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
