"""Store: how many results per second the database takes, and how big it gets per request.

    /tmp/venv/bin/python bench/store_bench.py
    /tmp/venv/bin/python bench/store_bench.py --db /path/to/a/real/run.db   # size of that db

1. Write rate: ``runner.store.Store.record`` called directly, as the engine's writer does, on a
   real SQLite file (the store's own pragmas: WAL, synchronous=FULL), with batches of 1, 100
   and 1,000 outcomes. An outcome is what one successful request writes: an ``AttemptRecord``,
   a ``ResultRecord`` with a simulator-sized response body (its ledger charge and state update
   come with it). Each batch is one transaction; timing covers the calls only (the job import
   that creates the request rows is not timed). Reported: results/s and commits/s.
2. Size: bytes of database (after a checkpoint, -wal included) per request after a real
   ``batchrun run`` of short chat requests against the simulator (or of ``--db``), with a
   per-table split from SQLite's dbstat.

The engine needs at least its request rate in results/s (issue 3: >= 500/s); the writer groups
outcomes every 50 ms or 1,000 rows, so batch 100-1,000 is the regime that matters at speed.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    Simulator,
    bench_env,
    db_size,
    guarded,
    header,
    median,
    run_args,
    run_cmd,
    shown,
    table,
    workdir,
    write_json,
)
from make_job import write_job

from runner.store import AttemptRecord, NewRequest, Outcomes, RequestState, ResultRecord, open_store

# Rows written per batch size: enough for a steady figure, bounded in time (batch 1 pays an
# fsync per commit).
PLAN = {1: 2_000, 100: 20_000, 1000: 50_000}
_BODY = (
    '{"id": "chatcmpl-%024x", "object": "chat.completion", "created": 1795000000, '
    '"model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "message": {"role": '
    '"assistant", "content": "sim reply token batch alpha beta gamma delta", "refusal": null, '
    '"annotations": []}, "logprobs": null, "finish_reason": "stop"}], "usage": '
    '{"prompt_tokens": 43, "completion_tokens": 8, "total_tokens": 51, "prompt_tokens_details": '
    '{"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": '
    '0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}, '
    '"service_tier": "default", "system_fingerprint": "fp_simulator"}'
)
_REQUEST_BODY = (
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Classify the support '
    'ticket as billing, shipping, technical or other; answer in one word."},{"role":"user",'
    '"content":"#%d: my order refund was late again, please help"}],"max_completion_tokens":16}'
)


class _Totals:
    """Stands in for the planner's totals (``create_job`` reads five fields)."""

    requests = input_tokens = output_limit_tokens = floor_pico = worst_pico = 0


def _new_requests(n: int) -> Iterator[NewRequest]:
    for i in range(n):
        yield NewRequest(
            seq=i,
            line=i + 1,
            custom_id=f"req-{i:07d}",
            url="/v1/chat/completions",
            model="gpt-4o-mini",
            body=_REQUEST_BODY % i,
            input_tokens=43,
            output_limit=16,
            worst_pico=16_050_000,
            floor_pico=6_450_000,
            approximate=False,
        )


def write_rate(db: Path, batch: int, rows: int) -> dict[str, Any]:
    """Record ``rows`` outcomes in batches of ``batch`` on a fresh database."""
    store = open_store(db)
    try:
        job = store.create_job(
            str(db) + ".jsonl", f"{batch:064x}", 10**15, _new_requests(rows), _Totals()
        )
        runner = store.register_runner(job.id, "bench", 1, "sync", 3600)
        ids = [r.id for r in store.claim(runner, rows).requests]
        now = time.time()
        batches = []
        for start in range(0, rows, batch):
            att, res = [], []
            for rid in ids[start : start + batch]:
                att.append(AttemptRecord(rid, 1, now, 150, 200, None))
                res.append(
                    ResultRecord(
                        request_id=rid,
                        state=RequestState.DONE,
                        attempts=1,
                        status_code=200,
                        body=_BODY % rid,
                        response_model="gpt-4o-mini-2024-07-18",
                        api_request_id=f"req_{rid:024x}",
                        prompt_tokens=43,
                        cached_tokens=0,
                        completion_tokens=8,
                        reasoning_tokens=0,
                        cost_pico=11_250_000,
                        latency_ms=150,
                        finished_at=now,
                        reserved_pico=16_050_000,
                    )
                )
            batches.append((att, res))
        t0 = time.perf_counter()
        for att, res in batches:
            store.record(runner, Outcomes(attempts=att, results=res))
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    return {
        "batch": batch,
        "rows": rows,
        "seconds": elapsed,
        "results_per_s": rows / elapsed,
        "commits_per_s": len(batches) / elapsed,
        "ms_per_commit": 1000 * elapsed / len(batches),
    }


def real_run_size(tmp: Path, n: int) -> tuple[dict[str, int], int, str]:
    """Run ``batchrun run`` on ``n`` short chat requests and measure its database."""
    job, db = tmp / "size.jsonl", tmp / "size.db"
    write_job(job, n, seed=5, prompt_words=12, max_tokens=16)
    with Simulator() as sim:
        cmd = run_args(job, db, sim.base_url)
        r = run_cmd(cmd, env=bench_env(), timeout=900)
    if r.rc != 0:
        raise RuntimeError(f"batchrun run failed ({r.rc}): {r.stderr.strip()[-600:]}")
    return db_size(db), n, shown(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--db", type=Path, help="measure this run's database instead of making one")
    p.add_argument("--size-requests", type=int, default=20_000, help="requests of the real run")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the databases")
    args = p.parse_args(argv)
    header("store")
    runs: list[dict[str, Any]] = []
    with guarded(), workdir(args.keep, "batchrun-storebench-") as tmp:
        print(f"database files in {tmp} (filesystem of /tmp)")
        for k in range(args.repeat):
            for batch, rows in PLAN.items():
                row = write_rate(tmp / f"rate-{batch}-{k}.db", batch, rows)
                row["repeat"] = k
                runs.append(row)
                print(
                    f"  [{k + 1}/{args.repeat}] batch {batch:>5,}: {row['results_per_s']:>9,.0f}"
                    f" results/s, {row['ms_per_commit']:.2f} ms/commit",
                    flush=True,
                )
        if args.db is not None:
            con = sqlite3.connect(args.db)
            (n,) = con.execute("SELECT COUNT(*) FROM requests").fetchone()
            con.close()
            size, how = db_size(args.db), f"the given database {args.db}"
        else:
            size, n, cmd = real_run_size(tmp, args.size_requests)
            how = f"a real run: {cmd}"
    medians = {
        b: {
            key: median([r[key] for r in runs if r["batch"] == b])
            for key in ("results_per_s", "commits_per_s", "ms_per_commit")
        }
        for b in PLAN
    }
    print()
    print(
        table(
            [
                (b, PLAN[b], m["results_per_s"], m["commits_per_s"], m["ms_per_commit"])
                for b, m in medians.items()
            ],
            ["batch", "rows", "results/s", "commits/s", "ms/commit"],
        )
    )
    per_table = {k[6:]: v / n for k, v in size.items() if k.startswith("table:") and v / n >= 1}
    print(f"\ndatabase size after {how}:")
    print(f"  {size['total']:,} bytes for {n:,} requests = {size['total'] / n:,.0f} bytes/request")
    print(
        "  per table/index (bytes/request): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in per_table.items())
    )
    write_json(
        args.json,
        {
            "medians": medians,
            "runs": runs,
            "size": size,
            "size_requests": n,
            "bytes_per_request": size["total"] / n,
            "size_source": how,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
