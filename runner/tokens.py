"""Input-token counts for OpenAI requests, as the API counts them, fast enough for millions.

Counts drive rate-limit reservations and the spend cap, so they must match the API where a
public rule exists and say plainly where they do not. Text follows the cookbook rule
("How to count tokens with tiktoken"), which is exact for plain chat messages. Everything the
rule does not cover (tool definitions, tool calls, images, audio, files, JSON schemas, server-side
conversation state) is estimated, and the result is marked ``approximate`` with a note naming the
part. Notes are drawn from a fixed set: ``encoding``, ``tools``, ``tool_calls``,
``response_format``, ``image``, ``audio``, ``file``, ``conversation``, ``endpoint``, ``other``.

Estimates lean high on purpose: a reservation or a cap that comes out short is the failure that
costs money, one that comes out long only costs a little throughput.

Speed: the plain-text path makes one ``encode_ordinary`` call per string (role and name counts,
and system/developer prompts, which jobs repeat on every line, are cached), touches no regex or
JSON, and returns shared ``TokenCount`` objects for exact counts, so its overhead over raw
encoding stays small. For whole files, ``count_request(..., batch)`` sets the texts aside and
``count_texts`` counts many of them in one tokenizer call (see there), with the same result.
"""

from __future__ import annotations

import array
import binascii
import json
import math
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import tiktoken

from .endpoints import endpoint_for
from .vocab import FALLBACK_ENCODING, encoding_name_for_model, get_encoding

__all__ = [
    "TextBatch",
    "TokenCount",
    "count_chat",
    "count_embeddings",
    "count_request",
    "count_responses",
    "count_texts",
    "count_texts_each",
    "image_tokens",
]

# The cookbook rule: every message is wrapped in 3 tokens (<|start|>role...<|message|>...<|end|>),
# a name costs 1 more, and every reply is primed with 3 (<|start|>assistant<|message|>).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A token count, with whether any part of it was estimated and which parts were."""

    tokens: int
    approximate: bool = False
    notes: tuple[str, ...] = ()


class _EncState:
    """Per-encoding hot-path state, so a count does one dict lookup instead of several."""

    __slots__ = ("encode", "measure", "prompt_chars", "prompts", "small")

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode = encode
        self.measure: Callable[[str], int] = lambda text: len(encode(text))
        self.small: dict[str, int] = {}  # token counts of roles and names, repeated everywhere
        # Token counts of system/developer message texts and Responses instructions: a job
        # usually repeats one prompt on every line. Bounded in entries and in characters held.
        self.prompts: dict[str, int] = {}
        self.prompt_chars = 0


_SMALL_CACHE_MAX = 1024
_PROMPT_CACHE_MAX = 4096
_PROMPT_CACHE_CHARS = 1 << 22  # at most ~4M characters of prompt text kept alive (<= 16 MiB)
_EXACT_CACHE_MAX = 1 << 16
_states: dict[tiktoken.Encoding, _EncState] = {}
_exact: dict[int, TokenCount] = {}  # shared immutable results; avoids a frozen-dataclass init


def _state(enc: tiktoken.Encoding) -> _EncState:
    """Create the hot-path state for an encoding (kept for the process, like the encoding)."""
    st = _states.get(enc)
    if st is None:
        st = _states[enc] = _EncState(enc.encode_ordinary)
    return st


def _small_count(st: _EncState, text: str) -> int:
    """Count a role or name and remember it (bounded: values come from user files)."""
    n = len(st.encode(text))
    if len(st.small) < _SMALL_CACHE_MAX:
        st.small[text] = n
    return n


def _prompt_count(st: _EncState, text: str) -> int:
    """Count a system/developer prompt and remember it; the cache starts over when full."""
    n = len(st.encode(text))
    if len(st.prompts) >= _PROMPT_CACHE_MAX or st.prompt_chars + len(text) > _PROMPT_CACHE_CHARS:
        st.prompts.clear()
        st.prompt_chars = 0
        if len(text) > _PROMPT_CACHE_CHARS:
            return n
    st.prompts[text] = n
    st.prompt_chars += len(text)
    return n


