"""``batchrun run``: find or import the job, check it against the cap, and drive the engine.

The same command line resumes: the job is recognised by the sha256 of its file, finished
requests are never sent again, and reservations left by a killed run are charged at their worst
case before anything new is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .engine import Engine, RunOptions, RunOutcome, RunReport
from .errors import JobChangedError, JobFileError, Problem, UsageError
from .executor import Executor, OpenAIExecutor, api_key_from_env
from .governor import Governor
from .jobfile import JobReader, file_sha256
from .plan import Plan, open_job, plan_rows
from .pricing import PriceTable, load_price_table
from .progress import Progress
from .report import format_estimate
from .retry import Backoff
from .store import Job, Store

Echo = Callable[[str], None]


@dataclass(slots=True)
class RunSettings:
    jobfile: Path
    db: Path
    cap_pico: int
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int = 32
    max_attempts: int = 6
    base_url: str | None = None
    timeout: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    grace: float = 10.0
    new_job: bool = False
    quiet: bool = False
    prices: Path | None = None
    lease_ttl: float = 30.0
    simulate: bool = False
    transport: str = "aiohttp"


def _sha256_or_problem(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else (
            exc.strerror or exc.__class__.__name__
        )
        raise JobFileError([Problem(str(path), 0, "file", reason)]) from None


def _diff(store: Store, old: Job, path: Path) -> tuple[int, int, int]:
    """(changed, added, vanished) custom_ids between a stored job and the file now at its path."""

    def fp(text: str) -> bytes:
        return hashlib.blake2b(text.encode(), digest_size=8).digest()

    now: dict[bytes, bytes] = {}
    for jl in JobReader(path):
        now[fp(jl.custom_id)] = fp(jl.body_json)
    changed = vanished = 0
    for custom_id, body in store.request_fingerprints(old.id):
        new_body = now.pop(fp(custom_id), None)
        if new_body is None:
            vanished += 1
        elif new_body != fp(body):
            changed += 1
    return changed, len(now), vanished


def open_or_import(
    store: Store, path: Path, table: PriceTable, cap_pico: int, new_job: bool
) -> tuple[Job, Plan | None]:
    """The job for ``path``: found by content, or priced and imported in one transaction."""
    sha = _sha256_or_problem(path)
    job = store.job_by_sha(sha)
    abspath = str(path.resolve())
    if job is not None:
        if job.path != abspath:
            store.set_job(job.id, path=abspath)
        return job, None
    previous = [j for j in store.jobs_for_path(abspath) if j.sha256 != sha]
    if previous and not new_job:
        old = previous[0]
        changed, added, vanished = _diff(store, old, path)
        raise JobChangedError(
            f"{path}: the file changed since job {old.id} was imported from it "
            f"({changed} custom_ids changed, {added} added, {vanished} vanished). "
            "Restore the file to resume that job, or pass --new-job to run this content as a "
            "new job."
        )
    reader, planner = open_job(path, table)
    job = store.create_job(abspath, sha, cap_pico, plan_rows(reader, planner), planner.plan.total)
    if job.sha256 != reader.sha256:  # the file changed while we read it
        raise UsageError(f"{path}: the file changed while it was being read; run again")
    return job, planner.plan


class _Lease:
    """Holds the job's lease and renews it (heartbeat) while the run lasts."""

    def __init__(self, store: Store, job_id: int, ttl: float) -> None:
        self.store = store
        self.job_id = job_id
        self.ttl = ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._task: asyncio.Task[None] | None = None

    def acquire(self) -> None:
        self.store.acquire_lease(self.job_id, self.owner, self.ttl)

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            with contextlib.suppress(Exception):  # a missed beat is retried; expiry is slack
                await asyncio.to_thread(self.store.renew_lease, self.job_id, self.owner, self.ttl)

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            self.store.release_lease(self.job_id, self.owner)


_FINAL_STATE = {
    RunOutcome.COMPLETE: "done",
    RunOutcome.CAPPED: "capped",
    RunOutcome.FATAL: "stopped",
    RunOutcome.INTERRUPTED: "stopped",
    RunOutcome.STORE_ERROR: "stopped",
}


async def run_job(settings: RunSettings, echo: Echo) -> tuple[RunReport, Store, Job]:
    """Import or resume the job and run it; the caller turns the report into an exit status."""
    table = load_price_table(settings.prices)
    store = Store.open(settings.db)
    try:
        job, plan = open_or_import(
            store, settings.jobfile, table, settings.cap_pico, settings.new_job
        )
    except BaseException:
        store.close()
        raise
    if job.cap_pico != settings.cap_pico:
        store.set_job(job.id, cap_pico=settings.cap_pico)
    lease = _Lease(store, job.id, settings.lease_ttl)
    lease.acquire()
    try:
        orphans, orphan_pico = store.recover_orphans(job.id)
        states = store.state_counts(job.id)
        echo(format_estimate(store, job, plan, table, settings, orphans, orphan_pico, states))
        finished = states.get("done", 0) + states.get("failed", 0)
        report = await _drive(store, job, table, settings, lease, finished)
    finally:
        await lease.release()
    store.set_job(job.id, state=_FINAL_STATE[report.outcome])
    return report, store, job


async def _drive(
    store: Store,
    job: Job,
    table: PriceTable,
    settings: RunSettings,
    lease: _Lease,
    finished_before: int,
) -> RunReport:
    simulator = None
    if settings.simulate:
        from .simulator import Simulator  # only the demo and tests need the server

        simulator = Simulator(prices=table)
        base_url = await simulator.start()
        api_key = "sk-batchrun-simulator"
    else:
        base_url = settings.base_url
        api_key = api_key_from_env()
    executor: Executor = OpenAIExecutor(
        api_key,
        base_url=base_url,
        timeout=settings.timeout,
        concurrency=settings.concurrency,
        transport=settings.transport,
    )
    del api_key  # nothing below needs it; keep it out of frames a traceback could show
    engine = Engine(
        store,
        job,
        executor,
        Governor(settings.rpm, settings.tpm),
        table,
        RunOptions(
            cap_pico=settings.cap_pico,
            concurrency=settings.concurrency,
            max_attempts=settings.max_attempts,
            backoff=Backoff(settings.backoff_base, settings.backoff_max),
            grace=settings.grace,
        ),
    )
    progress = Progress(engine.stats, job.requests, finished_before, quiet=settings.quiet)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        engine.stop(RunOutcome.INTERRUPTED, f"stopped by {sig.name}")

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    lease.start()
    progress.start()
    try:
        report = await engine.run()
        if received:
            report.signal = int(received[0])
        return report
    finally:
        await progress.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await executor.aclose()
        if simulator is not None:
            await simulator.stop()

