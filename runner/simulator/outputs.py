"""What the simulated model writes when a request asks for JSON.

A request with a JSON schema (chat's ``response_format``, the Responses API's ``text.format``,
``{"type": "json_schema", ...}``) is answered with a JSON object built from its schema; JSON
mode (``json_object``) with a small object. ``SimConfig.p_output_not_json`` of the answers are
cut short (they do not parse, as an answer cut at its output limit) and ``p_output_mismatch``
parse but do not match (a required property missing, or one the schema does not allow). Every
choice is drawn from the body's digest and its index: the same body gets the same answer.

The generator covers what ``runner.structured`` validates: ``type`` (object, array, string,
number, integer, boolean, null, or a list of them), ``enum``, ``const``, ``properties``
(every one is written, as strict mode requires), ``items`` with ``minItems``/``maxItems``,
string lengths, number bounds, ``anyOf``/``oneOf``/``allOf`` (the first option) and ``$ref``
within the schema (recursion stops after a few levels at an empty array or a null).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from typing import Any

from ..structured import Schema, compiled, format_of, schema_of
from .config import SimConfig

_WORDS = ("sim", "alpha", "beta", "gamma", "delta", "red", "green", "blue", "one", "two")
_DEEP = 4  # nesting beyond which a recursive schema is ended (empty arrays, nulls)


def json_texts(
    url: str, body: Mapping[str, Any], digest: bytes, n: int, config: SimConfig
) -> list[tuple[str, bool]] | None:
    """The output text of each of ``n`` choices when ``body`` asks for JSON, and whether it
    was cut short (its finish reason is then ``length``); None when it asks for text."""
    fmt = format_of(url, body)
    if fmt is None:
        return None
    raw = schema_of(url, body)
    schema = compiled(raw) if raw else None
    mode = fmt.get("type") == "json_object"
    return [_one(schema, mode, digest, i, config) for i in range(n)]


def _one(
    schema: Schema | None, mode: bool, digest: bytes, index: int, config: SimConfig
) -> tuple[str, bool]:
    seed = hashlib.blake2b(digest + b"json" + index.to_bytes(4, "big"), digest_size=16).digest()
    rng = random.Random(seed)
    draw = int.from_bytes(seed[:8], "big") / 2**64
    if schema is None or mode:
        value: Any = {"answer": " ".join(rng.choice(_WORDS) for _ in range(3))}
    else:
        value = example(schema, schema.root, rng, 0)
    text = json.dumps(value, ensure_ascii=False)
    if draw < config.p_output_not_json:
        return _cut(text), True
    mismatch = config.p_output_not_json + config.p_output_mismatch
    if draw < mismatch and schema is not None and not mode:  # JSON mode has no schema to miss
        return json.dumps(_mismatch(schema, value), ensure_ascii=False), False
    return text, False


def _cut(text: str) -> str:
    """``text`` cut halfway, as an answer that ran into its output limit: never JSON."""
    cut = text[: max(1, len(text) // 2)]
    try:
        json.loads(cut)
    except ValueError:
        return cut
    return cut + ' {"'  # a cut that still parsed (a short number): make it not


def _mismatch(schema: Schema, value: Any) -> Any:
    """``value`` (which matches) changed so that it does not: its first required property
    dropped, else a property the schema does not have added, else put in an array."""
    candidates: list[Any] = []
    root = schema.follow(schema.root)
    required = [k for k in root.get("required") or () if isinstance(value, dict) and k in value]
    if required:
        candidates.append({k: v for k, v in value.items() if k != required[0]})
    if isinstance(value, dict):
        candidates.append({**value, "unexpected_sim_property": "sim"})
    candidates.append([value])
    for candidate in candidates:
        if schema.error(candidate) is not None:
            return candidate
    return candidates[-1]


def example(schema: Schema, node: Any, rng: random.Random, depth: int) -> Any:
    """A value that matches ``node`` (a part of ``schema``)."""
    node = schema.follow(node)
    if not node:
        return "sim"
    if "const" in node:
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    for keyword in ("anyOf", "oneOf", "allOf"):
        options = node.get(keyword)
        if isinstance(options, list) and options:
            if depth >= _DEEP:  # end a recursion where an option allows it
                for option in options:
                    if "null" in _types(schema.follow(option)):
                        return None
            return example(schema, options[0], rng, depth + 1)
    kinds = _types(node)
    if depth >= _DEEP and "null" in kinds:
        return None
    kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if kind is None:
        kind = "object" if "properties" in node else "array" if "items" in node else "string"
    if kind == "object":
        props = node.get("properties")
        props = props if isinstance(props, Mapping) else {}
        return {str(k): example(schema, v, rng, depth + 1) for k, v in props.items()}
    if kind == "array":
        least = node.get("minItems") if isinstance(node.get("minItems"), int) else 0
        most = node.get("maxItems") if isinstance(node.get("maxItems"), int) else least + 3
        count = least if depth >= _DEEP else rng.randint(min(least + 1, most), most)
        items = node.get("items")
        return [example(schema, items, rng, depth + 1) for _ in range(count)]
    if kind == "string":
        return _string(node, rng)
    if kind in ("integer", "number"):
        return _number(node, rng, kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def _types(node: Mapping[str, Any]) -> list[str]:
    kind = node.get("type")
    if isinstance(kind, list):
        return [str(k) for k in kind]
    return [str(kind)] if kind is not None else []


def _string(node: Mapping[str, Any], rng: random.Random) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    least, most = node.get("minLength"), node.get("maxLength")
    if isinstance(least, int) and len(text) < least:
        text += "s" * (least - len(text))
    if isinstance(most, int) and len(text) > most:
        text = text[:most]
    return text


def _number(node: Mapping[str, Any], rng: random.Random, integer: bool) -> int | float:
    def bound(key: str) -> float | None:
        b = node.get(key)
        return b if isinstance(b, int | float) and not isinstance(b, bool) else None

    low, high = bound("minimum"), bound("maximum")
    if low is None and (x := bound("exclusiveMinimum")) is not None:
        low = x + 1 if integer else x + 0.5
    if high is None and (x := bound("exclusiveMaximum")) is not None:
        high = x - 1 if integer else x - 0.5
    low = low if low is not None else (high - 100 if high is not None else 0)
    high = high if high is not None else low + 100
    if integer:
        lo, hi = math.ceil(low), math.floor(high)
        return rng.randint(lo, hi) if lo <= hi else lo
    return min(max(round(rng.uniform(low, high), 2), low), high) if low < high else low