def _exact_count(tokens: int) -> TokenCount:
    """An exact TokenCount, shared between equal totals (it is immutable)."""
    tc = _exact.get(tokens)
    if tc is None:
        tc = TokenCount(tokens)
        if len(_exact) < _EXACT_CACHE_MAX:
            _exact[tokens] = tc
    return tc


def _result(total: int, notes: list[str] | None) -> TokenCount:
    """Package a total and the estimated parts (if any) into a TokenCount."""
    if notes:
        return TokenCount(total, True, tuple(notes))
    return _exact_count(total)


def _note(notes: list[str], note: str) -> None:
    """Record that a part was estimated, once, in the order first seen."""
    if note not in notes:
        notes.append(note)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def _json_tokens(encode: Callable[[str], list[int]], value: object) -> int:
    """Estimate an unstructured value by the tokens of its compact JSON (an overestimate)."""
    return len(encode(_dumps(value)))


# ---------------------------------------------------------------------------------------------
# Images. OpenAI's vision guide: "tile" models cost base + per_tile x 512px tiles after fitting
# the image in 2048x2048 and shrinking its short side to 768; "patch" models cost
# ceil(multiplier x 32px patches), at most 1536 patches; "low" detail costs the base alone on
# tile models. Sizes are read from data: URLs; a remote image's size is unknown, so it is
# charged the most its model's formula can give (8 tiles, or 1536 patches).


class _ImageRule(NamedTuple):
    base: int
    per_tile: int
    patch_multiplier: float  # > 0 for patch-based models


_TILE_DEFAULT = _ImageRule(85, 170, 0.0)  # gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo, unknown
_IMAGE_RULES: tuple[tuple[str, _ImageRule], ...] = (  # first matching prefix wins
    ("gpt-4o-mini", _ImageRule(2833, 5667, 0.0)),
    ("gpt-4.1-mini", _ImageRule(0, 0, 1.62)),
    ("gpt-4.1-nano", _ImageRule(0, 0, 2.46)),
    ("gpt-5-mini", _ImageRule(0, 0, 1.62)),
    ("gpt-5-nano", _ImageRule(0, 0, 2.46)),
    ("o4-mini", _ImageRule(0, 0, 1.72)),
    ("gpt-5", _ImageRule(70, 140, 0.0)),
    ("o1", _ImageRule(75, 150, 0.0)),
    ("o3", _ImageRule(75, 150, 0.0)),
    ("computer-use-preview", _ImageRule(65, 129, 0.0)),
)
_MAX_TILES = 8  # 768 x 2048 after resizing: 2 x 4 tiles
_MAX_PATCHES = 1536
_image_rule_cache: dict[str, _ImageRule] = {}


def _image_rule(model: object) -> _ImageRule:
    """The image pricing rule for a model name (fine-tuned names use their base model's)."""
    if not isinstance(model, str):
        return _TILE_DEFAULT
    rule = _image_rule_cache.get(model)
    if rule is None:
        base = model[3:] if model.startswith("ft:") else model
        rule = next((r for prefix, r in _IMAGE_RULES if base.startswith(prefix)), _TILE_DEFAULT)
        if len(_image_rule_cache) < _SMALL_CACHE_MAX:
            _image_rule_cache[model] = rule
    return rule


def image_tokens(
    model: str | None, width: int | None = None, height: int | None = None, detail: str = "auto"
) -> int:
    """Estimated tokens for one image; unknown size gives the formula's maximum for the model."""
    rule = _image_rule(model)
    known = width is not None and height is not None and width > 0 and height > 0
    if rule.patch_multiplier:
        patches = _MAX_PATCHES
        if known:
            patches = min(math.ceil(width / 32) * math.ceil(height / 32), _MAX_PATCHES)
        return math.ceil(patches * rule.patch_multiplier)
    if detail == "low":
        return rule.base
    tiles = _MAX_TILES
    if known:
        w, h = float(width), float(height)
        if max(w, h) > 2048:
            scale = 2048 / max(w, h)
            w, h = int(w * scale), int(h * scale)
        if min(w, h) > 768:
            scale = 768 / min(w, h)
            w, h = int(w * scale), int(h * scale)
        tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return rule.base + rule.per_tile * tiles


