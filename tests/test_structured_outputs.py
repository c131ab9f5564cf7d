"""Structured outputs: a result's content is checked against the JSON schema its request asked
for; ``status`` counts the outputs that do not parse or match, ``export --fields`` writes the
parsed fields as columns, and ``run --retry-failed --invalid`` sends them again (paid again)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shlex
from pathlib import Path
from typing import Any

import click.testing
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import runner
from runner import structured
from runner.cli import main
from runner.report import format_status, status_json
from runner.settings import Batching
from runner.simulator import SimConfig, SimulatorThread
from runner.simulator.outputs import json_texts
from runner.store import ResultFlag, open_store

from .helpers import ROOT, ledger_total, query, run_in_process

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
FAST = Batching(poll_first=0.01, poll_interval=0.05)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": ["number", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "meta": {"$ref": "#/$defs/meta"},
    },
    "required": ["sentiment", "score", "confidence", "tags", "meta"],
    "additionalProperties": False,
    "$defs": {
        "meta": {
            "type": "object",
            "properties": {
                "ok": {"type": "boolean"},
                "next": {"anyOf": [{"$ref": "#/$defs/meta"}, {"type": "null"}]},
            },
            "required": ["ok", "next"],
            "additionalProperties": False,
        }
    },
}


def _invoke(*args: str | Path) -> click.testing.Result:
    """The command in this process (the same code path, without a start-up)."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test-key"})


def _chat_body(text: str, schema: dict[str, Any] | None = SCHEMA) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "max_completion_tokens": 50,
    }
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "review", "schema": schema, "strict": True},
        }
    return body


def _write_rows_and_job(folder: Path, n: int) -> tuple[Path, Path]:
    """A CSV of ``n`` reviews (with a column named like a schema property) and the job that
    ``batchrun build --schema`` makes of it."""
    rows, schema, job = folder / "reviews.csv", folder / "review.json", folder / "job.jsonl"
    with rows.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "review", "score"])
        for i in range(n):
            writer.writerow([f"r{i:02d}", f"review number {i}, it was fine", str(i % 5)])
    schema.write_text(json.dumps(SCHEMA))
    built = _invoke("build", rows, "--id", "id", "-m", "gpt-4o-mini", "--max-tokens", "60",
                    "-t", "Review: {review}", "--schema", schema, "-o", job)  # fmt: skip
    assert built.exit_code == 0, built.output
    return rows, job


def _flags(db: Path) -> dict[str, str]:
    """custom_id -> the result's flags, of every request with a result."""
    return {
        cid: flags or ""
        for cid, flags in query(
            db,
            "SELECT r.custom_id, x.flags FROM requests r JOIN results x ON x.request_id = r.id",
        )
    }


# -- the validator -----------------------------------------------------------------------------


def _error(schema: dict[str, Any], value: Any) -> str | None:
    return structured.Schema(schema).error(value)


def _meta(depth: int) -> dict[str, Any]:
    return {"ok": True, "next": _meta(depth - 1) if depth else None}


VALID = {"sentiment": "mixed", "score": 3, "confidence": None, "tags": ["a"], "meta": _meta(3)}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({}, None),
        ({"score": 3.0}, None),  # an integral number is an integer
        ({"confidence": 0.5}, None),
        ({"score": True}, "$.score: expected integer, got boolean true"),
        ({"score": 2.5}, "$.score: expected integer, got number 2.5"),
        ({"score": 9}, "$.score: 9 is above maximum 5"),
        ({"sentiment": "great"}, '$.sentiment: "great" is not one of "positive", "negative"'),
        ({"tags": ["a", 1]}, "$.tags[1]: expected string, got integer 1"),
        ({"tags": ["a", "b", "c", "d"]}, "$.tags: 4 item(s), more than maxItems 3"),
        ({"extra": 1}, "$: unexpected property 'extra'"),
        ({"meta": {"ok": True, "next": {"ok": 1, "next": None}}}, "$.meta.next: matches none"),
        ({"meta": {"ok": True}}, "$.meta: missing required property 'next'"),
    ],
)
def test_the_validator_names_where_an_output_goes_wrong(
    change: dict[str, Any], says: str | None
) -> None:
    value = {**VALID, **change}
    error = _error(SCHEMA, value)
    assert (error is None) if says is None else (error is not None and error.startswith(says))
    missing = {k: v for k, v in VALID.items() if k != "score"}
    assert _error(SCHEMA, missing) == "$: missing required property 'score'"


