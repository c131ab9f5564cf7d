"""Engine overhead: batchrun's requests/s against a bare client loop on the same server.

    /tmp/venv/bin/python bench/engine_bench.py                 # 20,000 requests, 3 repeats
    /tmp/venv/bin/python bench/engine_bench.py --profile /tmp/engine-profile   # + py-spy

The simulator (its own process, a fresh one per measurement) is unlimited with zero latency,
so the client side is the bottleneck. For each concurrency (32, 64), in the same run:

- bare/create: ``openai.AsyncOpenAI(max_retries=0, http_client=DefaultAioHttpClient(...))``
  sending every job body with ``client.chat.completions.create(**body)`` from C workers;
- bare/raw: the same client posting the body bytes with ``client.post(path,
  cast_to=httpx2.Response, content=...)`` and reading the response, as batchrun's executor does;
- batchrun: the whole ``batchrun run`` command (startup, pricing, import included), and its run
  phase alone (first ``attempts.started_at`` to last ``results.finished_at`` in its db).

Both bare loops run in a child process of their own too, timed from the first send to the last
response. CPU per 1,000 requests comes from ``os.wait4`` (whole process) and, for the run phase,
from /proc samples of the batchrun process. Goals: batchrun run phase >= 0.9 x bare/create
(issue 5), and >= 0.8 x and >= 500 requests/s (issue 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    CpuSampler,
    Simulator,
    bench_env,
    db_size,
    guarded,
    header,
    median,
    price_totals,
    pyspy_exe,
    read_timeline,
    run_args,
    run_cmd,
    send_stalls,
    shown,
    summarize_raw_profile,
    table,
    verdict,
    workdir,
    write_json,
)
from make_job import write_job

KINDS = ("bare/create", "bare/raw", "batchrun")


# -- the bare loop (runs in its own process: ``engine_bench.py _bare ...``) -------------------


async def _bare_loop(job: Path, base_url: str, mode: str, concurrency: int) -> dict[str, Any]:
    """C workers share one iterator over the job's bodies; nothing else happens per request."""
    import resource

    import httpx2
    import openai

    lines = [json.loads(line) for line in job.read_text().splitlines()]
    bodies = [entry["body"] for entry in lines]
    raw = [json.dumps(b, separators=(",", ":")).encode() for b in bodies]
    paths = [entry["url"].removeprefix("/v1") for entry in lines]
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = openai.AsyncOpenAI(
        api_key="sk-bench",
        base_url=base_url,
        max_retries=0,
        timeout=60.0,
        http_client=openai.DefaultAioHttpClient(timeout=60.0, limits=limits),
    )
    headers = {"Content-Type": "application/json"}
    todo = iter(range(len(bodies)))
    errors: dict[str, int] = {}

    async def worker() -> None:
        for i in todo:
            try:
                if mode == "create":
                    await client.chat.completions.create(**bodies[i])
                else:
                    r = await client.post(
                        paths[i],
                        cast_to=httpx2.Response,
                        content=raw[i],
                        options={"headers": headers},
                    )
                    await r.aread()
            except Exception as exc:  # counted and reported, never hidden
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    first = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    last = time.time()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await client.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"n": len(bodies), "first": first, "last": last, "cpu_loop": cpu, "errors": errors}


def bare_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine_bench.py _bare")
    p.add_argument("job", type=Path)
    p.add_argument("base_url")
    p.add_argument("--mode", choices=("create", "raw"), required=True)
    p.add_argument("--concurrency", type=int, required=True)
    a = p.parse_args(argv)
    print(json.dumps(asyncio.run(_bare_loop(a.job, a.base_url, a.mode, a.concurrency))))
    return 0


# -- the benchmark ------------------------------------------------------------------------------


