"""Shared helpers for batchrun's benchmarks: processes, the simulator, timing and the database.

Every benchmark drives the real ``batchrun`` command against ``python -m runner.simulator`` in
its own process (so the server never shares the client's GIL), reads what happened from the
run's SQLite file and the simulator's ledger, and must leave no process behind: children are
tracked here, die with the benchmark (PR_SET_PDEATHSIG) and are reaped on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import itertools
import json
import os
import platform
import selectors
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
API_KEY = "sk-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- processes ----------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM if the benchmark dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a tracked child; :func:`reap_all` ends it if the benchmark stops early."""
    kwargs.setdefault("preexec_fn", _die_with_parent if sys.platform == "linux" else None)
    proc: subprocess.Popen[bytes] = subprocess.Popen(list(cmd), **kwargs)
    _LIVE.add(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    _LIVE.discard(proc)


def reap_all() -> None:
    for proc in list(_LIVE):
        stop(proc)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt and end every child however the block exits."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted: stopping child processes", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        reap_all()
        signal.signal(signal.SIGTERM, old)


@dataclass(slots=True)
class CmdResult:
    """One finished child: exit status, wall time and its own rusage (from wait4)."""

    cmd: list[str]
    rc: int
    started: float  # time.time() just before the fork
    wall: float
    user: float
    sys: float
    maxrss_kb: int
    stdout: str
    stderr: str

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_cmd(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
    on_start: Callable[[int], None] | None = None,
) -> CmdResult:
    """Run ``cmd`` to completion, measured with ``os.wait4`` so the rusage is this child's alone
    (RUSAGE_CHILDREN would mix in the simulator and earlier children)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.time()
        t0 = time.perf_counter()
        proc = spawn(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        if on_start is not None:
            on_start(proc.pid)
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}")
                time.sleep(0.002)
        except BaseException:
            stop(proc)
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        _LIVE.discard(proc)
        out.seek(0)
        err.seek(0)
        return CmdResult(
            list(cmd),
            proc.returncode,
            started,
            wall,
            ru.ru_utime,
            ru.ru_stime,
            ru.ru_maxrss,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


class CpuSampler:
    """Samples a process's CPU seconds (all threads, from /proc) at ~50 Hz, so the CPU spent
    in one phase (say, first request to last result) can be read off afterwards."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (time.time(), cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        path = f"/proc/{self.pid}/stat"
        while not self._stop.is_set():
            try:
                with open(path) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                return
            if fields[0] == "Z":
                return
            self.samples.append((time.time(), (int(fields[11]) + int(fields[12])) / CLK_TCK))
            self._stop.wait(self.interval)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_between(self, t0: float, t1: float) -> float | None:
        """CPU seconds used between two wall-clock times (interpolated between samples)."""
        if len(self.samples) < 2:
            return None
        return self._at(t1) - self._at(t0)

    def _at(self, t: float) -> float:
        s = self.samples
        if t <= s[0][0]:
            return s[0][1]
        for (ta, ca), (tb, cb) in itertools.pairwise(s):
            if ta <= t <= tb:
                return ca + (cb - ca) * ((t - ta) / (tb - ta) if tb > ta else 0.0)
        return s[-1][1]


# -- batchrun -----------------------------------------------------------------------------------


def batchrun_exe() -> str:
    """The ``batchrun`` script of the interpreter running the benchmark (the venv's)."""
    local = Path(PYTHON).parent / "batchrun"
    return str(local) if local.exists() else (shutil.which("batchrun") or "batchrun")


def bench_env() -> dict[str, str]:
    """The environment for batchrun: a dummy key, and nothing that could redirect it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHRUN_"))}
    env["OPENAI_API_KEY"] = API_KEY
    return env


def run_args(
    job: Path,
    db: Path,
    base_url: str,
    *,
    cap: str = "1000",
    rpm: int | None = None,
    tpm: int | None = None,
    concurrency: int | None = None,
) -> list[str]:
    cmd = [
        batchrun_exe(),
        "run",
        str(job),
        "--db",
        str(db),
        "--cap",
        cap,
        "--base-url",
        base_url,
        "--quiet",
    ]
    if rpm:
        cmd += ["--rpm", str(rpm)]
    if tpm:
        cmd += ["--tpm", str(tpm)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    return cmd


def shown(cmd: Sequence[str]) -> str:
    """A command as the reader can paste it (the dummy key included)."""
    return f"OPENAI_API_KEY={API_KEY} " + shlex.join(cmd)


def price_totals(job: Path) -> tuple[dict[str, Any], float]:
    """``batchrun price --json`` totals for ``job``, and how long pricing took (wall seconds)."""
    r = run_cmd([batchrun_exe(), "price", str(job), "--json"], env=bench_env())
    if r.rc != 0:
        raise RuntimeError(f"batchrun price failed ({r.rc}): {r.stderr.strip()}")
    return json.loads(r.stdout)["total"], r.wall


# -- the simulator ------------------------------------------------------------------------------


class Simulator:
    """``python -m runner.simulator`` in its own process; a fresh one starts with full buckets
    and an empty ledger (after a warm-up request), so every measured run gets its own."""

    def __init__(self, **config: Any) -> None:
        self.args = [PYTHON, "-m", "runner.simulator", "--port", "0"]
        for key, value in config.items():
            if value is not None:
                self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def __enter__(self) -> Simulator:
        self.proc = spawn(self.args, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=20):
            self.__exit__()
            raise RuntimeError("the simulator did not start within 20 s")
        line = self.proc.stdout.readline().decode().strip()
        sel.close()
        if not line.startswith("http"):
            self._log.seek(0)
            log = self._log.read().decode(errors="replace")
            self.__exit__()
            raise RuntimeError(f"the simulator did not start: {line!r} {log}")
        self.base_url = line
        self.warm()
        return self

    def warm(self) -> None:
        """Send one request, then reset the ledger and buckets. The first request a fresh
        simulator sees loads its tokenizer (~0.25 s with its event loop blocked), which would
        otherwise be charged to whatever is being measured."""
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "warm up"}],
            "max_completion_tokens": 1,
        }
        self._post("/v1/chat/completions", body)
        self._post("/_sim/reset", None)

    def _post(self, path: str, body: Any) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(
            self.root + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        self._log.close()

    def ledger(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/_sim/ledger", timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
        return data

    def command(self) -> str:
        return shlex.join(self.args)


# -- the database -------------------------------------------------------------------------------


@dataclass(slots=True)
class Timeline:
    """When the run worked, read from the database batchrun wrote."""

    results: int
    first_start: float | None  # earliest attempts.started_at
    last_finish: float | None  # latest results.finished_at
    finished: list[float] = field(default_factory=list)
    attempts: int = 0
    requests_429: int = 0  # distinct requests that met at least one 429
    attempts_429: int = 0

    @property
    def run_seconds(self) -> float | None:
        if self.first_start is None or self.last_finish is None:
            return None
        return self.last_finish - self.first_start

    def longest_stall(self) -> tuple[float, float]:
        """(longest gap between consecutive completions, seconds into the run it began)."""
        f = self.finished
        if len(f) < 2:
            return 0.0, 0.0
        gap, at = max((b - a, a) for a, b in itertools.pairwise(f))
        return gap, at - (self.first_start or f[0])


def read_timeline(db: Path, since: float = 0.0) -> Timeline:
    """Results and attempts of the run(s) that started at or after ``since`` (wall clock)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        finished = [
            r[0]
            for r in con.execute(
                "SELECT finished_at FROM results WHERE finished_at >= ? ORDER BY finished_at",
                (since,),
            )
        ]
        first, n_att = con.execute(
            "SELECT MIN(started_at), COUNT(*) FROM attempts WHERE started_at >= ?", (since,)
        ).fetchone()
        req429, att429 = con.execute(
            "SELECT COUNT(DISTINCT request_id), COUNT(*) FROM attempts "
            "WHERE status_code = 429 AND started_at >= ?",
            (since,),
        ).fetchone()
    finally:
        con.close()
    return Timeline(
        results=len(finished),
        first_start=first,
        last_finish=finished[-1] if finished else None,
        finished=finished,
        attempts=n_att,
        requests_429=req429,
        attempts_429=att429,
    )


def send_stalls(db: Path, threshold: float = 0.003) -> tuple[int, float, float]:
    """Gaps longer than ``threshold`` between consecutive sends (``attempts.started_at``):
    (how many, their total seconds, the share of the send span they fill). At zero latency a
    send loop that never starves has none; a feeder that refills in batches shows one a batch."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        starts = [r[0] for r in con.execute("SELECT started_at FROM attempts ORDER BY started_at")]
    finally:
        con.close()
    if len(starts) < 2:
        return 0, 0.0, 0.0
    gaps = [b - a for a, b in itertools.pairwise(starts) if b - a > threshold]
    return len(gaps), sum(gaps), sum(gaps) / (starts[-1] - starts[0])


def db_size(db: Path) -> dict[str, int]:
    """Bytes on disk after a checkpoint: main file, -wal, and per table (if dbstat exists)."""
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        tables: dict[str, int] = {}
        with contextlib.suppress(sqlite3.DatabaseError):
            for name, size in con.execute(
                "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ):
                tables[name] = int(size)
    finally:
        con.close()
    wal = Path(f"{db}-wal")
    out = {"file": db.stat().st_size, "wal": wal.stat().st_size if wal.exists() else 0}
    out["total"] = out["file"] + out["wal"]
    out.update({f"table:{k}": v for k, v in tables.items()})
    return out


# -- reporting ----------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(title: str) -> None:
    """What was run, where and on what: printed first by every benchmark."""
    print(f"== {title}")
    print(f"command: cd {Path.cwd()} && {shlex.join([PYTHON, *sys.argv])}")
    print(
        f"date {dt.date.today().isoformat()}  commit {git_commit()}  "
        f"machine {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.release()}"
    )
    print(f"load average now: {load_text()} (other processes share these cores)")
    sys.stdout.flush()


def load_text() -> str:
    """The 1/5/15-minute load averages: on a 2-core box, anything above ~0 is interference."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def median(values: Sequence[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def verdict(value: float | None, goal: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= goal if higher_is_better else value <= goal
    return "MET" if ok else "MISSED"


def write_json(path: Path | None, data: Any) -> None:
    """Machine-readable figures (for bench/RESULTS.md), when asked for."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"figures written to {path}")


@contextlib.contextmanager
def workdir(keep: bool, prefix: str) -> Iterator[Path]:
    """A scratch directory for job files and databases, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept scratch files in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- profiling ----------------------------------------------------------------------------------


def pyspy_exe() -> str | None:
    local = Path(PYTHON).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def summarize_raw_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from ``py-spy record --format raw``
    (collapsed stacks: ``frame;frame;... count`` per line), plus batchrun's own call sites."""
    self_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    sites: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short_frame(f) for f in stack.split(";")]
        funcs = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f for f in frames]
        self_n[funcs[-1]] = self_n.get(funcs[-1], 0) + n
        for f in set(funcs):
            incl_n[f] = incl_n.get(f, 0) + n
        for f in set(frames):
            if "(runner/" in f:
                sites[f] = sites.get(f, 0) + n
    if not total:
        return "(no samples)"

    def rows(d: dict[str, int]) -> str:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return "\n".join(f"  {100 * n / total:5.1f}%  {name}" for name, n in best)

    return (
        f"{total:,} samples (CPU only: idle threads are not sampled)\n"
        f"self time by function:\n{rows(self_n)}\n"
        f"inclusive time by function:\n{rows(incl_n)}\n"
        f"inclusive time at batchrun's own lines (runner/):\n{rows(sites)}"
    )


def _short_frame(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def now_iso() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")