def test_the_validator_covers_the_rest_of_the_subset() -> None:
    assert _error({"type": "object"}, []) == "$: expected object, got array []"
    assert _error({"const": "x"}, "y") == '$: expected "x", got "y"'
    assert _error({"enum": [1, True]}, 1.0) is None and _error({"enum": [1]}, True) is not None
    assert _error({"type": "string", "pattern": "^[a-z]+$"}, "abc") is None
    assert "does not match the pattern" in (_error({"pattern": "^[a-z]+$"}, "ab1") or "")
    assert "fewer than minLength 2" in (_error({"type": "string", "minLength": 2}, "a") or "")
    assert "not above exclusiveMinimum 0" in (_error({"exclusiveMinimum": 0}, 0) or "")
    assert _error({"multipleOf": 0.1}, 0.3) is None and _error({"multipleOf": 2}, 3) is not None
    assert "matches 2 of the schema's oneOf" in (
        _error({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1) or ""
    )
    assert _error({"allOf": [{"type": "integer"}, {"minimum": 2}]}, 1) is not None
    assert _error({"additionalProperties": {"type": "integer"}}, {"a": "x"}) is not None
    assert _error({"$ref": "#/definitions/x", "definitions": {"x": {"type": "null"}}}, None) is None
    assert "names nothing" in (_error({"$ref": "#/$defs/missing"}, 1) or "")
    assert "does not end" in (_error({"$ref": "#"}, 1) or "")  # a schema that is only itself
    assert _error({"$ref": "https://example.com/schema.json"}, 1) is None  # not followed
    assert _error({"format": "date-time", "description": "ignored"}, "x") is None


# -- where a request asks for JSON, and what came back -----------------------------------------


def test_the_schema_is_read_from_chat_responses_and_json_mode() -> None:
    assert structured.schema_of(CHAT, _chat_body("x")) == SCHEMA
    fmt = {"type": "json_schema", "name": "r", "schema": SCHEMA}
    responses = {"model": "gpt-4o-mini", "input": "x", "text": {"format": fmt}}
    assert structured.schema_of(RESPONSES, responses) == SCHEMA
    json_mode = {"model": "m", "messages": [], "response_format": {"type": "json_object"}}
    assert structured.schema_of(CHAT, json_mode) == {"type": "object"}
    assert structured.schema_of(CHAT, _chat_body("x", schema=None)) is None
    text = {"model": "m", "messages": [], "response_format": {"type": "text"}}
    assert structured.schema_of(CHAT, text) is None
    # A body that names no JSON format costs a substring search and is never checked.
    assert structured.check(CHAT, json.dumps(_chat_body("x", None)), {"choices": []}) is None


def _chat_answer(
    *contents: str | None, finish: str = "stop", refusal: str | None = None
) -> dict[str, Any]:
    return {
        "choices": [
            {"message": {"content": c, "refusal": refusal}, "finish_reason": finish}
            for c in contents
        ]
    }


def test_check_says_why_an_output_is_not_the_json_asked_for() -> None:
    body = json.dumps(_chat_body("x"))
    good = json.dumps(VALID)
    assert structured.check(CHAT, body, _chat_answer(good)) is None
    flag, why = structured.check(CHAT, body, _chat_answer(good[:30], finish="length")) or ("", "")
    assert flag == ResultFlag.OUTPUT_NOT_JSON and why.startswith("not JSON (")
    assert why.endswith("it was cut short (length)")
    assert structured.check(CHAT, body, _chat_answer(None, refusal="I can't")) == (
        "output_not_json",
        "refused: I can't",
    )
    mismatch = structured.check(CHAT, body, _chat_answer(good, json.dumps({**VALID, "x": 1})))
    assert mismatch == ("output_mismatch", "choice 1: $: unexpected property 'x'")
    assert structured.check(CHAT, body, {"choices": []}) == (
        "output_not_json",
        "no output in the response",
    )
    long = json.dumps({**VALID, "sentiment": "x" * 1000})
    checked = structured.check(CHAT, body, _chat_answer(long))
    assert checked is not None and len(checked[1]) <= 240


# -- the simulator -----------------------------------------------------------------------------


def test_the_simulator_answers_with_json_built_from_the_schema_deterministically() -> None:
    body = _chat_body("x")
    text = json.dumps(body)
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(40)]
    for config, expected in [
        (SimConfig(), None),
        (SimConfig(p_output_not_json=1.0), "output_not_json"),
        (SimConfig(p_output_mismatch=1.0), "output_mismatch"),
    ]:
        for digest in digests:
            answers = json_texts(CHAT, body, digest, 2, config)
            assert answers is not None and answers == json_texts(CHAT, body, digest, 2, config)
            data = {"choices": [{"message": {"content": t}, "finish_reason": "stop"}
                                for t, _cut in answers]}  # fmt: skip
            checked = structured.check(CHAT, text, data)
            assert (checked[0] if checked else None) == expected, (answers, checked)
            assert all(cut == (expected == "output_not_json") for _t, cut in answers)
    assert json_texts(CHAT, _chat_body("x", schema=None), digests[0], 1, SimConfig()) is None
    json_mode = {**_chat_body("x", schema=None), "response_format": {"type": "json_object"}}
    answer = json_texts(CHAT, json_mode, digests[0], 1, SimConfig(p_output_mismatch=1.0))
    assert answer is not None and isinstance(json.loads(answer[0][0]), dict)  # no schema to miss
    mixed = SimConfig(p_output_not_json=0.25, p_output_mismatch=0.25)
    kinds = set()
    for digest in digests:
        answers = json_texts(CHAT, body, digest, 1, mixed) or []
        checked = structured.check(
            CHAT, text, {"choices": [{"message": {"content": answers[0][0]}}]}
        )
        kinds.add(checked[0] if checked else None)
    assert kinds == {None, "output_not_json", "output_mismatch"}
    with pytest.raises(ValueError, match="sum to at most 1"):
        SimConfig(p_output_not_json=0.6, p_output_mismatch=0.6)


