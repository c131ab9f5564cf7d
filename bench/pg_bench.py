"""PostgreSQL as the shared store: runners on one job, claim + record cost, importing 1M requests.

    /tmp/venv/bin/python bench/pg_bench.py                              # all three parts
    /tmp/venv/bin/python bench/pg_bench.py --parts import --job /tmp/job1m.jsonl
    /tmp/venv/bin/python bench/pg_bench.py --parts runners --run-requests 20000

Needs a PostgreSQL server: ``--pg URL`` (default $BATCHRUN_TEST_POSTGRES, else
postgresql://postgres@127.0.0.1:5432/test); every measurement gets a database of its own,
created and dropped by the benchmark.

1. runners: 1, 2 and 4 ``batchrun run --db URL --job ID`` processes on one job against the
   simulator (its own process: no limits, no latency), the job imported beforehand. Aggregate
   requests/s = requests / (first attempt started .. last result finished, from the database).
   The machine has few cores: the runners share them with the simulator and the server, so
   this measures what the store costs them, not how far more machines would go.
2. store: the claim + record cost per request, ``Store.claim(runner, batch)`` then
   ``Store.record`` of that many results (one attempt, one result, one ledger row each), as a
   runner's feeder and writer do, on PostgreSQL and on SQLite (the store's own settings);
   microseconds per request for batches of 64 and 1,000.
3. import: a generated job (1,000,000 chat requests by default) into PostgreSQL and into
   SQLite, each in a child process running ``runner.run.open_or_import`` (what ``batchrun run``
   does first: read, validate, count, price, store, in one transaction): wall seconds,
   requests/s and the child's peak RSS; ``batchrun price`` on the same file is the baseline,
   alternating with the imports. Goals: PostgreSQL >= 50,000 requests/s; SQLite <= 1.5x the
   time ``price`` takes; < 300 MB peak RSS either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    CLK_TCK,
    REPO,
    Simulator,
    batchrun_exe,
    bench_env,
    guarded,
    header,
    median,
    run_cmd,
    shown,
    spawn,
    stop,
    table,
    verdict,
    workdir,
    write_json,
)
from make_job import write_job

sys.path.insert(0, str(REPO))

GOAL_PG_RATE = 50_000
GOAL_SQLITE_RATIO = 1.5
GOAL_RSS_MB = 300
DEFAULT_PG = os.environ.get("BATCHRUN_TEST_POSTGRES") or "postgresql://postgres@127.0.0.1:5432/test"


# -- databases ------------------------------------------------------------------------------------


class Databases:
    """Fresh PostgreSQL databases on the server, dropped at the end."""

    def __init__(self, admin: str) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        self.admin = admin
        self.made: list[str] = []
        self._url = make_url(admin)
        self._psycopg = psycopg

    def new(self) -> str:
        name = f"batchrun_bench_{os.getpid()}_{len(self.made)}"
        with self._psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return self._url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self._psycopg.connect(self.admin, autocommit=True) as conn:
            for name in self.made:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.clear()


def _import(job: Path, db: str) -> tuple[int, float]:
    """Import ``job`` into ``db`` (what ``batchrun run`` does first); (requests, seconds)."""
    from runner.pricing import load_price_table
    from runner.run import open_or_import
    from runner.store import open_store

    t0 = time.perf_counter()
    store = open_store(db)
    try:
        found, _ = open_or_import(store, job, load_price_table(), 10**18, False)
    finally:
        store.close()
    return found.requests, time.perf_counter() - t0


# -- 1. runners ---------------------------------------------------------------------------------


def runners(dbs: Databases, tmp: Path, n_requests: int, counts: list[int]) -> list[dict[str, Any]]:
    """``counts`` runner processes on one PostgreSQL job each (and, for reference, one runner
    on the same job in SQLite)."""
    job = tmp / "runners.jsonl"
    write_job(job, n_requests, seed=3, prompt_words=12, max_tokens=16)
    out = []
    for n, db in [(1, str(tmp / "runners.db")), *((n, None) for n in counts)]:
        url = db or dbs.new()
        _import(job, url)
        with Simulator() as sim:
            cmd = [batchrun_exe(), "run", "--db", url, "--job", "1", "--base-url", sim.base_url,
                   "--quiet"]  # fmt: skip
            procs = [
                spawn(cmd, env=bench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for _ in range(n)
            ]
            errors = []
            for p in procs:
                _, err = p.communicate(timeout=1800)
                if p.returncode:
                    errors.append(f"exit {p.returncode}: {err.decode()[-500:]}")
                stop(p)
            if errors:
                raise RuntimeError(f"a runner failed: {errors}")
        first, last, done = _db_row(
            url,
            "SELECT (SELECT MIN(started_at) FROM attempts), (SELECT MAX(finished_at) FROM "
            "results), (SELECT COUNT(*) FROM results)",
        )
        row = {
            "db": "sqlite" if db else "postgresql",
            "runners": n,
            "requests": done,
            "seconds": last - first,
            "rate": done / (last - first),
        }
        out.append(row)
        print(
            f"  {row['db']:<10} {n} runner(s): {row['rate']:,.0f} requests/s "
            f"({row['seconds']:.2f} s)",
            flush=True,
        )
        if db is None:
            shown_cmd = shown(cmd)
    print(f"  command per runner: {shown_cmd}")
    return out


def _db_row(db: str, sql: str) -> tuple[Any, ...]:
    if not db.startswith("postgresql"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as conn:
            return tuple(conn.execute(sql).fetchone())
    return _pg_row(db, sql)


def _pg_row(url: str, sql: str) -> tuple[Any, ...]:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return tuple(row)


# -- 2. the store -------------------------------------------------------------------------------

_BODY = (
    '{"id":"chatcmpl-%d","object":"chat.completion","model":"gpt-4o-mini-2024-07-18","choices":'
    '[{"index":0,"message":{"role":"assistant","content":"sim reply token batch alpha beta"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":43,"completion_tokens":8,"total_tokens":51}}'
)


def claim_record(db: str, batch: int, n: int) -> float:
    """Microseconds per request to claim ``n`` requests ``batch`` at a time and record them."""
    from runner.store import (
        AttemptRecord,
        NewRequest,
        Outcomes,
        RequestState,
        ResultRecord,
        open_store,
    )

    class Totals:
        requests = input_tokens = output_limit_tokens = floor_pico = worst_pico = 0

    rows = (
        NewRequest(i, i + 1, f"r{i}", "/v1/chat/completions", "gpt-4o-mini", "{}", 43, 16,
                   16_050_000, 6_450_000, False)
        for i in range(n)
    )  # fmt: skip
    store = open_store(db)
    try:
        job = store.create_job("/bench.jsonl", f"{batch:064x}", 10**18, rows, Totals()).id
        runner = store.register_runner(job, "bench", os.getpid(), "sync", 60)
        t0 = time.perf_counter()
        while claim := store.claim(runner, batch).requests:
            now = time.time()
            store.record(
                runner,
                Outcomes(
                    attempts=[AttemptRecord(r.id, 1, now, 150, 200, None) for r in claim],
                    results=[
                        ResultRecord(
                            r.id,
                            RequestState.DONE,
                            1,
                            200,
                            _BODY % r.id,
                            "gpt-4o-mini",
                            f"req_{r.id}",
                            43,
                            0,
                            8,
                            0,
                            11_250_000,
                            150,
                            now,
                            r.worst_pico,
                        )
                        for r in claim
                    ],
                ),
            )
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    return elapsed / n * 1e6


def store_costs(dbs: Databases, tmp: Path, repeat: int) -> list[dict[str, Any]]:
    out = []
    for batch, n in ((64, 20_000), (1000, 50_000)):
        for name in ("postgresql", "sqlite"):
            runs = []
            for k in range(repeat):
                db = dbs.new() if name == "postgresql" else str(tmp / f"store-{batch}-{k}.db")
                runs.append(claim_record(db, batch, n))
            row = {"db": name, "batch": batch, "requests": n, "us_per_request": median(runs),
                   "runs": runs}  # fmt: skip
            out.append(row)
            print(f"  {name:<10} batch {batch:>5}: {row['us_per_request']:.0f} us/request "
                  f"({', '.join(f'{r:.0f}' for r in runs)})", flush=True)  # fmt: skip
    return out


# -- 3. the import ------------------------------------------------------------------------------


def imports(dbs: Databases, tmp: Path, job: Path, repeat: int) -> list[dict[str, Any]]:
    out = []
    me = [sys.executable, str(Path(__file__).resolve()), "import-child"]
    for k in range(repeat):
        for what in ("price", "postgresql", "sqlite"):
            if what == "price":
                cmd = [batchrun_exe(), "price", str(job)]
            else:
                db = dbs.new() if what == "postgresql" else str(tmp / f"import-{k}.db")
                cmd = [*me, str(job), db]
            r = run_cmd(cmd, env=bench_env(), timeout=3600)
            if r.rc != 0:
                raise RuntimeError(f"{what} failed ({r.rc}): {r.stderr.strip()[-800:]}")
            child = json.loads(r.stdout) if what != "price" else {}
            requests = child.get("requests")
            row = {"what": what, "repeat": k, "wall": r.wall, "cpu": r.cpu,
                   "rss_mb": r.maxrss_kb * 1024 / 1e6, "requests": requests,
                   "load": os.getloadavg()[0], "command": shown(cmd), **child}  # fmt: skip
            out.append(row)
            where = (
                f" (main thread {child['main_cpu']:.1f} s, server {child['server_cpu']:.1f} s)"
                if child
                else ""
            )
            print(
                f"  [{k + 1}/{repeat}] {what:<10} {r.wall:7.2f} s wall, {r.cpu:7.2f} s CPU"
                f"{where}, {row['rss_mb']:.0f} MB peak RSS (load {row['load']:.1f})",
                flush=True,
            )
            if what == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    Path(db + suffix).unlink(missing_ok=True)
    return out


def _server_cpu() -> float:
    """CPU seconds of every ``postgres`` process on this machine so far (the server's backends,
    WAL writer and checkpointer work for the import too)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if "(postgres)" in text:
                fields = text.rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def import_child(job: str, db: str) -> int:
    """Import ``job`` into ``db``; print what it took, and where the CPU went."""
    main0, cpu0, server0 = time.thread_time(), time.process_time(), _server_cpu()
    requests, seconds = _import(Path(job), db)
    main, cpu = time.thread_time() - main0, time.process_time() - cpu0
    server = _server_cpu() - server0 if db.startswith("postgresql") else 0.0
    print(json.dumps({"requests": requests, "seconds": seconds, "main_cpu": main,
                      "process_cpu": cpu, "server_cpu": server}))  # fmt: skip
    return 0


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import-child"]:
        return import_child(*argv[1:3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pg", default=DEFAULT_PG, help="a PostgreSQL URL to create databases with")
    p.add_argument("--parts", default="runners,store,import", help="comma list of parts")
    p.add_argument("--runners", default="1,2,4", help="runner counts to compare")
    p.add_argument("--run-requests", type=int, default=20_000, help="requests of the run job")
    p.add_argument("--requests", type=int, default=1_000_000, help="requests of the import job")
    p.add_argument("--job", type=Path, help="import this job file instead of generating one")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep scratch files")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    header("pg: PostgreSQL as the shared store")
    figures: dict[str, Any] = {}
    dbs = Databases(args.pg)
    with guarded(), workdir(args.keep, "batchrun-pgbench-") as tmp:
        try:
            if "runners" in parts:
                print(f"\n1. runner processes on one job of {args.run_requests:,} requests")
                counts = [int(x) for x in args.runners.split(",")]
                figures["runners"] = runners(dbs, tmp, args.run_requests, counts)
                base = figures["runners"][1]["rate"]
                print(table([(r["db"], r["runners"], r["requests"], r["seconds"], r["rate"],
                              f"{r['rate'] / base:.2f}x") for r in figures["runners"]],
                            ["db", "runners", "requests", "seconds", "requests/s",
                             "vs 1 on PostgreSQL"]))  # fmt: skip
            if "store" in parts:
                print("\n2. claim + record cost per request")
                figures["store"] = store_costs(dbs, tmp, args.repeat)
            if "import" in parts:
                job = args.job
                if job is None:
                    job = tmp / "import.jsonl"
                    print(f"\n3. import: writing {args.requests:,} requests to {job}", flush=True)
                    write_job(job, args.requests, seed=1)
                print(f"\n3. import of {job} ({job.stat().st_size / 1e6:,.1f} MB)")
                rows = imports(dbs, tmp, job, args.repeat)
                figures["import"] = summarize_imports(rows)
        finally:
            dbs.drop_all()
    write_json(args.json, figures)
    return 0


def summarize_imports(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = {w: median([r["wall"] for r in rows if r["what"] == w])
           for w in ("price", "postgresql", "sqlite")}  # fmt: skip
    rss = {w: max(r["rss_mb"] for r in rows if r["what"] == w) for w in med}
    n = next(r["requests"] for r in rows if r["requests"])
    pg_rate = n / med["postgresql"]
    ratio = med["sqlite"] / med["price"]
    print()
    print(table(
        [("price (baseline)", med["price"], n / med["price"], "-", rss["price"], "-"),
         ("postgresql", med["postgresql"], pg_rate, f"{med['postgresql'] / med['price']:.2f}x",
          rss["postgresql"], f">= {GOAL_PG_RATE:,}/s: {verdict(pg_rate, GOAL_PG_RATE, True)}"),
         ("sqlite", med["sqlite"], n / med["sqlite"], f"{ratio:.2f}x", rss["sqlite"],
          f"<= {GOAL_SQLITE_RATIO}x price: {verdict(ratio, GOAL_SQLITE_RATIO, False)}")],
        ["", "median s", "requests/s", "vs price", "peak RSS MB", "goal"],
    ))  # fmt: skip
    print(f"peak RSS < {GOAL_RSS_MB} MB: {verdict(max(rss.values()), GOAL_RSS_MB, False)}")
    # Where the CPU went: on a shared machine the wall times above include waiting for cores
    # other processes hold. Without them, an import could take no less than its main thread's
    # CPU, nor less than all its CPU (its threads and the server's) spread over the cores.
    cores = os.cpu_count() or 1
    price_cpu = median([r["cpu"] for r in rows if r["what"] == "price"]) or 0.0
    cpu_rows, bounds = [], {}
    for w in ("postgresql", "sqlite"):
        mine = [r for r in rows if r["what"] == w]
        main = median([r["main_cpu"] for r in mine]) or 0.0
        total = median([r["process_cpu"] + r["server_cpu"] for r in mine]) or 0.0
        bound = bounds[w] = max(main, total / cores)
        cpu_rows.append((w, total, main, bound, f"{bound / price_cpu:.2f}x", n / bound))
    print(f"\nCPU (median s; price used {price_cpu:.1f} s CPU, all in its main thread):")
    print(table(cpu_rows, ["", "all CPU", "main thread", f"bound on {cores} idle cores",
                           "vs price CPU", "requests/s at the bound"]))  # fmt: skip
    return {"requests": n, "median_seconds": med, "peak_rss_mb": rss,
            "pg_requests_per_s": pg_rate, "sqlite_vs_price": ratio, "price_cpu": price_cpu,
            "idle_bound_seconds": bounds, "runs": rows}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
