"""Read and validate a job file (OpenAI Batch API input format) in one streaming pass.

A job file is JSONL: one ``{"custom_id", "method", "url", "body"}`` object per line. Files can be
gigabytes, so the reader never holds more than one line (at most ``MAX_LINE_BYTES``) plus a
compact duplicate index (about 12 bytes per request at load <= 0.6) in memory, hashes the bytes as
they stream by, and reports every defect as a ``Problem`` with its line and field instead of
raising on the first one. The happy path is checked first; detailed reasons are only built for
lines that are actually wrong, because pricing a million-request job must stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import json.encoder
import json.scanner
import re
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .endpoints import ENDPOINTS, MAX_CHOICES, MAX_OUTPUT_TOKENS
from .errors import JobFileError, Problem
from .pricing import SERVICE_TIERS

MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer line is a problem; never read more than this at once
MAX_EMBEDDING_INPUTS = 2048  # the embeddings endpoint's documented limit on inputs per request
READ_BUFFER = 1024 * 1024
STDIN = "-"  # the job file argument that means standard input (``price`` only)

_BOM = b"\xef\xbb\xbf"
# Files that are clearly not UTF-8 JSONL, recognised by their first bytes: one clear problem
# instead of fifty confusing ones about NUL bytes.
_NOT_JSONL = {
    b"\xff\xfe": "is UTF-16 encoded (it starts with a UTF-16 byte order mark); save it as UTF-8",
    b"\xfe\xff": "is UTF-16 encoded (it starts with a UTF-16 byte order mark); save it as UTF-8",
    b"\x1f\x8b": "is gzip-compressed; decompress it first",
    b"PK\x03\x04": "is a zip archive, not a JSONL file",
}
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_PLAIN_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})  # no extra fields
_RESPONSES_ROLES = ("user", "assistant", "system", "developer")
# Every key that sets an output limit or a completion count must be a positive integer.
_LIMIT_KEYS = (*sorted({k for e in ENDPOINTS.values() for k in e.limit_keys}), "n")
_FOREIGN_LIMITS = {e.name: e.foreign_limits for e in ENDPOINTS.values()}
_KIND = {url: e.name for url, e in ENDPOINTS.items()}
_KNOWN_MODEL_CACHE_SIZE = 4096
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD]").search  # a \uD800-\uDFFF escape may be unpaired

_DECODER = json.JSONDecoder()


class _NonFinite(ValueError):
    """A NaN, Infinity or overflowing float literal: the line takes the slow, re-encoding path."""


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value:  # nan for inf and nan, 0.0 otherwise
        raise _NonFinite(text)
    return value


def _no_constant(text: str) -> Any:
    raise _NonFinite(text)


# C scanner: no whitespace regexes on the happy path. Non-finite numbers abort the scan (they are
# rare), so the line goes through _decode_slowly and has its body re-encoded, where the encoder's
# allow_nan=False decides exactly as when every body was encoded. Finite floats cost one call.
_SCAN = json.scanner.make_scanner(
    json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
)
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


def _no_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")  # unreachable for decoded JSON


def _make_encode_body() -> Callable[[dict[str, Any]], str]:
    """``_ENCODER.encode``, minus its per-call Python overhead when the C encoder exists.

    Same output as json.dumps(body, separators=(",", ":"), ensure_ascii=False), with less work
    per body: encoding is the largest single cost of reading a job.
    """
    make = json.encoder.c_make_encoder
    if make is None:
        return _ENCODER.encode
    encoder = make(
        None, _no_default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    return lambda body: "".join(encoder(body, 0))


_encode_body = _make_encode_body()

Errors = list[tuple[str, str]]  # (field, reason) pairs for one line


@dataclass(slots=True)
class JobLine:
    """One valid request, ready to store and price."""

    line: int  # 1-based physical line number
    custom_id: str
    url: str
    body: dict[str, Any]
    body_json: str  # compact canonical JSON of body, for storage ("" if keep_body_json=False)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed in 1 MiB chunks: recognises a job without parsing."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_BUFFER)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class _HashingRaw(io.RawIOBase):
    """Raw file wrapper that hashes and counts every byte the buffered reader pulls through it.

    Hashing per buffer fill (1 MiB) instead of per line keeps ``readline`` entirely in C.
    """

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__()
        self._raw = raw
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            with memoryview(buffer) as view:
                self.digest.update(view[:n])
            self.nbytes += n
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


class _IdIndex:
    """custom_id fingerprint -> first line, in two flat arrays (12 bytes a slot).

    A dict of Python ints costs several times more per id than this open-addressing table
    (linear probing, load <= 0.6). Ids are reduced to 64-bit fingerprints, so two
    different ids collide with probability about n^2 / 2^65 (3e-8 for a million ids): a collision
    would be reported as a false duplicate, never hide a real one.

    The fingerprint is Python's own ``hash(str)`` (SipHash, 64 bits on 64-bit builds), much
    cheaper than blake2b. It is salted per process (PYTHONHASHSEED), which does not matter here:
    the table lives for one pass in one process and is never stored or compared across
    processes. (On a 32-bit build the fingerprint has 32 bits and false duplicates become
    possible at about 10^5 ids; batchrun targets 64-bit machines.)
    """

    _NO_LINE = 0xFFFFFFFF  # line numbers past 2^32 - 1 are stored as "unknown"

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._keys = array("Q", [0]) * capacity
        self._lines = array("I", [0]) * capacity
        self._mask = capacity - 1
        self._limit = int(capacity * 0.6)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def fingerprint(custom_id: str) -> int:
        """Nonzero 64-bit fingerprint (zero marks an empty slot); valid within this process."""
        return (hash(custom_id) & 0xFFFFFFFFFFFFFFFF) or 1

    def first_line(self, custom_id: str, line: int) -> int | None:
        """Record ``custom_id`` at ``line``; if it was seen before, return its first line instead.

        Returns 0 when the first line is beyond what the table stores.
        """
        fp = (hash(custom_id) & 0xFFFFFFFFFFFFFFFF) or 1  # fingerprint(), inlined: hot path
        keys, mask = self._keys, self._mask
        i = fp & mask
        k = keys[i]
        while k:
            if k == fp:
                first = self._lines[i]
                return 0 if first == self._NO_LINE else first
            i = (i + 1) & mask
            k = keys[i]
        keys[i] = fp
        self._lines[i] = line if line < self._NO_LINE else self._NO_LINE
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return None

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        capacity = 2 * len(old_keys)
        keys = array("Q", [0]) * capacity
        lines = array("I", [0]) * capacity
        mask = capacity - 1
        for fp, line in zip(old_keys, old_lines, strict=True):
            if fp:
                i = fp & mask
                while keys[i]:
                    i = (i + 1) & mask
                keys[i] = fp
                lines[i] = line
        self._keys, self._lines, self._mask = keys, lines, mask
        self._limit = int(capacity * 0.6)

    def nbytes(self) -> int:
        """Memory held by the table's arrays."""
        return self._keys.itemsize * len(self._keys) + self._lines.itemsize * len(self._lines)


