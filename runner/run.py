"""``batchrun run``: find or import the job, check it against the cap, and drive the engine.

The same command line resumes: the job is recognised by the sha256 of its file, finished
requests are never sent again, and requests a dead runner held are charged at their worst case
before anything new is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .engine import Books, Control, Engine, RunOutcome, RunReport, process_alive
from .errors import JobChangedError, JobFileError, Problem, UsageError
from .jobfile import JobReader, file_sha256
from .money import format_usd
from .plan import Estimate, Plan, open_job, plan_rows
from .pricing import PriceTable, load_price_table
from .progress import Progress
from .report import format_estimate
from .settings import RunSettings
from .store import Job, JobStatus, Store, open_store

Echo = Callable[[str], None]
Confirm = Callable[[Estimate], bool]


def _sha256_or_problem(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        reason = (
            "no such file"
            if isinstance(exc, FileNotFoundError)
            else (exc.strerror or exc.__class__.__name__)
        )
        raise JobFileError([Problem(str(path), 0, "file", reason)]) from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise JobFileError(
            [
                Problem(
                    str(path),
                    0,
                    "file",
                    "is not a regular file (a pipe or a device?); batchrun reads a job file "
                    "more than once, so save it to a file first",
                )
            ]
        )
    try:
        return file_sha256(path)
    except OSError as exc:
        raise JobFileError([Problem(str(path), 0, "file", exc.strerror or str(exc))]) from None


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

    def unchanged() -> None:
        # The job is committed only if the bytes read are the bytes hashed at the start.
        if reader.sha256 != sha:
            raise UsageError(f"{path}: the file changed while it was being read; run again")

    job = store.create_job(
        abspath, sha, cap_pico, plan_rows(planner), planner.plan.total, before_commit=unchanged
    )
    return job, planner.plan


def find_job(store: Store, settings: RunSettings, table: PriceTable) -> tuple[Job, Plan | None]:
    """The job to run: from the job file, or (``--job ID``) one already in the database."""
    if settings.jobfile is not None:
        if settings.cap_pico is None:
            raise UsageError("--cap is required to import a job")
        return open_or_import(store, settings.jobfile, table, settings.cap_pico, settings.new_job)
    assert settings.job_id is not None
    job = store.job_by_id(settings.job_id)
    if job is None:
        raise UsageError(f"{store.name}: no job {settings.job_id}")
    return job, None


class _Runner:
    """This process's registration on the job, for as long as it runs."""

    def __init__(self, store: Store, job: Job, settings: RunSettings) -> None:
        self.store = store
        self.job = job
        self.host = socket.gethostname()
        self.id = store.register_runner(
            job.id, self.host, os.getpid(), settings.via, settings.stopping.heartbeat_ttl
        )

    def retire(self) -> None:
        with contextlib.suppress(Exception):  # a dead database is reported elsewhere
            self.store.retire_runner(self.id)


def estimate(
    store: Store,
    job: Job,
    plan: Plan | None,
    settings: RunSettings,
    orphans: tuple[int, int],
) -> Estimate:
    """The job against its cap, as ``run`` shows it before sending."""
    spend, cap = store.books(job.id)
    states = store.state_counts(job.id)
    batch = settings.via == "batch"
    fits = store.fits_under(job.id, cap - spend.total_pico, batch=batch)
    limits = settings.limits
    pending = states.get("pending", 0)
    weight = job.input_tokens + job.output_limit_tokens
    share = pending / job.requests if job.requests else 0.0
    from .plan import least_seconds

    return Estimate(
        job_id=job.id,
        db=store.name,
        requests=job.requests,
        floor_pico=job.floor_pico,
        worst_pico=job.worst_pico,
        cap_pico=cap,
        spent_pico=spend.settled_pico,
        pending=pending,
        pending_worst_pico=store.pending_worst(job.id),
        fits=fits,
        projected_fits=fits,
        imported=plan is not None,
        orphans=orphans[0],
        orphan_pico=orphans[1],
        min_seconds=least_seconds(pending, int(weight * share), limits.rpm, limits.tpm, burst=True),
        sustained_seconds=least_seconds(
            pending, int(weight * share), limits.rpm, limits.tpm, burst=False
        ),
    )


@dataclass(frozen=True, slots=True)
class Conclusion:
    """How a run ends for the user: an exit status and, unless all went well, why."""

    exit_code: int
    message: str | None = None


