"""The ``batchrun`` command: parses options and calls the library, nothing more.

Exit status: 0 every request succeeded; 1 finished, some failed permanently; 2 bad input or
usage; 3 stopped at the spend cap; 4 stopped by a fatal API error (auth, quota); 130 / 143
stopped by SIGINT / SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import BatchrunError, JobFileError, UsageError
from .money import format_usd, usd_to_pico
from .plan import price_job
from .pricing import load_price_table
from .report import (
    export_lines,
    format_plan,
    format_prices,
    format_status,
    plan_json,
    prices_json,
    status_json,
)
from .simulator.cli import simulate

DEFAULT_DB = "batchrun.db"
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_CAPPED, EXIT_FATAL = 0, 1, 2, 3, 4
_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|sess-[A-Za-z0-9]{8,})")


def redact(text: str) -> str:
    """Hide the API key and anything that looks like one from what batchrun prints."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if len(key) >= 8:
        text = text.replace(key, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


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


def _usd(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        pico = usd_to_pico(value)
    except ValueError:
        raise click.BadParameter("expected a dollar amount such as 25 or 0.50") from None
    if pico < 0:
        raise click.BadParameter("must not be negative")
    return pico


def _existing_file(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Path | None:
    # Validation of the job file itself (missing, unreadable, ...) reports FILE:LINE problems;
    # this only turns the string into a Path.
    return Path(value) if value is not None else None


db_option = click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_DB,
    envvar="BATCHRUN_DB",
    show_default=True,
    help="SQLite database holding jobs, results and spend (env BATCHRUN_DB). Running the same "
    "command again with the same --db resumes the job.",
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
@click.argument("jobfile", callback=_existing_file)
@prices_option
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute: show the least "
              "wall time this limit allows.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute: show the least "
              "wall time this limit allows.")
@json_option
def price(jobfile: Path, prices: Path | None, rpm: int | None, tpm: int | None,
          as_json: bool) -> None:
    """Price JOBFILE in full without sending anything.

    Counts every request's input tokens exactly (offline) and prints, per model and in total:
    requests, input tokens, the sum of output limits, requests without an output limit, the
    cost floor (input only) and the worst case (input plus every output limit).
    """
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
    """List the price table in use, its as-of date and where each entry came from."""
    table = load_price_table(prices)
    if as_json:
        click.echo(json.dumps(prices_json(table), indent=2))
    else:
        click.echo(format_prices(table))


@main.command()
@click.argument("jobfile", callback=_existing_file)
@db_option
@click.option("--cap", required=True, callback=_usd, metavar="USD",
              help="Spend cap in dollars for this job, across all its runs. A request is sent "
              "only if spend so far + open reservations + its worst case fit under it. Raise it "
              "on a later run to continue.")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests-per-minute limit to keep to "
              "(default: learned from the API's x-ratelimit headers).")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens-per-minute limit to keep to; a "
              "request weighs its prompt tokens + n x its output limit.")
@click.option("--concurrency", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Requests in flight at once.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=6, show_default=True,
              help="Attempts per request before it fails (429, 408, 409, 5xx, timeouts and "
              "connection errors are retried).")
@click.option("--backoff-base", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds: full-jitter backoff waits up to base x 2^(attempt-1) ...")
@click.option("--backoff-max", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="... capped at this many seconds (server retry headers are always honoured).")
@click.option("--base-url", envvar="OPENAI_BASE_URL", help="API base URL (env OPENAI_BASE_URL; "
              "default https://api.openai.com/v1).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds before a request is abandoned (its outcome then counts as unknown "
              "and it is charged at worst case).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds in-flight requests get to finish after Ctrl-C / SIGTERM.")
@click.option("--simulate", is_flag=True, help="Run against the built-in OpenAI simulator on "
              "127.0.0.1 (no API key, no network, nothing billed).")
@click.option("--new-job", is_flag=True, help="The file at this path changed: run its new "
              "content as a new job instead of refusing.")
@prices_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--lease-ttl", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds another process must wait before taking over the job from a "
              "runner that stopped renewing its lease (killed).")
