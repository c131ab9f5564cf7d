"""Tables of rows: the input of ``batchrun build`` and of ``batchrun export --rows``.

A rows file is a CSV (a header line first), a JSONL file (one object per line) or a Parquet
file, read as a stream of dicts: one row in memory at a time (Parquet: one record batch), so a
million rows take the memory of a few. CSV is read as people write it: quoted commas and
newlines inside quoted fields, a byte-order mark, UTF-8.

Every problem is a ``UsageError`` that names the file, the line (CSV, JSONL) and the row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

ROW_FORMATS = ("csv", "jsonl", "parquet")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
PARQUET_BATCH_ROWS = 10_000  # rows per record batch read from a Parquet file
PARQUET_INSTALL = "pip install 'batchrun[parquet]'"
# The csv module refuses fields over 128 KiB; a long document in a cell is a normal input.
CSV_FIELD_LIMIT = 16 * 1024 * 1024


def row_format(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format of a rows file: ``fmt`` if given, else from its extension."""
    if fmt is not None:
        if fmt not in ROW_FORMATS:
            raise UsageError(f"format: expected one of {', '.join(ROW_FORMATS)}, not {fmt!r}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    raise UsageError(
        f"{path}: cannot tell the format from the name; name it .csv, .jsonl or .parquet, "
        "or give --format csv|jsonl|parquet"
    )


def pyarrow_parquet(what: str) -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or a usage error saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError(f"{what} needs pyarrow: {PARQUET_INSTALL}") from None
    return pyarrow, pyarrow.parquet


