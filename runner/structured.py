"""Structured outputs: whether a result's content is the JSON its request asked for.

A request asks for JSON with ``response_format`` (chat completions) or ``text.format``
(Responses): ``{"type": "json_schema", ...}`` with a JSON schema, or ``{"type": "json_object"}``
(JSON mode: any JSON object). When a result comes back, ``check`` parses each output (every
choice of a chat completion) and validates it against the schema. An output that does not
parse (cut at the output limit, a refusal, prose) or does not match is still a result: it was
billed. The engine flags it (``ResultFlag.OUTPUT_NOT_JSON`` / ``OUTPUT_MISMATCH``) with a short
reason, ``status`` counts them and ``run --retry-failed --invalid`` sends them again.

The validator covers the subset of JSON Schema that the API's strict structured outputs allow,
and a little more:

- ``type`` (one name or a list; ``integer`` accepts 1.0, never ``true``), ``enum``, ``const``;
- objects: ``properties``, ``required``, ``additionalProperties`` (false, true or a schema);
- arrays: ``items`` (a schema), ``minItems``, ``maxItems``;
- strings: ``minLength``, ``maxLength``, ``pattern`` (Python ``re``, searched);
- numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``,
  ``multipleOf``;
- ``anyOf``, ``allOf``, ``oneOf``; ``$ref`` to ``#`` or a JSON pointer within the same schema
  (``#/$defs/...``, ``#/definitions/...``), recursive schemas included.

Other keywords (``format``, ``description``, ``title``, ``default``, ...) are ignored, as a
validator that does not know them must; a remote ``$ref`` counts as matching anything.
Validators are built once per schema (cached by its text), and a request body that names no
JSON format costs one substring search.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

__all__ = [
    "MISMATCH",
    "NOT_JSON",
    "Schema",
    "check",
    "format_body",
    "format_of",
    "output_texts",
    "parsed_output",
    "schema_of",
    "schema_of_body",
]

NOT_JSON = "output_not_json"
MISMATCH = "output_mismatch"
_REASON_CHARS = 240  # a stored reason is cut to this many characters
_MAX_DEPTH = 256  # $ref chains without progress (a schema that refers to itself) stop here
_JSON_OBJECT: dict[str, Any] = {"type": "object"}  # what JSON mode promises


# -- where a request asks for JSON ------------------------------------------------------------


def format_of(url: str, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON format object a request body asks for (chat's ``response_format``, the
    Responses API's ``text.format``), or None when it asks for text."""
    if url.endswith("/responses"):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, Mapping) else None
    else:
        fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_schema", "json_object"):
        return fmt
    return None