class JobReader:
    """Single-pass iterator over the valid requests of a job file; collects every problem.

    Iterate it once (``for job in reader``), then call ``check()``. ``sha256`` is the digest of
    the whole file once it has been read to the end ("" if reading stopped early).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        known_model: Callable[[str], bool] | None = None,
        known_tier: Callable[[str, str], str | None] | None = None,
        max_problems: int = 50,
        display_path: str | None = None,
        keep_body_json: bool = True,
    ) -> None:
        """``keep_body_json=False`` (pricing only) leaves ``JobLine.body_json`` empty; the lines
        accepted and the problems reported are the same either way. ``known_tier(model,
        tier)`` says why a known model's service tier cannot be priced (None: it can)."""
        self.path = Path(path)
        self.keep_body_json = keep_body_json
        self._stdin = str(path) == STDIN  # a file named "-" is "./-"
        self.display_path = display_path or ("<stdin>" if self._stdin else str(path))
        self.known_model = known_model
        self.known_tier = known_tier
        self.max_problems = max_problems
        self.problems: list[Problem] = []
        self.truncated = False
        self.sha256 = ""
        self.bytes_read = 0
        self.lines_read = 0
        self.requests = 0
        self._ids = _IdIndex()
        self._model_ok: dict[str, bool] = {}
        self._hashing: _HashingRaw | None = None
        self._stream = self._read()

    @property
    def position(self) -> int:
        """Bytes read from the file so far (for progress while it is read)."""
        return self._hashing.nbytes if self._hashing is not None else self.bytes_read

    def __iter__(self) -> Iterator[JobLine]:
        return self._stream  # the same generator every time: a second loop yields nothing

    def check(self) -> None:
        """Finish reading if needed; raise ``JobFileError`` if any problem was found."""
        for _ in self._stream:
            pass
        if self.problems:
            raise JobFileError(self.problems, self.truncated)

    # -- reading -------------------------------------------------------------------------------

    def _add(self, line: int, field: str, reason: str) -> bool:
        """Record a problem; False once the cap is passed (the caller stops reading)."""
        if len(self.problems) >= self.max_problems:
            self.truncated = True
            return False
        self.problems.append(Problem(self.display_path, line, field, reason))
        return True

    def _open(self) -> _HashingRaw | None:
        if self._stdin:
            return _HashingRaw(io.FileIO(0, "rb", closefd=False))
        try:
            if self.path.is_dir():
                self._add(0, "file", "is a directory, not a job file")
                return None
            raw = io.FileIO(self.path, "rb")
        except FileNotFoundError:
            self._add(0, "file", "no such file")
            return None
        except PermissionError:
            self._add(0, "file", "permission denied")
            return None
        except OSError as e:
            self._add(0, "file", f"cannot open: {e.strerror or e}")
            return None
        return _HashingRaw(raw)

    def _read(self) -> Iterator[JobLine]:
        hashing = self._hashing = self._open()
        if hashing is None:
            return
        f = io.BufferedReader(hashing, buffer_size=READ_BUFFER)
        lineno = 0
        nonblank = 0
        complete = False
        try:
            with f:
                readline = f.readline
                head = f.peek(4)[:4]
                for magic, why in _NOT_JSONL.items():
                    if head.startswith(magic):
                        self._add(0, "file", why)
                        return
                bom = head.startswith(_BOM)
                if bom:
                    f.read(3)
                while True:
                    raw: bytes | bytearray | None = readline(READ_BUFFER)
                    if not raw:
                        complete = True
                        break
                    lineno += 1
                    if raw[-1] != 10 and len(raw) == READ_BUFFER:
                        raw = _read_long_line(raw, readline)
                        if raw is None:
                            nonblank += 1
                            if not self._add(lineno, "line", f"longer than {MAX_LINE_BYTES} bytes"):
                                break
                            continue
                    if raw.isspace():
                        continue
                    nonblank += 1
                    job = self._parse(raw, lineno, bom and lineno == 1)
                    if job is not None:
                        self.requests += 1
                        yield job
                    elif self.truncated:
                        break
        except OSError as e:
            self._add(lineno + 1, "file", f"read error: {e.strerror or e}")
            complete = False
        finally:
            self.lines_read = lineno
            self.bytes_read = hashing.nbytes
        if complete:
            self.sha256 = hashing.digest.hexdigest()
            if nonblank == 0:
                self._add(0, "file", "no requests (the file is empty or only blank lines)")

    def _parse(self, raw: bytes | bytearray, lineno: int, after_bom: bool) -> JobLine | None:
        """Validate one non-blank line; return the request, or None after recording problems.

        Byte and column numbers in reasons are 1-based positions within the physical line.
        """
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if b"\0" in raw:
                self._add(lineno, "line", "contains a NUL byte")
            else:
                col = e.start + 1 + (3 if after_bom else 0)
                self._add(lineno, "line", f"invalid UTF-8 at byte {col}")
            return None
        encode = self.keep_body_json
        suspect = False  # might give a key twice
        try:
            obj, end = _SCAN(text, 0)
            if end != len(text) and text[end:].strip(" \t\r\n"):
                raise ValueError("extra data")
        except (ValueError, StopIteration, RecursionError):
            # leading whitespace, a non-finite number, or a real error to explain
            obj = _decode_slowly(text, raw)
            if isinstance(obj, _Invalid):
                self._add(lineno, "line", obj.reason)
                return None
            encode = True  # the encoder checks what the fast scan did not (NaN, Infinity)
            suspect = True

        if type(obj) is not dict:
            self._add(lineno, "line", f"must be a JSON object, got {_kind(obj)}")
            return None
        errors: Errors = []
        if suspect or _may_repeat_a_key(raw, obj):
            # json keeps the last of two equal keys; the API's parser may keep the first
            errors.extend(_repeated_keys(text))
        custom_id = obj.get("custom_id")
        url = obj.get("url")
        body = obj.get("body")
        if type(custom_id) is str and custom_id:
            first = self._ids.first_line(custom_id, lineno)
            if first is not None:
                where = f"line {first}" if first else "an earlier line"
                errors.append(("custom_id", f"duplicate of {where} ({_short(custom_id)})"))
        else:
            errors.append(("custom_id", _bad_string(obj, "custom_id", custom_id)))
        method = obj.get("method")
        if method != "POST":
            if "method" not in obj:
                errors.append(("method", 'missing (must be "POST")'))
            else:
                errors.append(("method", f'must be "POST", got {_show(method)}'))
        kind = _KIND.get(url) if type(url) is str else None
        if kind is None:
            errors.append(("url", _bad_url(obj, url)))
        if type(body) is not dict:
            if "body" not in obj:
                errors.append(("body", "missing"))
            else:
                errors.append(("body", f"must be an object, got {_kind(body)}"))
        else:
            self._check_body(body, kind, errors)

        body_json = ""
        if not errors:
            # Escaped surrogates (\udXXX): check they are paired. Most lines have no backslash
            # at all, so one memchr comes first; lines that have one get one regex scan.
            surrogates = 92 in raw and _SURROGATE_ESCAPE(raw) is not None  # 92: backslash
            if encode or surrogates:
                try:
                    body_json = _encode_body(body)
                except RecursionError:
                    errors.append(("body", "nested too deeply"))
                except ValueError:
                    errors.append(("body", "contains NaN or Infinity, which JSON does not allow"))
            if surrogates:
                errors.extend(_lone_surrogates(custom_id, body_json))
        if errors:
            for field, reason in errors:
                if not self._add(lineno, field, reason):
                    break
            return None
        return JobLine(lineno, custom_id, url, body, body_json if self.keep_body_json else "")

    def _check_body(self, body: dict[str, Any], kind: str | None, errors: Errors) -> None:
        model = body.get("model")
        priced = False
        if type(model) is not str or not model:
            errors.append(("body.model", _bad_string(body, "model", model)))
        elif self.known_model is not None and not self._is_known(model):
            errors.append(
                (
                    "body.model",
                    f"no price known for model {model!r} (add it to a price file of your own)",
                )
            )
        else:
            priced = True
        if body.get("service_tier") is not None:
            self._check_tier(body["service_tier"], model if priced else None, errors)
        if kind == "chat":
            _check_chat(body, errors)
        elif kind == "responses":
            _check_responses(body, errors)
        elif kind == "embeddings":
            _check_embeddings(body, errors)
        for key in _LIMIT_KEYS:
            if key in body:
                value = body[key]
                if type(value) is not int or value <= 0:
                    errors.append(
                        (f"body.{key}", f"must be a positive integer, got {_show(value)}")
                    )
                elif value > (MAX_CHOICES if key == "n" else MAX_OUTPUT_TOKENS):
                    most = MAX_CHOICES if key == "n" else MAX_OUTPUT_TOKENS
                    errors.append((f"body.{key}", f"at most {most:,}, got {value:,}"))
        foreign = _FOREIGN_LIMITS.get(kind or "")
        if foreign:
            for key, hint in foreign.items():
                if key in body:
                    errors.append((f"body.{key}", f"not a parameter of {kind} requests ({hint})"))
        if body.get("stream") not in (None, False):
            errors.append(("body.stream", "streaming is not supported in a job file"))

    def _check_tier(self, tier: Any, model: str | None, errors: Errors) -> None:
        """A service tier is priced as asked (a priority request at standard prices would let
        its worst case, and the cap's guard, fall short): one the table cannot price is a
        problem at its line."""
        if type(tier) is not str:
            errors.append(("body.service_tier", f"must be a string, got {_kind(tier)}"))
        elif tier not in SERVICE_TIERS:
            errors.append(
                (
                    "body.service_tier",
                    f"must be one of {', '.join(SERVICE_TIERS)}, got {_show(tier)}",
                )
            )
        elif model is not None and self.known_tier is not None:
            why = self.known_tier(model, tier)
            if why is not None:
                errors.append(("body.service_tier", why))

    def _is_known(self, model: str) -> bool:
        ok = self._model_ok.get(model)
        if ok is None:
            assert self.known_model is not None
            ok = bool(self.known_model(model))
            if len(self._model_ok) >= _KNOWN_MODEL_CACHE_SIZE:
                self._model_ok.clear()  # a file with endless distinct models must not grow memory
            self._model_ok[model] = ok
        return ok


