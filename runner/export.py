"""What ``batchrun export`` writes: the Batch API output format (JSONL), a CSV for
spreadsheets or a Parquet file for data tools, streamed row by row, into a file written
atomically or to standard output.

The Batch API format is what OpenAI's own batches return, so readers join on ``custom_id``
whichever way a job ran.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from .endpoints import endpoint_for
from .errors import UsageError
from .money import format_exact, pico_to_decimal
from .store import ExportRow, Job

FORMATS = ("jsonl", "csv", "parquet")
CSV_COLUMNS = (
    "custom_id",
    "status",
    "output_text",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "error",
)
# Parquet: rows per record batch, so memory stays flat however large the job.
PARQUET_BATCH_ROWS = 10_000
# Exact dollars in Parquet: 19 digits, 12 of them decimals, hold any int64 of picodollars.
PARQUET_COST_PRECISION, PARQUET_COST_SCALE = 19, 12
PARQUET_INSTALL = "pip install 'batchrun[parquet]'"

# One request as a table row: custom_id, status, output text, finish reason (or None),
# input tokens, output tokens, cost in picodollars, error (or None).
TableRow = tuple[str, str, str, str | None, int, int, int, str | None]


def export_lines(job: Job, rows: Iterable[ExportRow]) -> Iterator[str]:
    """The Batch API output format, one line per request, in job-file order."""
    prefix = job.sha256[:12]
    for row in rows:
        yield _export_line(prefix, row)


def _export_line(prefix: str, r: ExportRow) -> str:
    rid = "batch_req_" + hashlib.sha256(f"{prefix}:{r.seq}".encode()).hexdigest()[:24]
    head = f'{{"id":"{rid}","custom_id":{json.dumps(r.custom_id, ensure_ascii=False)},'
    if r.has_result and r.status_code is not None:
        body = r.body if r.body is not None else "null"
        if r.state != "done" and not _is_json(body):
            # An HTML error page or a truncated body: keep it, as the message of an error.
            body = json.dumps({"error": {"message": body, "code": r.error_code}})
        response = (
            f'{{"status_code":{r.status_code},"request_id":{json.dumps(r.api_request_id)},'
            f'"body":{body}}}'
        )
        return f'{head}"response":{response},"error":null}}'
    if r.has_result:
        code, message = r.error_code or "request_failed", r.error_message or "request failed"
    elif r.state in ("pending", "reserved"):
        code = "not_completed"
        message = r.last_error or "not sent yet: run the job again (it may have reached its cap)"
    else:
        code, message = "unknown", r.last_error or "no result recorded"
    error = json.dumps({"code": code, "message": message}, ensure_ascii=False)
    return f'{head}"response":null,"error":{error}}}'


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def table_rows(rows: Iterable[ExportRow]) -> Iterator[TableRow]:
    """One row per request, the columns of :data:`CSV_COLUMNS`: the CSV and Parquet exports
    share it so they never disagree."""
    for r in rows:
        text, reason = "", None
        if r.state == "done" and r.body:
            endpoint = endpoint_for(r.url)
            try:
                data = json.loads(r.body)
            except ValueError:
                data = None
            if endpoint is not None and isinstance(data, dict):
                text, reason = endpoint.text_of(data)
        yield (
            r.custom_id,
            r.state,
            text,
            reason or None,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_pico,
            r.error_message or r.last_error or None,
        )


def csv_lines(rows: Iterable[ExportRow]) -> Iterator[str]:
    """One CSV row per request (a header first): what people open in a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="")

    def line(values: Iterable[object]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield line(CSV_COLUMNS)
    for cid, state, text, reason, tokens_in, tokens_out, cost, error in table_rows(rows):
        yield line(
            (cid, state, text, reason or "", tokens_in, tokens_out, format_exact(cost), error or "")
        )


def _pyarrow() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a usage error saying how to install them (optional)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(f"--format parquet needs pyarrow: {PARQUET_INSTALL}") from None
    return pyarrow, pyarrow.parquet


def require_parquet() -> None:
    """Fail before any work when Parquet cannot be written (pyarrow is an optional extra)."""
    _pyarrow()


def parquet_schema() -> Any:
    """The Parquet export's columns: text as strings, tokens as int64, cost as exact decimal
    dollars (decimal128(19, 12): money is never a float)."""
    pa, _pq = _pyarrow()
    dollars = pa.decimal128(PARQUET_COST_PRECISION, PARQUET_COST_SCALE)
    return pa.schema(
        [
            pa.field("custom_id", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("output_text", pa.string(), nullable=False),
            pa.field("finish_reason", pa.string()),
            pa.field("input_tokens", pa.int64(), nullable=False),
            pa.field("output_tokens", pa.int64(), nullable=False),
            pa.field("cost_usd", dollars, nullable=False),
            pa.field("error", pa.string()),
        ]
    )


def write_parquet_to(
    rows: Iterable[ExportRow], fh: IO[bytes], batch_rows: int = PARQUET_BATCH_ROWS
) -> int:
    """Write one Parquet row per request to the binary stream ``fh`` in record batches of
    ``batch_rows`` (memory does not grow with the job); how many rows."""
    pa, pq = _pyarrow()
    schema = parquet_schema()
    cost = CSV_COLUMNS.index("cost_usd")
    n = 0
    with pq.ParquetWriter(fh, schema) as writer:
        batch: list[TableRow] = []

        def flush() -> None:
            columns = [list(c) for c in zip(*batch, strict=True)] or [[] for _ in CSV_COLUMNS]
            columns[cost] = [pico_to_decimal(p) for p in columns[cost]]
            arrays = [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            batch.clear()

        for row in table_rows(rows):
            batch.append(row)
            n += 1
            if len(batch) >= batch_rows:
                flush()
        if batch or n == 0:  # an empty export still has its columns
            flush()
    return n


def write_parquet(
    rows: Iterable[ExportRow], output: Path | None, protect: Iterable[Path] = ()
) -> int:
    """The Parquet export into ``output`` atomically, or to standard output's binary buffer
    (refused on a terminal: it is binary); how many rows."""
    require_parquet()
    if output is None:
        if sys.stdout.isatty():
            raise UsageError("Parquet is binary: give -o FILE, or pipe standard output")
        sys.stdout.flush()
        out = sys.stdout.buffer
        written = write_parquet_to(rows, out)
        out.flush()
        return written
    with _atomic(output, protect, binary=True) as fh:
        return write_parquet_to(rows, fh)


def write_lines(lines: Iterable[str], output: Path | None, protect: Iterable[Path] = ()) -> int:
    """Write ``lines`` to ``output`` atomically (a partial file is renamed over it at the end),
    or to standard output; how many. ``protect``: files never to overwrite (the database)."""
    if output is None:
        return _write(lines, sys.stdout)
    with _atomic(output, protect, binary=False) as fh:
        return _write(lines, fh)


@contextlib.contextmanager
def _atomic(output: Path, protect: Iterable[Path], *, binary: bool) -> Iterator[Any]:
    """A partial file next to ``output``, renamed over it once written in full; a reader
    never sees half a file, and a failure leaves none behind."""
    target = output.resolve()
    for path in protect:
        for guarded in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
            if target == guarded.resolve() or (
                target.exists() and guarded.exists() and os.path.samefile(target, guarded)
            ):
                raise UsageError(f"{output}: that is the database itself; choose another file")
    if not target.parent.is_dir():
        raise UsageError(f"{output}: no such folder {target.parent}")
    tmp = target.with_name(target.name + ".partial")
    try:
        try:
            with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8", newline="") as fh:
                yield fh
            tmp.replace(target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UsageError(f"{output}: cannot write: {exc.strerror or exc}") from None


def _write(lines: Iterable[str], fh: TextIO) -> int:
    n = 0
    for line in lines:
        fh.write(line)
        fh.write("\n")
        n += 1
    fh.flush()
    return n