_SNIFF_CHARS = 1 << 16  # base64 characters decoded first; enough unless a JPEG has a huge EXIF
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE})


def _sniff_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header, or None."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return w, h
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                w = int.from_bytes(data[24:27], "little") + 1
                h = int.from_bytes(data[27:30], "little") + 1
                return w, h
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            return None
        if data[:2] == b"\xff\xd8":
            i, n = 2, len(data)
            while i + 9 <= n:
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if marker in _JPEG_SOF:
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return w, h
                if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
                    i += 2
                    continue
                i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    except struct.error:
        return None
    return None


def _data_url_size(url: str) -> tuple[int, int] | None:
    """Image size from a base64 ``data:`` URL, decoding only the start when that suffices."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 256)
    if comma < 0 or not url[:comma].endswith(";base64"):
        return None
    try:
        head = url[comma + 1 : comma + 1 + _SNIFF_CHARS]
        size = _sniff_size(binascii.a2b_base64(head[: len(head) // 4 * 4]))
        if size is None and len(url) - comma - 1 > _SNIFF_CHARS:
            size = _sniff_size(binascii.a2b_base64(url[comma + 1 :]))
    except (binascii.Error, ValueError):
        return None
    return size


def _image_part_tokens(part: dict[str, Any], model: object) -> int:
    """Tokens of a chat ``image_url`` part or a Responses ``input_image`` part."""
    image = part.get("image_url")
    detail = part.get("detail")
    if isinstance(image, dict):  # chat: {"image_url": {"url": ..., "detail": ...}}
        detail = image.get("detail", detail)
        image = image.get("url")
    size = _data_url_size(image) if isinstance(image, str) else None
    width, height = size if size is not None else (None, None)
    return image_tokens(
        model if isinstance(model, str) else None,
        width,
        height,
        detail if isinstance(detail, str) else "auto",
    )


# Audio: about 10 tokens per second of input audio (1 per 100 ms). A WAV header gives the
# duration; other formats are sized at 32 kbit/s, a low speech bitrate, so the estimate is high.
_AUDIO_TOKENS_PER_SECOND = 10
_AUDIO_BYTES_PER_SECOND_GUESS = 4000


def _audio_part_tokens(part: dict[str, Any]) -> int:
    """Estimated tokens of an ``input_audio`` part from its duration."""
    audio = part.get("input_audio")
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str):
        return 0
    nbytes = len(data) * 3 // 4 - data.count("=", -2)  # base64 padding carries no bytes
    seconds = nbytes / _AUDIO_BYTES_PER_SECOND_GUESS
    try:
        head = binascii.a2b_base64(data[:64])
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            byte_rate = struct.unpack("<I", head[28:32])[0]
            if byte_rate:
                seconds = max(nbytes - 44, 0) / byte_rate
    except (binascii.Error, struct.error):
        pass
    return math.ceil(seconds * _AUDIO_TOKENS_PER_SECOND)


def _file_part_tokens(part: dict[str, Any]) -> int:
    """A guess for an attached file: its inline data at ~3 bytes per token; 0 if referenced."""
    file = part.get("file")
    if not isinstance(file, dict):
        file = part
    data = file.get("file_data")
    return len(data) // 4 if isinstance(data, str) else 0


_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})


def _parts_tokens(
    encode: Callable[[str], list[int]], parts: list[Any], notes: list[str], model: object
) -> int:
    """Tokens of a content-part list: text exactly, media estimated and noted."""
    total = 0
    for part in parts:
        if part.__class__ is str:
            total += len(encode(part))
            continue
        if not isinstance(part, dict):
            total += _json_tokens(encode, part)
            _note(notes, "other")
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get("text")
            if text.__class__ is str:
                total += len(encode(text))
                continue
        elif kind == "refusal":
            text = part.get("refusal")
            if text.__class__ is str:
                total += len(encode(text))
                continue
        elif kind in _IMAGE_PARTS:
            total += _image_part_tokens(part, model)
            _note(notes, "image")
            continue
        elif kind == "input_audio":
            total += _audio_part_tokens(part)
            _note(notes, "audio")
            continue
        elif kind in ("file", "input_file"):
            total += _file_part_tokens(part)
            _note(notes, "file")
            continue
        total += _json_tokens(encode, part)
        _note(notes, "other")
    return total


_TOOL_CALL_KEYS = frozenset({"tool_calls", "function_call"})


def _value_tokens(
    encode: Callable[[str], list[int]], key: str, value: object, notes: list[str], model: object
) -> int:
    """Tokens of a message value that is not a string (the slow, rarer path)."""
    if key == "content" and isinstance(value, list):
        return _parts_tokens(encode, value, notes, model)
    if key in _TOOL_CALL_KEYS:
        _note(notes, "tool_calls")
    elif key == "audio":
        _note(notes, "audio")
    else:
        _note(notes, "other")
    return _json_tokens(encode, value)


def _chat_extras(encode: Callable[[str], list[int]], body: dict[str, Any], notes: list[str]) -> int:
    """Estimate request-level inputs outside the messages: tool definitions and JSON schemas."""
    total = 0
    for key in ("tools", "functions"):
        value = body.get(key)
        if value:
            total += _json_tokens(encode, value)
            _note(notes, "tools")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        total += _json_tokens(encode, fmt.get("json_schema", fmt))
        _note(notes, "response_format")
    return total


def _odd_shape(st: _EncState, value: object, note: str = "other") -> TokenCount:
    """Estimate a structure we do not understand from its JSON, and say so."""
    return TokenCount(REPLY_PRIMING + _json_tokens(st.encode, value), True, (note,))


def count_chat(
    enc: tiktoken.Encoding, messages: list[dict[str, Any]], body: dict[str, Any] | None = None
) -> TokenCount:
    """Prompt tokens of a Chat Completions request, by the cookbook rule.

    3 per message, the tokens of every string value (role, content, name, tool_call_id, ...),
    +1 per name, +3 reply priming. ``body`` adds tool and JSON-schema estimates and supplies
    the model for image estimates.
    """
    st = _states.get(enc) or _state(enc)
    return _count_chat(st, st.measure, messages, body)


def _count_chat(
    st: _EncState, measure: Callable[[str], int], messages: object, body: dict[str, Any] | None
) -> TokenCount:
    encode, small, prompts = st.encode, st.small, st.prompts
    if messages.__class__ is not list:
        return _odd_shape(st, messages)
    total = REPLY_PRIMING
    notes: list[str] | None = None
    for message in messages:  # type: ignore[attr-defined]
        if message.__class__ is not dict and not isinstance(message, dict):
            if notes is None:
                notes = []
            total += _json_tokens(encode, message)
            _note(notes, "other")
            continue
        total += TOKENS_PER_MESSAGE
        role = message.get("role")
        prompt = role == "system" or role == "developer"  # any type: the role is not checked here
        for key, value in message.items():
            if value.__class__ is str:
                if key == "role":
                    n = small.get(value)
                    total += n if n is not None else _small_count(st, value)
                elif key == "name":
                    n = small.get(value)
                    total += (n if n is not None else _small_count(st, value)) + TOKENS_PER_NAME
                elif prompt and key == "content":
                    n = prompts.get(value)
                    total += n if n is not None else _prompt_count(st, value)
                else:
                    total += measure(value)
            elif value is not None:
                if notes is None:
                    notes = []
                model = body.get("model") if isinstance(body, dict) else None
                total += _value_tokens(encode, key, value, notes, model)
    if body is not None and ("tools" in body or "functions" in body or "response_format" in body):
        if notes is None:
            notes = []
        total += _chat_extras(encode, body, notes)
    if notes:
        return TokenCount(total, True, tuple(notes))
    return _exact.get(total) or _exact_count(total)  # inlined cache hit: this is the hot path


_RESPONSES_IGNORED_KEYS = frozenset({"type", "id", "status"})  # item metadata, not model input
_TOOL_ITEM_TEXT_KEYS = ("name", "arguments", "input", "output")


def count_responses(enc: tiktoken.Encoding, body: dict[str, Any]) -> TokenCount:
    """Input tokens of a Responses API request, by the same per-message rule as chat.

    Choices (the Responses API publishes no rule of its own): ``instructions`` counts as a
    leading ``developer`` message; a string ``input`` counts as one ``user`` message; message
    items count like chat messages, ignoring their ``type``/``id``/``status`` metadata; tool-call
    items count 3 plus their name/arguments/output text and are noted ``tool_calls``; a
    ``previous_response_id`` or ``conversation`` brings earlier turns the request does not show
    (noted ``conversation``); ``tools`` and a ``text.format`` JSON schema are estimated.
    """
    st = _states.get(enc) or _state(enc)
    return _count_responses(st, st.measure, body)


def _count_responses(st: _EncState, measure: Callable[[str], int], body: object) -> TokenCount:
    encode, small, prompts = st.encode, st.small, st.prompts
    if not isinstance(body, dict):
        return _odd_shape(st, body)
    model = body.get("model")
    total = REPLY_PRIMING
    notes: list[str] | None = None
    instructions = body.get("instructions")
    if instructions.__class__ is str:
        n = small.get("developer")
        total += TOKENS_PER_MESSAGE + (n if n is not None else _small_count(st, "developer"))
        n = prompts.get(instructions)
        total += n if n is not None else _prompt_count(st, instructions)
    items = body.get("input")
    if items.__class__ is str:
        n = small.get("user")
        total += TOKENS_PER_MESSAGE + (n if n is not None else _small_count(st, "user"))
        total += measure(items)
    elif items.__class__ is list:
        for item in items:
            if item.__class__ is not dict and not isinstance(item, dict):
                if notes is None:
                    notes = []
                total += _json_tokens(encode, item)
                _note(notes, "other")
                continue
            total += TOKENS_PER_MESSAGE
            if "role" not in item:
                if notes is None:
                    notes = []
                total += _responses_item_tokens(encode, item, notes, model)
                continue
            role = item["role"]
            prompt = role == "system" or role == "developer"
            for key, value in item.items():
                if value.__class__ is str:
                    if key in _RESPONSES_IGNORED_KEYS:
                        continue
                    if key == "role":
                        n = small.get(value)
                        total += n if n is not None else _small_count(st, value)
                    elif key == "name":
                        n = small.get(value)
                        n = n if n is not None else _small_count(st, value)
                        total += n + TOKENS_PER_NAME
                    elif prompt and key == "content":
                        n = prompts.get(value)
                        total += n if n is not None else _prompt_count(st, value)
                    else:
                        total += measure(value)
                elif value is not None:
                    if notes is None:
                        notes = []
                    total += _value_tokens(encode, key, value, notes, model)
    elif items is not None:
        notes = ["other"]
        total += _json_tokens(encode, items)
    if (
        "tools" in body
        or "text" in body
        or "previous_response_id" in body
        or "conversation" in body
        or "prompt" in body
    ):
        if notes is None:
            notes = []
        total += _responses_extras(encode, body, notes)
    return _result(total, notes)


def _responses_item_tokens(
    encode: Callable[[str], list[int]], item: dict[str, Any], notes: list[str], model: object
) -> int:
    """Estimate a non-message Responses input item: a tool call or its output, or other."""
    kind = item.get("type")
    if isinstance(kind, str) and (kind.endswith("_call") or kind.endswith("_call_output")):
        _note(notes, "tool_calls")
        total = 0
        found = False
        for key in _TOOL_ITEM_TEXT_KEYS:
            value = item.get(key)
            if value.__class__ is str:
                total += len(encode(value))
            elif isinstance(value, list):  # an output given as content parts
                total += _parts_tokens(encode, value, notes, model)
            elif value is not None:
                total += _json_tokens(encode, value)
            else:
                continue
            found = True
        if found:
            return total
    else:
        _note(notes, "other")
    return _json_tokens(encode, item)


def _responses_extras(
    encode: Callable[[str], list[int]], body: dict[str, Any], notes: list[str]
) -> int:
    """Estimate request-level Responses inputs: tools, a JSON schema, server-side state."""
    total = 0
    tools = body.get("tools")
    if tools:
        total += _json_tokens(encode, tools)
        _note(notes, "tools")
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        total += _json_tokens(encode, fmt.get("schema", fmt))
        _note(notes, "response_format")
    if body.get("previous_response_id") or body.get("conversation"):
        _note(notes, "conversation")  # earlier turns are billed but not visible here
    prompt = body.get("prompt")
    if prompt:
        total += _json_tokens(encode, prompt)  # a stored prompt template: content unknown
        _note(notes, "other")
    return total


def count_embeddings(enc: tiktoken.Encoding, input: object) -> TokenCount:
    """Tokens of an embeddings ``input``: a string, strings, one token array, or token arrays.

    Embeddings have no per-item overhead: the API bills exactly the tokens of the inputs, and a
    token array counts as its length.
    """
    st = _states.get(enc) or _state(enc)
    return _count_embeddings(st, st.measure, input)


def _count_embeddings(st: _EncState, measure: Callable[[str], int], input: object) -> TokenCount:
    encode = st.encode
    if input.__class__ is str:
        return _exact_count(measure(input))  # type: ignore[arg-type]
    if input.__class__ is not list:
        return TokenCount(_json_tokens(encode, input), True, ("other",))
    total = 0
    notes: list[str] | None = None
    for item in input:  # type: ignore[attr-defined]
        cls = item.__class__
        if cls is str:
            total += measure(item)
        elif cls is int:  # an element of a single token array
            total += 1
        elif cls is list:  # one token array of several
            total += len(item)
        else:
            notes = ["other"]
            total += _json_tokens(encode, item)
    return _result(total, notes)


_encodings_for_model: dict[str, tuple[tiktoken.Encoding, bool]] = {}


def _encoding_for(model: object) -> tuple[tiktoken.Encoding, bool]:
    """The encoding for a model and whether it was the fallback guess (cached per name)."""
    hit = _encodings_for_model.get(model) if model.__class__ is str else None
    if hit is None:
        name, fallback = encoding_name_for_model(model)  # type: ignore[arg-type]
        hit = (get_encoding(name), fallback)
        if model.__class__ is str and len(_encodings_for_model) < _SMALL_CACHE_MAX:
            _encodings_for_model[model] = hit  # type: ignore[index]
    return hit


def count_request(url: str, body: dict[str, Any], batch: TextBatch | None = None) -> TokenCount:
    """Input tokens of one job-file request, choosing the encoding from ``body["model"]``.

    A model tiktoken does not know is counted with the fallback encoding and noted
    ``encoding``; an endpoint without a rule here is estimated from the body's JSON and noted
    ``endpoint``.

    With ``batch``, the texts that the rule counts exactly and one by one (message contents,
    string inputs; not roles, names or repeated system prompts, which are cached) are set aside
    in it instead of encoded, and the result leaves them out: their tokens are
    ``batch.count()``, to be added once the batch is full. One batch holds the texts of one
    encoding (one model, say).
    """
    if not isinstance(body, dict):
        return _odd_shape(_state(get_encoding(FALLBACK_ENCODING)), body)
    enc, fallback = _encoding_for(body.get("model"))
    st = _states.get(enc) or _state(enc)
    if batch is None:
        measure = st.measure
    else:
        if batch.encoding is not enc:
            if batch.encoding is not None:
                raise ValueError("a TextBatch holds the texts of one encoding only")
            batch.encoding = enc
        measure = batch.add
    endpoint = endpoint_for(url)
    rule = _RULES.get(endpoint.name) if endpoint is not None else None
    if rule is None:
        result = TokenCount(_json_tokens(st.encode, body), True, ("endpoint",))
    else:
        result = rule(st, measure, body)
    if fallback:
        return TokenCount(result.tokens, True, ("encoding", *result.notes))
    return result


_RULES: dict[str, Callable[[_EncState, Callable[[str], int], dict[str, Any]], TokenCount]] = {
    "chat": lambda st, measure, body: _count_chat(st, measure, body.get("messages"), body),
    "responses": _count_responses,
    "embeddings": lambda st, measure, body: _count_embeddings(st, measure, body.get("input")),
}
"""Input-counting rule per endpoint (``endpoints.Endpoint.name``)."""


# ---------------------------------------------------------------------------------------------
# Counting many texts at once. The tokenizer splits its input at allowed special tokens *before*
# its regex and BPE run, so each piece between two separators is tokenized exactly as the text
# alone would be (encode_ordinary), and the separators add one token each:
#     tokens(sep.join(texts)) == sum(tokens(t) for t in texts) + len(texts) - 1
# provided no text contains the separator itself (checked: then that text is counted alone).
# One call instead of one per text saves the per-call overhead and the list of token ids, and it
# runs entirely without the GIL, so another thread can parse the next lines meanwhile.

_SEPARATOR = "<|endoftext|>"  # in every shipped encoding; it cannot overlap itself
_BATCH_CALL_CHARS = 1 << 22  # texts joined per tokenizer call, at most (bounds the copy)


class TextBatch:
    """Texts set aside by ``count_request(..., batch=)``; ``count()`` gives their tokens."""

    __slots__ = ("chars", "encoding", "texts")

    def __init__(self) -> None:
        self.encoding: tiktoken.Encoding | None = None
        self.texts: list[str] = []
        self.chars = 0  # characters held, for callers that bound their memory

    def add(self, text: str) -> int:
        """Set ``text`` aside; 0 tokens now (the counting functions call this per text)."""
        self.texts.append(text)
        self.chars += len(text)
        return 0

    def count(self) -> int:
        """The exact tokens of every text set aside (safe to call from another thread)."""
        if self.encoding is None:
            return 0
        return count_texts(self.encoding, self.texts)

    def counts(self) -> list[int]:
        """The exact tokens of each text set aside, in order (see ``count_texts_each``)."""
        if self.encoding is None:
            return [0] * len(self.texts)
        return count_texts_each(self.encoding, self.texts)


def count_texts(enc: tiktoken.Encoding, texts: list[str]) -> int:
    """``sum(len(enc.encode_ordinary(t)) for t in texts)``, computed in few tokenizer calls.

    Releases the GIL while tokenizing. Texts that contain the separator, or that cannot be
    encoded as UTF-8 (lone surrogates), are counted one by one with ``encode_ordinary``.
    """
    sep = _SEPARATOR if _SEPARATOR in enc.special_tokens_set else None
    return sum(_count_joined(enc, part, sep) for part in _calls(texts))


def _calls(texts: list[str]) -> Iterator[list[str]]:
    """``texts`` in runs of about ``_BATCH_CALL_CHARS`` characters: one tokenizer call each."""
    start, n = 0, len(texts)
    while start < n:
        end, size = start, 0
        while end < n and (size < _BATCH_CALL_CHARS or end == start):
            size += len(texts[end]) + 13
            end += 1
        yield texts[start:end]
        start = end


def _count_joined(enc: tiktoken.Encoding, texts: list[str], sep: str | None) -> int:
    if sep is None or len(texts) < 2:
        return sum(len(enc.encode_ordinary(t)) for t in texts)
    joined = sep.join(texts)
    if joined.count(sep) != len(texts) - 1:  # some text contains the separator
        alone = [t for t in texts if sep in t]
        rest = [t for t in texts if sep not in t]
        return _count_joined(enc, rest, sep) + sum(len(enc.encode_ordinary(t)) for t in alone)
    try:
        return _encoded_length(enc, joined, sep) - (len(texts) - 1)
    except UnicodeEncodeError:  # a lone surrogate: encode_ordinary replaces it, as tiktoken does
        return sum(len(enc.encode_ordinary(t)) for t in texts)


def _encoded_length(enc: tiktoken.Encoding, text: str, sep: str) -> int:
    """Tokens of ``text`` with ``sep`` allowed as a special token, without a list of token ids
    when the installed tiktoken offers its buffer API (what ``encode_to_numpy`` uses)."""
    core = getattr(enc, "_core_bpe", None)
    to_buffer = getattr(core, "encode_to_tiktoken_buffer", None)
    if to_buffer is not None:
        with memoryview(to_buffer(text, {sep})) as view:
            return view.nbytes // 4  # uint32 token ids
    return len(enc.encode(text, allowed_special={sep}, disallowed_special=()))


# Counting each text of a batch: the same joined call, its token ids split at the separator's id.
# Ids come back as native uint32s. When every id is below 2**24 and the separator id has no zero
# among its three low bytes, its 4-byte pattern cannot occur across two ids (the high byte of an
# id is always zero), so a plain bytes split finds exactly the separators.


def count_texts_each(enc: tiktoken.Encoding, texts: list[str]) -> list[int]:
    """``[len(enc.encode_ordinary(t)) for t in texts]``, computed in few tokenizer calls."""
    sep = _SEPARATOR if _SEPARATOR in enc.special_tokens_set else None
    out: list[int] = []
    for part in _calls(texts):
        out += _each_joined(enc, part, sep)
    return out


def _each_joined(enc: tiktoken.Encoding, texts: list[str], sep: str | None) -> list[int]:
    if sep is None or len(texts) < 2:
        return [len(enc.encode_ordinary(t)) for t in texts]
    joined = sep.join(texts)
    if joined.count(sep) != len(texts) - 1:  # some text contains the separator: count it alone
        inner = [i for i, t in enumerate(texts) if sep not in t]
        counts = [len(enc.encode_ordinary(t)) if sep in t else 0 for t in texts]
        for i, c in zip(inner, _each_joined(enc, [texts[i] for i in inner], sep), strict=True):
            counts[i] = c
        return counts
    try:
        pieces = _split_ids(enc, joined, sep)
    except UnicodeEncodeError:  # a lone surrogate: encode_ordinary replaces it, as tiktoken does
        pieces = None
    if pieces is None or len(pieces) != len(texts):
        return [len(enc.encode_ordinary(t)) for t in texts]
    return pieces


def _split_ids(enc: tiktoken.Encoding, text: str, sep: str) -> list[int] | None:
    """Token counts of the pieces of ``text`` between separators (allowed as special)."""
    sep_id = enc._special_tokens[sep]
    core = getattr(enc, "_core_bpe", None)
    to_buffer = getattr(core, "encode_to_tiktoken_buffer", None)
    if to_buffer is not None:
        with memoryview(to_buffer(text, {sep})) as view:
            data = view.tobytes()
    else:
        ids = enc.encode(text, allowed_special={sep}, disallowed_special=())
        data = array.array("I", ids).tobytes()
    pattern = struct.pack("=I", sep_id)
    low = pattern if sys.byteorder == "little" else pattern[::-1]
    if enc.n_vocab <= 1 << 24 and 0 not in low[:3]:
        return [len(piece) >> 2 for piece in data.split(pattern)]
    ids_array = array.array("I")
    ids_array.frombytes(data)
    counts, last = [], 0
    try:
        while True:
            at = ids_array.index(sep_id, last)
            counts.append(at - last)
            last = at + 1
    except ValueError:
        counts.append(len(ids_array) - last)
    return counts
