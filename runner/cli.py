"""The ``batchrun`` command: parses options, calls the library, prints, and exits.

Option defaults come from ``runner.settings``. Exit statuses are the command line's alone, in
the two tables below: 0 every request succeeded; 1 finished, some failed permanently (or
requests wait in open Batch API batches); 2 bad input or usage; 3 stopped at the spend cap;
4 stopped by a fatal API error (auth, quota); 5 the API was unreachable; 130 / 143 / 129
stopped by SIGINT / SIGTERM / SIGHUP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import BatchrunError, JobFileError, UsageError
from .money import MAX_PICO, format_usd, usd_to_pico
from .redact import redact
from .settings import (
    BUDGET_PER,
    BUDGET_PERIODS,
    BUDGET_TZ,
    DEFAULT_DB,
    DEMO_CAP_USD,
    Batching,
    Deadline,
    Limits,
    Retry,
    RunSettings,
    Stopping,
    Transport,
)
from .simulator.cli import simulate

EXIT_FAILURES = 1
EXIT_USAGE = 2
# How a run ended -> exit status (a stop by a signal is 128 + its number instead).
EXIT_BY_OUTCOME = {
    "complete": 0,
    "sampled": 0,
    "batches_open": EXIT_FAILURES,
    "capped": 3,
    "overrun": 3,
    "unpriced": 3,
    "fatal": 4,
    "unreachable": 5,
    "refused": EXIT_USAGE,
    "store_error": EXIT_USAGE,
    "interrupted": 130,
    "detached": 130,
}
# An error the library raised -> exit status: the first class in the error's MRO listed here.
EXIT_BY_ERROR = {
    "UsageError": EXIT_USAGE,
    "StoreError": EXIT_USAGE,
    "ApiKeyError": 4,
    "BatchrunError": 1,
}


def exit_status(conclusion: Any) -> int:
    """The exit status of a run, from how it ended (``run.Conclusion`` or ``RunResult``)."""
    outcome = conclusion.outcome.value
    if outcome in ("interrupted", "detached"):
        return 128 + (conclusion.signal or 2)
    if outcome == "complete":
        return EXIT_FAILURES if conclusion.failed else 0
    return EXIT_BY_OUTCOME[outcome]


def error_status(exc: BaseException) -> int:
    """The exit status for an error the library raised."""
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_BY_ERROR:
            return EXIT_BY_ERROR[cls.__name__]
    return 1


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
            sys.exit(error_status(exc))
        except BatchrunError as exc:
            _fail(str(exc), error_status(exc))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order a job goes through them

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole summary (click would cut it short)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                summary = (command.help or "").split("\n\n")[0]
                rows.append((name, " ".join(summary.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


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
        raise click.BadParameter(f"at most {format_usd(MAX_PICO)}")
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


def _file_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """A job file that is a file: a job is found again by its file's content."""
    import runner

    if value == runner.STDIN:
        raise click.BadParameter(
            "standard input cannot be run: a job is found again (to resume it) by its file's "
            "content, so save it to a file first (`batchrun price -` does read standard input)",
            ctx,
            param,
        )
    return _path(ctx, param, value)


