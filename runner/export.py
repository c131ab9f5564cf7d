"""What ``batchrun export`` writes: the Batch API output format (JSONL) or a CSV for
spreadsheets, streamed row by row, into a file written atomically or to standard output.

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
from typing import TextIO

from .endpoints import endpoint_for
from .errors import UsageError
from .money import format_exact
from .store import ExportRow, Job

FORMATS = ("jsonl", "csv")
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
    for r in rows:
        text, reason, error = "", None, r.error_message or r.last_error or ""
        if r.state == "done" and r.body:
            endpoint = endpoint_for(r.url)
            try:
                data = json.loads(r.body)
            except ValueError:
                data = None
            if endpoint is not None and isinstance(data, dict):
                text, reason = endpoint.text_of(data)
        yield line(
            (
                r.custom_id,
                r.state,
                text,
                reason or "",
                r.prompt_tokens,
                r.completion_tokens,
                format_exact(r.cost_pico),
                error,
            )
        )


def write_lines(lines: Iterable[str], output: Path | None, protect: Iterable[Path] = ()) -> int:
    """Write ``lines`` to ``output`` atomically (a partial file is renamed over it at the end),
    or to standard output; how many. ``protect``: files never to overwrite (the database)."""
    if output is None:
        return _write(lines, sys.stdout)
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
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            written = _write(lines, fh)
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UsageError(f"{output}: cannot write: {exc.strerror or exc}") from None
    return written


def _write(lines: Iterable[str], fh: TextIO) -> int:
    n = 0
    for line in lines:
        fh.write(line)
        fh.write("\n")
        n += 1
    fh.flush()
    return n