# -- a run: flagged, counted, billed, sent again -------------------------------------------------


async def test_a_run_flags_invalid_outputs_status_counts_them_and_retry_invalid_pays_again(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(p_output_not_json=0.2, p_output_mismatch=0.3)
    _rows, job = _write_rows_and_job(tmp_path, 30)
    db = tmp_path / "run.db"
    ran = await run_in_process(job, db, sim.base_url, cap="1")
    assert ran.exit_code == 0, ran.output
    s = ran.status
    assert s.states == {"done": 30}  # billed results, not failures
    flags = _flags(db)
    not_json = [c for c, f in flags.items() if "output_not_json" in f]
    mismatch = [c for c, f in flags.items() if "output_mismatch" in f]
    assert not_json and mismatch and len(not_json) + len(mismatch) < 30
    assert (s.outputs_not_json, s.outputs_mismatch) == (len(not_json), len(mismatch))
    notices = list(ran.report.stats.notices)
    assert sum("does not match the JSON schema it asked for" in n for n in notices) == 1
    assert sum("is not the JSON it asked for" in n for n in notices) == 1
    assert ran.report.stats.invalid_outputs == {
        "output_not_json": len(not_json),
        "output_mismatch": len(mismatch),
    }
    # The reason is kept on the result (its error column in the export), the flag as its code.
    sql = (
        "SELECT r.custom_id, x.error_message FROM requests r JOIN results x "
        "ON x.request_id = r.id WHERE x.error_code = 'output_mismatch'"
    )
    reasons = dict(query(db, sql))
    assert set(reasons) == set(mismatch) and all(r.startswith("$") for r in reasons.values())
    text = format_status(s)
    line = next(x for x in text.splitlines() if x.startswith("  outputs"))
    assert f"{len(mismatch)} output(s) do not match their JSON schema" in line
    assert f"{len(not_json)} output(s) are not JSON" in line
    assert "`batchrun run --job 1 --retry-failed --invalid` sends them again, paid again" in line
    as_json = status_json(s)
    assert (as_json["outputs_not_json"], as_json["outputs_mismatch"]) == (
        len(not_json),
        len(mismatch),
    )
    first_spend = s.spend.settled_pico
    assert first_spend == ledger_total(db) > 0

    # Sent again: the same bodies, a simulator that now answers them well.
    sim.configure(p_output_not_json=0.0, p_output_mismatch=0.0)
    invalid = set(not_json) | set(mismatch)
    billed = sum(
        c for (c,) in query(db, "SELECT cost_pico FROM results WHERE error_code IS NOT NULL")
    )
    again = await run_in_process(None, db, sim.base_url, job_id=1, retry_failed=frozenset(),
                                 retry_invalid=True)  # fmt: skip
    assert again.exit_code == 0, again.output
    note = next(x for x in again.printed[0].splitlines() if "(--invalid)" in x)
    assert note.startswith(f"{len(invalid)} request(s) whose outputs did not parse or match")
    assert f"billed {runner.money.format_usd(billed)} already" in note
    assert "will be paid again" in note
    assert again.status.states == {"done": 30}
    assert (again.status.outputs_not_json, again.status.outputs_mismatch) == (0, 0)
    assert "  outputs" not in format_status(again.status)
    # Only those were sent again, and both billings are in the books.
    assert sim.ledger_snapshot()["requests_received"] == 30 + len(invalid)
    charges = query(db, "SELECT r.custom_id, COUNT(*) FROM ledger l JOIN requests r ON "
                        "r.id = l.request_id GROUP BY r.custom_id")  # fmt: skip
    assert {c for c, n in charges if n == 2} == invalid
    assert again.status.spend.settled_pico == ledger_total(db) > first_spend
    # Nothing left to send again.
    third = await run_in_process(None, db, sim.base_url, job_id=1, retry_failed=frozenset(),
                                 retry_invalid=True)  # fmt: skip
    assert "no result had an output that does not parse or match" in third.output


async def test_codes_pick_one_kind_and_failed_requests_are_queued_too(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(p_output_not_json=0.3, p_output_mismatch=0.3)
    _rows, job = _write_rows_and_job(tmp_path, 20)
    db = tmp_path / "run.db"
    assert (await run_in_process(job, db, sim.base_url)).exit_code == 0
    flags = _flags(db)
    mismatch = {c for c, f in flags.items() if "output_mismatch" in f}
    not_json = {c for c, f in flags.items() if "output_not_json" in f}
    store = open_store(str(db))
    try:
        again = store.requeue_invalid(1, frozenset({"output_mismatch"}))
        assert again.requests == len(mismatch) and again.billed_pico > 0
        assert again.batch_worst_pico < again.worst_pico
        pending = {c for (c,) in query(db, "SELECT custom_id FROM requests WHERE state = "
                                           "'pending'")}  # fmt: skip
        assert pending == mismatch
        assert store.requeue_invalid(1, frozenset({"404"})).requests == len(not_json)  # all
    finally:
        store.close()
    assert set(_flags(db)) == set(flags) - mismatch - not_json


async def test_the_responses_api_and_the_batch_lane_are_checked_the_same_way(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(p_output_mismatch=1.0)
    job = tmp_path / "responses.jsonl"
    lines = []
    for i in range(4):
        body = {"model": "gpt-4o-mini", "input": f"review {i}", "max_output_tokens": 40,
                "text": {"format": {"type": "json_schema", "name": "review", "schema": SCHEMA,
                                    "strict": True}}}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": RESPONSES,
                                 "body": body}))  # fmt: skip
    job.write_text("\n".join(lines) + "\n")
    ran = await run_in_process(job, tmp_path / "sync.db", sim.base_url)
    assert ran.exit_code == 0 and ran.status.outputs_mismatch == 4
    batched = await run_in_process(job, tmp_path / "batch.db", sim.base_url, via="batch",
                                   batching=FAST)  # fmt: skip
    assert batched.exit_code == 0, batched.output
    assert batched.status.outputs_mismatch == 4
    assert all(
        "batch" in f and "output_mismatch" in f for f in _flags(tmp_path / "batch.db").values()
    )