def _read_long_line(first: bytes, readline: Callable[[int], bytes]) -> bytearray | None:
    """The rest of a line longer than one read buffer, or None (and skip it) past the cap.

    Pieces go into one bytearray, so a capped line costs its own size once, not twice as
    ``readline(limit)`` does while it joins its chunks.
    """
    line = bytearray(first)
    while True:
        piece = readline(READ_BUFFER)
        if len(line) + len(piece) > MAX_LINE_BYTES + 1:
            del line  # too long: drop what we have and skip to the next newline
            while piece and piece[-1] != 10:
                piece = readline(READ_BUFFER)
            return None
        line += piece
        if not piece or piece[-1] == 10:
            break
    size = len(line) - (1 if line.endswith(b"\n") else 0)
    return line if size <= MAX_LINE_BYTES else None


# -- per-endpoint checks ----------------------------------------------------------------------


def _check_chat(body: dict[str, Any], errors: Errors) -> None:
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        errors.append(("body.messages", _bad_list(body, "messages", messages)))
        return
    for i, message in enumerate(messages):
        if type(message) is dict:
            role = message.get("role")
            if (
                type(message.get("content")) is str
                and type(role) is str
                and role in _PLAIN_CHAT_ROLES
            ):
                continue  # the common case: nothing more to check
        _check_chat_message(message, f"body.messages[{i}]", errors)


