"""``batchrun build``: a job file from a table of rows (CSV, JSONL, Parquet), and ``export
--rows``, which joins the results back to those rows."""

from __future__ import annotations

import csv
import io
import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import click.testing
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import runner
from runner import rows as rows_module
from runner.cli import main

from .helpers import BATCHRUN, ROOT, batchrun_env

REVIEWS = ROOT / "jobs" / "reviews.csv"


def _invoke(*args: str | Path) -> click.testing.Result:
    """The command in this process (the same code path, without a start-up)."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test-key"})


def _build(rows: Path, *args: str | Path, out: Path | None = None) -> click.testing.Result:
    out = out or rows.with_name("job.jsonl")
    return _invoke("build", rows, "--model", "gpt-4o-mini", *args, "-o", out)


def _job(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompts(path: Path) -> list[str]:
    return [r["body"]["messages"][-1]["content"] for r in _job(path)]


# -- reading rows ------------------------------------------------------------------------------


def test_a_csv_as_people_write_it_becomes_one_request_per_row(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8": a byte-order mark and CRLF line ends; a comma, doubled quotes and a
    # newline inside quoted fields; non-ASCII text; a blank line between rows.
    text = (
        "name,review\r\n"
        'Zoë,"Good, but loud"\r\n'
        '"O\'Brien","He said ""wow""\r\nthen left"\r\n'
        "\r\n"
        "李,很好 👍\r\n"
    )
    rows = tmp_path / "reviews.csv"
    rows.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    template = "{{{name}}} wrote: {review}"  # {{ and }} are literal braces
    built = _build(rows, "--template", template, "--max-tokens", "20", "--system", "Be brief.")
    assert built.exit_code == 0, built.output
    job = _job(tmp_path / "job.jsonl")
    assert [r["custom_id"] for r in job] == ["row-1", "row-2", "row-3"]
    assert _prompts(tmp_path / "job.jsonl") == [
        "{Zoë} wrote: Good, but loud",
        '{O\'Brien} wrote: He said "wow"\r\nthen left',
        "{李} wrote: 很好 👍",
    ]
    assert job[0] == {
        "custom_id": "row-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "{Zoë} wrote: Good, but loud"},
            ],
            "max_completion_tokens": 20,
        },
    }
    assert "李" in (tmp_path / "job.jsonl").read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert built.stderr.startswith(f"built {tmp_path / 'job.jsonl'}: 3 request(s) from 3 row(s)")
    assert "next: batchrun price" in built.stderr


def test_jsonl_rows_take_any_json_values_and_the_id_from_a_column(tmp_path: Path) -> None:
    rows = tmp_path / "rows.ndjson"
    rows.write_text(
        '{"id": 7, "text": "plain", "tags": ["a", "b"], "note": null}\n'
        "\n"
        '{"id": 8, "text": "caf\\u00e9", "tags": [], "note": 1.5}\n'
    )
    built = _build(rows, "--template", "{text} | {tags} | {note}", "--id", "id")
    assert built.exit_code == 0, built.output
    job = _job(tmp_path / "job.jsonl")
    assert [r["custom_id"] for r in job] == ["7", "8"]
    assert _prompts(tmp_path / "job.jsonl") == ['plain | ["a", "b"] | ', "café | [] | 1.5"]


def test_parquet_rows_are_read_in_record_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rows_module, "PARQUET_BATCH_ROWS", 3)  # several batches of a small file
    rows = tmp_path / "rows.parquet"
    table = pa.table({"n": list(range(10)), "text": [f"t{i}" for i in range(10)],
                      "unused": [b"x" * 10] * 10})  # fmt: skip
    pq.write_table(table, rows, row_group_size=4)
    built = _build(rows, "--template", "{text}#{n}", "--id", "n")
    assert built.exit_code == 0, built.output
    job = _job(tmp_path / "job.jsonl")
    assert [r["custom_id"] for r in job] == [str(i) for i in range(10)]
    assert _prompts(tmp_path / "job.jsonl") == [f"t{i}#{i}" for i in range(10)]


def test_the_format_comes_from_the_extension_or_format(tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("a\nx\n")
    unknown = _build(rows, "--template", "{a}")
    assert unknown.exit_code == 2 and "name it .csv, .jsonl or .parquet" in unknown.stderr
    assert _build(rows, "--template", "{a}", "--format", "csv").exit_code == 0
    assert _prompts(tmp_path / "job.jsonl") == ["x"]


# -- errors ------------------------------------------------------------------------------------


def test_a_missing_column_names_the_row_and_the_column_exits_2_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job.jsonl"
    job.write_text("the job file of an earlier build\n")
    # JSONL: each row has its own keys; the third lacks one, after two rows were written.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1, "b": 2}\n{"a": 3, "b": 4}\n\n{"a": 5}\n')
    out = _build(rows, "--template", "{a} and {b}", out=job)
    assert out.exit_code == 2, out.output
    assert out.stderr == (
        f"batchrun: {rows}:4: row 3: no column 'b' (the template's {{b}}); its columns: 'a'\n"
    )
    # CSV: the header says at once.
    csv_rows = tmp_path / "rows.csv"
    csv_rows.write_text("id,text\n1,hello\n")
    out = _build(csv_rows, "--template", "{txt}", out=job)
    assert out.exit_code == 2
    assert out.stderr == (
        f"batchrun: {csv_rows}:1: the header has no column 'txt' (the template's {{txt}}); its "
        "columns: 'id', 'text'\n"
    )
    out = _build(csv_rows, "--template", "{text}", "--id", "key", out=job)
    assert out.exit_code == 2 and "no column 'key' (the id column)" in out.stderr
    # The job file is as it was, and nothing half-written is left beside it.
    assert job.read_text() == "the job file of an earlier build\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.jsonl", "rows.csv", "rows.jsonl"]


def test_a_repeated_id_names_both_rows(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("id,text\na,x\nb,y\na,z\n")
    out = _build(rows, "--template", "{text}", "--id", "id")
    assert out.exit_code == 2
    assert out.stderr == (
        f"batchrun: {rows}:4: row 3: id 'a' (column 'id') is row 1's too; ids must be unique\n"
    )
    assert not (tmp_path / "job.jsonl").exists()
    rows.write_text("id,text\na,x\n,y\n")
    out = _build(rows, "--template", "{text}", "--id", "id")
    assert out.exit_code == 2 and f"{rows}:3: row 2: the id column 'id' is empty" in out.stderr


def test_a_csv_row_with_a_stray_comma_or_bytes_that_are_not_utf8_names_its_line(
    tmp_path: Path,
) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text('id,text\n1,"two\nlines"\n2,a, b\n')
    out = _build(rows, "--template", "{text}")
    assert out.exit_code == 2
    assert f"{rows}:4: row 2: 3 field(s) where the header has 2" in out.stderr
    assert "must be in double quotes" in out.stderr
    rows.write_bytes(b"id,text\n1,ok\n2,caf\xe9\n")  # Latin-1, as an old spreadsheet saves it
    out = _build(rows, "--template", "{text}")
    assert out.exit_code == 2
    assert f"{rows}:3: not UTF-8 (byte 0xe9); save the file as UTF-8" in out.stderr
    rows.write_text("")
    out = _build(rows, "--template", "{text}")
    assert out.exit_code == 2 and "a CSV needs a header line" in out.stderr
    rows.write_text("id,text\n")
    out = _build(rows, "--template", "{text}")
    assert out.exit_code == 2 and "no rows, so no job to build" in out.stderr
    assert not (tmp_path / "job.jsonl").exists() and not (tmp_path / "job.jsonl.partial").exists()


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("Rate {review", "a lone '{' at character 6; write {{ for a literal {"),
        ("Rate } {review}", "a lone '}' at character 6"),
        ("Rate {} {review}", "an empty field {} at character 6"),
        ("Rate this", "no {column} field, so every request would be the same"),
    ],
)
def test_a_bad_template_is_refused_before_a_row_is_read(
    tmp_path: Path, template: str, says: str
) -> None:
    out = _build(tmp_path / "not-read.csv", "--template", template)
    assert out.exit_code == 2 and says in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_rows_file_is_never_overwritten_by_its_job(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": "x"}\n')
    out = _build(rows, "--template", "{a}", out=rows)
    assert out.exit_code == 2 and "that is the rows file itself" in out.stderr
    assert rows.read_text() == '{"a": "x"}\n'


def test_parquet_without_pyarrow_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": ["x"]}), rows)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    out = _build(rows, "--template", "{a}")
    assert out.exit_code == 2 and "pip install 'batchrun[parquet]'" in out.stderr
    assert "Traceback" not in out.output


# -- output ------------------------------------------------------------------------------------


def test_dash_writes_the_job_to_standard_output_and_the_summary_to_standard_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nx\ny\n")
    out = _invoke("build", rows, "-t", "{text}", "-m", "gpt-4o-mini", "-o", "-")
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["custom_id"] for line in out.stdout.splitlines()] == ["row-1", "row-2"]
    assert out.stderr.startswith("built standard output: 2 request(s) from 2 row(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]  # no file named "-"


def test_a_schema_file_asks_for_structured_outputs(tmp_path: Path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("text\nx\n")
    schema = {"type": "object", "properties": {"label": {"type": "string"}},
              "required": ["label"], "additionalProperties": False}  # fmt: skip
    bare = tmp_path / "sentiment label.json"
    bare.write_text(json.dumps(schema))
    assert _build(rows, "-t", "{text}", "--schema", bare).exit_code == 0
    assert _job(tmp_path / "job.jsonl")[0]["body"]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "sentiment_label", "schema": schema, "strict": True},
    }
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"name": "label", "schema": schema, "strict": False}))
    assert _build(rows, "-t", "{text}", "--schema", wrapped).exit_code == 0
    spec = _job(tmp_path / "job.jsonl")[0]["body"]["response_format"]["json_schema"]
    assert spec == {"name": "label", "schema": schema, "strict": False}
    refusals = [
        ("{not json", "not JSON"),
        ("[1]", "expected a JSON schema object"),
        ('{"type": "string"}', 'need an object at the root ("type": "object")'),
    ]
    for text, says in refusals:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        out = _build(rows, "-t", "{text}", "--schema", bad)
        assert out.exit_code == 2 and says in out.stderr and str(bad) in out.stderr


# -- one function for rows -> requests ---------------------------------------------------------


def test_to_requests_and_build_are_the_same_function() -> None:
    table = [{"id": "a", "review": "good", "{odd}": "braces"}, {"id": "b", "review": "bad",
             "{odd}": "more"}]  # fmt: skip
    options: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 8, "id_column": "id"}
    from_column = list(runner.to_requests(table, prompt="review", **options))
    assert from_column == list(runner.build_requests(table, template="{review}", **options))
    templated = next(iter(runner.to_requests(table, template="Review: {review}", **options)))
    assert templated["body"]["messages"] == [{"role": "user", "content": "Review: good"}]
    odd = list(runner.to_requests(table, prompt="{odd}", **options))  # a name with braces
    assert [r["body"]["messages"][0]["content"] for r in odd] == ["braces", "more"]
    with pytest.raises(runner.UsageError, match=r"row 2: id 'a' \(column 'id'\) is row 1's"):
        list(runner.to_requests([table[0], table[0]], prompt="review", **options))
    with pytest.raises(runner.UsageError, match="row 1: no column 'text'"):
        list(runner.to_requests(table, prompt="text", model="gpt-4o-mini"))


# -- from a CSV to a joined export -------------------------------------------------------------


def test_the_shipped_csv_builds_prices_runs_and_exports_joined_back_to_its_rows(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "reviews.jsonl", tmp_path / "run.db"
    built = _invoke("build", REVIEWS, "--id", "id", "-m", "gpt-4o-mini", "--max-tokens", "5",
                    "-t", "Is this {product} review positive, negative or mixed? {review}",
                    "-o", job)  # fmt: skip
    assert built.exit_code == 0, built.output
    with REVIEWS.open(encoding="utf-8-sig", newline="") as fh:
        source = list(csv.DictReader(fh))
    assert len(source) >= 20 and any("\n" in r["review"] for r in source)  # a real CSV's edges

    plan = runner.price(job)
    assert plan.requests == len(source) and plan.worst_usd > 0

    ran = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url, "-q")
    assert ran.exit_code == 0, ran.output

    joined_csv = tmp_path / "joined.csv"
    out = _invoke("export", "--db", db, "--rows", REVIEWS, "--id", "id", "--format", "csv",
                  "-o", joined_csv)  # fmt: skip
    assert out.exit_code == 0, out.output
    wrote = f"wrote {joined_csv}: {len(source)} row(s) of {REVIEWS} with job 1's results\n"
    assert out.stdout == wrote
    with joined_csv.open(encoding="utf-8", newline="") as fh:
        joined = list(csv.DictReader(fh))
    assert [{k: r[k] for k in ("id", "product", "review")} for r in joined] == source
    assert all(r["status"] == "done" and r["output_text"] and r["custom_id"] == r["id"]
               for r in joined)  # fmt: skip
    assert list(joined[0])[:4] == ["id", "product", "review", "custom_id"]

    joined_pq = tmp_path / "joined.parquet"
    out = _invoke("export", "--db", db, "--rows", REVIEWS, "--id", "id", "--format", "parquet",
                  "-o", joined_pq)  # fmt: skip
    assert out.exit_code == 0, out.output
    table = pq.read_table(joined_pq)
    assert table.num_rows == len(source)
    assert table.schema.field("input_tokens").type == pa.int64()
    assert table.schema.field("cost_usd").type == pa.decimal128(19, 12)
    assert table.column("output_text").to_pylist() == [r["output_text"] for r in joined]

    # The wrong --id, or a file the job was not built from, is refused at its first row.
    out = _invoke("export", "--db", db, "--rows", REVIEWS, "--format", "csv")
    assert out.exit_code == 2
    assert "row 1: its id 'row-1' (with no --id (ids row-1, row-2, ...)) is not job 1's" in (
        out.stderr
    )
    other = tmp_path / "other.csv"
    other.write_text("id,text\nr01,x\n")
    out = _invoke("export", "--db", db, "--rows", other, "--id", "id", "--format", "csv")
    assert out.exit_code == 2 and "has more requests" in out.stderr
    out = _invoke("export", "--db", db, "--rows", REVIEWS, "--format", "jsonl")
    assert out.exit_code == 2 and "--format csv or parquet" in out.stderr


def test_a_joined_parquet_keeps_the_rows_types_and_only_filters_by_outcome(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator()
    rows, job, db = tmp_path / "rows.parquet", tmp_path / "job.jsonl", tmp_path / "run.db"
    texts = ["fine", "__sim_400__", "also fine"]  # the simulator refuses the second one
    pq.write_table(pa.table({"n": pa.array([1, 2, 3], pa.int32()), "status": texts}), rows)
    assert _invoke("build", rows, "-t", "{status}", "-m", "gpt-4o-mini", "--max-tokens", "4",
                   "-o", job).exit_code == 0  # fmt: skip
    ran = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url, "-q")
    assert ran.exit_code == 1, ran.output  # one failed for good
    out = tmp_path / "joined.parquet"
    assert _invoke("export", "--db", db, "--rows", rows, "--format", "parquet", "-o", out,
                   "--only", "ok").exit_code == 0  # fmt: skip
    table = pq.read_table(out)
    assert table.schema.field("n").type == pa.int32()
    # The rows' own "status" column keeps its name; the result's gets a prefix.
    assert table.column_names[:4] == ["n", "status", "custom_id", "result_status"]
    assert table.column("n").to_pylist() == [1, 3]
    assert table.column("result_status").to_pylist() == ["done", "done"]


# -- a million rows in constant memory ---------------------------------------------------------

# The peak resident set of this process image: VmHWM starts afresh at exec, where ru_maxrss
# keeps the parent's (a pytest process far larger than the build).
_PEAK = textwrap.dedent(
    """
    import re, sys
    import runner
    runner.build_job(sys.argv[1], sys.argv[2], template="Summarise {title}: {body}",
                     model="gpt-4o-mini", max_tokens=50)
    status = open("/proc/self/status").read()
    print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
    """
)


def _peak_kib(rows: Path, out: Path) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK, str(rows), str(out)],
                          capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    return int(done.stdout.split()[-1])


def _write_rows(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["title", "body"])
        for i in range(n):
            writer.writerow([f"item {i}", f"line one of {i}, with a comma\nline two " + "x" * 120])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_building_200_000_rows_takes_no_more_memory_than_2_000(tmp_path: Path) -> None:
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    _write_rows(small, 2_000)
    _write_rows(large, 200_000)  # ~35 MB of CSV; held in memory as dicts it would be ~10x that
    base = _peak_kib(small, tmp_path / "small.jsonl")
    peak = _peak_kib(large, tmp_path / "large.jsonl")
    assert sum(1 for _ in (tmp_path / "large.jsonl").open()) == 200_000
    assert peak - base < 16 * 1024, f"peak RSS grew by {(peak - base) / 1024:.1f} MiB"


def test_the_readers_stream_row_by_row(tmp_path: Path) -> None:
    """The rows come one at a time as the file is read (nothing is read ahead of need beyond
    a buffer), which is what keeps the memory flat."""
    path = tmp_path / "rows.csv"
    _write_rows(path, 5_000)
    with rows_module.Rows(path) as rows:
        it = iter(rows)
        next(it)
        assert rows.nbytes < 256 * 1024 < path.stat().st_size
        assert isinstance(next(it), dict)


def test_a_csv_export_keeps_a_field_of_several_lines_in_one_quoted_field() -> None:
    from runner.export import csv_lines
    from runner.store import ExportRow

    body = {"choices": [{"message": {"content": "line one\r\nline two\nthree"},
                         "finish_reason": "stop"}]}  # fmt: skip
    row = ExportRow(seq=1, custom_id="a", state="done", last_error=None, status_code=200,
                    body=json.dumps(body), api_request_id=None, error_code=None,
                    error_message=None, has_result=True, url="/v1/chat/completions")  # fmt: skip
    text = "\n".join(csv_lines([row])) + "\n"
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [r["output_text"] for r in parsed] == ["line one\r\nline two\nthree"]


def test_the_readme_quick_start_goes_from_the_csv_to_a_joined_export_as_written(
    tmp_path: Path,
) -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("### Quick start", 1)[1]
    block = section.split("```console\n", 1)[1].split("```", 1)[0]
    commands = [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    assert [shlex.split(c)[1] for c in commands] == ["build", "price", "run", "export"]
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "reviews.csv").write_bytes(REVIEWS.read_bytes())
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/batchrun"
        done = subprocess.run([BATCHRUN, *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, env=batchrun_env(), timeout=120)  # fmt: skip
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done)
    # price's table is shown as it prints it
    shown = block.split(commands[1] + "\n", 1)[1].split("$ ", 1)[0]
    assert outputs[1].stdout == shown
    with (tmp_path / "reviews-results.csv").open(encoding="utf-8", newline="") as fh:
        joined = list(csv.DictReader(fh))
    with REVIEWS.open(encoding="utf-8-sig", newline="") as fh:
        source = list(csv.DictReader(fh))
    assert [{k: r[k] for k in source[0]} for r in joined] == source
    assert all(r["status"] == "done" and r["output_text"] for r in joined)


def test_a_jsonl_join_has_the_first_rows_keys_and_refuses_a_row_with_others(
    tmp_path: Path, simulator
) -> None:
    rows, job, db = tmp_path / "rows.jsonl", tmp_path / "job.jsonl", tmp_path / "run.db"
    rows.write_text('{"q": "one", "n": 1}\n{"q": "two"}\n')
    assert _invoke("build", rows, "-t", "{q}", "-m", "gpt-4o-mini", "--max-tokens", "4",
                   "-o", job).exit_code == 0  # fmt: skip
    ran = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", simulator.base_url, "-q")
    assert ran.exit_code == 0, ran.output
    out = _invoke("export", "--db", db, "--rows", rows, "--format", "csv")
    assert out.exit_code == 0, out.output
    joined = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["q"], r["n"], r["custom_id"], r["status"]) for r in joined] == [
        ("one", "1", "row-1", "done"),
        ("two", "", "row-2", "done"),
    ]
    rows.write_text('{"q": "one", "n": 1}\n{"q": "two", "extra": 2}\n')
    out = _invoke("export", "--db", db, "--rows", rows, "--format", "csv", "-o", tmp_path / "j.csv")
    assert out.exit_code == 2 and f"{rows}:2: row 2: key 'extra' is not in the first row" in (
        out.stderr
    )
    assert not (tmp_path / "j.csv").exists() and not (tmp_path / "j.csv.partial").exists()