def schema_of(url: str, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON schema a request body's output must follow: the schema of its ``json_schema``
    format (chat nests it as ``json_schema.schema``, Responses as ``format.schema``), ``{"type":
    "object"}`` for JSON mode, or None when it asks for text (or names no usable schema)."""
    fmt = format_of(url, body)
    if fmt is None:
        return None
    if fmt.get("type") == "json_object":
        return _JSON_OBJECT
    spec = fmt.get("json_schema", fmt) if not url.endswith("/responses") else fmt
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    return schema if isinstance(schema, Mapping) else None


def schema_of_body(url: str, body: str) -> Schema | None:
    """The compiled schema of a stored request body (JSON text), or None."""
    if '"json_schema"' not in body and '"json_object"' not in body:
        return None  # the common case: one substring search
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    schema = schema_of(url, parsed)
    if schema is None:
        return None
    return compiled(schema)


def format_body(url: str, body: str) -> str | None:
    """A stand-in for a stored request body that keeps only the JSON format it asks for (as
    compact JSON text, which ``check`` reads as it reads the whole body), or None when it asks
    for none: what the Batch API lane holds for each request of a batch instead of its body."""
    if '"json_schema"' not in body and '"json_object"' not in body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    fmt = format_of(url, parsed) if isinstance(parsed, dict) else None
    if fmt is None:
        return None
    kept = {"text": {"format": fmt}} if url.endswith("/responses") else {"response_format": fmt}
    return json.dumps(kept, separators=(",", ":"))


_COMPILED: dict[str, Schema] = {}
_COMPILED_MOST = 256


def compiled(schema: Mapping[str, Any]) -> Schema:
    """The validator of a schema, one per distinct schema (cached by its text, keys sorted;
    the validator keeps the schema's own order of properties)."""
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    found = _COMPILED.get(key)
    if found is None:
        if len(_COMPILED) >= _COMPILED_MOST:
            _COMPILED.clear()
        found = _COMPILED[key] = Schema(schema)
    return found


# -- what a response says -----------------------------------------------------------------------


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def output_texts(url: str, data: Mapping[str, Any]) -> list[tuple[str | None, str | None]]:
    """Each output of a response as (text, refusal): a chat completion's choices, a Responses
    answer's messages (its ``output_text`` parts joined). A refusal has no text."""
    out: list[tuple[str | None, str | None]] = []
    if url.endswith("/responses"):
        for item in data.get("output") or ():
            if not isinstance(item, Mapping) or item.get("type") != "message":
                continue
            texts, refusal = [], None
            for part in item.get("content") or ():
                part = _obj(part)
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal":
                    refusal = str(part.get("refusal") or "refused")
            out.append(("".join(texts) if texts or refusal is None else None, refusal))
        return out
    for choice in data.get("choices") or ():
        message = _obj(_obj(choice).get("message"))
        content, refusal = message.get("content"), message.get("refusal")
        out.append(
            (content if isinstance(content, str) else None, str(refusal) if refusal else None)
        )
    return out


def _finish(url: str, data: Mapping[str, Any], index: int) -> str | None:
    """Why output ``index`` ended, when it was cut (the output limit, a content filter)."""
    if url.endswith("/responses"):
        reason = _obj(data.get("incomplete_details")).get("reason")
        return str(reason) if reason else None
    choices = data.get("choices") or ()
    if index < len(choices):
        reason = _obj(choices[index]).get("finish_reason")
        return str(reason) if reason in ("length", "content_filter") else None
    return None


def check(url: str, body: str, data: Mapping[str, Any]) -> tuple[str, str] | None:
    """Whether a response's outputs are what its request (``body``, JSON text) asked for:
    None when it asked for no JSON or every output parses and matches; else (``NOT_JSON`` or
    ``MISMATCH``, a short reason naming the output and where it went wrong)."""
    schema = schema_of_body(url, body)
    if schema is None:
        return None
    outputs = output_texts(url, data)
    if not outputs:
        return NOT_JSON, "no output in the response"
    for i, (text, refusal) in enumerate(outputs):
        which = f"choice {i}: " if len(outputs) > 1 else ""
        if text is None:
            why = f"refused: {refusal}" if refusal else "no text"
            return NOT_JSON, _cut(which + why)
        try:
            value = json.loads(text)
        except ValueError as exc:
            cut = _finish(url, data, i)
            why = f"not JSON ({exc})" + (f"; it was cut short ({cut})" if cut else "")
            return NOT_JSON, _cut(which + why)
        problem = schema.error(value)
        if problem is not None:
            return MISMATCH, _cut(which + problem)
    return None


def parsed_output(url: str, data: Mapping[str, Any]) -> Any:
    """The first output of a response parsed as JSON, or None when it does not parse."""
    outputs = output_texts(url, data)
    if not outputs or outputs[0][0] is None:
        return None
    try:
        return json.loads(outputs[0][0])
    except ValueError:
        return None


def _cut(text: str) -> str:
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


# -- the validator --------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return True  # an unknown type name restricts nothing


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _is(a, "number") and _is(b, "number"):
        return bool(a == b)
    return type(a) is type(b) and a == b


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _where(path: tuple[str | int, ...]) -> str:
    """A JSON path of a value inside the output, as people read one: ``$.items[2].name``."""
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


class Schema:
    """One JSON schema, ready to validate values (see the module's docstring for what it
    covers)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.root = schema

    def properties(self) -> list[tuple[str, Mapping[str, Any]]]:
        """The root object's properties in the schema's order, each with its own schema
        (``$ref`` followed): the columns ``export --fields`` writes."""
        node: Any = self.root
        for _ in range(_MAX_DEPTH):
            ref = node.get("$ref") if isinstance(node, Mapping) else None
            if not isinstance(ref, str) or "properties" in node:
                break
            node = self._resolve(ref)
        props = node.get("properties") if isinstance(node, Mapping) else None
        if not isinstance(props, Mapping):
            return []
        return [(str(k), self.follow(v)) for k, v in props.items()]

    def follow(self, schema: Any) -> Mapping[str, Any]:
        """``schema`` with its ``$ref`` followed (to the end of a chain), or ``{}``."""
        for _ in range(_MAX_DEPTH):
            if not isinstance(schema, Mapping):
                return {}
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                return schema
            target = self._resolve(ref)
            if target is None:
                return schema
            schema = target
        return {}

    def error(self, value: Any) -> str | None:
        """None when ``value`` matches, else the first mismatch: where, and why."""
        return next(self._errors(self.root, value, (), 0), None)

    def _resolve(self, ref: str) -> Mapping[str, Any] | None:
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            return None  # a remote reference: not followed
        node: Any = self.root
        for raw in ref[2:].split("/"):
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node if isinstance(node, Mapping) else None

    def _errors(
        self, schema: Any, value: Any, path: tuple[str | int, ...], depth: int
    ) -> Iterator[str]:
        if schema is True or not isinstance(schema, Mapping):
            return
        if depth > _MAX_DEPTH:
            yield f"{_where(path)}: the schema's $ref chain does not end"
            return
        at = _where(path)
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(ref)
            if target is None and ref.startswith("#"):
                yield f"{at}: the schema's $ref {ref!r} names nothing in it"
                return
            if target is not None:
                yield from self._errors(target, value, path, depth + 1)
        kind = schema.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not any(_is(value, str(k)) for k in kinds):
                wanted = " or ".join(str(k) for k in kinds)
                yield f"{at}: expected {wanted}, got {_type_name(value)} {_short(value)}"
                return
        enum = schema.get("enum")
        if isinstance(enum, list) and not any(_same(value, option) for option in enum):
            options = ", ".join(_short(o) for o in enum[:8])
            yield f"{at}: {_short(value)} is not one of {options}"
            return
        if "const" in schema and not _same(value, schema["const"]):
            yield f"{at}: expected {_short(schema['const'])}, got {_short(value)}"
            return
        for keyword in ("anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list) and options:
                matching = sum(
                    next(self._errors(o, value, path, depth + 1), None) is None for o in options
                )
                if matching == 0:
                    yield f"{at}: matches none of the schema's {keyword} options"
                    return
                if keyword == "oneOf" and matching > 1:
                    yield f"{at}: matches {matching} of the schema's oneOf options, not one"
                    return
        for option in schema.get("allOf") or ():
            yield from self._errors(option, value, path, depth + 1)
        if isinstance(value, dict):
            yield from self._object(schema, value, path, depth)
        elif isinstance(value, list):
            yield from self._array(schema, value, path, depth)
        elif isinstance(value, str):
            yield from self._string(schema, value, at)
        elif _is(value, "number"):
            yield from self._number(schema, value, at)

    def _object(
        self, schema: Mapping[str, Any], value: dict[str, Any], path: tuple[str | int, ...],
        depth: int,
    ) -> Iterator[str]:  # fmt: skip
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        for name in schema.get("required") or ():
            if name not in value:
                yield f"{_where(path)}: missing required property {name!r}"
                return
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                yield from self._errors(properties[name], item, (*path, name), depth + 1)
            elif extra is False:
                yield f"{_where(path)}: unexpected property {name!r}"
                return
            elif isinstance(extra, Mapping):
                yield from self._errors(extra, item, (*path, name), depth + 1)

    def _array(
        self, schema: Mapping[str, Any], value: list[Any], path: tuple[str | int, ...], depth: int
    ) -> Iterator[str]:
        at = _where(path)
        least, most = schema.get("minItems"), schema.get("maxItems")
        if isinstance(least, int) and len(value) < least:
            yield f"{at}: {len(value)} item(s), fewer than minItems {least}"
            return
        if isinstance(most, int) and len(value) > most:
            yield f"{at}: {len(value)} item(s), more than maxItems {most}"
            return
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                yield from self._errors(items, item, (*path, i), depth + 1)

    def _string(self, schema: Mapping[str, Any], value: str, at: str) -> Iterator[str]:
        least, most = schema.get("minLength"), schema.get("maxLength")
        if isinstance(least, int) and len(value) < least:
            yield f"{at}: {len(value)} character(s), fewer than minLength {least}"
        elif isinstance(most, int) and len(value) > most:
            yield f"{at}: {len(value)} character(s), more than maxLength {most}"
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            regex = _regex(pattern)
            if regex is not None and not regex.search(value):
                yield f"{at}: {_short(value)} does not match the pattern {pattern!r}"

    def _number(self, schema: Mapping[str, Any], value: float, at: str) -> Iterator[str]:
        def bound(key: str) -> float | None:
            b = schema.get(key)
            return b if _is(b, "number") else None

        checks = (
            ("minimum", lambda b: value >= b, "below"),
            ("maximum", lambda b: value <= b, "above"),
            ("exclusiveMinimum", lambda b: value > b, "not above"),
            ("exclusiveMaximum", lambda b: value < b, "not below"),
        )
        for key, ok, word in checks:
            b = bound(key)
            if b is not None and not ok(b):
                yield f"{at}: {_short(value)} is {word} {key} {_short(b)}"
                return
        step = bound("multipleOf")
        if step and step > 0:
            ratio = value / step
            if not math.isfinite(ratio) or abs(ratio - round(ratio)) > 1e-9 * max(1, abs(ratio)):
                yield f"{at}: {_short(value)} is not a multiple of {_short(step)}"


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None  # a pattern Python cannot read restricts nothing here
