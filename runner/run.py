"""``batchrun run``: find or import the job, check it against the cap, and drive the engine.

The same command line resumes: the job is recognised by the sha256 of its file, finished
requests are never sent again, and requests a dead runner held are charged at their worst case
before anything new is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from .budgets import NO_BUDGET, THIS_PERIOD, Budget, BudgetBooks, describe
from .clock import SYSTEM, Clock
from .deadline import DeadlinePlan
from .engine import (
    Backend,
    Books,
    Control,
    Engine,
    RunOutcome,
    RunReport,
    RunStats,
    process_alive,
)
from .errors import ApiKeyError, Declined, JobFileError, Problem, UsageError
from .jobfile import file_sha256
from .money import format_money, format_usd
from .plan import (
    Estimate,
    Plan,
    ReadProgress,
    least_seconds,
    open_job,
    plan_rows,
)
from .pricing import PriceTable, load_price_table, tier_of_json
from .progress import Reading
from .projection import Projection, project
from .report import format_deadline_plan, format_estimate, projected_text
from .sampling import Drawn
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


def open_or_import(
    store: Store,
    path: Path,
    table: PriceTable,
    cap_pico: int,
    reuse: bool,
    notes: list[str] | None = None,
    progress: ReadProgress | None = None,
    *,
    label: str | None = None,
) -> tuple[Job, Plan | None]:
    """The job for ``path``: found by content, or priced and imported in one transaction.

    A file that changed since an earlier job was imported from the same path becomes a new job;
    its requests whose custom_id and body did not change reuse that job's results (``reuse``).
    ``label`` stands for the path where the file is not the user's (a job built from rows).
    """
    sha = _sha256_or_problem(path)
    job = store.job_by_sha(sha)
    abspath = label or str(path.resolve())
    if job is not None:
        if job.path != abspath:
            store.set_job(job.id, path=abspath)
        return job, None
    previous = [j for j in store.jobs_for_path(abspath) if j.sha256 != sha]
    reader, planner = open_job(path, table, progress=progress)

    def unchanged() -> None:
        # The job is committed only if the bytes read are the bytes hashed at the start.
        if reader.sha256 != sha:
            raise UsageError(f"{path}: the file changed while it was being read; run again")

    job = store.create_job(
        abspath,
        sha,
        cap_pico,
        plan_rows(planner),
        planner.plan.total,
        prices_fingerprint=table.fingerprint(),
        before_commit=unchanged,
    )
    if previous:
        old = previous[0]
        changed, added, vanished = store.compare_jobs(job.id, old.id)
        note = (
            f"{path} changed since job {old.id} was imported from it ({changed:,} custom_ids "
            f"changed, {added:,} added, {vanished:,} vanished)"
        )
        if reuse:
            n, pico = store.reuse_results(job.id, old.id)
            note += (
                f": {n:,} unchanged request(s) reuse job {old.id}'s results "
                f"({format_money(pico)}, not paid again)"
            )
        else:
            note += ": every request is sent again (reuse is off)"
        if notes is not None:
            notes.append(note)
    return job, planner.plan


SIMULATOR_KEY = "sk-batchrun-simulator"


async def _api_key(settings: RunSettings, notes: list[str], given: str | None = None) -> str:
    """The key to send with (``given``, else the environment's), checked before anything is
    imported or priced into the database: present, and (for a server that is not on this
    machine) accepted by one cheap call."""
    if settings.simulate:
        return SIMULATOR_KEY
    from .transport import OpenAITransport, api_key_from_env, is_local

    base_url = settings.transport.base_url
    if given is not None and not given.strip():
        raise UsageError("the API key given is empty")
    key = given.strip() if given is not None else api_key_from_env(base_url)
    if is_local(base_url):
        return key
    transport = OpenAITransport(key, settings.transport, 1)
    try:
        out = await transport.check_key()
    finally:
        await transport.aclose()
    if out.status in (401, 403):
        from .retry import classify

        raise ApiKeyError(
            f"the API rejected the API key (HTTP {out.status}): {classify(out).message}; nothing "
            "was imported or sent"
        )
    if out.status is None:
        notes.append(f"could not check the API key ({out.error}); going on")
    return key


def _rates(table: PriceTable) -> Callable[[str, str | None], tuple[int, int, int, int, int, int]]:
    """What the store re-prices pending requests with (unknown models and tiers without
    prices raise): per-token rates (input, output, batch input, batch output) at a service
    tier's prices and what each worst case adds per request, as ``Price.bounds`` prices them."""

    def rates(model: str, tier: str | None) -> tuple[int, int, int, int, int, int]:
        price = table.resolve(model)
        floor, worst = price.bounds(1, 0, tier=tier)
        batch_floor, batch_worst = price.bounds(1, 0, batch=True)
        return (
            floor, price.rates(tier=tier)[2], batch_floor, price.batch_output,
            worst - floor, batch_worst - batch_floor,
        )  # fmt: skip

    return rates


def _draw_sample(
    store: Store,
    job: Job,
    plan: Plan | None,
    table: PriceTable,
    settings: RunSettings,
    notes: list[str],
) -> tuple[Drawn, Job]:
    """Draw the sample; a job the sample imported (or only ever sampled) gets the sample's
    worst case as its cap (a job that was run keeps its own)."""
    from .sampling import draw

    assert settings.sample is not None
    if settings.via != "sync":
        raise UsageError("a sample is sent through the synchronous API (it is what projects)")
    drawn = draw(store, job.id, settings.sample, table)
    worst = store.worst_of(job.id, drawn.pending)
    drawn = replace(drawn, worst_pico=worst)
    if settings.cap_pico is None and (plan is not None or job.state == "sampled"):
        # A job only ever sampled has the cap of its samples: this one's worst case on top of
        # what is spent. A job that was run keeps the cap it was run with.
        spend, _ = store.books(job.id)
        store.set_job(job.id, cap_pico=max(job.cap_pico, spend.total_pico + worst))
        job = store.job_by_id(job.id) or job
    notes.append(
        f"sample: {len(drawn.seqs):,} of {job.requests:,} requests (seed "
        f"{settings.sample.seed}, by model, endpoint and output limit); "
        f"{len(drawn.pending):,} to send, worst case {format_usd(worst)}"
    )
    return drawn, job


PROJECT_EVERY = 15.0  # seconds between the projections a run's progress line shows


def _projected(projection: Projection, settings: RunSettings) -> tuple[int, int, int] | None:
    """The job's projected total at the lane's prices, once any model has two results in."""
    if not any(m.sampled >= 2 for m in projection.by_model.values()):
        return None
    lane = projection.lane(settings.via == "batch")
    return lane.total_pico, lane.low_pico, lane.high_pico


async def _projecting(
    store: Store, job: Job, table: PriceTable, settings: RunSettings, stats: RunStats
) -> None:
    """Keep ``stats.projected`` (what the progress line shows) learning from the results in:
    every ``PROJECT_EVERY`` seconds, read off the event loop (a few aggregate queries)."""
    while True:
        await asyncio.sleep(PROJECT_EVERY)
        with contextlib.suppress(Exception):  # a projection is a courtesy, never a failure
            projection = await asyncio.to_thread(project, store, job.id, table)
            stats.projected = _projected(projection, settings)


def find_job(
    store: Store, settings: RunSettings, table: PriceTable, notes: list[str]
) -> tuple[Job, Plan | None]:
    """The job to run: from the job file, or (``--job ID``) one already in the database."""
    if settings.jobfile is not None:
        if settings.cap_pico is None and settings.sample is None:
            raise UsageError("a cap is required to import a job")
        # A job a sample imports starts with a cap of nothing: the sample's own worst case is
        # set once it is drawn (see _sample_cap).
        cap = settings.cap_pico if settings.cap_pico is not None else 0
        reading = Reading(settings.jobfile, quiet=settings.quiet)
        try:
            return open_or_import(
                store, settings.jobfile, table, cap, settings.reuse, notes, reading
            )
        finally:
            reading.close()
    assert settings.job_id is not None
    job = store.job_by_id(settings.job_id)
    if job is None:
        raise UsageError(f"{store.name}: no job {settings.job_id}")
    return job, None


StopEvent = asyncio.Event | threading.Event


class Display(Protocol):
    """What shows a run while it goes (the command line's bar): built from the run's live
    counters, the job's size and the requests finished before this run."""

    def __call__(self, stats: RunStats, total: int, finished_before: int) -> Shown: ...


class Shown(Protocol):
    def start(self) -> None: ...

    def say(self, text: str) -> None: ...

    async def close(self) -> None: ...


class _Callback:
    """A display that calls ``callback(stats)`` every ``every`` seconds and once at the end."""

    def __init__(
        self, callback: Callable[[RunStats], None] | None, every: float, stats: RunStats
    ) -> None:
        self.callback, self.every, self.stats = callback, every, stats
        self.lines: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.callback is not None:
            self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        assert self.callback is not None
        while True:
            await asyncio.sleep(self.every)
            self.callback(self.stats)

    def say(self, text: str) -> None:
        self.lines.append(text)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.callback is not None:
            self.callback(self.stats)


def _callback_display(callback: Callable[[RunStats], None] | None, every: float) -> Display:
    def build(stats: RunStats, _total: int, _before: int) -> Shown:
        return _Callback(callback, every, stats)

    return build


async def _watch_stop(stop: StopEvent, control: Control) -> None:
    """Stop the run in order once ``stop`` is set (a threading.Event is polled)."""
    if isinstance(stop, asyncio.Event):
        await stop.wait()
    else:
        while not stop.is_set():
            await asyncio.sleep(0.05)
    control.stop(RunOutcome.INTERRUPTED, "stopped by the caller")


class _Runner:
    """This process's registration on the job, for as long as it runs."""

    def __init__(
        self, store: Store, job: Job, settings: RunSettings, budget: Budget | None = None
    ) -> None:
        self.store = store
        self.job = job
        self.host = socket.gethostname()
        self.id = store.register_runner(
            job.id,
            self.host,
            os.getpid(),
            settings.via,
            settings.stopping.heartbeat_ttl,
            budget.id if budget is not None else None,
        )

    def retire(self) -> None:
        with contextlib.suppress(Exception):  # a dead database is reported elsewhere
            self.store.retire_runner(self.id)


def find_budget(store: Store, settings: RunSettings) -> Budget | None:
    """The budget the run draws on: the one ``--budget`` names, none for ``--budget none``,
    else the database's default (if it has one). Looked up before anything is imported, so
    an unknown name changes nothing."""
    name = settings.budget
    if name is not None and name.lower() == NO_BUDGET:
        return None
    if name is None:
        return store.default_budget()
    budget = store.budget_named(name)
    if budget is None:
        known = ", ".join(b.name for b in store.budgets()) or "none yet"
        raise UsageError(
            f"{store.name}: no budget {name!r} (budgets: {known}); create it with `batchrun "
            f"budget set {name} USD --db ...`, or run with --budget none"
        )
    return budget


def _with_budget(
    store: Store, job: Job, est: Estimate, budget: Budget, settings: RunSettings
) -> tuple[Estimate, str]:
    """The estimate with what the budget has left (the requests that fit are those that fit
    under both the cap and the budget: the question asks about those), and the line that
    says whether the job's pending requests fit in it this period."""
    books = store.budget_books(budget)
    spend, cap = store.books(job.id)
    room = min(cap - spend.total_pico, books.left_pico)
    batch = settings.via == "batch"
    fits = store.fits_under(job.id, room, batch=batch)
    est = replace(
        est,
        fits=fits,
        budget_name=budget.name,
        budget_left_pico=books.left_pico,
        budget_period=THIS_PERIOD[budget.per],
    )
    head = f"{describe(books)}; {format_usd(books.left_pico)} left"
    pending = est.pending
    if not pending:
        return est, head
    if fits >= pending:
        return est, f"{head}: the job's {pending:,} pending request(s) fit at worst case"
    line = f"{head}: {fits:,} of {pending:,} pending request(s) fit at worst case"
    ratio = store.output_ratio(job.id)
    if ratio[1]:
        likely = store.fits_under(job.id, room, batch=batch, ratio=ratio)
        line += f" (~{likely:,} at the output seen so far)"
    return est, line


def estimate(
    store: Store,
    job: Job,
    plan: Plan | None,
    projection: Projection,
    settings: RunSettings,
    orphans: tuple[int, int],
) -> Estimate:
    """The job against its cap, as ``run`` shows it before sending: at the prices of the lane
    it goes by (``--via``), with the synchronous figures beside them for a batch job."""
    spend, cap = store.books(job.id)
    states = store.state_counts(job.id)
    batch = settings.via == "batch"
    room = cap - spend.total_pico
    limits = settings.limits
    pending = states.get("pending", 0)
    weight = job.input_tokens + job.output_limit_tokens
    share = pending / job.requests if job.requests else 0.0
    ratio = store.output_ratio(job.id)
    batch_floor, batch_worst = projection.floor_pico(True), projection.worst_pico(True)
    in_batches = store.in_batches(job.id)
    open_batches = (
        sum(1 for b in store.job_batches(job.id) if b.state == "submitted") if in_batches else 0
    )
    return Estimate(
        in_batches=in_batches,
        open_batches=open_batches,
        job_id=job.id,
        db=store.name,
        requests=job.requests,
        floor_pico=batch_floor if batch else job.floor_pico,
        worst_pico=batch_worst if batch else job.worst_pico,
        cap_pico=cap,
        spent_pico=spend.settled_pico,
        pending=pending,
        pending_worst_pico=store.pending_worst(job.id, batch=batch),
        via=settings.via,
        sync_floor_pico=job.floor_pico,
        sync_worst_pico=job.worst_pico,
        fits=store.fits_under(job.id, room, batch=batch),
        projected_fits=store.fits_under(job.id, room, batch=batch, ratio=ratio)
        if ratio[1]
        else None,
        imported=plan is not None,
        orphans=orphans[0],
        orphan_pico=orphans[1],
        min_seconds=least_seconds(pending, int(weight * share), limits.rpm, limits.tpm, burst=True),
        sustained_seconds=least_seconds(
            pending, int(weight * share), limits.rpm, limits.tpm, burst=False
        ),
    )


def _job_deadline(
    store: Store, job: Job, runner: _Runner, settings: RunSettings, clock: Clock | None
) -> RunSettings:
    """The settings with the deadline in epoch seconds. A duration counts from the first run
    that gave it (recorded in the job), so the same command resumes against the same
    deadline; an ISO time is the same in every run."""
    from .deadline import DEADLINE_EVENT, is_relative, resolve
    from .store import EventRecord, Outcomes

    spec = settings.deadline.spec
    if spec is None:
        return settings
    if settings.via != "auto":
        raise UsageError("--deadline plans across both APIs: run it with --via auto")
    now = (clock or SYSTEM).now()
    at = None
    if is_relative(spec):
        found = store.last_event(job.id, DEADLINE_EVENT)
        if found is not None and found[1] and found[1].rpartition("|")[0] == spec:
            at = float(found[1].rpartition("|")[2])
    if at is None:
        at = resolve(spec, now)
        store.record(runner.id, Outcomes(events=[EventRecord(now, DEADLINE_EVENT, 0.0,
                                                             f"{spec}|{at!r}")]))  # fmt: skip
    return replace(settings, deadline=replace(settings.deadline, at=at))


def deadline_plan(
    store: Store,
    job: Job,
    projection: Projection,
    settings: RunSettings,
    clock: Clock | None = None,
    table: PriceTable | None = None,
) -> DeadlinePlan:
    """The deadline's plan for the job's requests not yet finished (``run`` shows it before
    sending), at the limits given (the learned ones are known only once a request is sent);
    with ``table``, the flex lane of the models it marks flex-capable."""
    from .deadline import TailLimits, make_plan, plan_flex_lane

    states = store.state_counts(job.id)
    left = states.get("pending", 0) + states.get("reserved", 0)
    share = left / job.requests if job.requests else 0.0
    weight = int((job.input_tokens + job.output_limit_tokens) * share)
    batch_floor, batch_worst = projection.floor_pico(True), projection.worst_pico(True)
    limits = settings.limits
    tail = TailLimits(limits.rpm, limits.tpm, "given" if limits.rpm or limits.tpm else "unknown")
    flex = None
    if table is not None and table.marks_flex:
        flex = plan_flex_lane(store.open_by_model(job.id), table, tail, settings.deadline)
    # Batches will be open (or are) unless nothing is left: cancelling them takes its time.
    return make_plan(
        settings.deadline,
        (clock or SYSTEM).now(),
        left,
        weight,
        tail,
        (int(batch_floor * share), int(batch_worst * share)),
        (int(job.floor_pico * share), int(job.worst_pico * share)),
        cancel=settings.deadline.cancel if left else 0.0,
        flex=flex,
    )


@dataclass(frozen=True, slots=True)
class Conclusion:
    """How a run ends for the user: its outcome, how many requests failed for good, and,
    unless all went well, why. (The command line turns this into an exit status.)"""

    outcome: RunOutcome
    message: str | None = None
    failed: int = 0
    signal: int | None = None


def conclude(report: RunReport, status: JobStatus, *, cancelling: bool = False) -> Conclusion:
    """The outcome and closing message of a run, from its report and the job's status
    (``cancelling``: of ``batchrun cancel``, which sends nothing and leaves requests pending)."""
    outcome = report.outcome
    failed = status.states.get("failed", 0)
    pending = status.states.get("pending", 0) + status.states.get("reserved", 0)
    if cancelling and outcome in (RunOutcome.COMPLETE, RunOutcome.CAPPED):
        return Conclusion(RunOutcome.COMPLETE, _cancelled(status, pending), failed)
    if outcome is RunOutcome.DETACHED:
        return Conclusion(outcome, report.message, failed, report.signal or 2)
    if outcome is RunOutcome.COMPLETE and pending and pending == status.in_batches:
        watchers = [f"pid {r.pid} on {r.host}" for r in status.runners if r.via == "batch"]
        if watchers:
            return Conclusion(
                RunOutcome.BATCHES_OPEN,
                f"{pending:,} request(s) are in Batch API batches still open at OpenAI, watched "
                f"by another runner ({', '.join(watchers)}): it records their results.",
                failed,
            )
        return Conclusion(
            RunOutcome.BATCHES_OPEN,
            f"{pending:,} request(s) are in Batch API batches still open at OpenAI; run the job "
            "through the Batch API again to collect their results.",
            failed,
        )
    if outcome is RunOutcome.SAMPLED:
        return Conclusion(outcome, None, failed)
    if outcome is RunOutcome.INTERRUPTED:
        return Conclusion(
            outcome,
            f"{report.message}; {pending:,} request(s) not finished. Run the same command "
            "again to resume.",
            failed,
            report.signal or 2,
        )
    stop = report.stats.budget_stop
    if outcome in (RunOutcome.CAPPED, RunOutcome.COMPLETE) and pending and stop is not None:
        return Conclusion(RunOutcome.CAPPED, budget_message(stop, pending), failed)
    if outcome is RunOutcome.CAPPED or (outcome is RunOutcome.COMPLETE and pending):
        worst = status.spend.settled_pico + status.pending_worst_pico
        return Conclusion(
            RunOutcome.CAPPED,
            f"stopped at the spend cap: {pending:,} request(s) not sent, because the next "
            f"one's worst case would pass the cap of {format_money(status.job.cap_pico)}. A cap "
            f"of {format_money(worst)} finishes the job at worst case (projected "
            f"{projected_text(status)} from the results in); run again with a higher cap "
            "to continue.",
            failed,
        )
    if outcome is not RunOutcome.COMPLETE:
        return Conclusion(outcome, f"stopped: {report.message}", failed)
    return Conclusion(outcome, None, failed)


def _cancelled(status: JobStatus, pending: int) -> str:
    """What ``batchrun cancel`` did: the batches cancelled, what they had finished."""
    cancelled = [b for b in status.batches if b.status == "cancelled"]
    done = sum(b.completed or 0 for b in cancelled)
    total = sum(b.total or b.requests for b in cancelled)
    text = (
        f"cancelled {len(cancelled):,} batch(es): {done:,} of their {total:,} requests had "
        f"finished and are recorded (the job has spent {format_money(status.spend.settled_pico)})"
    )
    if pending:
        text += f"; {pending:,} request(s) back to pending: run the job again to send them"
    return text


def _budget_after(store: Store, stats: RunStats) -> None:
    """The books of the period the run stopped at, read again once its own requests settled
    (the claim that stopped saw them with its reservations)."""
    stopped = stats.budget_stop
    if stopped is None:
        return
    with contextlib.suppress(Exception):  # the stop's own books still say which budget
        budget = store.budget_named(stopped.budget.name) or stopped.budget
        stats.budget_stop = store.budget_books(budget, at=stopped.period.start)


def budget_message(books: BudgetBooks, pending: int) -> str:
    """Why a run stopped at its budget, and what lets it go on."""
    after = (
        "raise it (`batchrun budget set "
        f"{books.budget.name} USD`) or wait until it resets, then run the same command again"
        if books.period.end is not None
        else f"raise it (`batchrun budget set {books.budget.name} USD`) to continue"
    )
    return (
        f"stopped at the budget: {describe(books)}. {pending:,} request(s) not sent, because "
        f"the next one's worst case would pass it; {after}."
    )


def _requeue_invalid(store: Store, job: Job, settings: RunSettings) -> str:
    """``--retry-failed --invalid``: queue the results whose outputs were not the JSON their
    requests asked for, and say that they were billed and will be paid again."""
    codes = settings.retry_failed or frozenset()
    again = store.requeue_invalid(job.id, codes)
    if not again.requests:
        return "no result had an output that does not parse or match its JSON schema (--invalid)"
    worst = again.batch_worst_pico if settings.via == "batch" else again.worst_pico
    return (
        f"{again.requests:,} request(s) whose outputs did not parse or match their JSON schema "
        f"queued again (--invalid): they were billed {format_usd(again.billed_pico)} already "
        f"(kept in the spend) and will be paid again, up to {format_usd(worst)} at worst case "
        "(in the estimate above, under the same cap)"
    )


async def run_job(
    settings: RunSettings,
    echo: Echo,
    confirm: Confirm | None = None,
    *,
    signals: bool = True,
    api_key: str | None = None,
    stop: StopEvent | None = None,
    display: Display | None = None,
    progress: Callable[[RunStats], None] | None = None,
    progress_every: float = 1.0,
    clock: Clock | None = None,
) -> tuple[RunReport, Store, Job]:
    """Import or resume the job and run it; ``conclude`` says how it ended.

    ``signals``: stop in order on SIGINT / SIGTERM (the command line), or leave signals alone
    (a library caller, a test). ``api_key``: the key (default: from the environment).
    ``stop``: an event that, once set, stops the run in order. ``display`` builds what shows
    the run (the command line's progress bar); ``progress`` is a plain callback instead, called
    with the live counters every ``progress_every`` seconds. ``clock``: the run's time, for
    the governor, the backends, heartbeats, what is recorded and which budget period claims
    fall in (default: real time, and the database's clock for budget periods)."""
    table = load_price_table(settings.prices)
    notes: list[str] = []
    api_key = await _api_key(settings, notes, api_key)
    if display is None:
        display = _callback_display(progress, progress_every)
    store = open_store(settings.db, create=settings.jobfile is not None)
    store.clock = clock
    try:
        budget = find_budget(store, settings)
        job, plan = find_job(store, settings, table, notes)
        if settings.cap_pico is not None and job.cap_pico != settings.cap_pico:
            store.set_job(job.id, cap_pico=settings.cap_pico)
            job = store.job_by_id(job.id) or job
        if settings.retry_failed is not None:
            n = store.requeue_failed(job.id, settings.retry_failed)
            which = ", ".join(sorted(settings.retry_failed)) or "any error"
            notes.append(f"{n:,} failed request(s) ({which}) queued again")
            if settings.retry_invalid:
                notes.append(_requeue_invalid(store, job, settings))
        fingerprint = table.fingerprint()
        if job.prices_fingerprint != fingerprint:
            n, before, after = store.reprice(job.id, _rates(table), fingerprint, tier_of_json)
            if n and before != after:
                notes.append(
                    f"the price table changed since job {job.id} was priced: {n:,} pending "
                    f"request(s) re-priced, worst case {format_usd(before)} -> {format_usd(after)}"
                )
        unbounded = store.unbounded_pending(job.id)
        if unbounded and not settings.allow_unbounded:
            raise UsageError(
                f"{unbounded:,} request(s) continue a stored conversation (previous_response_id"
                " or conversation): OpenAI bills the earlier turns as input, so no worst case "
                "bounds their cost and the cap could be passed. Remove them, or allow "
                "unbounded requests to send them anyway (the run then stops at the cap only "
                "after they are billed)"
            )
        drawn = None
        if settings.sample is not None:
            drawn, job = _draw_sample(store, job, plan, table, settings, notes)
        from .backends import sync  # noqa: F401 - loaded before the heartbeat starts to count

        runner = _Runner(store, job, settings, budget)
    except BaseException:
        store.close()
        raise
    try:
        orphans = store.recover(job.id, runner.host, process_alive)
        settings = _job_deadline(store, job, runner, settings, clock)
        # One read of the job's strata: its bounds at both lanes, and what it will cost.
        projection = project(store, job.id, table)
        est = estimate(store, job, plan, projection, settings, orphans)
        if drawn is not None:
            est = replace(
                est, sampling=True, sample=len(drawn.pending), sample_worst_pico=drawn.worst_pico
            )
        else:
            est = replace(est, projected=_projected(projection, settings))
        if budget is not None and drawn is None:
            est, line = _with_budget(store, job, est, budget, settings)
            notes.insert(0, line)
        shown = [format_estimate(est, plan, table, settings.limits), *notes]
        if settings.deadline.at is not None:
            by_deadline = deadline_plan(store, job, projection, settings, clock, table)
            shown.append(format_deadline_plan(by_deadline))
            if by_deadline.feasible is False:
                est = replace(est, deadline_missed=True)
        echo("\n".join(shown))
        # Nothing to send but batches to wait for: no question (nothing will be spent that
        # was not reserved already).
        asking = est.pending > 0 or not est.in_batches
        if confirm is not None and asking and not confirm(est):
            raise Declined(
                f"nothing sent; the job is job {job.id} in {store.name}: run the same command "
                "again to send it"
            )
        # Estimating (and a user reading it) may take longer than the heartbeat's TTL: renew
        # it, or another runner would count this one dead before it has sent anything.
        store.heartbeat(runner.id, settings.stopping.heartbeat_ttl, 0)
        report = await _drive(
            store, job, table, settings, runner.id, signals, api_key, stop, display,
            drawn.pending if drawn is not None else None, clock=clock,
        )  # fmt: skip
        if drawn is not None and report.outcome is RunOutcome.COMPLETE:
            report = replace(report, outcome=RunOutcome.SAMPLED)
        _budget_after(store, report.stats)
    finally:
        runner.retire()
    final = {
        RunOutcome.COMPLETE: "done",
        RunOutcome.CAPPED: "capped",
        RunOutcome.OVERRUN: "capped",
        RunOutcome.SAMPLED: "sampled",
    }.get(report.outcome, "stopped")
    with contextlib.suppress(Exception):
        store.set_job(job.id, state=final)
    return report, store, job


def _existing_job(store: Store, settings: RunSettings) -> Job:
    """The job named by ``--job ID`` or JOBFILE (never imported), else the most recent one."""
    if settings.job_id is not None:
        job = store.job_by_id(settings.job_id)
    elif settings.jobfile is not None:
        job = store.job_by_sha(_sha256_or_problem(settings.jobfile))
    else:
        jobs = store.all_jobs()
        job = jobs[-1] if jobs else None
    if job is None:
        raise UsageError(f"{store.name}: no such job")
    return job


async def cancel_job(
    settings: RunSettings,
    echo: Echo,
    *,
    signals: bool = True,
    api_key: str | None = None,
    display: Display | None = None,
) -> tuple[RunReport, Store, Job]:
    """``batchrun cancel``: cancel the job's open Batch API batches and record what they
    return (the lines that ran; the others go back to pending). Nothing new is submitted."""
    from dataclasses import replace

    table = load_price_table(settings.prices)
    store = open_store(settings.db, create=False)
    try:
        job = _existing_job(store, settings)
        api_key = await _api_key(settings, [], api_key)
        settings = replace(
            settings,
            cap_pico=job.cap_pico,
            via="batch",
            batching=replace(settings.batching, cancel=True),
        )
        runner = _Runner(store, job, settings)
    except BaseException:
        store.close()
        raise
    try:
        store.recover(job.id, runner.host, process_alive)
        held = [b for b in store.job_batches(job.id) if b.open]
        echo(f"job {job.id}: {len(held)} open batch(es) in {store.name}")
        report = await _drive(
            store, job, table, settings, runner.id, signals, api_key, None,
            display or _callback_display(None, 1.0),
        )  # fmt: skip
    finally:
        runner.retire()
    return report, store, job


async def _drive(
    store: Store,
    job: Job,
    table: PriceTable,
    settings: RunSettings,
    runner_id: int,
    handle_signals: bool,
    api_key: str,
    stop: StopEvent | None,
    display: Display,
    only: frozenset[int] | None = None,
    *,
    clock: Clock | None = None,
) -> RunReport:
    from .backends.sync import SyncBackend
    from .governor import Governor
    from .transport import OpenAITransport

    time_ = clock or SYSTEM
    simulator = None
    transport_settings = settings.transport
    if settings.simulate:
        from .simulator import Simulator  # only the demo and tests need the server

        simulator = Simulator(prices=table)
        transport_settings = replace(transport_settings, base_url=await simulator.start())
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
        strict_models=settings.strict_models,
        calibrating=settings.calibrating,
        seen=store.calibration(job.id),
        only=only,
        clock=time_,
    )
    backend: Backend
    if settings.via == "batch":
        from .backends.batch import BatchBackend

        backend = BatchBackend(
            transport, settings.batching, settings.retry, settings.seed, clock=time_
        )
    elif settings.via == "auto":
        from .backends.auto import AutoBackend
        from .backends.batch import BatchBackend

        backend = AutoBackend(
            BatchBackend(
                transport,
                settings.batching,
                settings.retry,
                settings.seed,
                lane=True,
                clock=time_,
            ),
            SyncBackend(
                transport,
                Governor(settings.limits.rpm, settings.limits.tpm, clock=time_),
                settings.limits,
                settings.retry,
                settings.seed,
            ),
            settings.deadline,
            settings.limits,
            time_,
        )
    else:
        backend = SyncBackend(
            transport,
            Governor(settings.limits.rpm, settings.limits.tpm, clock=time_),
            settings.limits,
            settings.retry,
            settings.seed,
        )
    engine = Engine(books, backend, control, settings.stopping)
    finished_before = sum(
        n for state, n in store.state_counts(job.id).items() if state in ("done", "failed")
    )
    progress = display(books.stats, job.requests, finished_before)

    def acknowledge() -> None:
        if control.outcome is RunOutcome.INTERRUPTED and settings.via == "batch":
            progress.say(
                f"batchrun: stopping: detaching from {books.stats.open_batches:,} open "
                f"batch(es) holding {books.stats.in_flight:,} request(s) (they keep running at "
                "OpenAI; the same command re-attaches to them)"
            )
        elif control.outcome is RunOutcome.INTERRUPTED:
            progress.say(
                f"batchrun: stopping: waiting up to {control.grace:g} s for "
                f"{books.stats.in_flight:,} request(s) in flight; "
                + ("Ctrl-C again to stop now" if handle_signals else "stop again to stop now")
            )

    control.listeners.append(acknowledge)
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal went away (a closed ssh session); stop in order as for SIGTERM.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, control.interrupt, int(sig), sig.name)
    watching = asyncio.create_task(_watch_stop(stop, control)) if stop is not None else None
    projecting = asyncio.create_task(_projecting(store, job, table, settings, books.stats))
    progress.start()
    running = asyncio.create_task(engine.run())
    try:
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # The caller's task was cancelled: stop in order (the grace period, conservative
            # books), then let the cancellation go on.
            control.stop(RunOutcome.INTERRUPTED, "stopped by cancellation")
            while not running.done():
                try:
                    await asyncio.shield(running)
                except asyncio.CancelledError:
                    control.hard.set()  # cancelled again: stop now (books stay conservative)
            raise
    finally:
        if watching is not None:
            watching.cancel()
        projecting.cancel()
        await progress.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await backend.aclose()
        if simulator is not None:
            await simulator.stop()
