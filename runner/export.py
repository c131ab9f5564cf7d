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
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

from .endpoints import endpoint_for
from .errors import UsageError
from .money import format_exact, pico_to_decimal
from .rows import PARQUET_INSTALL, Rows, describe_columns, row_id, text_of
from .store import ExportRow, Job
from .structured import Schema, parsed_output

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

# One request as a table row: custom_id, status, output text, finish reason (or None),
# input tokens, output tokens, cost in picodollars, error (or None); with ``Fields``, then the
# parsed output's fields (raw JSON values, None when absent).
TableRow = tuple[Any, ...]
_BASE = len(CSV_COLUMNS)


class Fields:
    """``export --fields``: a column per top-level property of the job's JSON schema, filled
    from each output parsed as JSON (the first choice's). In CSV a string is itself, another
    value its JSON text (nested objects and arrays too); in Parquet a property of one scalar
    type (string, integer, number, boolean, nullable or not) is a column of that type, the rest
    strings of JSON text. A value of another type than its column's (an output that does not
    match) is empty in Parquet and its JSON text in CSV; an output that does not parse leaves
    every field empty (the error column says why)."""

    def __init__(self, schema: Schema) -> None:
        self.properties = schema.properties()
        if not self.properties:
            raise UsageError(
                "--fields: the job's JSON schema has no top-level properties to write as columns"
            )
        self.kinds = [_kind(sub) for _name, sub in self.properties]

    def names(self, taken: Iterable[str]) -> list[str]:
        """The columns' names: the properties', a name already taken getting a ``field_``
        prefix."""
        used = set(taken)
        out = []
        for name, _sub in self.properties:
            while name in used:
                name = f"field_{name}"
            used.add(name)
            out.append(name)
        return out

    def values(self, output: Any) -> tuple[Any, ...]:
        if not isinstance(output, dict):
            return (None,) * len(self.properties)
        return tuple(output.get(name) for name, _sub in self.properties)

    def arrow_types(self) -> list[Any]:
        pa, _pq = _pyarrow()
        types = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                 "boolean": pa.bool_()}  # fmt: skip
        return [types.get(kind, pa.string()) for kind in self.kinds]


def _kind(schema: Any) -> str:
    """A property's column type: string, integer, number or boolean when it has one such type
    (or that and null), else json (its values written as JSON text)."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kinds = [k for k in (kind if isinstance(kind, list) else [kind]) if k != "null"]
    if len(kinds) == 1 and kinds[0] in ("string", "integer", "number", "boolean"):
        return str(kinds[0])
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if kind is None and isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
        return "string"
    return "json"


def _typed(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else None
    if kind == "boolean":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value if isinstance(value, int) and -(2**63) <= value < 2**63 else None
    if kind == "number":
        return float(value) if isinstance(value, int | float) else None
    return json.dumps(value, ensure_ascii=False)


def _field_text(value: Any) -> str:
    """A field's CSV cell: a string as itself, nothing for null or absent, else JSON text."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


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


def table_rows(rows: Iterable[ExportRow], fields: Fields | None = None) -> Iterator[TableRow]:
    """One row per request, the columns of :data:`CSV_COLUMNS` (then those of ``fields``): the
    CSV and Parquet exports share it so they never disagree."""
    for r in rows:
        text, reason, output = "", None, None
        if r.state == "done" and r.body:
            endpoint = endpoint_for(r.url)
            try:
                data = json.loads(r.body)
            except ValueError:
                data = None
            if endpoint is not None and isinstance(data, dict):
                text, reason = endpoint.text_of(data)
                if fields is not None:
                    output = parsed_output(r.url, data)
        extra = fields.values(output) if fields is not None else ()
        yield (
            r.custom_id,
            r.state,
            text,
            reason or None,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_pico,
            r.error_message or r.last_error or None,
            *extra,
        )


def _csv_record() -> Callable[[Iterable[object]], str]:
    """A function that writes one CSV record as a string, without its line end. The writer
    ends lines with \\r\\n because the csv module quotes a field holding a line end only if
    that character is in its ``lineterminator``: an output text or a review of several lines
    must stay one quoted field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def line(values: Iterable[object]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()[:-2]

    return line


def _csv_cells(row: TableRow) -> list[object]:
    """A table row's CSV cells (exact dollars, empty for None)."""
    cid, state, text, reason, tokens_in, tokens_out, cost, error = row[:_BASE]
    return [
        cid, state, text, reason or "", tokens_in, tokens_out, format_exact(cost), error or "",
        *(_field_text(v) for v in row[_BASE:]),
    ]  # fmt: skip