def text_of(value: Any) -> str:
    """A cell as text in a prompt or an id: strings as they are; a missing value (None, NaN)
    as empty; lists and objects (JSONL) as JSON; anything else as ``str``."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class _Counting(io.RawIOBase):
    """A raw file that counts the bytes read through it (for progress)."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer) or 0
        self.count += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class Rows:
    """An open rows file, iterated as dicts (a context manager).

    ``columns``: the columns, known on opening for CSV (the header) and Parquet (the schema);
    for JSONL, the first object's keys once it is read (each object may have its own).
    ``where()``: the location of the row read last, for a message (``file:line: row n``).
    ``nbytes``: how much of the file has been read. ``number``: rows read so far.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fmt: str | None = None,
        *,
        columns: Sequence[str] | None = None,
    ) -> None:
        """Open ``path`` (format ``fmt`` or from its extension). ``columns``: for Parquet, read
        only these (the others are never decoded)."""
        self.path = os.fspath(path)
        self.format = row_format(path, fmt)
        self.number = 0
        self.line = 0
        self.nbytes = 0
        self.columns: list[str] = []
        self.types: dict[str, Any] = {}  # Parquet: each column's arrow type
        self._wanted = list(columns) if columns is not None else None
        self._counting: _Counting | None = None
        self._text: io.TextIOWrapper | None = None
        self._parquet: Any = None
        try:
            if self.format == "parquet":
                self._open_parquet()
            else:
                raw = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
                self._counting = _Counting(raw)
                if self.format == "csv":
                    self._text = io.TextIOWrapper(
                        io.BufferedReader(self._counting, 1 << 16),
                        encoding="utf-8-sig",  # a byte-order mark (Excel's "CSV UTF-8") goes
                        newline="",  # newlines inside quoted fields stay in the field
                    )
                    self._csv = csv.reader(self._text)
                    self._read_header()
        except OSError as exc:
            self.close()
            raise UsageError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._parquet is not None and hasattr(self._parquet, "close"):
            self._parquet.close()
        if self._text is not None:
            self._text.close()
        elif self._counting is not None:
            self._counting.close()
        self._text = self._counting = None

    def where(self) -> str:
        """``file:line: row n`` (``file: row n`` for Parquet): where the last row was read."""
        if self.format == "parquet":
            return f"{self.path}: row {self.number:,}"
        return f"{self.path}:{self.line}: row {self.number:,}"

    def fail(self, reason: str) -> UsageError:
        """An error at the row read last."""
        return UsageError(f"{self.where()}: {reason}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.format == "csv":
            return self._csv_rows()
        if self.format == "jsonl":
            return self._jsonl_rows()
        return self._parquet_rows()

    # -- CSV -------------------------------------------------------------------------------------

    def _next_csv(self) -> list[str] | None:
        """The next non-blank CSV record, or None at the end; ``line``: where it starts."""
        assert self._counting is not None
        if csv.field_size_limit() < CSV_FIELD_LIMIT:
            csv.field_size_limit(CSV_FIELD_LIMIT)
        while True:
            start = self._csv.line_num + 1
            try:
                record = next(self._csv, None)
            except UnicodeDecodeError:
                # Decoding runs ahead of the rows by a buffer: find the line in the bytes.
                line, byte = _first_bad_utf8(self.path)
                raise UsageError(
                    f"{self.path}:{line}: not UTF-8 (byte 0x{byte:02x}); save the file as UTF-8 "
                    "(in Excel: CSV UTF-8)"
                ) from None
            except csv.Error as exc:
                raise UsageError(f"{self.path}:{start}: not readable as CSV: {exc}") from None
            finally:
                self.nbytes = self._counting.count
            if record is None:
                return None
            if record:  # a blank line is no row
                self.line = start
                return record

    def _read_header(self) -> None:
        header = self._next_csv()
        if header is None:
            raise UsageError(f"{self.path}: empty: a CSV needs a header line naming its columns")
        seen: set[str] = set()
        for name in header:
            if name in seen:
                raise UsageError(f"{self.path}:{self.line}: the header names column {name!r} twice")
            seen.add(name)
        self.columns = header

    def _csv_rows(self) -> Iterator[dict[str, Any]]:
        width = len(self.columns)
        while (record := self._next_csv()) is not None:
            self.number += 1
            if len(record) != width:
                raise self.fail(
                    f"{len(record)} field(s) where the header has {width}; a field holding a "
                    'comma, a quote or a newline must be in double quotes ("a, b"; "say ""hi""")'
                )
            yield dict(zip(self.columns, record, strict=True))

    # -- JSONL -----------------------------------------------------------------------------------

    def _jsonl_rows(self) -> Iterator[dict[str, Any]]:
        assert self._counting is not None
        reader = io.BufferedReader(self._counting, 1 << 16)
        for lineno, raw in enumerate(reader, 1):
            self.nbytes = self._counting.count
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            self.line = lineno
            self.number += 1
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                raise self.fail("not UTF-8") from None
            except ValueError as exc:
                raise self.fail(f"invalid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise self.fail(f"expected a JSON object (one row), got {type(obj).__name__}")
            if b"\\u" in raw:  # an escaped surrogate must have its pair: a job file is UTF-8
                try:
                    json.dumps(obj, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise self.fail("contains an unpaired surrogate (not valid Unicode)") from None
            if self.number == 1:
                self.columns = list(obj)
            yield obj

    # -- Parquet ---------------------------------------------------------------------------------

    def _open_parquet(self) -> None:
        pa, pq = pyarrow_parquet("reading Parquet")
        try:
            self._parquet = pq.ParquetFile(self.path)
        except OSError:
            raise
        except pa.ArrowException as exc:
            raise UsageError(f"{self.path}: not readable as Parquet: {exc}") from None
        schema = self._parquet.schema_arrow
        self.columns = list(schema.names)
        self.types = {f.name: f.type for f in schema}
        self._size = os.path.getsize(self.path)

    def _parquet_rows(self) -> Iterator[dict[str, Any]]:
        total = self._parquet.metadata.num_rows or 1
        wanted = None
        if self._wanted is not None:
            wanted = [c for c in self.columns if c in set(self._wanted)]
        for batch in self._parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            for row in batch.to_pylist():
                self.number += 1
                self.nbytes = self._size * self.number // total
                yield row


def _first_bad_utf8(path: str) -> tuple[int, int]:
    """The line of the first byte that is not UTF-8 in the file at ``path``, and the byte."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, raw[exc.start]
    return 0, 0


def missing(columns: Sequence[str], needed: Sequence[str]) -> list[str]:
    """Which of ``needed`` are not among ``columns``."""
    have = set(columns)
    return [name for name in needed if name not in have]


def describe_columns(row: Mapping[str, Any] | Sequence[str]) -> str:
    names = list(row)
    shown = ", ".join(repr(n) for n in names[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "") if names else "none"


def row_id(row: Mapping[str, Any], number: int, id_column: str | None) -> str:
    """The custom_id of row ``number`` (from 1): its ``id_column``'s value, or ``row-<n>``.
    ``batchrun build`` names requests so, and ``export --rows`` finds them again so."""
    return f"row-{number}" if id_column is None else text_of(row[id_column])