def measure(kind: str, job: Path, db: Path, n: int, concurrency: int) -> dict[str, Any]:
    """One measurement against a fresh simulator."""
    load = os.getloadavg()[0]
    with Simulator() as sim:
        if kind == "batchrun":
            cmd = run_args(job, db, sim.base_url, concurrency=concurrency)
        else:
            cmd = [
                PYTHON,
                __file__,
                "_bare",
                str(job),
                sim.base_url,
                "--mode",
                kind.split("/")[1],
                "--concurrency",
                str(concurrency),
            ]
        samplers: list[CpuSampler] = []
        r = run_cmd(
            cmd, env=bench_env(), timeout=900, on_start=lambda pid: samplers.append(CpuSampler(pid))
        )
        for s in samplers:
            s.close()
        ledger = sim.ledger()
    row: dict[str, Any] = {
        "load1_before": load,
        "kind": kind,
        "concurrency": concurrency,
        "rc": r.rc,
        "wall_s": r.wall,
        "cpu_s": r.cpu,
        "maxrss_mb": r.maxrss_kb / 1024,
        "billed": ledger["requests_billed"],
        "command": shown(cmd),
    }
    if kind == "batchrun":
        tl = read_timeline(db)
        run_s = tl.run_seconds
        row["run_s"] = run_s
        row["results"] = tl.results
        row["stalls"], row["stall_s"], row["stall_share"] = send_stalls(db)
        row["cmd_rps"] = n / r.wall
        row["run_cpu_s"] = (
            samplers[0].cpu_between(tl.first_start, tl.last_finish)
            if samplers and tl.first_start and tl.last_finish
            else None
        )
    else:
        out = json.loads(r.stdout.strip().splitlines()[-1]) if r.rc == 0 else {}
        run_s = out["last"] - out["first"] if out else None
        row["run_s"] = run_s
        row["run_cpu_s"] = out.get("cpu_loop")
        row["errors"] = out.get("errors")
        row["cmd_rps"] = None
    row["run_rps"] = n / run_s if run_s else None
    row["cpu_per_1k"] = 1000 * r.cpu / n
    row["run_cpu_per_1k"] = 1000 * row["run_cpu_s"] / n if row["run_cpu_s"] else None
    bad = r.rc != 0 or ledger["requests_billed"] != n or row.get("errors")
    if bad:
        row["problem"] = (
            f"exit {r.rc}, billed {ledger['requests_billed']} of {n}, "
            f"errors {row.get('errors')}; stderr: {r.stderr.strip()[-600:]}"
        )
        print(f"  !! PROBLEM: {row['problem']}", flush=True)
    return row