def csv_lines(rows: Iterable[ExportRow], fields: Fields | None = None) -> Iterator[str]:
    """One CSV row per request (a header first): what people open in a spreadsheet; with
    ``fields``, a column per field of the parsed outputs after the usual ones."""
    line = _csv_record()

    yield line([*CSV_COLUMNS, *(fields.names(CSV_COLUMNS) if fields is not None else ())])
    for row in table_rows(rows, fields):
        yield line(_csv_cells(row))


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


def parquet_schema(fields: Fields | None = None) -> Any:
    """The Parquet export's columns: text as strings, tokens as int64, cost as exact decimal
    dollars (decimal128(19, 12): money is never a float); then ``fields``' columns."""
    pa, _pq = _pyarrow()
    dollars = pa.decimal128(PARQUET_COST_PRECISION, PARQUET_COST_SCALE)
    extra = []
    if fields is not None:
        names = fields.names(CSV_COLUMNS)
        extra = [pa.field(n, t) for n, t in zip(names, fields.arrow_types(), strict=True)]
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
            *extra,
        ]
    )


def write_parquet_to(
    rows: Iterable[ExportRow],
    fh: IO[bytes],
    batch_rows: int = PARQUET_BATCH_ROWS,
    fields: Fields | None = None,
) -> int:
    """Write one Parquet row per request to the binary stream ``fh`` in record batches of
    ``batch_rows`` (memory does not grow with the job); how many rows."""
    pa, pq = _pyarrow()
    schema = parquet_schema(fields)
    cost = CSV_COLUMNS.index("cost_usd")
    n = 0
    with pq.ParquetWriter(fh, schema) as writer:
        batch: list[TableRow] = []

        def flush() -> None:
            columns = [list(c) for c in zip(*batch, strict=True)] or [[] for _ in schema]
            columns[cost] = [pico_to_decimal(p) for p in columns[cost]]
            if fields is not None:
                for k, kind in enumerate(fields.kinds, _BASE):
                    columns[k] = [_typed(v, kind) for v in columns[k]]
            arrays = [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            batch.clear()

        for row in table_rows(rows, fields):
            batch.append(row)
            n += 1
            if len(batch) >= batch_rows:
                flush()
        if batch or n == 0:  # an empty export still has its columns
            flush()
    return n


def write_parquet(
    rows: Iterable[ExportRow],
    output: Path | None,
    protect: Iterable[Path] = (),
    fields: Fields | None = None,
) -> int:
    """The Parquet export into ``output`` atomically, or to standard output's binary buffer
    (refused on a terminal: it is binary); how many rows."""
    require_parquet()
    if output is None:
        if sys.stdout.isatty():
            raise UsageError("Parquet is binary: give -o FILE, or pipe standard output")
        sys.stdout.flush()
        out = sys.stdout.buffer
        written = write_parquet_to(rows, out, fields=fields)
        out.flush()
        return written
    with _atomic(output, protect, binary=True) as fh:
        return write_parquet_to(rows, fh, fields=fields)


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


# -- the results joined back to the rows a job was built from (``export --rows``) ---------------


def joined_rows(
    rows: Rows,
    results: Iterable[ExportRow],
    id_column: str | None,
    job_id: int,
    fields: Fields | None = None,
) -> Iterator[tuple[dict[str, Any], TableRow]]:
    """Each row of ``rows`` with its request's result, streamed: the job's requests are in
    the rows' order (``batchrun build`` writes one per row), so the two are read side by side
    and each row's id (its ``id_column``, or ``row-<n>``) must be its request's custom_id."""
    results = table_rows(results, fields)
    known: set[str] = set()
    for number, row in enumerate(rows, 1):
        if number == 1:
            known = set(rows.columns)  # a JSONL file's: its first row's keys
        elif rows.format == "jsonl" and row.keys() != known:
            extra = [k for k in row if k not in rows.columns]
            if extra:
                raise rows.fail(
                    f"key {extra[0]!r} is not in the first row: the joined table has the first "
                    f"row's columns ({describe_columns(rows.columns)})"
                )
        if id_column is not None and id_column not in row:
            raise rows.fail(f"no id column {id_column!r}; its columns: {describe_columns(row)}")
        expected = row_id(row, number, id_column)
        result = next(results, None)
        if result is None:
            raise rows.fail(
                f"job {job_id} has only {number - 1:,} request(s): was it built from this file?"
            )
        if result[0] != expected:
            how = f"--id {id_column}" if id_column else "no --id (ids row-1, row-2, ...)"
            raise rows.fail(
                f"its id {expected!r} (with {how}) is not job {job_id}'s request {number:,} "
                f"({result[0]!r}): join the rows file the job was built from, with the --id "
                "build was given"
            )
        yield row, result
    extra_result = next(results, None)
    if extra_result is not None:
        raise UsageError(
            f"{rows.path}: {rows.number:,} row(s), but job {job_id} has more requests (the next "
            f"is {extra_result[0]!r}): was it built from this file?"
        )


def _result_names(row_columns: Iterable[str], fields: Fields | None = None) -> list[str]:
    """The result columns' names beside the rows' own: a clash takes a ``result_`` prefix (a
    field's, a ``field_`` prefix)."""
    taken = set(row_columns)
    names = [f"result_{c}" if c in taken else c for c in CSV_COLUMNS]
    return names + (fields.names([*taken, *names]) if fields is not None else [])


def _only(joined: Iterable[tuple[dict[str, Any], TableRow]], only: str | None) -> Iterator[Any]:
    state = {"ok": "done", "failed": "failed"}.get(only or "")
    return (pair for pair in joined if state is None or pair[1][1] == state)


def write_joined(
    source: Path,
    results: Iterable[ExportRow],
    output: Path | None,
    *,
    fmt: str,
    job_id: int,
    id_column: str | None = None,
    only: str | None = None,
    protect: Iterable[Path] = (),
    fields: Fields | None = None,
) -> int:
    """``export --rows``: one row per row of ``source`` (the rows file the job was built from),
    its columns first, then the result's (:data:`CSV_COLUMNS`), as CSV or Parquet, into
    ``output`` atomically or to standard output; how many rows. ``only``: the rows whose
    request succeeded (``ok``) or failed for good (``failed``). ``fields``: the parsed outputs'
    fields too, as :func:`csv_lines` writes them."""
    if fmt not in ("csv", "parquet"):
        raise UsageError("--rows joins the results to the rows as a table: --format csv or parquet")
    if output is not None and output.resolve() == source.resolve():
        raise UsageError(f"{output}: that is the rows file itself; choose another file")
    if fmt == "parquet":
        require_parquet()
    with Rows(source) as rows:
        joined = _only(joined_rows(rows, results, id_column, job_id, fields), only)
        if fmt == "csv":
            lines = _joined_csv(rows, joined, fields)
            return write_lines(lines, output, protect) - 1  # the header
        if output is None:
            if sys.stdout.isatty():
                raise UsageError("Parquet is binary: give -o FILE, or pipe standard output")
            sys.stdout.flush()
            written = _joined_parquet(rows, joined, sys.stdout.buffer, fields=fields)
            sys.stdout.buffer.flush()
            return written
        with _atomic(output, protect, binary=True) as fh:
            return _joined_parquet(rows, joined, fh, fields=fields)


def _joined_csv(
    rows: Rows, joined: Iterator[tuple[dict[str, Any], TableRow]], fields: Fields | None = None
) -> Iterator[str]:
    line = _csv_record()

    first = next(joined, None)  # a JSONL file's columns are its first row's keys
    columns = list(rows.columns)
    yield line([*columns, *_result_names(columns, fields)])
    if first is None:
        return
    for row, result in itertools.chain([first], joined):
        yield line([*(text_of(row.get(c)) for c in columns), *_csv_cells(result)])


def _joined_parquet(
    rows: Rows,
    joined: Iterator[tuple[dict[str, Any], TableRow]],
    fh: IO[bytes],
    batch_rows: int = PARQUET_BATCH_ROWS,
    fields: Fields | None = None,
) -> int:
    """The joined table as Parquet in record batches: a Parquet file's columns keep their
    types, a CSV's or JSONL's are strings; the result columns as in the Parquet export."""
    pa, pq = _pyarrow()
    first = next(joined, None)  # a JSONL file's columns are its first row's keys
    columns = list(rows.columns)
    row_fields = [pa.field(c, rows.types.get(c, pa.string())) for c in columns]
    result_fields = [
        f.with_name(name)
        for f, name in zip(parquet_schema(fields), _result_names(columns, fields), strict=True)
    ]
    schema = pa.schema([*row_fields, *result_fields])
    native = {c for c in columns if c in rows.types}
    cost = len(columns) + CSV_COLUMNS.index("cost_usd")
    n = 0
    with pq.ParquetWriter(fh, schema) as writer:
        batch: list[list[Any]] = []

        def flush() -> None:
            values = [list(c) for c in zip(*batch, strict=True)] or [[] for _ in schema]
            values[cost] = [pico_to_decimal(p) for p in values[cost]]
            if fields is not None:
                for k, kind in enumerate(fields.kinds, len(columns) + _BASE):
                    values[k] = [_typed(v, kind) for v in values[k]]
            arrays = [pa.array(v, type=f.type) for v, f in zip(values, schema, strict=True)]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            batch.clear()

        pairs = itertools.chain([first], joined) if first is not None else iter(())
        for row, result in pairs:
            cells = [row.get(c) if c in native else _cell_text(row.get(c)) for c in columns]
            batch.append([*cells, *result])
            n += 1
            if len(batch) >= batch_rows:
                flush()
        if batch or n == 0:  # an empty export still has its columns
            flush()
    return n


def _cell_text(value: Any) -> str | None:
    return None if value is None else text_of(value)
