"""``batchrun export``: standard output with ``-o -``, and Parquet with typed, exact columns."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import click.testing
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.export import write_parquet_to
from runner.simulator import SimulatorThread
from runner.store import ExportRow


def _invoke(*args: str | Path) -> click.testing.Result:
    """The command in this process (the same code path, without a start-up)."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test-key"})


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished job of six requests: four answered, two failed for good (a 400)."""
    folder = tmp_path_factory.mktemp("export")
    job, db = folder / "job.jsonl", folder / "run.db"
    lines = []
    for i in range(6):
        text = "__sim_400__" if i % 3 == 0 else f"question {i}"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                "max_tokens": 8}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    job.write_text("\n".join(lines) + "\n")
    with SimulatorThread() as sim:
        ran = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url, "-q")
    assert ran.exit_code == 1, ran.output  # two requests failed for good
    yield db


def _csv_rows(db: Path) -> list[dict[str, str]]:
    out = _invoke("export", "--db", db, "--format", "csv")
    assert out.exit_code == 0, out.output
    return list(csv.DictReader(io.StringIO(out.stdout)))


# -- -o - --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_dash_output_writes_the_rows_to_stdout_and_no_file_named_dash(
    db: Path, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dashed = _invoke("export", "--db", db, "--format", fmt, "-o", "-")
    assert dashed.exit_code == 0, dashed.output
    assert not (tmp_path / "-").exists() and list(tmp_path.iterdir()) == []
    assert dashed.stdout == _invoke("export", "--db", db, "--format", fmt).stdout  # no -o
    lines = dashed.stdout.splitlines()
    if fmt == "jsonl":
        assert [json.loads(line)["custom_id"] for line in lines] == [f"r{i}" for i in range(6)]
    else:
        assert lines[0].startswith("custom_id,status,") and len(lines) == 7
    assert "wrote" not in dashed.stdout  # on standard output, the rows alone


def test_dot_slash_dash_is_still_a_file_named_dash(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = _invoke("export", "--db", db, "-o", "./-")
    assert out.exit_code == 0 and out.stdout == "wrote -: 6 request(s) of job 1\n"
    assert len((tmp_path / "-").read_text().splitlines()) == 6


# -- Parquet -----------------------------------------------------------------------------------


def test_parquet_round_trip_equals_the_csv_export_rows(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    written = _invoke("export", "--db", db, "--format", "parquet", "-o", out)
    assert written.exit_code == 0 and written.stdout == f"wrote {out}: 6 request(s) of job 1\n"
    assert not (tmp_path / "out.parquet.partial").exists()
    table = pq.read_table(out).to_pylist()
    as_csv = [
        {
            **r,
            "finish_reason": r["finish_reason"] or None,
            "error": r["error"] or None,
            "input_tokens": int(r["input_tokens"]),
            "output_tokens": int(r["output_tokens"]),
            "cost_usd": Decimal(r["cost_usd"]),
        }
        for r in _csv_rows(db)
    ]
    assert table == as_csv
    assert [r["status"] for r in table] == ["failed", "done", "done"] * 2
    assert all(r["cost_usd"] > 0 and r["output_text"] for r in table if r["status"] == "done")


def test_parquet_columns_are_typed_and_money_is_an_exact_decimal(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    assert _invoke("export", "--db", db, "--format", "parquet", "-o", out).exit_code == 0
    schema = pq.read_schema(out)
    assert {f.name: f.type for f in schema} == {
        "custom_id": pa.string(),
        "status": pa.string(),
        "output_text": pa.string(),
        "finish_reason": pa.string(),
        "input_tokens": pa.int64(),
        "output_tokens": pa.int64(),
        "cost_usd": pa.decimal128(19, 12),
        "error": pa.string(),
    }
    assert not any(pa.types.is_floating(f.type) for f in schema)


def test_parquet_on_dash_output_is_bytes_on_stdout(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = _invoke("export", "--db", db, "--format", "parquet", "-o", "-")
    assert out.exit_code == 0, out.output
    assert out.stdout_bytes[:4] == b"PAR1" and out.stdout_bytes[-4:] == b"PAR1"
    table = pq.read_table(pa.BufferReader(out.stdout_bytes))
    assert table.column("custom_id").to_pylist() == [f"r{i}" for i in range(6)]
    assert list(tmp_path.iterdir()) == []


def _row(i: int) -> ExportRow:
    return ExportRow(
        seq=i, custom_id=f"c{i}", state="failed", last_error=None, status_code=400, body=None,
        api_request_id=None, error_code="bad", error_message="bad request", has_result=True,
        prompt_tokens=i, cost_pico=i,
    )  # fmt: skip


def test_parquet_is_written_in_record_batches_as_the_rows_stream() -> None:
    taken: list[int] = []

    def rows() -> Iterator[ExportRow]:
        for i in range(8):
            taken.append(i)
            yield _row(i)

    buffer = io.BytesIO()
    assert write_parquet_to(rows(), buffer, batch_rows=3) == 8
    parquet = pq.ParquetFile(pa.BufferReader(buffer.getvalue()))
    assert parquet.metadata.num_row_groups == 3  # 3 + 3 + 2: never the whole job at once
    column = parquet.read().column("cost_usd").to_pylist()
    assert column == [Decimal(i).scaleb(-12) for i in range(8)]  # picodollar-exact


def test_parquet_of_no_rows_still_has_its_columns() -> None:
    buffer = io.BytesIO()
    assert write_parquet_to(iter(()), buffer) == 0
    table = pq.read_table(pa.BufferReader(buffer.getvalue()))
    assert table.num_rows == 0 and table.schema.field("cost_usd").type == pa.decimal128(19, 12)


def test_parquet_without_pyarrow_says_how_to_install_it_and_exits_2(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    out = _invoke("export", "--db", db, "--format", "parquet", "-o", tmp_path / "out.parquet")
    assert out.exit_code == 2
    assert "pip install 'batchrun[parquet]'" in out.stderr and "Traceback" not in out.output
    assert list(tmp_path.iterdir()) == []
