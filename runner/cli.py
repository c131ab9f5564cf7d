"""The ``batchrun`` command: parses options and calls the library, nothing more.

Option defaults come from ``runner.settings``; exit statuses from ``errors`` and
``engine.RunOutcome``: 0 every request succeeded; 1 finished, some failed permanently; 2 bad
input or usage; 3 stopped at the spend cap; 4 stopped by a fatal API error (auth, quota);
5 the API was unreachable; 130 / 143 stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import BatchrunError, JobFileError, UsageError
from .money import MAX_PICO, format_usd, usd_to_pico
from .redact import redact
from .settings import DEFAULT_DB, DEMO_CAP_USD, Limits, Retry, RunSettings, Stopping, Transport
from .simulator.cli import simulate

EXIT_FAILURES = 1
EXIT_USAGE = 2


def _default(cls: type, name: str) -> Any:
    """The default of a settings field: the one place it is declared."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _say(text: str) -> None:
    """Print a report that names paths: a key pasted where a path belongs is not echoed."""
    click.echo(redact(text))


def _fail(message: str, code: int) -> None:
    click.echo(redact(f"batchrun: {message}"), err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns every expected error into a message and an exit status (never a traceback), and
    keeps key-like strings out of click's own usage errors."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message() + _usage_hint(exc), EXIT_USAGE)
        except (click.exceptions.Abort, KeyboardInterrupt):
            # Ctrl-C before the run installs its own handler (click turns it into Abort).
            # Every write is one transaction, so there is nothing to undo.
            _fail("interrupted; run the same command again to resume", 130)
        except JobFileError as exc:
            # FILE:LINE: field: reason lines stand alone, so editors can jump to them.
            click.echo(redact(str(exc)), err=True)
            sys.exit(exc.exit_code)
        except BatchrunError as exc:
            _fail(str(exc), exc.exit_code)


def _usage_hint(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    return f"\n{ctx.get_usage()}\nTry '{ctx.command_path} --help' for help." if ctx else ""


class _Seconds(click.ParamType):
    """A finite number of seconds (nan and inf refused) of at least ``minimum``."""

    name = "seconds"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if number < self.minimum:
            self.fail(f"{value!r} is less than {self.minimum:g}", param, ctx)
        return number


def _usd(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        pico = usd_to_pico(value)
    except ValueError:
        raise click.BadParameter("expected a dollar amount such as 25 or 0.50") from None
    if pico < 0:
        raise click.BadParameter("must not be negative")
    if pico > MAX_PICO:
        raise click.BadParameter(f"at most {format_usd(MAX_PICO, 0)}")
    return pico


def _base_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise click.BadParameter(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(
            "expected an http:// or https:// URL, e.g. http://127.0.0.1:8765/v1"
        )
    return value


def _path(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Path | None:
    # Validation of the job file itself (missing, unreadable, ...) reports FILE:LINE problems;
    # this only turns the string into a Path.
    return Path(value) if value is not None else None


db_option = click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="BATCHRUN_DB",
    show_default=True,
    help="The database holding jobs, results and spend: an SQLite file, or a "
    "postgresql://user@host/dbname URL (env BATCHRUN_DB).",
)
prices_option = click.option(
    "--prices",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML price file that overrides or adds models (same shape as the bundled "
    "table; see `batchrun prices`).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrun")
def main() -> None:
    """Run OpenAI Batch-API job files under a spend cap that cannot be passed.

    Price a job first (`batchrun price JOBFILE`), then run it (`batchrun run JOBFILE --cap
    USD`). The API key is read from OPENAI_API_KEY only.
    """


@main.command()
@click.argument("jobfile", callback=_path)
@prices_option
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Requests per minute: show the least wall time this limit allows.",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute: show the least wall time this limit allows.",
)
@json_option
def price(
    jobfile: Path, prices: Path | None, rpm: int | None, tpm: int | None, as_json: bool
) -> None:
    """Price JOBFILE in full without sending anything.

    Counts every request's input tokens exactly (offline) and prints, per model and in total:
    requests, input tokens, the sum of output limits, requests without an output limit, the
    cost floor (input only) and the worst case (input plus every output limit).

    Example: batchrun price jobs/example.jsonl --rpm 500 --tpm 200000
    """
    from .plan import price_job
    from .pricing import load_price_table
    from .report import format_plan, plan_json

    table = load_price_table(prices)
    plan = price_job(jobfile, table)
    if as_json:
        click.echo(json.dumps(plan_json(plan, table, rpm, tpm), indent=2))
    else:
        click.echo(format_plan(plan, table, rpm, tpm))


@main.command(name="prices")
@prices_option
@json_option
def prices_cmd(prices: Path | None, as_json: bool) -> None:
    """List the price table in use, its as-of date and where each entry came from.

    Example: batchrun prices --prices my-prices.toml
    """
    from .pricing import load_price_table
    from .report import format_prices, prices_json

    table = load_price_table(prices)
    if as_json:
        click.echo(json.dumps(prices_json(table), indent=2))
    else:
        click.echo(format_prices(table))


@main.command()
@click.argument("jobfile", required=False, callback=_path)
@click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="BATCHRUN_DB",
    show_default=True,
    help="The database for jobs, results and spend: an SQLite file, or a "
    "postgresql://user@host/dbname URL that runners on several machines share (env "
    "BATCHRUN_DB). Running the same command again with the same --db resumes the job.",
)
@click.option(
    "--job",
    "job_id",
    type=click.IntRange(min=1),
    help="Run (or join) this job "
    "already in --db instead of a JOBFILE: its requests are in the database, and --cap may "
    "be left out to keep the job's cap.",
)
@click.option(
    "--cap",
    callback=_usd,
    metavar="USD",
    help="Spend cap in dollars for this job, across all its runs. A request is sent "
    "only if spend so far + open reservations + its worst case fit under it. Raise it "
    f"on a later run to continue. Optional with --simulate (default ${DEMO_CAP_USD}).",
)
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Requests-per-minute limit to keep to "
    "(default: learned from the API's x-ratelimit headers).",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens-per-minute limit to keep to; a "
    "request weighs its prompt tokens + n x its output limit.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 4096),
    default=_default(Limits, "concurrency"),
    show_default=True,
    help="Most requests in flight at once. The pool sizes itself from the rate "
    "limit and the latency it sees (in flight = rate x latency) up to this bound.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=_default(Retry, "max_attempts"),
    show_default=True,
    help="Attempts per request before it fails (408, 409, 5xx, timeouts and dropped "
    "connections are retried; rate-limit 429s and refused connections do not count).",
)
@click.option(
    "--backoff-base",
    type=_Seconds(),
    default=_default(Retry, "backoff_base"),
    show_default=True,
    help="Seconds: full-jitter backoff waits up to base x 2^(attempt-1) ...",
)
@click.option(
    "--backoff-max",
    type=_Seconds(),
    default=_default(Retry, "backoff_max"),
    show_default=True,
    help="... capped at this many seconds (server retry headers are honoured).",
)
@click.option(
    "--max-wait",
    type=_Seconds(),
    default=_default(Retry, "max_wait"),
    show_default=True,
    help="Longest wait a server's retry-after may impose at once (longer requests are "
    "cut to this, and said so).",
)
@click.option(
    "--outage-limit",
    type=_Seconds(),
    default=_default(Retry, "outage_limit"),
    show_default=True,
    help="Seconds the API may stay unreachable before the run stops with exit 5 "
    "(unsent requests stay pending).",
)
@click.option(
    "--base-url",
    envvar="OPENAI_BASE_URL",
    callback=_base_url,
    help="API base URL (env OPENAI_BASE_URL; default https://api.openai.com/v1).",
)
@click.option(
    "--timeout",
    type=_Seconds(0.1),
    default=_default(Transport, "timeout"),
    show_default=True,
    help="Seconds a whole request may take, first byte to last (its outcome then "
    "counts as unknown and it is charged at worst case).",
)
@click.option(
    "--grace",
    type=_Seconds(),
    default=_default(Stopping, "grace"),
    show_default=True,
    help="Seconds in-flight requests get to finish after Ctrl-C / SIGTERM.",
)
@click.option(
    "--heartbeat-ttl",
    "--lease-ttl",
    "heartbeat_ttl",
    type=_Seconds(1),
    default=_default(Stopping, "heartbeat_ttl"),
    show_default=True,
    help="Seconds after which a runner that stopped renewing its heartbeat (killed) "
    "counts as dead, and another runner takes over its requests.",
)
@click.option(
    "--simulate",
    is_flag=True,
    help="Run against the built-in OpenAI simulator on "
    "127.0.0.1 (no API key, no network, nothing billed).",
)
@click.option(
    "--new-job",
    is_flag=True,
    help="The file at this path changed: run its new content as a new job instead of refusing.",
)
@click.option(
    "--allow-unbounded",
    is_flag=True,
    help="Send requests that continue a stored "
    "conversation (previous_response_id, conversation), whose cost no worst case "
    "bounds.",
)
@prices_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def run(
    jobfile: Path | None,
    db: str,
    job_id: int | None,
    cap: int | None,
    rpm: int | None,
    tpm: int | None,
    concurrency: int,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    max_wait: float,
    outage_limit: float,
    base_url: str | None,
    timeout: float,
    grace: float,
    heartbeat_ttl: float,
    simulate: bool,
    new_job: bool,
    allow_unbounded: bool,
    prices: Path | None,
    quiet: bool,
) -> None:
    """Price JOBFILE, then run it under the spend cap, recording every result in --db.

    Running the same command again resumes: finished requests are never sent again.

    Example: batchrun run jobs/example.jsonl --cap 5.00 --rpm 500 --tpm 200000
    """
    import asyncio

    from .run import conclude, run_job

    if (jobfile is None) == (job_id is None):
        raise UsageError("give a JOBFILE, or --job ID to run a job already in --db")
    if cap is None and job_id is None:
        if not simulate:
            raise UsageError("--cap is required: the most this job may spend, e.g. --cap 5.00")
        cap = usd_to_pico(DEMO_CAP_USD)
    settings = RunSettings(
        cap_pico=cap,
        jobfile=jobfile,
        db=db,
        job_id=job_id,
        prices=prices,
        new_job=new_job,
        allow_unbounded=allow_unbounded,
        simulate=simulate,
        quiet=quiet,
        limits=Limits(rpm=rpm, tpm=tpm, concurrency=concurrency),
        retry=Retry(max_attempts=max_attempts, backoff_base=backoff_base,
                    backoff_max=backoff_max, max_wait=max_wait, outage_limit=outage_limit),
        transport=Transport(base_url=base_url, timeout=timeout),
        stopping=Stopping(grace=grace, heartbeat_ttl=heartbeat_ttl),
    )  # fmt: skip
    report, store, job = asyncio.run(run_job(settings, _say))
    from .report import format_status

    try:
        status = store.status(job.id)
    finally:
        store.close()
    _say(format_status(status))
    end = conclude(report, status)
    if end.message:
        click.echo(redact(f"batchrun: {end.message}"), err=True)
    sys.exit(end.exit_code)


def _open_readonly(db: str) -> Any:
    from .store import open_store

    return open_store(db, readonly=True)


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Only this job id (default: every job).")
@json_option
def status(db: str, job_id: int | None, as_json: bool) -> None:
    """Show each job: requests by state, spend vs cap, tokens, errors, projected cost.

    Example: batchrun status --db batchrun.db --job 1
    """
    from .report import format_status, status_json

    store = _open_readonly(db)
    name = store.name  # a URL's password is never printed
    try:
        jobs = [j for j in store.all_jobs() if job_id is None or j.id == job_id]
        if job_id is not None and not jobs:
            raise UsageError(f"{name}: no job {job_id}")
        statuses = [store.status(j.id) for j in jobs]
    finally:
        store.close()
    if as_json:
        _say(json.dumps({"db": name, "jobs": [status_json(s) for s in statuses]}, indent=2))
    else:
        _say("\n".join(format_status(s) for s in statuses) or f"{name}: no jobs yet")


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Job id (default: the most recent job).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (default: standard output). Written atomically.",
)
def export(db: str, job_id: int | None, output: Path | None) -> None:
    """Write results in the Batch API output format, one line per request, in file order.

    Example: batchrun export --db batchrun.db -o results.jsonl
    """
    from .report import export_lines

    store = _open_readonly(db)
    try:
        jobs = store.all_jobs()
        chosen = [j for j in jobs if job_id is None or j.id == job_id]
        if not chosen:
            name = store.name
            raise UsageError(f"{name}: no job {job_id}" if job_id else f"{name}: no jobs yet")
        job = chosen[-1]
        lines = export_lines(job, store.iter_export(job.id))
        if output is None:
            out = sys.stdout
            for line in lines:
                out.write(line + "\n")
            out.flush()
        else:
            tmp = output.with_name(output.name + ".partial")
            with tmp.open("w", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(line + "\n")
            tmp.replace(output)
    finally:
        store.close()


main.add_command(simulate)