db_option = click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="BATCHRUN_DB",
    show_default=True,
    help="The database holding jobs, results and spend: an SQLite file, or a "
    "postgresql://user@host/dbname URL.",
)
prices_option = click.option(
    "--prices",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML price file that overrides or adds models (same shape as the bundled "
    "table; see `batchrun prices`).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


# Set by a command that leaves nothing open (no database, no file, no thread): the console
# script may then end the process without freeing what it built. Freeing the tokenizer's tables
# at interpreter exit costs more than pricing a small job.
_nothing_open = False


class _Outlet(io.RawIOBase):
    """A standard stream's file descriptor whose reader may go away: once a write meets a
    closed pipe (``| head``) or a hung-up terminal, later output is dropped. A run goes on (or
    stops in order) and its exit status says how the job went, not what became of its output.
    A command whose output is the product (``export``) sets ``strict``: it stops instead."""

    _GONE = (errno.EPIPE, errno.EIO, errno.ENXIO)

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.gone = False
        self.strict = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return not self.gone and os.isatty(self.fd)

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = len(view)
        if not self.gone:
            try:
                while view:  # whole writes, as an unbuffered stream (python -u) writes directly
                    view = view[os.write(self.fd, view) :]
            except OSError as exc:
                if exc.errno not in self._GONE:
                    raise
                self.gone = True
        if self.gone and self.strict:
            self.strict = False  # once: the flush at exit must not raise again
            raise BrokenPipeError(errno.EPIPE, "nobody reads the output any more")
        return n


def _stop_when_unread() -> None:
    """This command's output is the product: stop when nobody reads it (click then exits 1)."""
    buffer = getattr(sys.stdout, "buffer", None)
    outlet = getattr(buffer, "raw", buffer)  # under python -u the outlet is the buffer
    if isinstance(outlet, _Outlet):  # the console script's standard output
        outlet.strict = True


def _outlet(stream: Any) -> Any:
    """``stream`` (sys.stdout or sys.stderr) rebuilt on an :class:`_Outlet`, same settings."""
    try:
        fd = stream.fileno()
        buffered = isinstance(stream.buffer, io.BufferedWriter)  # not under python -u
        stream.flush()
    except (AttributeError, OSError, ValueError):
        return stream  # not a file descriptor (embedded, redirected in-process): leave it
    raw = _Outlet(fd)
    return io.TextIOWrapper(
        io.BufferedWriter(raw) if buffered else raw,  # type: ignore[arg-type]
        encoding=stream.encoding,
        errors=stream.errors,
        line_buffering=stream.line_buffering,
        write_through=getattr(stream, "write_through", False),
    )


def entry() -> None:
    """The ``batchrun`` console script: :func:`main`, then a quick exit when nothing is open."""
    sys.stdout, sys.stderr = _outlet(sys.stdout), _outlet(sys.stderr)
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if _nothing_open and (code is None or isinstance(code, int)):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a closed pipe (``| head``): nothing to add
                stream.flush()
        os._exit(code or 0)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrun")
def main() -> None:
    """Run OpenAI Batch-API job files under a spend cap that cannot be passed.

    Price a job first (`batchrun price JOBFILE`), then run it (`batchrun run JOBFILE --cap
    USD`). The API key is read from OPENAI_API_KEY only.
    """


def _sample(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """``--sample``: N requests, or N% of the job's."""
    if value is None:
        return None
    from .settings import Sample

    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            return Sample(share=share)
        size = int(text)
        if size < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter(
            "expected a number of requests (e.g. 100) or a share of the job (e.g. 5%)"
        ) from None
    most = _default(Sample, "most")
    if size > most:
        raise click.BadParameter(f"a sample of {size:,} requests is more than the {most:,} allowed")
    return Sample(size=size)


@main.command()
@click.argument("rows", type=click.Path(dir_okay=False, allow_dash=False, path_type=Path))
@click.option(
    "--template", "-t", required=True, metavar="TEXT",
    help="The user message of each row's request: {column} is replaced by the row's value in "
    "that column ({{ and }} are literal braces).",
)  # fmt: skip
@click.option("--model", "-m", required=True, help="The model of every request, e.g. gpt-4o-mini.")
@click.option(
    "--max-tokens", type=click.IntRange(min=1),
    help="The output limit of each request (max_completion_tokens). Without one, `price` "
    "counts each request at its model's largest possible output.",
)  # fmt: skip
@click.option("--system", metavar="TEXT", help="A system message, the same for every row.")
@click.option(
    "--schema", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
    help="A JSON schema file (an object at the root) the answers must follow: the requests "
    "ask for structured outputs (response_format json_schema, strict), named after the file.",
)  # fmt: skip
@click.option(
    "--id", "id_column", metavar="COLUMN",
    help="Take each request's custom_id from this column (unique values); default: the row "
    "number, row-1, row-2, ...",
)  # fmt: skip
@click.option(
    "--format", "fmt", metavar="[csv|jsonl|parquet]",
    help="The rows file's format (default: from its extension: .csv, .jsonl or .ndjson, "
    ".parquet). Parquet needs pip install 'batchrun[parquet]'.",
)  # fmt: skip
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
    metavar="JOBFILE",
    help="The job file to write, atomically (on an error none is left); '-': standard output.",
)  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No summary or progress on standard error.")
def build(
    rows: Path, template: str, model: str, max_tokens: int | None, system: str | None,
    schema: Path | None, id_column: str | None, fmt: str | None, output: str, quiet: bool,
) -> None:  # fmt: skip
    """Write a job file from a table of rows (CSV, JSONL or Parquet), one request per row.

    Each row becomes a chat completions request: the prompt from --template with the row's
    {column} values, the same model, output limit, system message and schema for every row.
    The rows are streamed, so their number does not matter. A CSV may have quoted commas and
    newlines in its fields and a byte-order mark; it must be UTF-8 with a header line. A
    problem names the row (and line) and the column, and exits 2.

    Example: batchrun build reviews.csv -t 'Sentiment of: {review}' -m gpt-4o-mini -o job.jsonl
    """
    import runner

    from .progress import Reading

    target = None if output == "-" else Path(output)  # "./-" is a file named "-"
    if target is None:
        _stop_when_unread()
    reading = Reading(rows, quiet=quiet)
    try:
        built = runner.build_job(
            rows, target, template=template, model=model, max_tokens=max_tokens, system=system,
            schema=schema, id_column=id_column, fmt=fmt, progress=reading,
        )  # fmt: skip
    finally:
        reading.close()
    if not quiet:
        where = "standard output" if target is None else str(target)
        limit = (
            f", at most {max_tokens:,} output tokens each" if max_tokens else ", no output limit"
        )
        line = (f"built {where}: {built.requests:,} request(s) from {built.rows:,} row(s) of "
                f"{rows} ({model}{limit})")  # fmt: skip
        if target is not None:
            line += f"; next: batchrun price {target}"
        click.echo(redact(line), err=True)
    global _nothing_open
    _nothing_open = True


@main.command()
@click.argument("jobfile", callback=_path)
@prices_option
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Requests per minute: show the least wall time this limit allows (and, with "
    "--sample, keep to it).",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute: show the least wall time this limit allows (and, with "
    "--sample, keep to it).",
)
@click.option(
    "--via", type=click.Choice(["sync", "batch"]),
    help="Price at the synchronous API's rates or the Batch API's (half); by default the "
    "table is at synchronous rates and a line gives the Batch API's floor and worst case.",
)  # fmt: skip
@click.option(
    "--sample", callback=_sample, metavar="N|N%",
    help="Send a seeded random sample of N requests (or N% of them), stratified by model, "
    "endpoint and output limit, and project what the whole job will really cost, with a 95% "
    "interval. The sample is sent for real (through the synchronous API, under a cap of its "
    "own worst case) and recorded in --db: a `run` of the same file and --db reuses it.",
)  # fmt: skip
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True,
    help="--sample: which sample to draw (the same seed draws the same requests).",
)  # fmt: skip
@click.option(
    "--db", default=DEFAULT_DB, envvar="BATCHRUN_DB", show_default=True,
    help="--sample: the database the job and its sampled results go to (as `run --db`).",
)  # fmt: skip
@click.option(
    "--base-url", envvar="OPENAI_BASE_URL", callback=_base_url,
    help="--sample: API base URL (default https://api.openai.com/v1).",
)  # fmt: skip
@click.option(
    "--simulate", is_flag=True,
    help="--sample: send it to the built-in simulator (no API key, nothing billed).",
)  # fmt: skip
@click.option(
    "--yes", "-y", is_flag=True,
    help="--sample: do not ask before sending it (asked on a terminal only).",
)  # fmt: skip
@click.option(
    "--budget", metavar="NAME",
    help="Say whether the job fits what this budget in --db has left this period (at worst "
    "case; see `batchrun budget`).",
)  # fmt: skip
@click.option(
    "--deadline", metavar="WHEN",
    help="Print the plan `run --via auto --deadline WHEN` would follow (nothing is sent): "
    "the cost all by batch and all sync, the synchronous tail's time at --rpm/--tpm, and the "
    "latest time the batches may run to.",
)  # fmt: skip
@click.option(
    "--deadline-margin", type=click.FloatRange(min=0), default=_default(Deadline, "margin"),
    show_default=True, help="--deadline: as `run --deadline-margin`.",
)  # fmt: skip
@click.option(
    "--deadline-slack", type=_Seconds(0), default=_default(Deadline, "slack"),
    show_default=True, help="--deadline: as `run --deadline-slack`.",
)  # fmt: skip
@click.option(
    "--deadline-cancel", type=_Seconds(0), default=_default(Deadline, "cancel"),
    show_default=True, help="--deadline: as `run --deadline-cancel`.",
)  # fmt: skip
@json_option
def price(
    jobfile: Path,
    prices: Path | None,
    rpm: int | None,
    tpm: int | None,
    via: str | None,
    sample: Any,
    seed: int,
    db: str,
    base_url: str | None,
    simulate: bool,
    yes: bool,
    budget: str | None,
    deadline: str | None,
    deadline_margin: float,
    deadline_slack: float,
    deadline_cancel: float,
    as_json: bool,
) -> None:
    """Price JOBFILE in full; with --sample, send a sample and project the real cost.

    Counts every request's input tokens exactly (offline) and prints, per model and in total:
    requests, input tokens, the sum of output limits, requests without an output limit, the
    cost floor (input only) and the worst case (input plus every output limit). JOBFILE may be
    - (standard input), e.g. to price a compressed file: zcat job.jsonl.gz | batchrun price -

    Example: batchrun price jobs/example.jsonl --sample 100 --rpm 500 --tpm 200000
    """
    import runner

    from .report import budget_fit, budget_json, format_plan, plan_json

    if sample is not None and deadline is not None:
        raise UsageError("--deadline prints the plan of the whole job: give it without --sample")
    if sample is not None:
        _price_sample(jobfile, prices, rpm, tpm, via, sample, seed, db, base_url, simulate, yes,
                      as_json, budget)  # fmt: skip
        return
    given = (("--seed", seed != 0), ("--base-url", base_url), ("--simulate", simulate))
    unused = [flag for flag, value in given if value]
    if unused:
        raise UsageError(f"{', '.join(unused)} only mean something with --sample")
    from .progress import Reading

    table = runner.price_table(prices)
    books = None
    if budget is not None and budget.lower() != "none":  # looked up before a large file is read
        with _open_readonly(db) as database:
            books = database.budget(budget)
    reading = Reading(jobfile)
    try:
        plan = runner.price(jobfile, prices=prices, progress=reading)
    finally:
        reading.close()
    worst = plan.total.batch_worst_pico if via == "batch" else plan.total.worst_pico
    by_deadline = None
    if deadline is not None:
        spec = Deadline(
            spec=deadline, margin=deadline_margin, slack=deadline_slack, cancel=deadline_cancel
        )
        by_deadline = runner.deadline_plan(plan, spec, rpm, tpm, table=table)
    if as_json:
        from .report import deadline_plan_json

        out = plan_json(plan, table, rpm, tpm, via=via)
        if books is not None:
            out["budget"] = {**budget_json(books), "fits_worst_case": worst <= books.left_pico}
        if by_deadline is not None:
            out["deadline"] = deadline_plan_json(by_deadline)
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_plan(plan, table, rpm, tpm, via=via))
        if books is not None:
            click.echo(budget_fit(books, worst))
        if by_deadline is not None:
            from .report import format_deadline_plan

            click.echo(format_deadline_plan(by_deadline))
    if books is not None:
        return  # a database was opened: let it close as usual
    global _nothing_open
    _nothing_open = True


def _price_sample(
    jobfile: Path, prices: Path | None, rpm: int | None, tpm: int | None, via: str | None,
    sample: Any, seed: int, db: str, base_url: str | None, simulate: bool, yes: bool,
    as_json: bool, budget: str | None = None,
) -> None:  # fmt: skip
    import asyncio
    from dataclasses import replace

    import runner

    from .progress import Progress
    from .report import format_projection, projection_json

    if str(jobfile) == runner.STDIN:
        raise UsageError(
            "a sample is recorded as part of its job, which is found again by its file's "
            "content: save standard input to a file first"
        )
    settings = RunSettings(
        cap_pico=None, jobfile=jobfile, db=db, prices=prices, simulate=simulate,
        quiet=as_json, limits=Limits(rpm=rpm, tpm=tpm), transport=Transport(base_url=base_url),
        sample=replace(sample, seed=seed), budget=budget,
    )  # fmt: skip
    confirm = None
    if sys.stdin.isatty() and not yes:
        from .report import confirm_question

        def confirm(est: Any) -> bool:
            return click.confirm(confirm_question(est), default=False, err=True)

    def display(stats: Any, total: int, before: int) -> Progress:
        return Progress(stats, total, before, quiet=as_json)

    echo = (lambda _text: None) if as_json else _say
    result, projection = asyncio.run(
        runner.sample_with(settings, echo=echo, confirm=confirm, display=display, signals=True)
    )
    if result.message:
        click.echo(redact(f"batchrun: {result.message}"), err=True)
    fit = None
    books = None
    if budget is not None and budget.lower() != "none":
        from .report import budget_fit, budget_json

        lane = projection.lane(via == "batch")
        spent = usd_to_pico(result.status["spent_usd"])
        rest = tuple(max(0, x - spent) for x in (lane.total_pico, lane.low_pico, lane.high_pico))
        with _open_readonly(db) as database:
            books = database.budget(budget)
        worst_left = projection.worst_pico(via == "batch") - spent
        fit = budget_fit(books, max(0, worst_left), rest)  # type: ignore[arg-type]
    if as_json:
        status = result.status
        out = {
            "job": status["job"],
            "path": status["path"],
            "requests": status["requests"],
            "floor_usd": status["estimate_floor_usd"],
            "worst_usd": status["estimate_worst_usd"],
            "spent_usd": status["spent_usd"],
            "sample": {"seed": seed, "outcome": result.outcome.value},
            "projection": projection_json(projection, via),
        }
        if books is not None:
            out["budget"] = {**budget_json(books), "fit": fit}
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_projection(projection, via))
        if fit is not None:
            click.echo(fit)
    code = exit_status(result)
    if code:
        sys.exit(code)