def _check_chat_message(message: Any, where: str, errors: Errors) -> None:
    if type(message) is not dict:
        errors.append((where, f"must be an object, got {_kind(message)}"))
        return
    role = message.get("role")
    if type(role) is not str or role not in _CHAT_ROLES:
        errors.append((f"{where}.role", _bad_role(message, role, _CHAT_ROLES)))
    elif role == "tool" and type(message.get("tool_call_id")) is not str:
        errors.append((f"{where}.tool_call_id", "a tool message needs a string tool_call_id"))
    content = message.get("content")
    if type(content) is str:
        return
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return
        reason = "missing" if "content" not in message else "null"
        errors.append(
            (
                f"{where}.content",
                f"{reason} (allowed only for an assistant message with tool_calls)",
            )
        )
    elif type(content) is list:
        _check_parts(content, f"{where}.content", errors)
    else:
        errors.append(
            (
                f"{where}.content",
                f"must be a string or a list of content parts, got {_kind(content)}",
            )
        )


def _check_parts(parts: list[Any], where: str, errors: Errors) -> None:
    if not parts:
        errors.append((where, "must not be an empty list"))
    for j, part in enumerate(parts):
        if type(part) is not dict:
            errors.append((f"{where}[{j}]", f"must be a content part object, got {_kind(part)}"))
            continue
        ptype = part.get("type")
        if type(ptype) is not str or not ptype:
            errors.append((f"{where}[{j}].type", _bad_string(part, "type", ptype)))
        elif ptype in ("text", "input_text", "output_text") and type(part.get("text")) is not str:
            errors.append((f"{where}[{j}].text", f"a {ptype} part needs a string text"))


