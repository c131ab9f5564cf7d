"""The Python API: price a job, keep jobs in a database, run them, read their results.

The command line is a client of this module. Nothing here reads the environment for the API key
unless no ``api_key`` is given, prints, or exits: errors are the classes of ``runner.errors``.
Heavy parts (asyncio, the openai client, the engine) load when a job runs, not on import.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .money import pico_to_decimal, usd_to_pico
from .settings import (
    DEFAULT_DB,
    Batching,
    Deadline,
    Limits,
    Retry,
    RunSettings,
    Stopping,
    Transport,
)

if TYPE_CHECKING:
    import asyncio

    from .budgets import BudgetBooks, JobDraw
    from .clock import Clock
    from .engine import RunOutcome, RunStats
    from .plan import Plan
    from .projection import Projection
    from .store import Job as JobRecord
    from .store import JobStatus, Store

Money = str | int | Decimal
Progress = Callable[["RunStats"], None]
# How often a ``progress`` callback is called while a job runs.
PROGRESS_EVERY = 1.0


def price(
    source: str | Path | Iterable[Mapping[str, Any]],
    *,
    prices: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Plan:
    """Price a job in full, offline: a job file's path, or an iterable of Batch-format dicts.

    The plan's ``requests``, ``floor_usd`` and ``worst_usd`` (exact ``Decimal``), ``by_model``
    and ``min_seconds(rpm, tpm)`` say what it costs and how long its limits make it take.
    ``progress`` is told the requests and bytes read so far while a large file is read.
    """
    from .plan import price_job

    table = price_table(prices)
    if isinstance(source, (str, Path)):
        return price_job(source, table, progress)
    with _rows_file(source) as path:
        return price_job(path, table, progress)


@contextlib.contextmanager
def _rows_file(rows: Iterable[Mapping[str, Any]]) -> Iterator[Path]:
    """``rows`` as a job file, one compact JSON line each (written as they come: a large
    iterable is never held in memory), deleted afterwards."""
    fd, name = tempfile.mkstemp(prefix="batchrun-rows-", suffix=".jsonl")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for number, row in enumerate(rows, 1):
                if not isinstance(row, Mapping):
                    raise UsageError(
                        f"row {number}: expected a dict in the Batch API input format "
                        f"(custom_id, method, url, body), got {type(row).__name__}"
                    )
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
                fh.write("\n")
        yield path
    finally:
        path.unlink(missing_ok=True)


def to_requests(
    frame: Any,
    *,
    prompt: str | None = None,
    model: str,
    max_tokens: int | None = None,
    system: str | None = None,
    id_column: str | None = None,
    template: str | None = None,
    schema: Mapping[str, Any] | None = None,
    url: str = "/v1/chat/completions",
) -> Iterator[dict[str, Any]]:
    """Batch-format requests from a table (a pandas DataFrame, or any iterable of dicts): the
    user message from column ``prompt``, or from ``template`` with ``{column}`` fields (as
    ``batchrun build --template``); ``custom_id`` from ``id_column`` (unique) or ``row-<n>``;
    ``schema``: a JSON schema the answers must follow (``response_format``)."""
    from .build import Template, build_requests

    if (prompt is None) == (template is None):
        raise UsageError("to_requests: give prompt (a column) or template (text with {column})")
    records: Iterable[Mapping[str, Any]]
    records = frame.to_dict("records") if hasattr(frame, "to_dict") else frame
    return build_requests(
        records,
        template=Template.column(prompt) if prompt is not None else str(template),
        model=model,
        max_tokens=max_tokens,
        system=system,
        schema=schema,
        id_column=id_column,
        url=url,
    )


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: ``outcome`` (a ``RunOutcome``), why (``message``), and the job's
    status afterwards (what ``Job.status()`` returns)."""

    outcome: RunOutcome
    message: str | None
    status: dict[str, Any]
    signal: int | None = None
    failed: int = 0  # requests of the job failed for good
    stats: RunStats | None = field(default=None, repr=False, compare=False)  # this run's counters
    job_status: JobStatus | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Every request of the job has succeeded."""
        from .engine import RunOutcome

        by_state = self.status["by_state"]
        return self.outcome is RunOutcome.COMPLETE and set(by_state) <= {"done"}


class Database:
    """A batchrun database (an SQLite file or a ``postgresql://`` URL), as a context manager.

    >>> with runner.Database("batchrun.db") as db:
    ...     job = db.import_rows(rows, cap="5.00")
    ...     job.run(api_key=key)
    """

    def __init__(
        self, path_or_url: str | Path = DEFAULT_DB, *, readonly: bool = False, create: bool = True
    ) -> None:
        """Open (and, unless ``readonly`` or not ``create``, create or upgrade) the database."""
        from .store import open_store

        self.target = str(path_or_url)
        self.readonly = readonly
        self._store: Store = open_store(self.target, readonly=readonly, create=create)
        self.name = self._store.name  # a URL's password is never shown

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    def jobs(self) -> list[Job]:
        """Every job in the database, oldest first."""
        return [Job(self, record) for record in self._store.all_jobs()]

    def job(self, id: int | None = None) -> Job:
        """The job ``id``, or the most recent job."""
        jobs = self._store.all_jobs()
        chosen = [j for j in jobs if id is None or j.id == id]
        if not chosen:
            raise UsageError(f"{self.name}: no job {id}" if id else f"{self.name}: no jobs yet")
        return Job(self, chosen[-1])

    def import_job(
        self,
        path: str | Path,
        *,
        cap: Money,
        prices: str | Path | None = None,
        reuse: bool = True,
        label: str | None = None,
    ) -> Job:
        """The job of the file at ``path``: found by its content, or priced and imported (all of
        it or nothing). ``cap``: the most the job may spend, in dollars."""
        from .pricing import load_price_table
        from .run import open_or_import

        self._writable()
        table = load_price_table(Path(prices) if prices is not None else None)
        record, _plan = open_or_import(
            self._store, Path(path), table, _pico(cap), reuse, label=label
        )
        return Job(self, record)

    def import_rows(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        cap: Money,
        name: str | None = None,
        prices: str | Path | None = None,
    ) -> Job:
        """A job built from Batch-format dicts, without a file of the user's. Content-addressed
        like a file: the same rows find the same job again (and resume it). ``name`` labels the
        job (default ``rows``); rows under a name that changed reuse the results of the rows that
        did not, as a changed file does."""
        with _rows_file(rows) as path:
            return self.import_job(path, cap=cap, prices=prices, label=f"rows:{name or 'rows'}")

    # -- budgets ---------------------------------------------------------------------------------

    def set_budget(
        self,
        name: str,
        amount: Money | None = None,
        *,
        per: str | None = None,
        tz: str | None = None,
        default: bool | None = None,
    ) -> tuple[BudgetBooks, bool]:
        """Create the budget ``name`` (``amount`` dollars per day, week, month or in total, in
        time zone ``tz``), or change what is given of it; ``default``: every run in this
        database draws on it unless told otherwise. Returns its books this period, and whether
        it is new. Checked before anything is written."""
        self._writable()
        pico = check_budget(name, amount, per=per, tz=tz, default=default)
        budget, new = self._store.set_budget(name, pico, per=per, tz=tz, default=default)
        return self._store.budget_books(budget), new

    def budgets(self) -> list[BudgetBooks]:
        """Every budget, by name, with its books this period."""
        return [self._store.budget_books(b) for b in self._store.budgets()]

    def budget(self, name: str) -> BudgetBooks:
        """The budget ``name``'s books this period: spent, reserved, unknown, left, reset."""
        found = self._store.budget_named(name)
        if found is None:
            raise UsageError(f"{self.name}: no budget {name!r} (see `batchrun budget list`)")
        return self._store.budget_books(found)

    def budget_jobs(self, name: str) -> list[JobDraw]:
        """The jobs drawing on the budget this period, and what each spent and holds."""
        return self._store.budget_jobs(self.budget(name))

    def remove_budget(self, name: str) -> None:
        """Remove a budget no run draws on now (what was booked under it stays booked)."""
        self._writable()
        self._store.remove_budget(name)

    def _writable(self) -> None:
        if self.readonly:
            raise UsageError(f"{self.name} was opened read-only")


class Job:
    """A job in a :class:`Database`: its requests and results live there."""

    def __init__(self, db: Database, record: JobRecord) -> None:
        self.db = db
        self._record = record

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.path!r}: {self.requests:,} requests in {self.db.name}>"

    @property
    def id(self) -> int:
        return self._record.id

    @property
    def path(self) -> str:
        return self._record.path

    @property
    def requests(self) -> int:
        return self._record.requests

    @property
    def cap_usd(self) -> Decimal:
        return pico_to_decimal(self._fresh().cap_pico)

    @property
    def worst_usd(self) -> Decimal:
        return pico_to_decimal(self._record.worst_pico)

    @property
    def floor_usd(self) -> Decimal:
        return pico_to_decimal(self._record.floor_pico)

    def _fresh(self) -> JobRecord:
        record = self.db._store.job_by_id(self.id)
        if record is None:
            raise UsageError(f"{self.db.name}: job {self.id} is gone")
        self._record = record
        return record

    # -- reading ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The job's status: exactly what ``batchrun status --json`` prints for it."""
        from .report import status_json

        return status_json(self.summary())

    def summary(self, prices: str | Path | None = None) -> JobStatus:
        """The status as a record (what ``status()`` is the JSON form of), with the job's
        projection at ``prices`` (the bundled table by default) when they price its models."""
        return _with_projection(self.db._store, self.db._store.status(self.id), prices)

    def projection(self, prices: str | Path | None = None) -> Projection:
        """What the job will really cost, projected from its results so far (a sample, or
        the requests finished): total, low and high at sync and Batch API prices, per model
        (see ``projection``'s method)."""
        from .pricing import load_price_table
        from .projection import project

        return project(self.db._store, self.id, load_price_table(prices))

    def output_schema(self) -> Any:
        """The JSON schema the job's outputs follow (a ``structured.Schema``): that of its first
        request asking for JSON (a ``json_schema`` format, or JSON mode), or None when none
        does. ``export --fields`` writes a column per top-level property of it."""
        from .structured import schema_of_body

        found = self.db._store.json_format_request(self.id)
        return schema_of_body(*found) if found is not None else None

    def failed(self) -> list[Any]:
        """The requests that failed for good: custom_id, error code and message."""
        return list(self.db._store.failed(self.id))

    def timeline(self) -> Any:
        """What happened when: the samples behind ``batchrun report``."""
        return self.db._store.timeline(self.id)

    def projection_over_time(
        self, points: int = 12, prices: str | Path | None = None
    ) -> list[tuple[float, Projection]]:
        """What the projection said at ``points`` moments from the first result to the last:
        (epoch seconds, projection), for the report. Empty before two results are in or when
        the price table does not know one of the job's models."""
        from .errors import BatchrunError
        from .pricing import load_price_table
        from .projection import project

        store = self.db._store
        first, last = store.results_span(self.id)
        if first is None or last is None or last <= first:
            return []
        try:
            table = load_price_table(prices)
            step = (last - first) / max(points - 1, 1)
            return [
                (first + k * step, project(store, self.id, table, until=first + k * step))
                for k in range(points)
            ]
        except BatchrunError:
            return []

    def budget_spend(self) -> list[tuple[Any, dict[int, str], list[tuple[int, float, int]]]]:
        """Per budget the job draws on: its books this period, the jobs drawing on it (id ->
        path), and their spend over time (job id, time, picodollars booked), for the report's
        budget chart."""
        store = self.db._store
        out = []
        for books, _ in store.status(self.id).budgets:
            draws = {d.job_id: d.path for d in store.budget_jobs(books)}
            out.append((books, draws, store.budget_spend(books)))
        return out

    def rows(self, only: str | None = None) -> Iterator[Any]:
        """Every request with its result, in job-file order, streamed (the export's rows)."""
        if only not in (None, "ok", "failed"):
            raise UsageError(f"only: expected 'ok' or 'failed', not {only!r}")
        return self.db._store.iter_export(self.id, only)

    @property
    def record(self) -> JobRecord:
        """The job as stored (sha256, state, totals in picodollars)."""
        return self._fresh()

    def results(self, only: str | None = None) -> Iterator[dict[str, Any]]:
        """Every request's outcome in the Batch API output format, in job-file order, streamed.
        ``only``: ``"ok"`` (succeeded) or ``"failed"`` (failed for good)."""
        from .export import export_lines

        rows = self.rows(only)
        for line in export_lines(self._fresh(), rows):
            yield json.loads(line)

    def to_pandas(self) -> Any:
        """One row per request (custom_id, status, output text, finish reason, tokens, cost in
        dollars, error), as a pandas DataFrame (pandas must be installed)."""
        try:
            import pandas as pd
        except ImportError:
            raise UsageError("to_pandas needs pandas: pip install pandas") from None
        import csv

        from .export import CSV_COLUMNS, csv_lines

        reader = csv.reader(csv_lines(self.db._store.iter_export(self.id)))
        header = next(reader)
        assert tuple(header) == CSV_COLUMNS
        frame = pd.DataFrame(list(reader), columns=header)
        for column in ("input_tokens", "output_tokens"):
            frame[column] = frame[column].astype("int64")
        frame["cost_usd"] = frame["cost_usd"].map(Decimal)
        return frame

    # -- running ---------------------------------------------------------------------------------

    def run(self, **options: Any) -> RunResult:
        """Run the job to its end (see :meth:`arun` for the options); blocks.

        From inside a running event loop (Jupyter) use ``await job.arun(...)``."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(**options))
        raise UsageError(
            "Job.run was called inside a running event loop (a notebook?): use "
            "`await job.arun(...)` there"
        )

    async def arun(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        via: str = "sync",
        cap: Money | None = None,
        progress: Progress | None = None,
        stop: asyncio.Event | threading.Event | None = None,
        simulate: bool = False,
        limits: Limits | None = None,
        retry: Retry | None = None,
        transport: Transport | None = None,
        batching: Batching | None = None,
        stopping: Stopping | None = None,
        prices: str | Path | None = None,
        allow_unbounded: bool = False,
        retry_failed: Iterable[str] | None = None,
        retry_invalid: bool = False,
        confirm: Callable[[Any], bool] | None = None,
        echo: Callable[[str], None] | None = None,
        deadline: str | Deadline | None = None,
        clock: Clock | None = None,
    ) -> RunResult:
        """Send the job's pending requests under its cap and record every result.

        ``api_key``: the key (default: the ``OPENAI_API_KEY`` environment variable); it is never
        stored. ``cap``: a new cap in dollars for the job (default: keep its cap). ``progress``
        is called with the run's live counters about once a second. Setting ``stop`` (an event)
        or cancelling the task stops the run in order: requests in flight get their grace
        period and the books stay conservative. The settings dataclasses (``limits``, ``retry``,
        ``transport``, ...) are the ones the command line builds; ``rpm``, ``tpm`` and
        ``base_url`` override fields of theirs. ``retry_failed`` (error codes; empty: every
        failure) and ``retry_invalid`` queue requests again as ``run --retry-failed
        [--invalid]`` does: ``retry_invalid`` also sends those whose outputs did not match the
        JSON schema they asked for (they were billed, and are paid again). ``via="auto"``: the
        Batch API for the bulk and the synchronous API for what it does not finish, by
        ``deadline`` if given (an ISO time or a duration such as ``"8h"``, or a ``Deadline``
        with its margin and slack). ``clock`` (a ``runner.clock.Clock``): the run's time
        (default: real time).
        """
        if retry_invalid and retry_failed is None:
            retry_failed = ()

        self.db._writable()
        if via not in ("sync", "batch", "auto"):
            raise UsageError(f"via: expected 'sync', 'batch' or 'auto', not {via!r}")
        if isinstance(deadline, str):
            deadline = Deadline(spec=deadline)
        limits = limits or Limits()
        if rpm is not None or tpm is not None:
            limits = replace(limits, rpm=rpm or limits.rpm, tpm=tpm or limits.tpm)
        transport = transport or Transport()
        if base_url is not None:
            transport = replace(transport, base_url=base_url)
        settings = RunSettings(
            cap_pico=_pico(cap) if cap is not None else None,
            db=self.db.target,
            job_id=self.id,
            prices=Path(prices) if prices is not None else None,
            via=via,
            retry_failed=frozenset(retry_failed) if retry_failed is not None else None,
            retry_invalid=retry_invalid,
            allow_unbounded=allow_unbounded,
            simulate=simulate,
            quiet=True,
            limits=limits,
            retry=retry or Retry(),
            transport=transport,
            batching=batching or Batching(),
            stopping=stopping or Stopping(),
            deadline=deadline or Deadline(),
        )
        result = await run_with(
            settings,
            echo=echo,
            confirm=confirm,
            api_key=api_key,
            stop=stop,
            progress=progress,
            clock=clock,
        )
        self._fresh()
        return result


async def run_with(
    settings: RunSettings,
    *,
    echo: Callable[[str], None] | None = None,
    confirm: Callable[[Any], bool] | None = None,
    display: Any = None,
    signals: bool = False,
    api_key: str | None = None,
    stop: asyncio.Event | threading.Event | None = None,
    progress: Progress | None = None,
    clock: Clock | None = None,
) -> RunResult:
    """Run a job from its settings, as the command line builds them (a job file to import or
    resume, or ``settings.job_id``). ``echo`` gets the estimate and notes before sending;
    ``confirm`` may decline it; ``display`` shows the run (default: ``progress`` callbacks);
    ``signals``: stop in order on SIGINT / SIGTERM / SIGHUP. ``clock`` (a ``runner.clock.Clock``)
    is the run's time: the rate limits, backoff, heartbeats, what is recorded and the budget
    period claims fall in (default: real time, the database's clock for budget periods)."""
    from .run import run_job

    report, store, record = await run_job(
        settings,
        echo or (lambda _text: None),
        confirm,
        signals=signals,
        api_key=api_key,
        stop=stop,
        display=display,
        progress=progress,
        progress_every=PROGRESS_EVERY,
        clock=clock,
    )
    return _result(report, store, record, settings.prices)


async def sample_with(
    settings: RunSettings,
    *,
    echo: Callable[[str], None] | None = None,
    confirm: Callable[[Any], bool] | None = None,
    display: Any = None,
    signals: bool = False,
    api_key: str | None = None,
) -> tuple[RunResult, Projection]:
    """Send ``settings.sample`` of a job (imported if new, under a cap of the sample's worst
    case) and project the whole job from it; a run of the same file and database then reuses
    the sampled results."""
    if settings.sample is None:
        raise UsageError("sample_with needs settings.sample")
    result = await run_with(
        settings, echo=echo, confirm=confirm, display=display, signals=signals, api_key=api_key
    )
    with Database(settings.db, readonly=True) as db:
        projection = db.job(int(result.status["job"])).projection(settings.prices)
    return result, projection


async def cancel_with(
    settings: RunSettings,
    *,
    echo: Callable[[str], None] | None = None,
    display: Any = None,
    signals: bool = False,
    api_key: str | None = None,
) -> RunResult:
    """Cancel a job's open Batch API batches and record what they finished."""
    from .run import cancel_job

    report, store, record = await cancel_job(
        settings, echo or (lambda _text: None), signals=signals, api_key=api_key, display=display
    )
    return _result(report, store, record, settings.prices, cancelling=True)


def _with_projection(store: Store, status: JobStatus, prices: str | Path | None) -> JobStatus:
    """``status`` with its projection (``JobStatus.projection``), left None when the price
    table does not know one of the job's models (a job priced with a file of its own)."""
    from .errors import BatchrunError
    from .pricing import load_price_table
    from .projection import project

    try:
        status.projection = project(store, status.job.id, load_price_table(prices))
    except BatchrunError:
        status.projection = None
    return status


def _result(
    report: Any,
    store: Store,
    record: JobRecord,
    prices: str | Path | None = None,
    *,
    cancelling: bool = False,
) -> RunResult:
    from .report import status_json
    from .run import conclude

    try:
        job_status = _with_projection(store, store.status(record.id), prices)
    finally:
        store.close()
    end = conclude(report, job_status, cancelling=cancelling)
    return RunResult(
        end.outcome,
        end.message,
        status_json(job_status),
        end.signal,
        end.failed,
        report.stats,
        job_status,
    )


def check_budget(
    name: str,
    amount: Money | None = None,
    *,
    per: str | None = None,
    tz: str | None = None,
    default: bool | None = None,
) -> int | None:
    """Check what ``Database.set_budget`` would be given, before any database is opened (a
    bad amount, period or zone must not create or touch one); the amount in picodollars."""
    from .budgets import check_amount, check_name, check_per, check_tz

    check_name(name)
    pico = check_amount(str(amount)) if amount is not None else None
    if per is not None:
        check_per(per)
    if tz is not None:
        check_tz(tz)
    if pico is None and per is None and tz is None and default is None:
        raise UsageError(f"budget set {name}: nothing to set; give an amount (e.g. 100)")
    return pico


def price_table(prices: str | Path | None = None) -> Any:
    """The price table in use: the bundled one, with a user price file's entries over it."""
    from .pricing import load_price_table

    return load_price_table(Path(prices) if prices is not None else None)


def _pico(amount: Money) -> int:
    try:
        pico = usd_to_pico(amount)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cap: {exc}") from None
    if pico < 0:
        raise UsageError("cap: must not be negative")
    return pico