@main.command(name="prices")
@prices_option
@json_option
def prices_cmd(prices: Path | None, as_json: bool) -> None:
    """List the price table in use, its as-of date and where each entry came from.

    Example: batchrun prices --prices my-prices.toml
    """
    import runner

    from .report import format_prices, prices_json

    table = runner.price_table(prices)
    if as_json:
        click.echo(json.dumps(prices_json(table), indent=2))
    else:
        click.echo(format_prices(table))


@main.command()
@click.argument("jobfile", required=False, callback=_file_path)
@click.option(
    "--db",
    default=DEFAULT_DB,
    envvar="BATCHRUN_DB",
    show_default=True,
    help="The database for jobs, results and spend: an SQLite file, or a "
    "postgresql://user@host/dbname URL that runners on several machines share. Running the "
    "same command again with the same --db resumes the job.",
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
    help="API base URL (default https://api.openai.com/v1).",
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
    "--flex-timeout",
    type=_Seconds(0.1),
    default=_default(Transport, "flex_timeout"),
    show_default=True,
    help='The same for a request sent at service_tier "flex" (slower by design; OpenAI\'s '
    "flex guide allows 15 minutes).",
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
    "--no-reuse", "no_reuse", is_flag=True,
    help="When the file at this path changed, send every request of its new content again "
    "(by default, requests whose custom_id and body did not change reuse the earlier job's "
    "results and are not paid again).",
)  # fmt: skip
@click.option(
    "--retry-failed", "retry_failed", is_flag=False, flag_value="", default=None,
    metavar="[CODES]",
    help="Queue the job's failed requests again (all of them, or only those whose error code "
    "or HTTP status is in the comma-separated CODES, e.g. --retry-failed=404,500) and run "
    "them under the same cap.",
)  # fmt: skip
@click.option(
    "--invalid", "retry_invalid", is_flag=True,
    help="With --retry-failed: also queue the requests whose outputs did not parse or did not "
    "match the JSON schema they asked for (response_format / text.format; `status` counts "
    "them). They were billed: sending them again is paid again, under the same cap. CODES "
    "output_not_json or output_mismatch pick one kind.",
)  # fmt: skip
@click.option(
    "--allow-unbounded",
    is_flag=True,
    help="Send requests that continue a stored "
    "conversation (previous_response_id, conversation), whose cost no worst case "
    "bounds.",
)
@click.option(
    "--strict-models", is_flag=True,
    help="Stop the run (exit 3) when a response names a model, or reports a service tier, "
    "that the price table has no prices for (a proxy or router falling back to another "
    "model). By default such a result is booked at its worst case, said in the run and "
    "counted in `status`.",
)  # fmt: skip
@click.option(
    "--via", type=click.Choice(["sync", "batch", "auto"]), default=_default(RunSettings, "via"),
    show_default=True,
    help="sync: each request its own API call, as fast as the rate limits allow. batch: the "
    "OpenAI Batch API, at half the price, each batch taking up to 24 h. auto: the Batch API "
    "first, then synchronously what its batches did not finish (expired or failed lines, or "
    "by --deadline). A job may go on with another --via (its pending requests).",
)  # fmt: skip
@click.option(
    "--deadline", metavar="WHEN",
    help="--via auto: finish by WHEN (an ISO time, 2026-12-03T08:00, or a duration, 8h, 90s, "
    "counted from the first run that gives it), as cheaply as that allows: the batches are "
    "cancelled (what they finished is kept) and the rest is sent synchronously once the time "
    "left comes down to what the synchronous API needs at the rate limits, with the margin.",
)  # fmt: skip
@click.option(
    "--deadline-margin", type=click.FloatRange(min=0), default=_default(Deadline, "margin"),
    show_default=True,
    help="--deadline: plan the synchronous tail this share longer than the rate limits "
    "allow (retries, 429s, limits shared with other work).",
)  # fmt: skip
@click.option(
    "--deadline-slack", type=_Seconds(0), default=_default(Deadline, "slack"),
    show_default=True,
    help="--deadline: seconds added to the plan on top of the margin (the last requests' "
    "latency).",
)  # fmt: skip
@click.option(
    "--deadline-cancel", type=_Seconds(0), default=_default(Deadline, "cancel"),
    show_default=True,
    help="--deadline: seconds cancelling the open batches may take (the Batch API's "
    "cancelling lasts up to ~10 minutes, and the lines a cancelling batch holds come back "
    "only when it ends): the switch comes this much earlier while batches are open.",
)  # fmt: skip
@click.option(
    "--batch-requests", type=click.IntRange(1, 50_000),
    default=_default(Batching, "requests_per_batch"), show_default=True,
    help="--via batch: most requests per batch (batches also stay under 200 MB, one endpoint "
    "and one model each).",
)  # fmt: skip
@click.option(
    "--poll-interval", type=_Seconds(0.01), default=_default(Batching, "poll_interval"),
    show_default=True,
    help="--via batch: longest wait between two status polls (polls back off from a few "
    "seconds up to it).",
)  # fmt: skip
@click.option(
    "--batch-queue-tokens", type=click.IntRange(min=1),
    help="--via batch: keep the input tokens of a model's enqueued batches under this many "
    "(the organization's enqueued-token limit is also waited out when a batch meets it).",
)  # fmt: skip
@click.option(
    "--budget", metavar="NAME",
    help="Draw on this budget too (see `batchrun budget`): a request is sent only if it fits "
    "under the job's cap and what the budget has left this period, across every job and "
    "runner that draws on it. Default: the database's default budget, if it has one; "
    "'none': no budget.",
)  # fmt: skip
@prices_option
@click.option(
    "--yes", "-y", is_flag=True,
    help="Do not ask before sending (run asks on a terminal; scripts and pipes never ask).",
)  # fmt: skip
@click.option(
    "--quiet", "-q", is_flag=True,
    help="Nothing on standard output (no estimate, progress or summary); errors still go to "
    "standard error.",
)  # fmt: skip
def run(**options: Any) -> None:
    """Price JOBFILE, then run it under the spend cap, recording every result in --db.

    Running the same command again resumes: finished requests are never sent again.

    Example: batchrun run jobs/example.jsonl --cap 5.00 --rpm 500 --tpm 200000
    """
    import asyncio

    import runner

    from .progress import Progress
    from .report import format_status

    settings = _run_settings(options)
    quiet = settings.quiet
    confirm = None
    if sys.stdin.isatty() and not options["yes"]:
        from .report import confirm_question

        def confirm(est: Any) -> bool:
            return click.confirm(confirm_question(est), default=False, err=True)

    def display(stats: Any, total: int, before: int) -> Progress:
        return Progress(stats, total, before, quiet=quiet)

    echo = (lambda _text: None) if quiet else _say
    result = asyncio.run(
        runner.run_with(settings, echo=echo, confirm=confirm, display=display, signals=True)
    )
    echo(format_status(result.job_status))
    if result.message:
        click.echo(redact(f"batchrun: {result.message}"), err=True)
    sys.exit(exit_status(result))