def _check_responses(body: dict[str, Any], errors: Errors) -> None:
    instructions = body.get("instructions")
    if instructions is not None and type(instructions) is not str:
        errors.append(("body.instructions", f"must be a string, got {_kind(instructions)}"))
    items = body.get("input")
    if type(items) is str:
        return
    if type(items) is not list or not items:
        if "input" not in body:
            errors.append(("body.input", "missing"))
        elif type(items) is list:
            errors.append(("body.input", "must not be an empty list"))
        else:
            errors.append(
                ("body.input", f"must be a string or a list of items, got {_kind(items)}")
            )
        return
    for i, item in enumerate(items):
        where = f"body.input[{i}]"
        if type(item) is not dict:
            errors.append((where, f"must be an object, got {_kind(item)}"))
            continue
        itype = item.get("type", "message")
        if itype != "message":
            if type(itype) is not str or not itype:
                errors.append((f"{where}.type", _bad_string(item, "type", itype)))
            continue  # function_call_output, item_reference, ...: the API checks their fields
        role = item.get("role")
        if type(role) is not str or role not in _RESPONSES_ROLES:
            errors.append((f"{where}.role", _bad_role(item, role, _RESPONSES_ROLES)))
        content = item.get("content")
        if type(content) is list:
            _check_parts(content, f"{where}.content", errors)
        elif type(content) is not str:
            reason = "missing" if "content" not in item else f"got {_kind(content)}"
            errors.append(
                (f"{where}.content", f"must be a string or a list of content parts, {reason}")
            )


