"""``batchrun build``: a job file from a table of rows, one chat completions request per row.

The prompt comes from a template whose ``{column}`` fields are filled from each row (``{{`` and
``}}`` are literal braces), the model and output limit are the same for every row, and
``custom_id`` is a column's value or ``row-<n>`` (n counts rows from 1). :func:`build_requests`
is the one place a row becomes a request: ``runner.to_requests`` and ``batchrun build`` both
use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .endpoints import MAX_OUTPUT_TOKENS
from .errors import UsageError
from .rows import Rows, describe_columns, missing, row_id, text_of

CHAT_URL = "/v1/chat/completions"
PROGRESS_EVERY_ROWS = 512  # how often a build tells its progress callback
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Template:
    """A prompt template: text with ``{column}`` fields; ``{{`` and ``}}`` are literal braces.

    A field names a column exactly as the file spells it (``{review text}``, ``{a.b}``): no
    attribute, index or format syntax."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[tuple[str, str | None]] = []  # (literal text, then a field or None)
        literal: list[str] = []
        at = 0
        for m in _TOKEN.finditer(text):
            literal.append(text[at : m.start()])
            at = m.end()
            token = m.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif token in ("{", "}"):
                raise UsageError(
                    f"template: a lone {token!r} at character {m.start() + 1}; write "
                    f"{token * 2} for a literal {token}, or {{column}} for a column's value"
                )
            elif not m.group(1):
                raise UsageError(
                    f"template: an empty field {{}} at character {m.start() + 1}; name a column "
                    "in it, e.g. {text}, or write {{}} for literal braces"
                )
            else:
                self.parts.append(("".join(literal), m.group(1)))
                literal = []
        literal.append(text[at:])
        self.parts.append(("".join(literal), None))
        self.fields = tuple(dict.fromkeys(f for _, f in self.parts if f is not None))
        if not self.fields:
            raise UsageError(
                "template: no {column} field, so every request would be the same; put a "
                "column's name in braces, e.g. --template 'Summarise: {text}'"
            )

    @classmethod
    def column(cls, name: str) -> Template:
        """The template that is one column's value, whatever the column's name holds."""
        template = cls.__new__(cls)
        template.text = name
        template.parts = [("", name), ("", None)]
        template.fields = (name,)
        return template

    def render(self, row: Mapping[str, Any]) -> str:
        """The prompt of ``row``; ``KeyError(field)`` when the row has no such column."""
        out = []
        for literal, field in self.parts:
            out.append(literal)
            if field is not None:
                out.append(text_of(row[field]))
        return "".join(out)