def _codes(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(code.strip() for code in value.split(",") if code.strip())


def _retry_invalid(o: dict[str, Any]) -> bool:
    if o["retry_invalid"] and o["retry_failed"] is None:
        raise UsageError(
            "--invalid goes with --retry-failed: `--retry-failed --invalid` sends the requests "
            "whose outputs did not match their JSON schema again (they are paid again)"
        )
    return bool(o["retry_invalid"])


def _run_settings(o: dict[str, Any]) -> RunSettings:
    """``run``'s options as settings (defaults were taken from ``settings`` by the options)."""
    if (o["jobfile"] is None) == (o["job_id"] is None):
        raise UsageError("give a JOBFILE, or --job ID to run a job already in --db")
    cap = o["cap"]
    if cap is None and o["job_id"] is None:  # joining a job keeps its cap unless given
        if not o["simulate"]:
            raise UsageError("--cap is required: the most this job may spend, e.g. --cap 5.00")
        cap = usd_to_pico(DEMO_CAP_USD)
    return RunSettings(
        cap_pico=cap,
        jobfile=o["jobfile"],
        db=o["db"],
        job_id=o["job_id"],
        prices=o["prices"],
        reuse=not o["no_reuse"],
        retry_failed=_codes(o["retry_failed"]),
        retry_invalid=_retry_invalid(o),
        allow_unbounded=o["allow_unbounded"],
        strict_models=o["strict_models"],
        simulate=o["simulate"],
        quiet=o["quiet"],
        limits=Limits(rpm=o["rpm"], tpm=o["tpm"], concurrency=o["concurrency"]),
        retry=Retry(
            max_attempts=o["max_attempts"],
            backoff_base=o["backoff_base"],
            backoff_max=o["backoff_max"],
            max_wait=o["max_wait"],
            outage_limit=o["outage_limit"],
        ),
        transport=Transport(
            base_url=o["base_url"], timeout=o["timeout"], flex_timeout=o["flex_timeout"]
        ),
        stopping=Stopping(grace=o["grace"], heartbeat_ttl=o["heartbeat_ttl"]),
        via=o["via"],
        deadline=_deadline(o),
        batching=_batching(o),
        budget=o["budget"],
    )


def _deadline(o: dict[str, Any]) -> Deadline:
    """``--deadline``: checked here (a bad WHEN is a usage error before anything opens); the
    run resolves it against the job (a duration counts from the first run that gave it)."""
    spec = o.get("deadline")
    if spec is not None:
        import runner

        runner.resolve_deadline(spec, 0.0)
        if o["via"] != "auto":
            raise UsageError("--deadline plans across both APIs: give it with --via auto")
    return Deadline(
        spec=spec,
        margin=o.get("deadline_margin", _default(Deadline, "margin")),
        slack=o.get("deadline_slack", _default(Deadline, "slack")),
        cancel=o.get("deadline_cancel", _default(Deadline, "cancel")),
    )


def _batching(o: dict[str, Any], **extra: Any) -> Batching:
    poll = o["poll_interval"]
    return Batching(
        requests_per_batch=o.get("batch_requests") or _default(Batching, "requests_per_batch"),
        poll_interval=poll,
        poll_first=min(_default(Batching, "poll_first"), poll),
        queue_tokens=o.get("batch_queue_tokens"),
        **extra,
    )


@main.command()
@click.argument("jobfile", required=False, callback=_file_path)
@db_option
@click.option(
    "--job", "job_id", type=click.IntRange(min=1),
    help="The job id (default: the job of JOBFILE, else the most recent job).",
)  # fmt: skip
@click.option(
    "--base-url", envvar="OPENAI_BASE_URL", callback=_base_url,
    help="API base URL (env OPENAI_BASE_URL; default https://api.openai.com/v1).",
)  # fmt: skip
@click.option(
    "--poll-interval", type=_Seconds(0.01), default=_default(Batching, "poll_interval"),
    show_default=True, help="Longest wait between two status polls.",
)  # fmt: skip
@prices_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def cancel(**o: Any) -> None:
    """Cancel the job's open Batch API batches and record the partial results they return.

    Requests that had not run go back to pending: run the job again to send them.

    Example: batchrun cancel --db batchrun.db --job 1
    """
    import asyncio

    import runner

    from .progress import Progress
    from .report import format_status

    settings = RunSettings(
        cap_pico=0, jobfile=o["jobfile"], db=o["db"], job_id=o["job_id"], prices=o["prices"],
        quiet=o["quiet"], transport=Transport(base_url=o["base_url"]), via="batch",
        batching=_batching(o, cancel=True),
    )  # fmt: skip

    def display(stats: Any, total: int, before: int) -> Progress:
        return Progress(stats, total, before, quiet=o["quiet"])

    result = asyncio.run(runner.cancel_with(settings, echo=_say, display=display, signals=True))
    status = result.job_status
    _say(format_status(status))
    if result.outcome.value == "complete":
        pending = status.states.get("pending", 0)
        click.echo(
            f"batchrun: no batch of job {status.job.id} is open any more; {pending:,} "
            "request(s) are pending: run the job again to send them.",
            err=True,
        )
        sys.exit(0)
    click.echo(redact(f"batchrun: {result.message}"), err=True)
    sys.exit(exit_status(result))


def _open_readonly(db: str) -> Any:
    import runner

    return runner.Database(db, readonly=True)


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Only this job id (default: every job).")
@click.option(
    "--failed", "list_failed", is_flag=True,
    help="List the failed requests (custom_id, error code, message) instead.",
)  # fmt: skip
@json_option
def status(db: str, job_id: int | None, list_failed: bool, as_json: bool) -> None:
    """Show each job: requests by state, spend vs cap, tokens, errors, projected cost.

    Example: batchrun status --db batchrun.db --job 1
    """
    from .report import failed_json, format_failed, format_status, status_json

    with _open_readonly(db) as database:
        name = database.name  # a URL's password is never printed
        if list_failed:
            job = database.job(job_id)
            failed = job.failed()
            _say(json.dumps(failed_json(job.id, failed), indent=2) if as_json
                 else format_failed(job.id, failed))  # fmt: skip
            return
        jobs = [j for j in database.jobs() if job_id is None or j.id == job_id]
        if job_id is not None and not jobs:
            raise UsageError(f"{name}: no job {job_id}")
        statuses = [j.summary() for j in jobs]
    if as_json:
        _say(json.dumps({"db": name, "jobs": [status_json(s) for s in statuses]}, indent=2))
    else:
        _say("\n".join(format_status(s) for s in statuses) or f"{name}: no jobs yet")


@main.command()
@db_option
@click.option("--job", "job_id", type=int, help="Job id (default: the most recent job).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
    help="Write to this file, written atomically; '-' or none: standard output.",
)  # fmt: skip
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv", "parquet"]), default="jsonl",
    show_default=True,
    help="jsonl: the Batch API output format; csv: custom_id, status, output text, finish "
    "reason, input/output tokens, cost, error (for spreadsheets and pandas); parquet: the CSV's "
    "columns typed, tokens as int64 and cost as exact decimal dollars (decimal128(19, 12), "
    "never a float); needs pip install 'batchrun[parquet]'.",
)  # fmt: skip
@click.option(
    "--only", type=click.Choice(["ok", "failed"]),
    help="Only the requests that succeeded, or only those that failed for good.",
)  # fmt: skip
@click.option(
    "--rows", "rows_path", type=click.Path(dir_okay=False, path_type=Path), metavar="ROWS",
    help="Join the results back to the rows file the job was built from (`batchrun build "
    "ROWS`): one row per input row, its columns first, then the result's (a name the rows "
    "already use gets a result_ prefix); with --format csv or parquet.",
)  # fmt: skip
@click.option(
    "--id", "id_column", metavar="COLUMN",
    help="--rows: the column build took custom_id from (its --id), so each row is checked "
    "against its result; default: the row number (ROWS must then be the very file the job "
    "was built from: only the count of rows is checked).",
)  # fmt: skip
@click.option(
    "--fields", "with_fields", is_flag=True,
    help="With --format csv or parquet: a column per top-level property of the JSON schema "
    "the job's requests ask for (response_format / text.format; `batchrun build --schema`), "
    "from each output parsed (nested values as JSON text; in Parquet, typed when the property "
    "has one scalar type). A name already taken gets a field_ prefix.",
)  # fmt: skip
def export(
    db: str, job_id: int | None, output: str | None, fmt: str, only: str | None,
    rows_path: Path | None, id_column: str | None, with_fields: bool,
) -> None:  # fmt: skip
    """Write results, a row per request: Batch API format, CSV or Parquet, or joined to --rows.

    With --rows ROWS (the rows file the job was built from by `batchrun build`), each row of
    ROWS comes with its request's result: the rows' columns, then the CSV's.

    Example: batchrun export --rows jobs/reviews.csv --format csv -o reviews-results.csv
    """
    from .export import (
        Fields,
        csv_lines,
        export_lines,
        require_parquet,
        write_joined,
        write_lines,
        write_parquet,
    )

    target = None if output in (None, "-") else Path(output)  # "./-" is a file named "-"
    if id_column is not None and rows_path is None:
        raise UsageError("--id only means something with --rows")
    if rows_path is not None and fmt == "jsonl":
        raise UsageError("--rows joins the results to the rows as a table: --format csv or parquet")
    if with_fields and fmt == "jsonl":
        raise UsageError("--fields writes the outputs' fields as columns: --format csv or parquet")
    if fmt == "parquet":
        require_parquet()  # before reading a large job
    if target is None:
        _stop_when_unread()
    with _open_readonly(db) as database:
        job = database.job(job_id)
        protect = [Path(db)] if "://" not in db else []
        fields = None
        if with_fields:
            schema = job.output_schema()
            if schema is None:
                raise UsageError(
                    f"--fields: no request of job {job.id} asks for JSON (a response_format or "
                    "text.format with a JSON schema; `batchrun build --schema FILE` writes one)"
                )
            fields = Fields(schema)
        if rows_path is not None:
            n = write_joined(rows_path, job.rows(), target, fmt=fmt, job_id=job.id,
                             id_column=id_column, only=only, protect=protect,
                             fields=fields)  # fmt: skip
            if target is not None:
                which = f" ({only} only)" if only else ""
                _say(f"wrote {target}: {n:,} row(s) of {rows_path} with job {job.id}'s "
                     f"results{which}")  # fmt: skip
            return
        rows = job.rows(only)
        if fmt == "parquet":
            n = write_parquet(rows, target, protect, fields)
        else:
            lines = csv_lines(rows, fields) if fmt == "csv" else export_lines(job.record, rows)
            n = write_lines(lines, target, protect) - (1 if fmt == "csv" else 0)  # the header
    if target is not None:  # on standard output, the rows alone
        which = f" ({only} only)" if only else ""
        _say(f"wrote {target}: {n:,} request(s) of job {job.id}{which}")