def _check_embeddings(body: dict[str, Any], errors: Errors) -> None:
    value = body.get("input")
    if type(value) is str:
        if not value:
            errors.append(("body.input", "must not be an empty string"))
        return
    if type(value) is not list or not value:
        if "input" not in body:
            errors.append(("body.input", "missing"))
        elif type(value) is list:
            errors.append(("body.input", "must not be an empty list"))
        else:
            errors.append(("body.input", f"must be a string or a list, got {_kind(value)}"))
        return
    first = value[0]
    if type(first) is int:  # one token array
        _check_tokens(value, "body.input", errors)
        return
    if type(first) is not str and type(first) is not list:
        errors.append(
            ("body.input[0]", f"must be a string, a token id or a token list, got {_kind(first)}")
        )
        return
    if len(value) > MAX_EMBEDDING_INPUTS:
        errors.append(("body.input", f"at most {MAX_EMBEDDING_INPUTS} inputs, got {len(value)}"))
    if type(first) is str:  # a list of texts
        for i, text in enumerate(value):
            if type(text) is not str:
                errors.append((f"body.input[{i}]", f"must be a string, got {_kind(text)}"))
                return
            if not text:
                errors.append((f"body.input[{i}]", "must not be an empty string"))
                return
        return
    for i, tokens in enumerate(value):  # a list of token arrays
        if type(tokens) is not list:
            errors.append((f"body.input[{i}]", f"must be a token list, got {_kind(tokens)}"))
            return
        if not tokens:
            errors.append((f"body.input[{i}]", "must not be an empty token list"))
            return
        if not _check_tokens(tokens, f"body.input[{i}]", errors):
            return


def _check_tokens(tokens: list[Any], where: str, errors: Errors) -> bool:
    """Every item a non-negative int (bools are not token ids); report the first that is not."""
    for j, token in enumerate(tokens):
        if type(token) is not int or token < 0:
            errors.append(
                (f"{where}[{j}]", f"must be a token id (integer >= 0), got {_show(token)}")
            )
            return False
    return True


# -- reasons ------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """JSON's name for a value's type, as the user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _short(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _show(value: Any) -> str:
    """A value for a message: short strings and numbers verbatim, other things by kind."""
    if isinstance(value, str):
        return _short(value)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return _kind(value)


def _bad_string(obj: dict[str, Any], key: str, value: Any) -> str:
    if key not in obj:
        return "missing"
    if type(value) is str:
        return "must not be empty"
    return f"must be a string, got {_kind(value)}"


def _bad_list(obj: dict[str, Any], key: str, value: Any) -> str:
    if key not in obj:
        return "missing"
    if type(value) is list:
        return "must not be an empty list"
    return f"must be a non-empty list, got {_kind(value)}"


def _bad_url(obj: dict[str, Any], url: Any) -> str:
    if "url" not in obj:
        return "missing"
    if type(url) is not str:
        return f"must be a string, got {_kind(url)}"
    return f"unsupported endpoint {_short(url)} (supported: {', '.join(ENDPOINTS)})"


def _bad_role(obj: dict[str, Any], role: Any, allowed: tuple[str, ...]) -> str:
    if "role" not in obj:
        return "missing"
    if type(role) is not str:
        return f"must be a string, got {_kind(role)}"
    return f"unknown role {_short(role)} (expected one of {', '.join(allowed)})"


# -- repeated keys ------------------------------------------------------------------------------


