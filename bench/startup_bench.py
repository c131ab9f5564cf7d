"""How fast batchrun starts: `price` on a 1,000-request job, and `run` from process start to its
first request (a fresh import, and a resume), each against the bare cost of starting Python and
of importing the ``openai`` client, measured in the same run.

Goal (issue "Seams before growth"): first request within 0.5 s of process start, and `price`
answering within 0.5 s, on this machine.

``--phases``: the RPM-bound job of governor_bench.py instead (6,000 short requests, a fresh
database, ``--rpm 3000 --tpm 1000000``, the simulator enforcing those limits with 150 ms
latency): the delay from the fork of ``batchrun run`` to its first request, broken down by step
(``_startup_probe.py`` runs the same command in-process with a timestamp at each step and ends
at the first send), and the same delay of the plain command (the first ``attempts.started_at``;
the run is stopped once it has one). ``--baseline-src DIR`` measures another tree's ``runner``
package too, alternating with this one's in the same run (e.g. ``git archive <commit> runner |
tar -x -C DIR``).

Usage: python bench/startup_bench.py [--repeat 5] [--requests 1000]
       python bench/startup_bench.py --phases [--repeat 5] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import compileall
import json
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BENCH_DIR,
    PYTHON,
    REPO,
    Simulator,
    batchrun_exe,
    bench_env,
    git_commit,
    guarded,
    header,
    now_iso,
    run_cmd,
    spawn,
    stop,
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


# The RPM-bound case of governor_bench.py (FULL setting, "rpm" case).
RPM, TPM, LATENCY_MS, JITTER = 3000, 1_000_000, 150, 0.3
RPM_REQUESTS, PROMPT_WORDS, MAX_TOKENS = 6000, 10, 16

# (segment, the mark it ends at): consecutive, so the segments add up to the first send
SEGMENTS = (
    ("python start (interpreter, site)", "interpreter up"),
    ("CLI: imports (report, plan, tokens), options", "api.run_with >"),
    ("run modules: engine, store (SQLAlchemy)", "run_job >"),
    ("price table", "api_key >"),
    ("HTTP client import (openai, aiohttp, httpx2)", "api_key <"),
    ("store open + schema (a new database)", "open_store <"),
    ("job file: hash, read, validate, tokenize, price, insert", "find_job <"),
    ("recover, runner row, deadline", "project >"),
    ("projection", "project <"),
    ("estimate, its text, heartbeat", "drive >"),
    ("engine start: transport (SSL context), books, backend", "engine.run >"),
    ("engine to first send (governor: the probe)", "first send"),
)
# parts of the segments above: (name, start mark, end mark), or a mark that is a sum already
DETAILS = (
    ("  of the store: schema check / creation", "check_schema >", "check_schema <"),
    ("  of the job file: vocabulary (tiktoken tables)", "vocabulary >", "vocabulary <"),
    ("  of the job file: producing rows, vocabulary included", "producing rows (sum)", None),
    ("  of the engine start: transport", "transport init >", "transport init <"),
)


def _src_env(src: Path | None) -> dict[str, str]:
    env = bench_env()
    if src is not None:  # read by _startup_probe.use_src, in the child
        env["STARTUP_BENCH_SRC"] = str(src)
    return env


# `batchrun` from another tree: what the console script does, with that tree's package
LAUNCH = (
    "import sys; sys.argv[0] = 'batchrun'; sys.path.insert(0, {src!r}); "
    "import _startup_probe; _startup_probe.use_src(); "
    "from runner.cli import entry; sys.exit(entry())"
)


def _run_rpm(job: Path, db: Path, base_url: str) -> list[str]:
    return ["run", str(job), "--db", str(db), "--cap", "1000", "--base-url", base_url,
            "--quiet", "--rpm", str(RPM), "--tpm", str(TPM)]  # fmt: skip


def _marks(job: Path, db: Path, sim: Simulator, src: Path | None, out: Path) -> dict[str, float]:
    """One instrumented run: the step marks, seconds from the fork."""
    out.unlink(missing_ok=True)
    env = _src_env(src)
    env["PROBE_OUT"] = str(out)
    env["T0"] = repr(time.time())
    cmd = [PYTHON, str(BENCH_DIR / "_startup_probe.py"), *_run_rpm(job, db, sim.base_url)]
    result = run_cmd(cmd, env=env)
    if result.rc != 0 or not out.exists():
        raise RuntimeError(f"probe failed ({result.rc}): {result.stderr.strip()[-800:]}")
    marks: dict[str, float] = {}
    for name, at in json.loads(out.read_text()):
        marks.setdefault(name, at)  # the first time a step starts or ends
    if "first send" not in marks:
        raise RuntimeError(f"the probe ended without a send: {result.stderr.strip()[-800:]}")
    return marks


def _first_attempt(db: Path, since: float) -> float | None:
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT MIN(started_at) FROM attempts WHERE started_at >= ?", (since,)
            ).fetchone()
    except sqlite3.Error:  # not created yet, or mid-migration
        return None
    return None if row is None or row[0] is None else float(row[0])


def _plain(job: Path, db: Path, src: Path | None) -> float:
    """The plain command against a fresh simulator: fork to its first attempt's started_at;
    stopped (SIGTERM, in order) as soon as that is in the database."""
    with Simulator(rpm=RPM, tpm=TPM, latency_ms=LATENCY_MS, latency_jitter=JITTER) as sim:
        started = time.time()
        exe = [batchrun_exe()]
        if src is not None:
            exe = [PYTHON, "-c", LAUNCH.format(src=str(BENCH_DIR))]
        proc = spawn(
            [*exe, *_run_rpm(job, db, sim.base_url)],
            env=_src_env(src),
            stdin=subprocess.DEVNULL,  # no question
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while (first := _first_attempt(db, started)) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"batchrun run sent nothing (exit {proc.returncode})")
                time.sleep(0.02)
        finally:
            stop(proc, timeout=10)
    return first - started


def _segments(marks: dict[str, float]) -> list[tuple[str, float | None]]:
    rows: list[tuple[str, float | None]] = []
    before = 0.0
    for name, end in SEGMENTS:
        at = marks.get(end)
        rows.append((name, None if at is None else at - before))
        before = at if at is not None else before
    for name, start, stop_mark in DETAILS:
        if stop_mark is None:
            rows.append((name, marks.get(start)))
        elif start in marks and stop_mark in marks:
            rows.append((name, marks[stop_mark] - marks[start]))
        else:
            rows.append((name, None))
    return rows


def _med(values: list[float]) -> float:
    return statistics.median(values)


def phases(args: argparse.Namespace) -> int:
    header("startup phases: the RPM-bound job's first send")
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline_src is not None:
        trees.insert(0, (f"baseline ({args.baseline_src})", args.baseline_src))
    if not args.no_precompile:
        # As an installed package has them: this machine's environment may say
        # PYTHONDONTWRITEBYTECODE=1, and then every start compiles batchrun's modules again.
        for _, src in trees:
            compileall.compile_dir(str((src or REPO) / "runner"), quiet=1)
    with guarded(), workdir(False, "startup-phases") as tmp:
        job = tmp / "rpm.jsonl"
        write_job(job, RPM_REQUESTS, seed=7, prompt_words=PROMPT_WORDS, max_tokens=MAX_TOKENS)
        python = [run_cmd([PYTHON, "-c", "pass"], env=bench_env()).wall for _ in range(5)]
        seen: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
        plain: dict[str, list[float]] = {name: [] for name, _ in trees}
        with Simulator(rpm=RPM, tpm=TPM, latency_ms=LATENCY_MS, latency_jitter=JITTER) as sim:
            for i in range(args.repeat):  # alternating, so both trees meet the same load
                for k, (name, src) in enumerate(trees):
                    seen[name].append(
                        _marks(job, tmp / f"probe-{k}-{i}.db", sim, src, tmp / "marks.json")
                    )
        for i in range(args.repeat):
            for k, (name, src) in enumerate(trees):
                plain[name].append(_plain(job, tmp / f"plain-{k}-{i}.db", src))
    base_python = _med(python)
    print(f"\npython -c pass: median {base_python:.3f} s (best {min(python):.3f})")
    for name, _ in trees:
        runs = seen[name]
        totals = [m["first send"] for m in runs]
        total = _med(totals)
        per_run = [_segments(m) for m in runs]
        rows: list[tuple[Any, ...]] = []
        for j, (label, _) in enumerate(per_run[0]):
            values = [r[j][1] for r in per_run if r[j][1] is not None]
            if not values:
                rows.append((label, "-", "-", "-"))
                continue
            med = _med(values)
            rows.append((label, f"{med:.3f}", f"{min(values):.3f}", f"{100 * med / total:.1f}%"))
        rows.append(
            ("first send, instrumented (sum)", f"{total:.3f}", f"{min(totals):.3f}", "100%")
        )
        p = plain[name]
        rows.append(
            (
                "first send, plain `batchrun run`",
                f"{_med(p):.3f}",
                f"{min(p):.3f}",
                f"{_med(p) / base_python:.0f}x python start",
            )
        )
        print(f"\n{name}: {args.repeat} runs each, median / best")
        print(table(rows, ("step", "median s", "best s", "share of median total")))
    if len(trees) == 2:
        (b, _), (t, _) = trees
        ratio = _med(plain[t]) / _med(plain[b])
        print(f"\nplain first send, this tree / baseline (medians): {ratio:.2f}")
    extra = f" --baseline-src {args.baseline_src}" if args.baseline_src else ""
    extra += " --no-precompile" if args.no_precompile else ""
    print(f"\n{now_iso()} commit {git_commit()}: python bench/startup_bench.py --phases "
          f"--repeat {args.repeat}{extra}")  # fmt: skip
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--phases", action="store_true", help="the RPM-bound job, by step")
    parser.add_argument("--baseline-src", type=Path, help="with --phases: another runner/ tree")
    parser.add_argument(
        "--no-precompile", action="store_true", help="with --phases: leave bytecode as it is"
    )
    args = parser.parse_args()
    if args.phases:
        return phases(args)
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
