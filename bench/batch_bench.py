"""The Batch API backend on a 100,000-request job: memory, preparation time, result recording.

    .venv/bin/python bench/batch_bench.py                 # 100,000 requests, 2 batches of 50,000

One ``batchrun run JOB --via batch`` against ``python -m runner.simulator`` (its own process,
batch lines answered as fast as it can) measures:

- peak RSS of the batchrun process (``ru_maxrss`` from ``os.wait4``): the goal is < 300 MB
  whatever the job's size (files are streamed, a chunk's requests are claimed 2,000 at a time);
- import + chunking + upload preparation: from the fork to the moment the last chunk was
  recorded (``batches.prepared_at``; its file is written by then), and to the last batch
  created at the API;
- download + recording throughput: results per second while the ended batches' output files
  are streamed and every line is settled in the books (from each batch's first recorded result
  to its ``closed_at``), against the baseline measured in the same run: the same output files
  streamed raw with the same client and split into lines, nothing parsed or stored.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import openai
from _common import (
    API_KEY,
    Simulator,
    batchrun_exe,
    bench_env,
    git_commit,
    guarded,
    header,
    now_iso,
    run_cmd,
    shown,
    table,
    workdir,
)
from make_job import write_job

GOAL_RSS_MB = 300


async def raw_read(base_url: str, file_ids: list[str]) -> tuple[int, int, float]:
    """(lines, bytes, seconds) of streaming the files and splitting them into lines."""
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key=API_KEY, max_retries=0, http_client=openai.DefaultAioHttpClient()
    )
    lines = size = 0
    t = time.perf_counter()
    for file_id in file_ids:
        rest = b""
        async with client.files.with_streaming_response.content(file_id) as response:
            async for piece in response.iter_bytes(1 << 16):
                size += len(piece)
                parts = (rest + piece).split(b"\n")
                rest = parts.pop()
                lines += len(parts)
    seconds = time.perf_counter() - t
    await client.close()
    return lines, size, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch-requests", type=int, default=50_000)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    header("batch_bench: the Batch API backend on a large job")
    with guarded(), workdir(args.keep, "batchrun-batch-bench-") as work:
        job, db = work / "job.jsonl", work / "run.db"
        write_job(job, args.requests, seed=1, prompt_words=40, max_tokens=64)
        print(f"job: {args.requests:,} requests, {job.stat().st_size / 1e6:,.1f} MB")
        with Simulator(batch_lines_per_s=10_000_000) as sim:
            cmd = [
                batchrun_exe(), "run", str(job), "--db", str(db), "--cap", "1000",
                "--base-url", sim.base_url, "--via", "batch", "--batch-requests",
                str(args.batch_requests), "--poll-interval", "0.2", "--quiet",
            ]  # fmt: skip
            r = run_cmd(cmd, env=bench_env())
            if r.rc != 0:
                sys.exit(f"batchrun failed ({r.rc}): {r.stderr[-2000:]}")
            ledger = sim.ledger()
            conn = sqlite3.connect(db)
            chunks = conn.execute(
                "SELECT id, prepared_at, created_at, closed_at, output_file_id, requests "
                "FROM batches ORDER BY id"
            ).fetchall()
            first_result = dict(
                conn.execute(
                    "SELECT r.chunk_id, MIN(s.finished_at) FROM results s JOIN requests r "
                    "ON r.id = s.request_id GROUP BY r.chunk_id"
                ).fetchall()
            )
            done = conn.execute("SELECT COUNT(*) FROM requests WHERE state = 'done'").fetchone()[0]
            conn.close()
            assert done == args.requests, f"only {done} requests done"
            assert ledger["batch_lines_billed"] == args.requests
            prepared = max(c[1] for c in chunks) - r.started
            created = max(c[2] for c in chunks) - r.started  # the API's whole seconds
            recording = sum(c[3] - first_result[c[0]] for c in chunks)
            rate = done / recording
            lines, size, raw_s = asyncio.run(raw_read(sim.base_url, [c[4] for c in chunks]))
            raw_rate = lines / raw_s
        rss_mb = r.maxrss_kb / 1024
        rows = [
            ("batches", f"{len(chunks)} x {args.batch_requests:,}"),
            ("wall time of the run", f"{r.wall:.1f} s"),
            ("import + chunking + upload preparation (last chunk recorded)", f"{prepared:.1f} s"),
            ("... last batch created at the API", f"{created:.0f} s (whole seconds)"),
            ("peak RSS of batchrun", f"{rss_mb:,.0f} MiB (goal < {GOAL_RSS_MB})"),
            ("download + recording", f"{rate:,.0f} results/s ({recording:.2f} s)"),
            (
                "raw read of the same files (baseline)",
                f"{raw_rate:,.0f} lines/s ({raw_s:.2f} s, {size / 1e6:,.1f} MB)",
            ),
            ("ratio recording / raw", f"{rate / raw_rate:.3f}"),
        ]
        print(table(rows, ("figure", "value")))
        print(f"date {now_iso()}, commit {git_commit()}")
        print(f"command: {shown(cmd)}")
        print(f"simulator: {sim.command()}")
        print(f"bench: {Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