class _Repeated(dict):  # type: ignore[type-arg]
    """A decoded object in which some keys were given more than once (rare: only on re-scans)."""

    __slots__ = ("repeated",)
    repeated: list[tuple[str, int]]  # (key, times given), in order of first appearance


def _keep_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    counts: dict[str, int] = {}
    for key, _ in pairs:
        counts[key] = counts.get(key, 0) + 1
    marked = _Repeated(obj)
    marked.repeated = [(key, n) for key, n in counts.items() if n > 1]
    return marked


# Only for lines that _may_repeat_a_key flags: building pairs for every object costs about as
# much again as the whole fast scan.
_SCAN_PAIRS = json.scanner.make_scanner(json.JSONDecoder(object_pairs_hook=_keep_repeats))


def _may_repeat_a_key(raw: bytes | bytearray, obj: dict[str, Any]) -> bool:
    """False only if no object of the line can have a key given twice; cheap, conservative.

    Every key of the line is followed by a colon (after optional whitespace), so the colons
    of the line are at least its keys plus the colons inside the decoded strings (a colon can
    only be escaped as \\u003a). Each key that decoding dropped as a repeat leaves its colon
    unaccounted for: once the keys and string colons of the usual objects (the line, the
    body, its messages or input items) account for every colon, nothing was dropped. Lines
    with other nested objects, or colons in other strings, are re-scanned (``_repeated_keys``).
    """
    if 92 in raw and (b"\\u003a" in raw or b"\\u003A" in raw):  # 92: backslash
        return True
    spare = raw.count(b":") - len(obj)
    for value in obj.values():
        if type(value) is str:
            spare -= value.count(":")
    if spare <= 0:
        return False
    body = obj.get("body")
    if type(body) is not dict:
        return True
    spare -= len(body)
    for value in body.values():
        if spare <= 0:
            return False
        if type(value) is str:
            spare -= value.count(":")
        elif type(value) is list:
            for item in value:
                if type(item) is dict:
                    spare -= len(item)
                    for text in item.values():
                        if type(text) is str:
                            spare -= text.count(":")
                elif type(item) is str:
                    spare -= item.count(":")
    return spare > 0


def _repeated_keys(text: str) -> Errors:
    """One problem per key given more than once in an object of ``text``, at its field."""
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, _ = _SCAN_PAIRS(text, start)
    except (ValueError, StopIteration, RecursionError):
        return []  # the line is reported as invalid JSON
    errors: Errors = []
    with contextlib.suppress(RecursionError):  # reported as nested too deeply
        _collect_repeats(value, "", errors)
    return errors


def _collect_repeats(value: Any, where: str, errors: Errors) -> None:
    if isinstance(value, dict):
        if type(value) is _Repeated:
            for key, times in value.repeated:
                errors.append(
                    (
                        f"{where}.{key}" if where else key,
                        f"key {_short(key)} given {times} times in one object: batchrun "
                        "checked the last value, the API may read another; give it once",
                    )
                )
        for key, item in value.items():
            if isinstance(item, dict | list):
                _collect_repeats(item, f"{where}.{key}" if where else key, errors)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                _collect_repeats(item, f"{where}[{i}]", errors)


@dataclass(frozen=True, slots=True)
class _Invalid:
    reason: str


def _decode_slowly(text: str, raw: bytes | bytearray) -> Any:
    """Parse ``text`` with the full decoder: the value, or an ``_Invalid`` saying why not."""
    if "\0" in text:
        return _Invalid("contains a NUL byte")
    try:
        return _DECODER.decode(text.rstrip("\r\n"))  # keep json's column on this line
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _Invalid(f"unexpected text after the JSON value at column {e.colno}")
        hint = "" if raw.endswith(b"\n") else "; the file ends mid-line (truncated?)"
        at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at"
        return _Invalid(f"invalid JSON: {e.msg}{at} column {e.colno}{hint}")
    except RecursionError:
        return _Invalid("invalid JSON: nested too deeply")
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        return _Invalid(f"invalid JSON: {str(e).split(':')[0]}")


def _lone_surrogates(custom_id: str, body_json: str) -> Errors:
    errors: Errors = []
    for field, text in (("custom_id", custom_id), ("body", body_json)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            code = ord(text[e.start])
            errors.append(
                (field, f"contains an unpaired surrogate \\u{code:04x} (not valid Unicode)")
            )
    return errors