def conclude(report: RunReport, status: JobStatus) -> Conclusion:
    """The exit status and closing message of a run, from its report and the job's status."""
    outcome = report.outcome
    pending = status.states.get("pending", 0) + status.states.get("reserved", 0)
    if outcome is RunOutcome.INTERRUPTED:
        return Conclusion(
            128 + (report.signal or 2),
            f"{report.message}; {pending:,} request(s) not finished. Run the same command "
            "again to resume.",
        )
    if outcome is RunOutcome.CAPPED or (outcome is RunOutcome.COMPLETE and pending):
        return Conclusion(
            RunOutcome.CAPPED.exit_code,
            f"stopped at the spend cap: {pending:,} request(s) not sent, because the next "
            f"one's worst case would pass the cap of {format_usd(status.job.cap_pico, 2)}. Run "
            "again with a higher --cap to continue.",
        )
    if outcome is not RunOutcome.COMPLETE:
        return Conclusion(outcome.exit_code, f"stopped: {report.message}")
    return Conclusion(1 if status.states.get("failed", 0) else 0)


async def run_job(
    settings: RunSettings,
    echo: Echo,
    confirm: Confirm | None = None,
    *,
    signals: bool = True,
) -> tuple[RunReport, Store, Job]:
    """Import or resume the job and run it; ``conclude`` turns the report into an exit status.

    ``signals``: stop in order on SIGINT / SIGTERM (the command line), or leave signals alone
    (a library caller, a test)."""
    table = load_price_table(settings.prices)
    store = open_store(settings.db)
    try:
        job, plan = find_job(store, settings, table)
        if settings.cap_pico is not None and job.cap_pico != settings.cap_pico:
            store.set_job(job.id, cap_pico=settings.cap_pico)
            job = store.job_by_id(job.id) or job
        unbounded = store.unbounded_pending(job.id)
        if unbounded and not settings.allow_unbounded:
            raise UsageError(
                f"{unbounded:,} request(s) continue a stored conversation (previous_response_id"
                " or conversation): OpenAI bills the earlier turns as input, so no worst case "
                "bounds their cost and the cap could be passed. Remove them, or pass "
                "--allow-unbounded to send them anyway (the run then stops at the cap only "
                "after they are billed)"
            )
        from .backends import sync  # noqa: F401 - loaded before the heartbeat starts to count

        runner = _Runner(store, job, settings)
    except BaseException:
        store.close()
        raise
    try:
        orphans = store.recover(job.id, runner.host, process_alive)
        est = estimate(store, job, plan, settings, orphans)
        echo(format_estimate(est, plan, table, settings.limits))
        if confirm is not None and not confirm(est):
            raise UsageError("nothing sent")
        # Estimating (and a user reading it) may take longer than the heartbeat's TTL: renew
        # it, or another runner would count this one dead before it has sent anything.
        store.heartbeat(runner.id, settings.stopping.heartbeat_ttl, 0)
        report = await _drive(store, job, table, settings, runner.id, signals)
    finally:
        runner.retire()
    final = {
        RunOutcome.COMPLETE: "done",
        RunOutcome.CAPPED: "capped",
        RunOutcome.OVERRUN: "capped",
    }.get(report.outcome, "stopped")
    with contextlib.suppress(Exception):
        store.set_job(job.id, state=final)
    return report, store, job


async def _drive(
    store: Store,
    job: Job,
    table: PriceTable,
    settings: RunSettings,
    runner_id: int,
    handle_signals: bool,
) -> RunReport:
    from .backends.sync import SyncBackend
    from .governor import Governor
    from .transport import OpenAITransport, api_key_from_env

    simulator = None
    transport_settings = settings.transport
    if settings.simulate:
        from dataclasses import replace

        from .simulator import Simulator  # only the demo and tests need the server

        simulator = Simulator(prices=table)
        transport_settings = replace(transport_settings, base_url=await simulator.start())
        api_key = "sk-batchrun-simulator"
    else:
        api_key = api_key_from_env()
    transport = OpenAITransport(api_key, transport_settings, settings.limits.concurrency)
    del api_key  # nothing below needs it; keep it out of frames a traceback could show
    control = Control(settings.stopping)
    books = Books(
        store,
        job,
        runner_id,
        table,
        control,
        batch=settings.via == "batch",
        allow_unbounded=settings.allow_unbounded,
    )
    backend = SyncBackend(
        transport,
        Governor(settings.limits.rpm, settings.limits.tpm),
        settings.limits,
        settings.retry,
        settings.seed,
    )
    engine = Engine(books, backend, control, settings.stopping)
    finished_before = sum(
        n for state, n in store.state_counts(job.id).items() if state in ("done", "failed")
    )
    progress = Progress(books.stats, job.requests, finished_before, quiet=settings.quiet)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, control.interrupt, int(sig), sig.name)
    progress.start()
    try:
        return await engine.run()
    finally:
        await progress.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await backend.aclose()
        if simulator is not None:
            await simulator.stop()