def response_format(schema: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The chat ``response_format`` asking for JSON that follows ``schema``: a JSON schema of
    an object, or the API's ``json_schema`` object itself (``{"name", "schema", "strict"}``).
    ``name`` (default ``output``) names it unless the object does; strict unless it says not."""
    if not isinstance(schema, Mapping):
        raise UsageError(f"schema: expected a JSON object, got {type(schema).__name__}")
    if isinstance(schema.get("schema"), Mapping):  # already {"name": ..., "schema": ...}
        spec = dict(schema)
        spec.setdefault("name", name or "output")
        spec.setdefault("strict", True)
    else:
        spec = {"name": name or "output", "schema": dict(schema), "strict": True}
    if not isinstance(spec["name"], str) or not _SCHEMA_NAME.match(spec["name"]):
        raise UsageError(f"schema: name {spec['name']!r} must be 1 to 64 letters, digits, _ or -")
    if spec["schema"].get("type") != "object":
        raise UsageError(
            'schema: structured outputs need an object at the root ("type": "object"), got '
            f"{json.dumps(spec['schema'].get('type'))}"
        )
    return {"type": "json_schema", "json_schema": spec}


def load_schema(path: str | Path) -> dict[str, Any]:
    """A JSON schema file as the API's ``json_schema`` object (``{"name", "schema",
    "strict"}``, what :func:`response_format` takes), named after the file unless the file
    names it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{path}: expected a JSON schema object, got {type(schema).__name__}")
    name = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:64] or "output"
    try:
        return response_format(schema, name)["json_schema"]
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def build_requests(
    rows: Iterable[Mapping[str, Any]],
    *,
    template: str | Template,
    model: str,
    max_tokens: int | None = None,
    system: str | None = None,
    schema: Mapping[str, Any] | None = None,
    id_column: str | None = None,
    url: str = CHAT_URL,
    where: Callable[[int], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Batch-format chat completions requests, one per row, streamed.

    ``template``: the user message, ``{column}`` fields filled from the row. ``system``: a
    system message, the same for every row (not a template). ``max_tokens``: the output limit
    (``max_completion_tokens``). ``schema``: a JSON schema (or a ``json_schema`` object) the
    answer must follow (``response_format``). ``custom_id``: the value of ``id_column``, or
    ``row-<n>``. ``where(n)`` says where row n is, for messages (default ``row n``).

    Memory stays flat whatever the number of rows, except with ``id_column``: ids must be
    unique, so each one seen is kept (the ids only, not the rows) to name a repeat's first row.
    """
    if not isinstance(template, Template):
        template = Template(template)
    if not isinstance(model, str) or not model:
        raise UsageError("model: give a model name, e.g. gpt-4o-mini")
    if max_tokens is not None and (
        type(max_tokens) is not int or not 1 <= max_tokens <= MAX_OUTPUT_TOKENS
    ):
        raise UsageError(f"max_tokens: expected 1 to {MAX_OUTPUT_TOKENS:,}, got {max_tokens!r}")
    fmt = response_format(schema) if schema is not None else None
    locate = where or (lambda n: f"row {n:,}")
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise UsageError(f"{locate(number)}: expected a dict, got {type(row).__name__}")
        try:
            prompt = template.render(row)
        except KeyError as exc:
            raise UsageError(
                f"{locate(number)}: no column {exc.args[0]!r} (the template's "
                f"{{{exc.args[0]}}}); its columns: {describe_columns(row)}"
            ) from None
        if id_column is not None and id_column not in row:
            raise UsageError(
                f"{locate(number)}: no id column {id_column!r}; its columns: "
                f"{describe_columns(row)}"
            )
        custom_id = row_id(row, number, id_column)
        if id_column is not None:
            if not custom_id:
                raise UsageError(f"{locate(number)}: the id column {id_column!r} is empty")
            first = first_row.setdefault(custom_id, number)
            if first != number:
                raise UsageError(
                    f"{locate(number)}: id {custom_id!r} (column {id_column!r}) is row "
                    f"{first:,}'s too; ids must be unique"
                )
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
        }
        if system:
            body["messages"].insert(0, {"role": "system", "content": system})
        if max_tokens is not None:
            body["max_completion_tokens"] = max_tokens
        if fmt is not None:  # one object, shared by every request
            body["response_format"] = fmt
        yield {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


@dataclass(frozen=True, slots=True)
class Built:
    """What :func:`build_job` wrote: how many rows it read and requests it wrote, where."""

    source: str
    rows: int
    requests: int
    output: Path | None  # None: standard output


def build_job(
    source: str | Path,
    output: str | Path | None,
    *,
    template: str,
    model: str,
    max_tokens: int | None = None,
    system: str | None = None,
    schema: str | Path | Mapping[str, Any] | None = None,
    id_column: str | None = None,
    fmt: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Built:
    """Write the job file of the rows file ``source`` (CSV, JSONL or Parquet; ``fmt`` or by
    extension) to ``output`` (written atomically: on any error no file is left), or to standard
    output when ``output`` is None. ``schema``: a JSON schema file's path, or the schema.
    ``progress(rows, bytes)`` is told how far the reading got."""
    from .export import write_lines

    parsed = Template(template)  # every option is checked before a row is read
    fixed = load_schema(schema) if isinstance(schema, (str, Path)) else schema
    target = Path(output) if output is not None else None
    if target is not None and target.resolve() == Path(source).resolve():
        raise UsageError(f"{target}: that is the rows file itself; choose another job file")
    needed = [*parsed.fields, *([id_column] if id_column else [])]
    with Rows(source, fmt, columns=needed) as rows:
        lacking = missing(rows.columns, needed) if rows.format != "jsonl" else []
        if lacking:
            where = (
                f"{rows.path}:{rows.line}: the header"
                if rows.format == "csv"
                else f"{rows.path}: the schema"
            )
            name = lacking[0]
            what = "the id column" if name == id_column else f"the template's {{{name}}}"
            raise UsageError(
                f"{where} has no column {name!r} ({what}); its columns: "
                f"{describe_columns(rows.columns)}"
            )
        requests = build_requests(
            rows, template=parsed, model=model, max_tokens=max_tokens, system=system,
            schema=fixed, id_column=id_column, where=lambda _n: rows.where(),
        )  # fmt: skip

        def lines() -> Iterator[str]:
            n = 0
            for n, request in enumerate(requests, 1):
                yield json.dumps(request, ensure_ascii=False, separators=(",", ":"))
                if progress is not None and n % PROGRESS_EVERY_ROWS == 0:
                    progress(n, rows.nbytes)
            if n == 0:
                raise UsageError(f"{rows.path}: no rows, so no job to build")

        written = write_lines(lines(), target)
    return Built(str(source), rows.number, written, target)
