"""Job file reading and validation: every defect located by line and field, never a traceback."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from runner.cli import error_status
from runner.endpoints import ENDPOINTS
from runner.errors import JobFileError, Problem
from runner.jobfile import MAX_LINE_BYTES, JobLine, JobReader, file_sha256

from . import badcorpus, jobgen

ROOT = Path(__file__).resolve().parents[1]
KNOWN = frozenset({"gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano", "text-embedding-3-small"})


def chat(custom_id: str = "req-1", **body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Where is my order?"}],
        "max_completion_tokens": 20,
    }
    base.update(body)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": base}


def responses(custom_id: str = "resp-1", **body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "gpt-4.1-mini", "input": "Hi", "max_output_tokens": 50}
    base.update(body)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/responses", "body": base}


def embeddings(custom_id: str = "emb-1", **body: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": "text-embedding-3-small", "input": "Where is my order?"}
    base.update(body)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": base}


def write(tmp_path: Path, *lines: Any, name: str = "job.jsonl", end: bytes = b"\n") -> Path:
    """Write lines (dicts as JSON, str/bytes verbatim), each followed by ``end``."""
    out = bytearray()
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)
        out += (line.encode() if isinstance(line, str) else line) + end
    path = tmp_path / name
    path.write_bytes(bytes(out))
    return path


def read(path: Path, **kwargs: Any) -> tuple[list[JobLine], JobReader]:
    kwargs.setdefault("known_model", KNOWN.__contains__)
    reader = JobReader(path, **kwargs)
    return list(reader), reader


def only_problem(reader: JobReader) -> Problem:
    assert len(reader.problems) == 1, reader.problems
    return reader.problems[0]


# -- valid files ------------------------------------------------------------------------------


def test_valid_lines_of_all_three_endpoints_parse_with_canonical_body_json(tmp_path: Path) -> None:
    lines = [
        chat("c-1", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi é"}]}]),
        responses("r-1", input=[{"role": "user", "content": "Hi"}], instructions="Be brief."),
        embeddings("e-1", input=["a", "b"]),
        embeddings("e-2", input=[1, 2, 3]),
        embeddings("e-3", input=[[1, 2], [3]]),
    ]
    path = write(tmp_path, *lines)
    jobs, reader = read(path)
    reader.check()
    assert [(j.line, j.custom_id, j.url) for j in jobs] == [
        (i + 1, line["custom_id"], line["url"]) for i, line in enumerate(lines)
    ]
    assert all(j.url in ENDPOINTS for j in jobs)
    for job, line in zip(jobs, lines, strict=True):
        assert job.body == line["body"]
        assert job.body_json == json.dumps(line["body"], separators=(",", ":"), ensure_ascii=False)
    assert (reader.requests, reader.lines_read, reader.bytes_read) == (5, 5, path.stat().st_size)


def test_example_job_file_is_valid_and_mixes_the_three_endpoints() -> None:
    jobs, reader = read(ROOT / "jobs" / "example.jsonl")
    reader.check()
    urls = [j.url for j in jobs]
    assert 35 <= len(jobs) <= 45
    assert urls.count("/v1/responses") >= 3 and urls.count("/v1/embeddings") == 8
    unlimited = [
        j
        for j in jobs
        if j.url == "/v1/chat/completions"
        and not {"max_tokens", "max_completion_tokens"} & j.body.keys()
    ]
    assert len(unlimited) == 2


def test_assistant_with_tool_calls_may_have_null_content(tmp_path: Path) -> None:
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 °C"},
    ]
    _, reader = read(write(tmp_path, chat(messages=messages)))
    reader.check()


def test_crlf_line_endings_and_a_bom_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + json.dumps(chat("a")).encode(), chat("b"), end=b"\r\n")
    jobs, reader = read(path)
    reader.check()
    assert [j.custom_id for j in jobs] == ["a", "b"]
    assert reader.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # BOM included


def test_blank_lines_are_skipped_but_still_numbered(tmp_path: Path) -> None:
    path = write(tmp_path, "", chat("a"), "   \t", chat("b", model=7))
    jobs, reader = read(path)
    assert [j.line for j in jobs] == [2]
    assert only_problem(reader).line == 4


def test_unicode_custom_ids_are_accepted(tmp_path: Path) -> None:
    jobs, reader = read(write(tmp_path, chat("заявка-1"), chat("🎫"), chat("チケット")))
    reader.check()
    assert [j.custom_id for j in jobs] == ["заявка-1", "🎫", "チケット"]


# -- whole-file problems ------------------------------------------------------------------------


def test_missing_file_is_a_problem_at_line_0(tmp_path: Path) -> None:
    _, reader = read(tmp_path / "nope.jsonl")
    assert only_problem(reader) == Problem(str(tmp_path / "nope.jsonl"), 0, "file", "no such file")


def test_directory_is_a_problem_at_line_0(tmp_path: Path) -> None:
    _, reader = read(tmp_path)
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (0, "file") and "directory" in problem.reason


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\r\n", b"\xef\xbb\xbf"])
def test_file_without_requests_is_a_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "job.jsonl"
    path.write_bytes(content)
    _, reader = read(path)
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (0, "file")
    assert problem.reason.startswith("no requests")


def test_utf16_file_is_one_clear_problem(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    path.write_bytes((json.dumps(chat()) + "\n").encode("utf-16"))
    _, reader = read(path)
    assert "UTF-16" in only_problem(reader).reason


def test_display_path_names_the_file_in_problems(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, "[]"), display_path="jobs/x.jsonl")
    assert str(only_problem(reader)).startswith("jobs/x.jsonl:1: line: ")


# -- line-level problems ------------------------------------------------------------------------


def test_invalid_utf8_reports_the_line_and_byte(tmp_path: Path) -> None:
    bad = json.dumps(chat("b")).encode().replace(b"Where", b"Wh\xe9re")
    path = write(tmp_path, chat("a"), bad)
    column = bad.index(b"\xe9") + 1
    _, reader = read(path)
    assert only_problem(reader) == Problem(str(path), 2, "line", f"invalid UTF-8 at byte {column}")


def test_invalid_json_reports_jsons_message_and_column(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, chat(), '{"custom_id": "a" "method": "POST"}'))
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (2, "line")
    assert problem.reason == "invalid JSON: Expecting ',' delimiter at column 19"


def test_truncated_last_line_says_the_file_may_be_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    path.write_bytes(json.dumps(chat("a")).encode() + b"\n" + json.dumps(chat("b")).encode()[:50])
    _, reader = read(path)
    problem = only_problem(reader)
    assert problem.line == 2 and problem.reason.endswith("(truncated?)")


def test_a_bad_line_in_the_middle_does_not_mention_truncation(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, json.dumps(chat("a"))[:50], chat("b")))
    problem = only_problem(reader)
    assert problem.line == 1 and "truncated" not in problem.reason


def test_text_after_the_object_is_a_problem(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, json.dumps(chat()) + " garbage"))
    problem = only_problem(reader)
    assert problem.line == 1 and "unexpected text after the JSON value" in problem.reason


@pytest.mark.parametrize(
    ("text", "kind"), [("[]", "array"), ("null", "null"), ('"x"', "string"), ("5", "number")]
)
def test_a_line_that_is_not_an_object_is_a_problem(tmp_path: Path, text: str, kind: str) -> None:
    _, reader = read(write(tmp_path, chat(), text))
    assert only_problem(reader).reason == f"must be a JSON object, got {kind}"
    assert only_problem(reader).line == 2


def test_nul_byte_is_a_problem(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, chat(), b'{"custom_id": "a\x00"}'))
    problem = only_problem(reader)
    assert (problem.line, problem.field, problem.reason) == (2, "line", "contains a NUL byte")


def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    _, reader = read(write(tmp_path, chat(), b'{"custom_id": "a", "body": ' + deep + b"}"))
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (2, "line") and "nested too deeply" in problem.reason


def test_nan_and_oversized_integers_are_problems(tmp_path: Path) -> None:
    nan = json.dumps(chat("a")).replace('"max_completion_tokens": 20', '"temperature": NaN')
    big = json.dumps(chat("b")).replace("20", "9" * 5000)
    _, reader = read(write(tmp_path, nan, big))
    assert [(p.line, p.field) for p in reader.problems] == [(1, "body"), (2, "line")]


def test_unpaired_surrogate_escape_is_a_problem(tmp_path: Path) -> None:
    _, reader = read(
        write(tmp_path, json.dumps(chat("ok-\ud83d\ude00")), json.dumps(chat("\ud800")))
    )
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (2, "custom_id")


def test_line_over_16_mib_is_skipped_without_loading_more(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(chat("a")).encode() + b"\n")
        f.write(b'{"custom_id": "' + b"x" * (MAX_LINE_BYTES + 1024 * 1024) + b'"}\n')
        f.write(json.dumps(chat("c")).encode() + b"\n")
    tracemalloc.start()
    try:
        jobs, reader = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [j.line for j in jobs] == [1, 3]
    assert only_problem(reader) == Problem(
        str(path), 2, "line", f"longer than {MAX_LINE_BYTES} bytes"
    )
    # The capped line once, its growth slack and two 1 MiB buffers: measured 23.8 MB. A plain
    # readline(limit) holds the line twice while it joins its chunks (measured 35.4 MB).
    assert peak < 2 * MAX_LINE_BYTES
    assert reader.sha256 == file_sha256(path)


# -- field problems, each on line 3 after a valid line and a blank one ------------------------


def _drop(line: dict[str, Any], *keys: str) -> dict[str, Any]:
    target = line
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]
    return line


def _with(line: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**line, **top}


FIELD_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("custom_id missing", _drop(chat(), "custom_id"), "custom_id", "missing"),
    ("custom_id number", chat(123), "custom_id", "must be a string, got number"),
    ("custom_id empty", chat(""), "custom_id", "must not be empty"),
    ("method missing", _drop(chat(), "method"), "method", 'missing (must be "POST")'),
    ("method GET", _with(chat(), method="GET"), "method", "must be \"POST\", got 'GET'"),
    ("method lowercase", _with(chat(), method="post"), "method", "must be \"POST\", got 'post'"),
    ("url missing", _drop(chat(), "url"), "url", "missing"),
    ("url number", _with(chat(), url=5), "url", "must be a string, got number"),
    (
        "url unsupported",
        _with(chat(), url="/v1/images/generations"),
        "url",
        "unsupported endpoint '/v1/images/generations' "
        "(supported: /v1/chat/completions, /v1/responses, /v1/embeddings)",
    ),
    ("body missing", _drop(chat(), "body"), "body", "missing"),
    ("body string", _with(chat(), body="{}"), "body", "must be an object, got string"),
    ("model missing", _drop(chat(), "body", "model"), "body.model", "missing"),
    ("model number", chat(model=7), "body.model", "must be a string, got number"),
    ("model empty", chat(model=""), "body.model", "must not be empty"),
    (
        "model unknown",
        chat(model="gpt-9"),
        "body.model",
        "no price known for model 'gpt-9' (add it to a price file of your own)",
    ),
    ("messages missing", _drop(chat(), "body", "messages"), "body.messages", "missing"),
    ("messages empty", chat(messages=[]), "body.messages", "must not be an empty list"),
    (
        "messages string",
        chat(messages="hi"),
        "body.messages",
        "must be a non-empty list, got string",
    ),
    (
        "message not object",
        chat(messages=["hi"]),
        "body.messages[0]",
        "must be an object, got string",
    ),
    ("role missing", chat(messages=[{"content": "hi"}]), "body.messages[0].role", "missing"),
    (
        "role unknown",
        chat(messages=[{"role": "bot", "content": "hi"}]),
        "body.messages[0].role",
        "unknown role 'bot' (expected one of system, developer, user, assistant, tool, function)",
    ),
    (
        "role number",
        chat(messages=[{"role": 1, "content": "hi"}]),
        "body.messages[0].role",
        "must be a string, got number",
    ),
    (
        "content number",
        chat(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": 4}]),
        "body.messages[1].content",
        "must be a string or a list of content parts, got number",
    ),
    (
        "content null for user",
        chat(messages=[{"role": "user", "content": None}]),
        "body.messages[0].content",
        "null (allowed only for an assistant message with tool_calls)",
    ),
    (
        "content null for assistant without tool_calls",
        chat(messages=[{"role": "assistant", "content": None}]),
        "body.messages[0].content",
        "null (allowed only for an assistant message with tool_calls)",
    ),
    (
        "content part not an object",
        chat(messages=[{"role": "user", "content": ["hi"]}]),
        "body.messages[0].content[0]",
        "must be a content part object, got string",
    ),
    (
        "content part type missing",
        chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]),
        "body.messages[0].content[0].type",
        "missing",
    ),
    (
        "tool message without tool_call_id",
        chat(messages=[{"role": "tool", "content": "4 °C"}]),
        "body.messages[0].tool_call_id",
        "a tool message needs a string tool_call_id",
    ),
    ("responses input missing", _drop(responses(), "body", "input"), "body.input", "missing"),
    ("responses input empty list", responses(input=[]), "body.input", "must not be an empty list"),
    (
        "responses input number",
        responses(input=3),
        "body.input",
        "must be a string or a list of items, got number",
    ),
    (
        "responses item number",
        responses(input=[3]),
        "body.input[0]",
        "must be an object, got number",
    ),
    (
        "responses message without role",
        responses(input=[{"content": "hi"}]),
        "body.input[0].role",
        "missing",
    ),
    (
        "responses message content number",
        responses(input=[{"role": "user", "content": 1}]),
        "body.input[0].content",
        "must be a string or a list of content parts, got number",
    ),
    (
        "responses instructions number",
        responses(instructions=1),
        "body.instructions",
        "must be a string, got number",
    ),
    ("embeddings input missing", _drop(embeddings(), "body", "input"), "body.input", "missing"),
    (
        "embeddings input empty string",
        embeddings(input=""),
        "body.input",
        "must not be an empty string",
    ),
    (
        "embeddings input empty list",
        embeddings(input=[]),
        "body.input",
        "must not be an empty list",
    ),
    (
        "embeddings input mixed types",
        embeddings(input=["a", 1]),
        "body.input[1]",
        "must be a string, got number",
    ),
    (
        "embeddings empty string item",
        embeddings(input=["a", ""]),
        "body.input[1]",
        "must not be an empty string",
    ),
    (
        "embeddings token array with a bool",
        embeddings(input=[1, True]),
        "body.input[1]",
        "must be a token id (integer >= 0), got true",
    ),
    (
        "embeddings empty token list",
        embeddings(input=[[1], []]),
        "body.input[1]",
        "must not be an empty token list",
    ),
    (
        "embeddings too many inputs",
        embeddings(input=["a"] * 2049),
        "body.input",
        "at most 2048 inputs, got 2049",
    ),
    (
        "max_tokens negative",
        chat(max_tokens=-5),
        "body.max_tokens",
        "must be a positive integer, got -5",
    ),
    (
        "max_tokens string",
        chat(max_tokens="100"),
        "body.max_tokens",
        "must be a positive integer, got '100'",
    ),
    (
        "max_completion_tokens bool",
        chat(max_completion_tokens=True),
        "body.max_completion_tokens",
        "must be a positive integer, got true",
    ),
    (
        "max_output_tokens float",
        responses(max_output_tokens=1.5),
        "body.max_output_tokens",
        "must be a positive integer, got 1.5",
    ),
    ("n zero", chat(n=0), "body.n", "must be a positive integer, got 0"),
    (
        "chat with max_output_tokens",
        chat(max_output_tokens=5),
        "body.max_output_tokens",
        "not a parameter of chat requests (use max_completion_tokens)",
    ),
    ("stream true", chat(stream=True), "body.stream", "streaming is not supported in a job file"),
]


@pytest.mark.parametrize(
    ("line", "field", "reason"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_each_field_problem_is_reported_at_its_line(
    tmp_path: Path, line: dict[str, Any], field: str, reason: str
) -> None:
    path = write(tmp_path, chat("first"), "", line)
    jobs, reader = read(path)
    assert [j.line for j in jobs] == [1]
    assert only_problem(reader) == Problem(str(path), 3, field, reason)
    with pytest.raises(JobFileError) as caught:
        reader.check()
    assert caught.value.problems == reader.problems and error_status(caught.value) == 2


def test_all_problems_of_one_line_are_reported(tmp_path: Path) -> None:
    line = {"custom_id": 1, "method": "GET", "url": 5, "body": {"model": 7, "n": 0}}
    _, reader = read(write(tmp_path, line))
    assert [p.field for p in reader.problems] == [
        "custom_id",
        "method",
        "url",
        "body.model",
        "body.n",
    ]


def test_duplicate_custom_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, chat("a"), chat("b"), chat("c"), chat("b"), chat("b"))
    jobs, reader = read(path)
    assert [j.custom_id for j in jobs] == ["a", "b", "c"]
    assert [(p.line, p.field, p.reason) for p in reader.problems] == [
        (4, "custom_id", "duplicate of line 2 ('b')"),
        (5, "custom_id", "duplicate of line 2 ('b')"),
    ]


def test_unicode_duplicates_far_apart_are_found(tmp_path: Path) -> None:
    lines = [embeddings(f"заявка-{i}") for i in range(3000)]
    lines.append(embeddings("заявка-7"))
    _, reader = read(write(tmp_path, *lines))
    assert [(p.line, p.reason) for p in reader.problems] == [
        (3001, "duplicate of line 8 ('заявка-7')")
    ]


def test_an_invalid_line_still_claims_its_custom_id(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, chat("a", model=7), chat("a")))
    assert [(p.line, p.field) for p in reader.problems] == [(1, "body.model"), (2, "custom_id")]


def test_id_index_keeps_first_lines_across_growth() -> None:
    from runner.jobfile import _IdIndex

    index = _IdIndex(capacity=8)
    for i in range(50_000):
        assert index.first_line(f"id-{i}", i + 1) is None
    assert len(index) == 50_000
    assert all(index.first_line(f"id-{i}", 0) == i + 1 for i in range(0, 50_000, 997))
    assert index.nbytes() <= 12 * 50_000 / 0.3  # 12 bytes a slot, load factor 0.3..0.6


# -- limits, hashes, API ---------------------------------------------------------------------


def test_problems_are_capped_at_max_problems_and_marked_truncated(tmp_path: Path) -> None:
    path = write(tmp_path, *[chat(f"r{i}", model=7) for i in range(20)])
    _, reader = read(path, max_problems=5)
    assert reader.truncated
    assert [p.line for p in reader.problems] == [1, 2, 3, 4, 5]
    assert reader.sha256 == ""  # reading stopped early: no digest of a partial file
    with pytest.raises(JobFileError, match="stopped after 5 problems"):
        reader.check()


def test_problems_exactly_at_the_cap_are_not_truncated(tmp_path: Path) -> None:
    _, reader = read(write(tmp_path, *[chat(f"r{i}", model=7) for i in range(5)]), max_problems=5)
    assert len(reader.problems) == 5 and not reader.truncated


def test_sha256_and_file_sha256_equal_hashlib(tmp_path: Path) -> None:
    path = write(tmp_path, *[chat(f"r{i}") for i in range(1000)], "", chat("bad", model=7))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    _, reader = read(path)
    assert reader.sha256 == expected == file_sha256(path)
    assert reader.bytes_read == path.stat().st_size and reader.lines_read == 1002


def test_check_reads_the_file_itself_and_passes_a_valid_one(tmp_path: Path) -> None:
    path = write(tmp_path, chat("a"), chat("b"))
    reader = JobReader(path)
    reader.check()
    assert reader.requests == 2 and reader.sha256 == file_sha256(path)


def test_reader_is_single_pass(tmp_path: Path) -> None:
    reader = JobReader(write(tmp_path, chat("a"), chat("b")))
    assert len(list(reader)) == 2
    assert list(reader) == []


def test_known_model_is_asked_once_per_model(tmp_path: Path) -> None:
    asked: list[str] = []

    def known(model: str) -> bool:
        asked.append(model)
        return True

    _, reader = read(write(tmp_path, *[chat(f"r{i}") for i in range(100)]), known_model=known)
    reader.check()
    assert asked == ["gpt-4o-mini"]


def test_memory_stays_flat_for_200k_lines(tmp_path: Path) -> None:
    """200,000 requests: RSS grows by the id table and buffers only (measured about 8 MB).

    tracemalloc makes this loop ten times slower (10 s; its peak was 12.6 MiB), so the figure
    comes from the peak RSS of a child process; the 16 MiB-line test above uses tracemalloc.
    """
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.writelines(
            f'{{"custom_id":"req-{i:06d}","method":"POST","url":"/v1/embeddings",'
            f'"body":{{"model":"text-embedding-3-small","input":"support ticket {i}"}}}}\n'
            for i in range(200_000)
        )
    script = (
        "import resource, sys\n"
        "from runner.jobfile import JobReader\n"
        "r = JobReader(sys.argv[1])\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "n = sum(1 for _ in r)\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
        "print(n, grew * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
    )
    count, grew = map(int, out.stdout.split())
    assert count == 200_000
    assert grew < 60 * 1024 * 1024, f"reader grew RSS by {grew / 2**20:.1f} MiB"


# -- corpus and generator -------------------------------------------------------------------


def test_every_bad_corpus_file_is_reported_with_its_line(tmp_path: Path) -> None:
    paths = badcorpus.materialize(tmp_path)
    assert len(paths) >= 30 and {p.name for p in paths} == set(badcorpus.EXPECTED)
    for path in paths:
        reader = JobReader(path, known_model=badcorpus.KNOWN_MODELS.__contains__)
        list(reader)
        assert reader.problems, path.name
        for problem in reader.problems:
            assert problem.line >= 1 or problem.field == "file", (path.name, problem)
        line, field, reason = badcorpus.EXPECTED[path.name]
        assert any(
            (p.line, p.field) == (line, field) and reason in p.reason for p in reader.problems
        ), (path.name, reader.problems)


def test_the_job_generator_writes_a_valid_deterministic_job_with_unique_bodies(
    tmp_path: Path,
) -> None:
    first, again, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    mix = ("chat", "responses", "embeddings")
    jobgen.write_job(first, 300, seed=7, mix=mix, prompt_words=12, max_tokens=32)
    jobgen.write_job(again, 300, seed=7, mix=mix, prompt_words=12, max_tokens=32)
    jobgen.write_job(other, 300, seed=8, mix=mix, prompt_words=12, max_tokens=32)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    jobs, reader = read(first)
    reader.check()
    assert len(jobs) == 300 and len({j.body_json for j in jobs}) == 300
    assert {j.url for j in jobs} == set(ENDPOINTS)
    assert all(j.body.get("max_completion_tokens") == 32 for j in jobs if "messages" in j.body)


def test_make_job_cli_writes_the_requested_count(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    cli = [sys.executable, str(ROOT / "bench" / "make_job.py"), str(out), "--requests", "25"]
    subprocess.run([*cli, "--max-tokens", "0"], check=True)
    jobs, reader = read(out)
    reader.check()
    assert len(jobs) == 25 and not any("max_completion_tokens" in j.body for j in jobs)


# -- pricing-only reads (keep_body_json=False) ------------------------------------------------


def test_reading_without_body_json_accepts_and_reports_exactly_the_same(tmp_path: Path) -> None:
    """price_job skips encoding bodies; every verdict must stay the one the encoder gave."""
    paths = badcorpus.materialize(tmp_path / "bad")

    def temperature(custom_id: str, literal: str) -> str:
        return json.dumps(chat(custom_id, temperature=0.5)).replace("0.5", literal)

    paths.append(
        write(
            tmp_path,
            temperature("a", "NaN"),
            temperature("b", "1e999"),  # overflows to inf
            temperature("c", "-Infinity"),
            temperature("d", "1.5e-3"),  # finite floats stay fine
            '{"extra": NaN, ' + json.dumps(chat("e"))[1:],  # outside body: ok
            json.dumps(chat("f", messages=[{"role": "user", "content": "\ud83d\ude00 ok\n"}])),
            json.dumps(chat("g", messages=[{"role": "user", "content": "lone \udc00"}])),
            json.dumps(chat("h", metadata={"\ud800": 1})),  # a lone surrogate in a key
            "  " + json.dumps(chat("i")),  # leading whitespace: the slow path
            name="floats.jsonl",
        )
    )
    for path in paths:
        kept, with_json = read(path, known_model=badcorpus.KNOWN_MODELS.__contains__)
        lean, without = read(
            path, known_model=badcorpus.KNOWN_MODELS.__contains__, keep_body_json=False
        )
        assert without.problems == with_json.problems, path.name
        assert [(j.line, j.custom_id, j.body) for j in lean] == [
            (j.line, j.custom_id, j.body) for j in kept
        ], path.name
        assert all(j.body_json == "" for j in lean)
        assert (without.sha256, without.requests) == (with_json.sha256, with_json.requests)
    problems = {(p.line, p.field, p.reason[:30]) for p in without.problems}
    assert problems == {
        (1, "body", "contains NaN or Infinity, whic"),
        (2, "body", "contains NaN or Infinity, whic"),
        (3, "body", "contains NaN or Infinity, whic"),
        (7, "body", "contains an unpaired surrogate"),
        (8, "body", "contains an unpaired surrogate"),
    }


def test_id_fingerprints_are_64_bit_and_never_zero() -> None:
    from runner.jobfile import _IdIndex

    fps = {_IdIndex.fingerprint(f"req-{i}") for i in range(10_000)}
    assert len(fps) == 10_000 and 0 not in fps
    assert all(0 < fp < 2**64 for fp in fps)
    assert _IdIndex.fingerprint("a\ud800") != 0  # lone surrogates hash like any string


# -- keys given twice ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (
            '{"custom_id": "a", "custom_id": "b", ' + json.dumps(chat("x"))[1:].split(", ", 1)[1],
            "custom_id",
        ),
        (json.dumps(chat("a")).replace('"model"', '"model": "gpt-4o", "model"'), "body.model"),
        (
            json.dumps(chat("a")).replace('"role": "user"', '"role": "system", "role": "user"'),
            "body.messages[0].role",
        ),
        # a colon inside a string must not let a repeat hide from the cheap pre-check
        (
            json.dumps(chat("a:b:c")).replace(
                '"max_completion_tokens"', '"max_completion_tokens": 5, "max_completion_tokens"'
            ),
            "body.max_completion_tokens",
        ),
        # nor a key spelled with an escaped colon elsewhere
        (
            json.dumps(chat("a", metadata={"k": "v\\u003a"})).replace(
                '"metadata"', '"temperature": 1, "temperature": 0, "metadata"'
            ),
            "body.temperature",
        ),
    ],
    ids=["custom_id", "model", "role", "colons-in-strings", "escaped-colon"],
)
def test_a_key_given_twice_is_a_problem_naming_the_line_and_the_key(
    tmp_path: Path, line: str, field: str
) -> None:
    path = write(tmp_path, chat("ok-1"), line, chat("ok-3"))
    jobs, reader = read(path)
    assert [j.line for j in jobs] == [1, 3]
    problem = only_problem(reader)
    assert (problem.line, problem.field) == (2, field)
    assert "given 2 times in one object" in problem.reason
    with pytest.raises(JobFileError) as caught:
        reader.check()
    assert error_status(caught.value) == 2


def test_keys_that_look_alike_but_differ_are_not_repeats(tmp_path: Path) -> None:
    body = chat("a", metadata={"model": "x", "note": "a: b: c"}, temperature=0.2)
    path = write(
        tmp_path, body, '{"custom_id": "b", ' + json.dumps(chat("b"))[1:].split(", ", 1)[1]
    )
    jobs, reader = read(path)
    assert reader.problems == [] and [j.custom_id for j in jobs] == ["a", "b"]