def profile(job: Path, tmp: Path, out_dir: Path, concurrency: int, gil: bool) -> None:
    """One more batchrun run under ``py-spy record`` (raw collapsed stacks + speedscope);
    ``gil`` samples only the thread holding the GIL: the view that matters for one event loop."""
    spy = pyspy_exe()
    if spy is None:
        print("py-spy not found: no profile")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt, ext in (("raw", "txt"), ("speedscope", "json")):
        with Simulator() as sim:
            db = tmp / f"profile-{fmt}.db"
            inner = run_args(job, db, sim.base_url, concurrency=concurrency)
            out = out_dir / f"batchrun-c{concurrency}.{ext}"
            cmd = [spy, "record", "--rate", "250", "--format", fmt, "-o", str(out)]
            cmd += ["--gil", "--", *inner] if gil else ["--", *inner]
            print(f"profiling: {shown(cmd)}", flush=True)
            r = run_cmd(cmd, env=bench_env(), timeout=900)
            if r.rc != 0:
                print(f"  py-spy exit {r.rc}: {r.stderr.strip()[-400:]}")
        if fmt == "raw" and out.exists():
            print(summarize_raw_profile(out))
    print(f"profiles in {out_dir}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_bare":
        return bare_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--concurrency", default="32,64", help="comma list")
    p.add_argument("--profile", type=Path, help="also profile one batchrun run into this dir")
    p.add_argument("--gil", action="store_true", help="profile GIL-holding samples only")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the job file and databases")
    args = p.parse_args(argv)
    n = args.requests
    levels = [int(c) for c in args.concurrency.split(",")]
    header("engine overhead")
    rows: list[dict[str, Any]] = []
    with guarded(), workdir(args.keep, "batchrun-enginebench-") as tmp:
        job = tmp / "short.jsonl"
        write_job(job, n, seed=3, prompt_words=12, max_tokens=16)
        totals, price_s = price_totals(job)
        print(
            f"job: {n:,} short chat requests ({totals['input_tokens'] / n:.0f} input tokens, "
            f"16 output limit); `batchrun price` takes {price_s:.2f} s"
        )
        print("simulator: python -m runner.simulator --port 0 (unlimited, zero latency)")
        for k in range(args.repeat):
            for c in levels:
                for kind in KINDS:
                    db = tmp / f"run-c{c}-{k}.db"
                    row = measure(kind, job, db, n, c)
                    row["repeat"] = k
                    rows.append(row)
                    print(
                        f"  [{k + 1}/{args.repeat}] c={c} {kind:<11} "
                        f"{row['run_rps'] or 0:8,.0f} req/s run phase"
                        + (
                            f", {row['cmd_rps']:,.0f} req/s whole command" if row["cmd_rps"] else ""
                        ),
                        flush=True,
                    )
                    if kind == "batchrun":
                        print(
                            f"        sends stalled > 3 ms {row['stalls']:,} times, "
                            f"{row['stall_s']:.2f} s = {100 * row['stall_share']:.0f}% of the run"
                        )
                        print(f"        {row['command']}")
        size: dict[str, int] = {}
        summary: dict[str, Any] = {}
        if rows:
            size = db_size(tmp / f"run-c{levels[0]}-0.db")
            summary = summarize(rows, levels, n)
            print()
            print(
                f"database after a {n:,}-request run: {size['total']:,} bytes = "
                f"{size['total'] / n:,.0f} bytes/request "
                + ", ".join(
                    f"{k[6:]} {v / n:,.0f}"
                    for k, v in size.items()
                    if k.startswith("table:") and v / n >= 1
                )
            )
        if args.profile:
            profile(job, tmp, args.profile, levels[0], args.gil)
    problems = [r for r in rows if "problem" in r]
    for r in problems:
        print(
            f"PROBLEM c={r['concurrency']} {r['kind']}: {r['problem']}\n  reproduce: {r['command']}"
        )
    write_json(
        args.json,
        {"requests": n, "price_s": price_s, "db_size": size, "summary": summary, "runs": rows},
    )
    return 1 if problems else 0


def summarize(rows: list[dict[str, Any]], levels: list[int], n: int) -> dict[str, Any]:
    """Medians per kind and concurrency, the ratios, and the verdicts against the goals."""
    out: dict[str, Any] = {}
    table_rows = []
    for c in levels:
        med: dict[str, dict[str, float | None]] = {}
        for kind in KINDS:
            sel = [r for r in rows if r["kind"] == kind and r["concurrency"] == c]
            med[kind] = {
                key: median([r.get(key) for r in sel])
                for key in (
                    "run_rps",
                    "cmd_rps",
                    "cpu_per_1k",
                    "run_cpu_per_1k",
                    "maxrss_mb",
                    "wall_s",
                    "stall_share",
                )
            }
            table_rows.append(
                (
                    c,
                    kind,
                    med[kind]["run_rps"],
                    med[kind]["cmd_rps"],
                    med[kind]["wall_s"],
                    med[kind]["cpu_per_1k"],
                    med[kind]["run_cpu_per_1k"],
                    med[kind]["maxrss_mb"],
                    med[kind]["stall_share"],
                )
            )
        b, create, raw = med["batchrun"], med["bare/create"], med["bare/raw"]
        out[str(c)] = {
            "medians": med,
            "ratio_run_vs_create": _ratio(b["run_rps"], create["run_rps"]),
            "ratio_cmd_vs_create": _ratio(b["cmd_rps"], create["run_rps"]),
            "ratio_run_vs_raw": _ratio(b["run_rps"], raw["run_rps"]),
        }
    print()
    print(f"medians of {len(rows) // (len(levels) * len(KINDS))} runs, {n:,} requests each:")
    print(
        table(
            table_rows,
            [
                "conc",
                "loop",
                "run req/s",
                "cmd req/s",
                "cmd s",
                "cpu s/1k",
                "run cpu s/1k",
                "maxrss MB",
                "stalled",
            ],
        )
    )
    print("\nratios and goals (run phase unless said):")
    for c in levels:
        o = out[str(c)]
        rps = o["medians"]["batchrun"]["run_rps"]
        r_create, r_raw, r_cmd = (
            o["ratio_run_vs_create"],
            o["ratio_run_vs_raw"],
            o["ratio_cmd_vs_create"],
        )
        print(
            f"  c={c}: batchrun/bare-create {_f(r_create)} (goal >= 0.9 "
            f"{verdict(r_create, 0.9, True)}; >= 0.8 {verdict(r_create, 0.8, True)}), "
            f"whole command/bare-create {_f(r_cmd)}, batchrun/bare-raw {_f(r_raw)}, "
            f"{rps or 0:,.0f} req/s (goal >= 500 {verdict(rps, 500, True)})"
        )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