@main.command(name="report")
@db_option
@click.option("--job", "job_id", type=int, help="Job id (default: the most recent job).")
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The HTML file to write (atomically). It opens offline: nothing is fetched.",
)  # fmt: skip
def report_cmd(db: str, job_id: int | None, output: Path) -> None:
    """Write a job's run report: one HTML page of charts that opens offline.

    Spend over time against the cap, throughput with rate-limited periods marked, latency
    percentiles, errors by kind over time, cost by model, and the numbers `status --json`
    prints.

    Example: batchrun report --db batchrun.db --job 1 -o report.html
    """
    import time

    from .export import write_lines
    from .htmlreport import render

    if not output.resolve().parent.is_dir():  # say so before reading a large job
        raise UsageError(f"{output}: no such folder {output.resolve().parent}")
    with _open_readonly(db) as database:
        job = database.job(job_id)
        status, timeline, budgets = job.summary(), job.timeline(), job.budget_spend()
        projections = job.projection_over_time()
    page = render(
        status, timeline, db=database.name, generated_at=time.time(), budgets=budgets,
        projections=projections,
    )  # fmt: skip
    write_lines([page], output, [Path(db)] if "://" not in db else [])
    _say(f"wrote {output}: the report of job {job.id} ({job.path})")


@main.command()
@db_option
def upgrade(db: str) -> None:
    """Bring a database written by an older batchrun up to this version's schema.

    Reading commands (status, export, report) never change a database, so they ask for this
    first; `run` upgrades the database it opens by itself.

    Example: batchrun upgrade --db batchrun.db
    """
    import runner

    runner.Database(db, create=False).close()
    _say(f"{db}: up to date")