def run(jobfile: Path, db: Path, cap: int, rpm: int | None, tpm: int | None, concurrency: int,
        max_attempts: int, backoff_base: float, backoff_max: float, base_url: str | None,
        timeout: float, grace: float, simulate: bool, new_job: bool, prices: Path | None,
        quiet: bool, lease_ttl: float) -> None:
    """Price JOBFILE, then run it under the spend cap, recording every result in --db.

    Running the same command again resumes: finished requests are never sent again.
    """
    from .engine import RunOutcome
    from .run import RunSettings, run_job

    settings = RunSettings(
        jobfile=jobfile, db=db, cap_pico=cap, rpm=rpm, tpm=tpm, concurrency=concurrency,
        max_attempts=max_attempts, base_url=base_url, timeout=timeout, backoff_base=backoff_base,
        backoff_max=backoff_max, grace=grace, new_job=new_job, quiet=quiet, prices=prices,
        lease_ttl=lease_ttl, simulate=simulate,
    )
    report, store, job = asyncio.run(run_job(settings, _say))
    status = store.status(job.id)
    store.close()
    _say(format_status(status))
    pending = status.states.get("pending", 0) + status.states.get("reserved", 0)
    failed = status.states.get("failed", 0)
    if report.outcome is RunOutcome.INTERRUPTED:
        click.echo(f"batchrun: {report.message}; {pending:,} request(s) not finished. Run the "
                   "same command again to resume.", err=True)
        sys.exit(128 + (report.signal or 2))
    if report.outcome is RunOutcome.FATAL:
        _fail(f"stopped: {report.message}", EXIT_FATAL)
    if report.outcome is RunOutcome.STORE_ERROR:
        _fail(f"stopped: {report.message}", EXIT_USAGE)
    if pending:
        click.echo(
            f"batchrun: stopped at the spend cap: {pending:,} request(s) not sent, because the "
            f"next one's worst case would pass the cap of {format_usd(cap, 2)}. Run again with a "
            "higher --cap to continue.", err=True)
        sys.exit(EXIT_CAPPED)
    sys.exit(EXIT_FAILURES if failed else EXIT_OK)


def _open_store(db: Path) -> Any:
    from .store import Store

    if not db.exists():
        raise UsageError(f"{db}: no such database (run a job first, or pass --db)")
    return Store.open(db)


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Only this job id (default: every job).")
@json_option
def status(db: Path, job_id: int | None, as_json: bool) -> None:
    """Show each job: requests by state, spend vs cap, tokens, errors, projected cost."""
    store = _open_store(db)
    try:
        jobs = [j for j in store.all_jobs() if job_id is None or j.id == job_id]
        if job_id is not None and not jobs:
            raise UsageError(f"{db}: no job {job_id}")
        statuses = [store.status(j.id) for j in jobs]
    finally:
        store.close()
    if as_json:
        _say(json.dumps({"db": str(db), "jobs": [status_json(s) for s in statuses]}, indent=2))
    else:
        _say("\n".join(format_status(s) for s in statuses) or f"{db}: no jobs yet")


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Job id (default: the most recent job).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file (default: standard output). Written atomically.")
def export(db: Path, job_id: int | None, output: Path | None) -> None:
    """Write results in the Batch API output format, one line per request, in file order."""
    store = _open_store(db)
    try:
        jobs = store.all_jobs()
        chosen = [j for j in jobs if job_id is None or j.id == job_id]
        if not chosen:
            raise UsageError(f"{db}: no job {job_id}" if job_id else f"{db}: no jobs yet")
        job = chosen[-1]
        if output is None:
            out = sys.stdout
            for line in export_lines(store, job):
                out.write(line + "\n")
            out.flush()
        else:
            tmp = output.with_name(output.name + ".partial")
            with tmp.open("w", encoding="utf-8") as fh:
                for line in export_lines(store, job):
                    fh.write(line + "\n")
            tmp.replace(output)
    finally:
        store.close()


main.add_command(simulate)

