"""Resume: how soon a resumed 1,000,000-request job (99% finished) sends its first new request,
and how much memory the resuming process needs.

    /tmp/venv/bin/python bench/resume_bench.py          # builds the fixture once (~3 min), cached

The fixture is built, not run: sending 990,000 requests at ~1,000/s would take 17 minutes. So:

1. ``bench/make_job.py`` writes the 1M-request job file (short chat prompts);
2. ``batchrun run JOB --db DB --cap 0`` imports (prices and stores) all of it and stops at once
   with exit 3, because no request fits under a $0 cap (the simulator it points at must see no
   request: checked);
3. SQL marks the first 99% (by file order) ``done`` exactly as the engine would leave them: an
   ``attempts`` row, a ``results`` row with a simulator-sized response body, a ``result`` ledger
   charge, ``requests.state = 'done'``. This part is synthetic.

Each trial copies that database, starts a fresh simulator (unlimited, zero latency) and runs
the same ``batchrun run`` command with a real cap to completion. Time to first new request =
first ``attempts.started_at`` of this run minus the wall time just before the fork (the
simulator's ledger, polled every 10 ms, gives a second reading). Peak RSS is ``ru_maxrss`` of
the batchrun process (``os.wait4``). For comparison, ``batchrun price`` on the same file shows
what re-tokenizing it would cost. Goal: < 3 s to the first new request.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import (
    Simulator,
    batchrun_exe,
    bench_env,
    db_size,
    guarded,
    header,
    median,
    pyspy_exe,
    read_timeline,
    run_args,
    run_cmd,
    shown,
    summarize_raw_profile,
    table,
    verdict,
    write_json,
)
from make_job import write_job

GOAL_FIRST_S = 3.0
FIXTURE_VERSION = 1
# A chat.completion as the simulator returns it (~700 bytes): %s id, %d prompt tokens, %d total.
_BODY = (
    '{"id": "chatcmpl-%s", "object": "chat.completion", "created": 1795000000, '
    '"model": "gpt-4o-mini-2024-07-18", "choices": [{"index": 0, "message": {"role": '
    '"assistant", "content": "sim reply token batch alpha beta gamma delta", "refusal": null, '
    '"annotations": []}, "logprobs": null, "finish_reason": "stop"}], "usage": '
    '{"prompt_tokens": %d, "completion_tokens": 8, "total_tokens": %d, "prompt_tokens_details": '
    '{"cached_tokens": 0, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": '
    '0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}, '
    '"service_tier": "default", "system_fingerprint": "fp_simulator"}'
)
OUTPUT_PICO_PER_TOKEN = 600_000  # gpt-4o-mini output, $0.60 / 1M


def build_fixture(cache: Path, n: int, done_share: float) -> dict[str, Any]:
    """Write the job, import it with ``--cap 0``, then mark ``done_share`` of it finished."""
    cache.mkdir(parents=True, exist_ok=True)
    job, db = cache / "job.jsonl", cache / "base.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    meta: dict[str, Any] = {"version": FIXTURE_VERSION, "requests": n, "done_share": done_share}
    t = time.perf_counter()
    write_job(job, n, seed=11, prompt_words=8, max_tokens=16)
    meta["write_job_s"] = time.perf_counter() - t
    with Simulator() as sim:
        cmd = run_args(job, db, sim.base_url, cap="0")
        print(f"  import: {shown(cmd)}", flush=True)
        r = run_cmd(cmd, env=bench_env(), timeout=3600)
        received = sim.ledger()["requests_received"]
    if r.rc != 3 or received:
        raise RuntimeError(
            f"import with --cap 0 should exit 3 and send nothing: exit {r.rc}, "
            f"{received} sent; stderr: {r.stderr.strip()[-600:]}"
        )
    meta.update(import_s=r.wall, import_maxrss_mb=r.maxrss_kb / 1024, import_command=shown(cmd))
    t = time.perf_counter()
    cut = int(n * done_share)
    con = sqlite3.connect(db, isolation_level=None)
    try:
        (job_id,) = con.execute("SELECT id FROM jobs").fetchone()
        t0 = time.time() - 7200  # the earlier run: two hours ago, 1 ms apart
        where = "WHERE job_id = :job AND seq < :cut"
        sel = f"FROM requests {where}"
        args = {"job": job_id, "cut": cut, "t0": t0, "body": _BODY, "out": OUTPUT_PICO_PER_TOKEN}
        con.execute("BEGIN IMMEDIATE")
        con.execute(f"UPDATE requests SET state = 'done', attempts = 1 {where}", args)
        con.execute(
            "INSERT INTO attempts (request_id, attempt, started_at, latency_ms, status_code, "
            f"error_kind) SELECT id, 1, :t0 + seq * 0.001, 150, 200, NULL {sel}",
            args,
        )
        con.execute(
            "INSERT INTO results (request_id, status_code, body, response_model, api_request_id,"
            " prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost_pico,"
            " latency_ms, finished_at) SELECT id, 200,"
            " printf(:body, lower(hex(randomblob(12))), input_tokens, input_tokens + 8),"
            " 'gpt-4o-mini-2024-07-18', 'req_' || lower(hex(randomblob(12))), input_tokens, 0, 8,"
            f" 0, floor_pico + 8 * :out, 150, :t0 + seq * 0.001 + 0.15 {sel}",
            args,
        )
        con.execute(
            "INSERT INTO ledger (job_id, request_id, kind, amount_pico, at) SELECT job_id, id,"
            f" 'result', floor_pico + 8 * :out, :t0 + seq * 0.001 + 0.15 {sel}",
            args,
        )
        con.execute("COMMIT")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        states = dict(con.execute("SELECT state, COUNT(*) FROM requests GROUP BY state"))
    finally:
        con.close()
    meta.update(mark_done_s=time.perf_counter() - t, states=states, db_bytes=db_size(db)["total"])
    (cache / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_fixture(cache: Path, n: int, done_share: float, rebuild: bool) -> dict[str, Any]:
    meta_path = cache / "meta.json"
    if not rebuild and meta_path.exists() and (cache / "base.db").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == FIXTURE_VERSION and meta.get("requests") == n:
            print(f"fixture: reusing {cache} (built earlier; --rebuild to redo it)")
            return meta
    print(f"fixture: building {n:,} requests, {done_share:.0%} done, in {cache}", flush=True)
    return build_fixture(cache, n, done_share)


class LedgerWatch:
    """Polls the simulator's ledger every 10 ms until it has received a request."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.first: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.sim.ledger()["requests_received"] > 0:
                    self.first = time.time()
                    return
            except OSError:
                pass
            self._stop.wait(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _cap_for_a_few(db: Path, k: int) -> str:
    """A cap in dollars that lets about ``k`` more requests through (spent + k x worst case)."""
    con = sqlite3.connect(db)
    try:
        spent, worst = con.execute(
            "SELECT (SELECT COALESCE(SUM(amount_pico), 0) FROM ledger),"
            " (SELECT MAX(worst_pico) FROM requests WHERE state = 'pending')"
        ).fetchone()
    finally:
        con.close()
    return str(Decimal(spent + k * worst) / 10**12)


def trial(cache: Path, scratch: Path, left: int, profile: Path | None = None) -> dict[str, Any]:
    """Copy the fixture and resume it once, to completion (or under py-spy, briefly)."""
    db = scratch / "resume.db"
    for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        stale.unlink(missing_ok=True)
    shutil.copyfile(cache / "base.db", db)
    job = cache / "job.jsonl"
    with Simulator() as sim:
        cmd = run_args(job, db, sim.base_url)
        if profile is not None:
            # Profile the start-up, not the run: a cap a few requests above what was spent
            # stops the resume (exit 3) right after its first requests.
            cmd = run_args(job, db, sim.base_url, cap=_cap_for_a_few(db, 20))
            spy = pyspy_exe() or "py-spy"
            cmd = [
                spy,
                "record",
                "--rate",
                "500",
                "--format",
                "raw",
                "-o",
                str(profile),
                "--",
                *cmd,
            ]
        watch = LedgerWatch(sim)
        r = run_cmd(cmd, env=bench_env(), timeout=1800)
        watch.close()
        ledger = sim.ledger()
    tl = read_timeline(db, since=r.started)
    first_db = tl.first_start - r.started if tl.first_start else None
    first_sim = watch.first - r.started if watch.first else None
    row: dict[str, Any] = {
        "rc": r.rc,
        "first_request_s": first_db,
        "first_seen_by_sim_s": first_sim,
        "wall_s": r.wall,
        "cpu_s": r.cpu,
        "maxrss_mb": r.maxrss_kb / 1024,
        "billed": ledger["requests_billed"],
        "duplicates": ledger["duplicate_bodies"],
        "command": shown(cmd),
    }
    if profile is None and (r.rc != 0 or ledger["requests_billed"] != left):
        row["problem"] = (
            f"exit {r.rc}, billed {ledger['requests_billed']} (expected {left}); "
            f"stderr: {r.stderr.strip()[-600:]}"
        )
        print(f"  !! PROBLEM: {row['problem']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--done", type=float, default=0.99, help="share already finished")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/batchrun-bench-cache"),
        help="where the fixture (job file + 99%%-done db) is kept between runs",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the fixture")
    p.add_argument("--no-price", action="store_true", help="skip timing `batchrun price`")
    p.add_argument("--profile", type=Path, help="also py-spy one resume (raw) into this file")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    n = args.requests
    cache = args.cache / f"resume-{n}-{round(args.done * 100)}"
    header("resume")
    rows: list[dict[str, Any]] = []
    with guarded():
        meta = load_fixture(cache, n, args.done, args.rebuild)
        left = meta["states"].get("pending", 0)
        print(
            f"fixture: {meta['states']}; job file {(cache / 'job.jsonl').stat().st_size:,} bytes, "
            f"db {meta['db_bytes']:,} bytes; built by: make_job {meta['write_job_s']:.1f} s, "
            f"import (--cap 0) {meta['import_s']:.1f} s, SQL mark-done {meta['mark_done_s']:.1f} s"
        )
        print(f"  import command: {meta['import_command']}")
        scratch = cache / "trial"
        scratch.mkdir(exist_ok=True)
        try:
            for k in range(args.repeat):
                row = trial(cache, scratch, left)
                rows.append(row)
                print(
                    f"  [{k + 1}/{args.repeat}] first new request after "
                    f"{row['first_request_s'] or 0:.3f} s (simulator saw it at "
                    f"{row['first_seen_by_sim_s'] or 0:.3f} s); peak RSS "
                    f"{row['maxrss_mb']:.0f} MB; whole resume {row['wall_s']:.1f} s, exit "
                    f"{row['rc']}, billed {row['billed']:,}",
                    flush=True,
                )
            if rows:
                print(f"  command: {rows[0]['command']}")
            price_s = None
            if not args.no_price:
                price_cmd = [batchrun_exe(), "price", str(cache / "job.jsonl"), "--json"]
                r = run_cmd(price_cmd, env=bench_env(), timeout=3600)
                price_s = r.wall if r.rc == 0 else None
                print(f"  `batchrun price` on the same file (tokenizes all of it): {r.wall:.1f} s")
            if args.profile:
                prow = trial(cache, scratch, left, profile=args.profile)
                print(
                    "profiled resume (a cap stops it ~20 requests on; py-spy exit "
                    f"{prow['rc']}): first new request after "
                    f"{prow['first_request_s'] or 0:.3f} s under py-spy\n"
                    f"  {prow['command']}"
                )
                print(summarize_raw_profile(args.profile))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    first = median([r["first_request_s"] for r in rows])
    first_sim = median([r["first_seen_by_sim_s"] for r in rows])
    rss = median([r["maxrss_mb"] for r in rows])
    print()
    print(
        table(
            [
                (
                    "median",
                    first,
                    first_sim,
                    rss,
                    median([r["wall_s"] for r in rows]),
                    median([r["cpu_s"] for r in rows]),
                    price_s,
                )
            ],
            ["", "first req s", "sim saw s", "peak RSS MB", "resume s", "cpu s", "price s"],
        )
    )
    print(
        f"goal: first new request < {GOAL_FIRST_S:.0f} s: {verdict(first, GOAL_FIRST_S, False)}"
        + (
            f"; re-tokenizing would take {price_s:.1f} s, so the resume does not re-tokenize"
            if price_s and first and first < price_s / 2
            else ""
        )
    )
    problems = [r for r in rows if "problem" in r]
    for r in problems:
        print(f"PROBLEM: {r['problem']}\n  reproduce: {r['command']}")
    write_json(
        args.json,
        {
            "fixture": meta,
            "price_s": price_s,
            "first_request_s": first,
            "first_seen_by_sim_s": first_sim,
            "maxrss_mb": rss,
            "runs": rows,
        },
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