@main.group()
def budget() -> None:
    """Named spending limits by day, week or month, held across every job that draws on them.

    A run with `--budget NAME` (or in a database with a default budget) sends a request only
    if it fits under its job's cap and what the budget has left this period; runs that would
    pass it stop with exit 3. The cost of a request belongs to the period it was reserved in.

    Example: batchrun budget set team 100 --per month --tz Europe/Paris --default
    """


# A negative amount ("-5") is an amount to refuse in words, not an unknown option.
@budget.command(name="set", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("amount", required=False, metavar="[USD]")
@click.option(
    "--per", type=click.Choice(BUDGET_PERIODS), default=None,
    help=f"The period the amount is for (a new budget: {BUDGET_PER}; 'total' never resets).",
)  # fmt: skip
@click.option(
    "--tz", default=None,
    help=f"The time zone its periods start in, an IANA name (a new budget: {BUDGET_TZ}).",
)  # fmt: skip
@click.option(
    "--default/--no-default", "is_default", default=None,
    help="Make it the database's default budget: every run draws on it unless --budget "
    "names another (or none).",
)  # fmt: skip
@db_option
def budget_set(
    name: str, amount: str | None, per: str | None, tz: str | None, is_default: bool | None,
    db: str,
) -> None:  # fmt: skip
    """Create a budget, or change its amount, period, zone or default (at any time).

    Lowered below what its period has spent, it stops new sends at once.

    Example: batchrun budget set team 100 --per month
    """
    import runner

    from .report import budget_summary

    runner.check_budget(name, amount, per=per, tz=tz, default=is_default)  # before opening
    with runner.Database(db) as database:
        books, new = database.set_budget(name, amount, per=per, tz=tz, default=is_default)
    what = "created" if new else "set"
    default = "; the default for every run" if books.budget.is_default else ""
    _say(f"{what} {budget_summary(books)}{default}")


@budget.command(name="list")
@db_option
@json_option
def budget_list(db: str, as_json: bool) -> None:
    """Every budget in the database, with this period's spend.

    Example: batchrun budget list --db batchrun.db
    """
    from .report import budget_json, budget_summary

    with _open_readonly(db) as database:
        all_books = database.budgets()
    if as_json:
        _say(json.dumps({"db": database.name, "budgets": [budget_json(b) for b in all_books]},
                        indent=2))  # fmt: skip
        return
    lines = [
        budget_summary(b) + (" (default)" if b.budget.is_default else "") for b in all_books
    ] or [f"{database.name}: no budgets (`batchrun budget set NAME USD` creates one)"]
    _say("\n".join(lines))


@budget.command(name="show")
@click.argument("name")
@db_option
@json_option
def budget_show(name: str, db: str, as_json: bool) -> None:
    """One budget: this period's spend, reservations, what is left, when it resets, and the
    jobs drawing on it.

    Example: batchrun budget show team --json
    """
    from .report import budget_json, format_budget

    with _open_readonly(db) as database:
        books = database.budget(name)
        draws = database.budget_jobs(name)
    if as_json:
        _say(json.dumps(budget_json(books, draws), indent=2))
    else:
        _say(format_budget(books, draws))


@budget.command(name="rm")
@click.argument("name")
@db_option
def budget_rm(name: str, db: str) -> None:
    """Remove a budget that no run draws on now (what was booked under it stays booked).

    Example: batchrun budget rm team
    """
    import runner

    with runner.Database(db, create=False) as database:
        database.remove_budget(name)
    _say(f"removed budget {name}")


main.add_command(simulate)


def _env_vars(group: click.Group, skip: tuple[str, ...] = ("simulate",)) -> None:
    """Every option can also come from ``BATCHRUN_<OPTION>`` (``--max-attempts`` from
    ``BATCHRUN_MAX_ATTEMPTS``); ``--help`` says so. An option that already reads a variable
    (``--base-url`` from ``OPENAI_BASE_URL``) reads ``BATCHRUN_<OPTION>`` first."""
    for name, command in group.commands.items():
        if name in skip:
            continue
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            flag = max(param.opts, key=len).lstrip("-")
            ours = "BATCHRUN_" + flag.upper().replace("-", "_")
            existing = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            param.envvar = [ours, *[e for e in existing if e != ours]]
            param.show_envvar = True


_env_vars(main)