# -- export --fields ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished job of 12 reviews, some outputs not JSON, some not matching: (rows, db)."""
    folder = tmp_path_factory.mktemp("fields")
    rows, job = _write_rows_and_job(folder, 12)
    db = folder / "run.db"
    with SimulatorThread(SimConfig(p_output_not_json=0.25, p_output_mismatch=0.25)) as sim:
        ran = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url, "-q")
    assert ran.exit_code == 0, ran.output
    return rows, db


def _outputs(db: Path) -> dict[str, Any]:
    """custom_id -> the first output parsed (None when it does not parse)."""
    out = {}
    for cid, body in query(db, "SELECT r.custom_id, x.body FROM requests r JOIN results x ON "
                               "x.request_id = r.id ORDER BY r.seq"):  # fmt: skip
        out[cid] = structured.parsed_output(CHAT, json.loads(body))
    return out


def test_export_fields_writes_each_top_level_property_as_a_csv_column(
    finished: tuple[Path, Path],
) -> None:
    _rows, db = finished
    out = _invoke("export", "--db", db, "--format", "csv", "--fields")
    assert out.exit_code == 0, out.output
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    header = out.stdout.splitlines()[0].split(",")
    assert header[-5:] == ["sentiment", "score", "confidence", "tags", "meta"]
    outputs = _outputs(db)
    flags = _flags(db)
    kinds = {"valid": 0, "mismatch": 0, "not_json": 0}
    for row in table:
        parsed, flag = outputs[row["custom_id"]], flags[row["custom_id"]]
        if "output_not_json" in flag:
            kinds["not_json"] += 1
            assert parsed is None and row["sentiment"] == row["meta"] == ""
            assert row["error"].startswith("not JSON (")
            continue
        kinds["mismatch" if "output_mismatch" in flag else "valid"] += 1
        for name in ("sentiment", "score", "confidence", "tags", "meta"):
            value = parsed.get(name)
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            assert row[name] == ("" if value is None else text)
        if "output_mismatch" in flag:
            assert row["error"].startswith("$") and row["status"] == "done"
        else:
            assert row["error"] == "" and json.loads(row["meta"])["ok"] in (True, False)
    assert all(kinds.values()), kinds
    # JSONL has no columns; a job that asks for no JSON has no fields.
    out = _invoke("export", "--db", db, "--fields")
    assert out.exit_code == 2 and "--format csv or parquet" in out.stderr


def test_export_fields_in_parquet_are_typed_and_joined_rows_keep_their_own_columns(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    rows, db = finished
    target = tmp_path / "out.parquet"
    out = _invoke("export", "--db", db, "--format", "parquet", "--fields", "-o", target)
    assert out.exit_code == 0, out.output
    table = pq.read_table(target)
    types = {name: table.schema.field(name).type for name in table.schema.names}
    assert types["sentiment"] == pa.string() and types["score"] == pa.int64()
    assert types["confidence"] == pa.float64()
    assert types["tags"] == pa.string() and types["meta"] == pa.string()  # JSON text
    outputs = _outputs(db)
    columns = [table.column(c).to_pylist() for c in ("custom_id", "score", "tags")]
    for cid, score, tags in zip(*columns, strict=True):
        parsed = outputs[cid]
        if isinstance(parsed, dict) and isinstance(parsed.get("score"), int):
            assert score == parsed["score"] and json.loads(tags) == parsed["tags"]
        else:
            assert score is None

    # Joined back to the rows: the rows' own "score" column stays; the field takes a prefix.
    joined = tmp_path / "joined.csv"
    out = _invoke("export", "--db", db, "--rows", rows, "--id", "id", "--format", "csv",
                  "--fields", "-o", joined)  # fmt: skip
    assert out.exit_code == 0, out.output
    with joined.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        names = list(reader.fieldnames or ())
        got = list(reader)
    assert names[:4] == ["id", "review", "score", "custom_id"]
    assert names[-5:] == ["sentiment", "field_score", "confidence", "tags", "meta"]
    for row in got:
        parsed = outputs[row["id"]]
        assert row["score"] == str(int(row["id"][1:]) % 5)  # the row's own
        if isinstance(parsed, dict) and "score" in parsed:
            assert row["field_score"] == json.dumps(parsed["score"])
    joined_pq = tmp_path / "joined.parquet"
    out = _invoke("export", "--db", db, "--rows", rows, "--id", "id", "--format", "parquet",
                  "--fields", "-o", joined_pq)  # fmt: skip
    assert out.exit_code == 0, out.output
    assert pq.read_table(joined_pq).schema.field("field_score").type == pa.int64()


def test_export_fields_of_a_job_without_a_schema_says_so(tmp_path: Path, make_simulator) -> None:
    sim = make_simulator()
    job = tmp_path / "plain.jsonl"
    job.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": CHAT,
                               "body": _chat_body("x", schema=None)}) + "\n")  # fmt: skip
    db = tmp_path / "run.db"
    assert _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url,
                   "-q").exit_code == 0  # fmt: skip
    out = _invoke("export", "--db", db, "--format", "csv", "--fields")
    assert out.exit_code == 2 and "no request of job 1 asks for JSON" in out.stderr


# -- the command line --------------------------------------------------------------------------


def test_run_retry_failed_invalid_on_the_command_line(tmp_path: Path, make_simulator) -> None:
    sim = make_simulator(p_output_mismatch=0.5)
    _rows, job = _write_rows_and_job(tmp_path, 10)
    db = tmp_path / "run.db"
    base = ("--db", db, "--cap", "1", "--base-url", sim.base_url)
    assert _invoke("run", job, *base, "-q").exit_code == 0
    status = _invoke("status", "--db", db)
    mismatched = sum("output_mismatch" in f for f in _flags(db).values())
    assert mismatched and f"{mismatched} output(s) do not match" in status.stdout
    as_json = json.loads(_invoke("status", "--db", db, "--json").stdout)["jobs"][0]
    assert as_json["outputs_mismatch"] == mismatched
    alone = _invoke("run", job, *base, "--invalid")
    assert alone.exit_code == 2 and "--invalid goes with --retry-failed" in alone.stderr
    sim.configure(p_output_mismatch=0.0)
    again = _invoke("run", job, *base, "--retry-failed", "--invalid")  # no CODES: a flag after
    assert again.exit_code == 0, again.output
    assert f"{mismatched} request(s) whose outputs did not parse or match" in again.stdout
    assert "0 failed request(s) (any error) queued again" in again.stdout
    assert "  outputs" not in _invoke("status", "--db", db).stdout


def test_the_readme_commands_work_as_written(
    tmp_path: Path, make_simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("### Structured outputs", 1)[1]
    block = section.split("```console\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line[2:], comments=True) for line in block.splitlines()
                if line.startswith("$ ")]  # fmt: skip
    assert [c[1] for c in commands] == ["build", "run", "status", "export", "run"]
    (tmp_path / "jobs").mkdir()
    for name in ("reviews.csv", "sentiment.json"):
        (tmp_path / "jobs" / name).write_bytes((ROOT / "jobs" / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    sim = make_simulator(p_output_mismatch=0.3, p_output_not_json=0.1)
    outputs = []
    for n, argv in enumerate(commands):
        assert argv[0] == "batchrun"
        if argv[1] == "run":
            argv = [*argv, "--base-url", sim.base_url, "-y"]
        if n == len(commands) - 1:
            sim.configure(p_output_mismatch=0.0, p_output_not_json=0.0)
        done = _invoke(*argv[1:])
        assert done.exit_code == 0, (argv, done.output)
        outputs.append(done.stdout)
    assert "`batchrun run --job 1 --retry-failed --invalid` sends them again" in outputs[2]
    with (tmp_path / "sentiment.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0])[-3:] == ["sentiment", "stars", "topics"]
    assert any(r["error"] for r in table) and any(r["stars"] for r in table)
    assert "queued again (--invalid)" in outputs[4]
    assert "  outputs" not in _invoke("status").stdout
