"""`batchrun price` and `batchrun prices` as a user runs them: output, exit status, bad input."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.money import format_exact, format_usd
from runner.plan import Plan, Totals, price_job
from runner.pricing import load_price_table

from . import badcorpus

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "jobs" / "example.jsonl"
BATCHRUN = Path(sys.executable).with_name("batchrun")  # the installed console script
# One problem line: FILE:LINE: field: reason (the first one carries the "batchrun: " prefix).
PROBLEM = re.compile(r"^(?:batchrun: )?(?P<file>.+?):(?P<line>\d+): (?P<field>[\w.\[\]]+): \S")


def batchrun(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run the command in this process (click's runner: its output needs no process of its
    own); no API key in the environment (pricing must not need one)."""
    with contextlib.chdir(cwd):
        result = CliRunner(env={"OPENAI_API_KEY": None}).invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(
        ["batchrun", *map(str, args)], result.exit_code, result.stdout, result.stderr
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def write_prices(tmp_path: Path) -> Path:
    path = tmp_path / "my-prices.toml"
    path.write_text(
        textwrap.dedent(
            """\
            as_of = "2026-12-01"

            [models.gpt-4o-mini]
            output = "1.00"         # overrides just this field

            [models.my-finetune]
            input = 0.30
            cached_input = 0.15
            output = 1.20
            max_output = 16384
            """
        ),
        "utf-8",
    )
    return path


@pytest.fixture(scope="module")
def example_plan() -> Plan:
    return price_job(EXAMPLE, load_price_table())


def table_row(stdout: str, name: str) -> list[str]:
    [row] = [ln.split() for ln in stdout.splitlines() if ln.split()[:1] == [name]]
    return row


def expected_row(name: str, t: Totals) -> list[str]:
    return [
        name,
        f"{t.requests:,}",
        f"{t.input_tokens:,}",
        f"{t.output_limit_tokens:,}",
        f"{t.unlimited_requests:,}",
        format_usd(t.floor_pico),
        format_usd(t.worst_pico),
    ]


def duration(seconds: float) -> str:
    h, rem = divmod(round(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# -- the happy path ----------------------------------------------------------------------------


def test_price_prints_a_row_per_model_and_the_total(example_plan: Plan) -> None:
    result = batchrun("price", "jobs/example.jsonl")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("jobs/example.jsonl: 39 requests, prices as of 2026-11-01\n")
    for model, totals in example_plan.by_model.items():
        assert table_row(out, model) == expected_row(model, totals)
    assert table_row(out, "total") == expected_row("total", example_plan.total)
    assert "warning: 2 request(s) set no output limit" in out
    assert "minimum wall time" not in out


def test_readme_example_output_is_what_price_prints() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    match = re.search(r"```console\n\$ batchrun (price [^\n]+)\n(.*?)```", readme, re.S)
    assert match, "README has no `batchrun price` example"
    result = batchrun(*match.group(1).split())
    assert result.returncode == 0, result.stderr
    assert result.stdout == match.group(2)


def test_rpm_and_tpm_print_the_minimum_wall_time(example_plan: Plan) -> None:
    result = batchrun("price", EXAMPLE, "--rpm", "10", "--tpm", "1000")
    assert result.returncode == 0, result.stderr
    seconds = example_plan.min_seconds(10, 1000)
    assert seconds == pytest.approx((1720 + 50_822 - 1000) / 1000 * 60)  # TPM binds
    sustained = example_plan.sustained_seconds(10, 1000)
    assert sustained == pytest.approx((1720 + 50_822) / 1000 * 60)  # no full first minute
    last = result.stdout.splitlines()[-1]
    assert last == (
        f"minimum wall time at 10 RPM and 1,000 TPM: {duration(seconds)} with the limits' full "
        f"first minute, {duration(sustained)} at their sustained rate (a key already in use)"
    )
    assert "51m33s" in last and "52m33s" in last


def test_json_is_one_object_with_the_same_totals_as_price_job(example_plan: Plan) -> None:
    result = batchrun("price", EXAMPLE, "--json", "--rpm", "10", "--tpm", "1000")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON object

    def as_json(t: Totals) -> dict[str, object]:
        d: dict[str, object] = t.as_dict()
        d["floor_usd"] = format_exact(d.pop("floor_pico"))  # type: ignore[arg-type]
        d["worst_usd"] = format_exact(d.pop("worst_pico"))  # type: ignore[arg-type]
        d["unlimited_worst_usd"] = format_exact(d.pop("unlimited_worst_pico"))  # type: ignore[arg-type]
        return d

    assert data["total"] == as_json(example_plan.total)
    assert data["models"] == {m: as_json(t) for m, t in example_plan.by_model.items()}
    assert data["total"]["floor_usd"] == "0.00027488"  # exact, not rounded for display
    # The two requests without a limit: 93% of the worst case, at their models' largest output.
    assert data["total"]["unlimited_worst_usd"] == "0.0229376"
    assert data["sha256"] == example_plan.sha256
    assert data["prices_as_of"] == "2026-11-01"
    assert data["rate_limits"] == {"rpm": 10, "tpm": 1000}
    assert data["min_seconds"] == pytest.approx(example_plan.min_seconds(10, 1000))


def test_price_opens_no_network_connection(tmp_path: Path) -> None:
    """Pricing runs with every socket connection and DNS lookup made to fail."""
    script = textwrap.dedent(
        """\
        import socket, sys

        def refuse(*args, **kwargs):
            raise AssertionError("batchrun price tried to use the network")

        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.create_connection = socket.getaddrinfo = refuse
        from runner.cli import main
        main(["price", sys.argv[1], "--json"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLE)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["total"]["requests"] == 39


# -- user price files ---------------------------------------------------------------------------


def test_user_price_file_changes_the_total(tmp_path: Path, example_plan: Plan) -> None:
    prices = write_prices(tmp_path)
    result = batchrun("price", EXAMPLE, "--prices", prices, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    mini = example_plan.by_model["gpt-4o-mini"]
    more = mini.output_limit_tokens * (1_000_000 - 600_000)  # output 0.60 -> 1.00 per 1M
    assert data["total"]["worst_usd"] == format_exact(example_plan.total.worst_pico + more)
    assert data["total"]["floor_usd"] == format_exact(example_plan.total.floor_pico)
    assert data["prices_as_of"] == "2026-11-01 (user file as of 2026-12-01)"


def test_prices_lists_the_table_and_marks_entries_from_the_users_file(tmp_path: Path) -> None:
    prices = write_prices(tmp_path)
    result = batchrun("prices", "--prices", prices)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "USD per 1M tokens, as of 2026-11-01 (user file as of 2026-12-01)"
    assert lines[1].split()[0] == "model" and set(lines[2]) == {"-", " "}
    rows = {ln.split()[0]: ln for ln in lines[3:] if not ln.startswith("sources:")}
    assert len(rows) == len(load_price_table().prices) + 1
    assert rows["my-finetune"].split() == [
        "my-finetune",
        "0.30",
        "0.15",
        "1.20",
        "0.15",
        "0.60",
        "16,384",
        str(prices),
    ]
    assert rows["gpt-4o-mini"].split()[1:4] == ["0.15", "0.075", "1.00"]
    assert rows["gpt-4o-mini"].endswith(str(prices))
    others = [row for name, row in rows.items() if name not in ("my-finetune", "gpt-4o-mini")]
    assert all(re.search(r"bundled \((openai|litellm)\)$", row) for row in others)


def test_prices_without_a_user_file_shows_the_bundled_date() -> None:
    result = batchrun("prices", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["as_of"] == "2026-11-01" and data["user_file"] is None
    assert data["models"]["gpt-4o-2024-05-13"]["input"] == "5.00"
    assert data["models"]["gpt-4o-mini"]["cached_input"] == "0.075"
    assert {m["origin"] for m in data["models"].values()} == {"bundled"}


# -- bad input ----------------------------------------------------------------------------------


def test_invalid_job_file_exits_2_with_one_located_line_per_problem(tmp_path: Path) -> None:
    good = json.dumps(
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": "hi"},
        }
    )
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                good,
                good.replace('"POST"', '"GET"').replace('"a"', '"b"'),
                "{oops",
                good.replace('"a"', '"c"').replace('"hi"', "[]"),
                good,
            ]
        )
        + "\n",
        "utf-8",
    )
    result = batchrun("price", path)
    assert_clean_failure(result)
    found = [PROBLEM.match(ln) for ln in result.stderr.splitlines()]
    assert all(found), result.stderr
    assert [(m["file"], int(m["line"]), m["field"]) for m in found if m] == [
        (str(path), 2, "method"),
        (str(path), 3, "line"),
        (str(path), 4, "body.input"),
        (str(path), 5, "custom_id"),
    ]


def test_unknown_model_exits_2_naming_the_line_before_anything_is_sent(tmp_path: Path) -> None:
    path = tmp_path / "unknown.jsonl"
    path.write_bytes((badcorpus.BAD_DIR / "unknown_model.jsonl").read_bytes())
    result = batchrun("price", path)
    assert_clean_failure(result)
    assert f"{path}:2: body.model: no price known for model 'gpt-9-ultra'" in result.stderr


def test_missing_job_file_is_a_located_problem(tmp_path: Path) -> None:
    result = batchrun("price", tmp_path / "nope.jsonl")
    assert_clean_failure(result)
    assert f"{tmp_path / 'nope.jsonl'}:0: file: no such file" in result.stderr


def test_price_reads_standard_input_given_a_dash() -> None:
    """`zcat job.jsonl.gz | batchrun price -`: the same numbers as from the file."""
    from_file = batchrun("price", "jobs/example.jsonl", "--json")
    env = {"PATH": str(BATCHRUN.parent), "LC_ALL": "C.UTF-8"}
    piped = subprocess.run(
        [str(BATCHRUN), "price", "-", "--json"],
        input=EXAMPLE.read_bytes(),
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    expected = json.loads(from_file.stdout)
    got = json.loads(piped.stdout)
    assert got.pop("file") == "<stdin>"
    expected.pop("file")
    assert got == expected
    bad = subprocess.run(
        [str(BATCHRUN), "price", "-"], input=b'{"custom_id": "a"}\n', capture_output=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert '<stdin>:1: method: missing (must be "POST")' in bad.stderr.decode()


def test_run_refuses_standard_input_because_a_job_is_found_again_by_its_file() -> None:
    result = CliRunner().invoke(main, ["run", "-", "--simulate"])
    assert result.exit_code == 2
    assert "standard input cannot be run" in result.output + result.stderr


# In-process from here on: the same command object and error handling, without a process each.


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpm", "0"], "Invalid value for '--rpm'"),
        (["--tpm", "many"], "Invalid value for '--tpm'"),
        (["--prices", "/no/such/prices.toml"], "does not exist"),
        (["--bogus"], "No such option"),
    ],
)
def test_bad_options_exit_2_without_a_traceback(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["price", str(EXAMPLE), *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert message in result.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[models.gpt-4o-mini]\ninput = "0.0000001"\n', "input: price '0.0000001' has more than"),
        ("[models.x]\noutput = 1\n", "models.x: input is required"),
        ("not toml at all", "invalid TOML"),
    ],
)
def test_bad_price_files_exit_2_naming_the_file(tmp_path: Path, toml: str, message: str) -> None:
    prices = tmp_path / "p.toml"
    prices.write_text(toml, "utf-8")
    for command in (["price", str(EXAMPLE)], ["prices"]):
        result = CliRunner().invoke(main, [*command, "--prices", str(prices)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert f"batchrun: {prices}" in result.stderr and message in result.stderr


def test_every_bad_corpus_file_exits_2_with_its_located_problem(tmp_path: Path) -> None:
    paths = badcorpus.materialize(tmp_path)
    assert {p.name for p in paths} == set(badcorpus.EXPECTED)
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(main, ["price", str(path)])
        # SystemExit(2) means the CLI handled it; any other exception would be a traceback
        assert isinstance(result.exception, SystemExit), (path.name, result.exception)
        assert result.exit_code == 2, (path.name, result.output)
        assert result.stdout == "", path.name
        line, field, reason = badcorpus.EXPECTED[path.name]
        lines = result.stderr.splitlines()
        assert all(PROBLEM.match(ln) or ln.startswith("... stopped after") for ln in lines), lines
        assert any(f"{path}:{line}: {field}: " in ln and reason in ln for ln in lines), (
            path.name,
            lines,
        )


class _Ended(Exception):
    def __init__(self, how: str, code: object) -> None:
        super().__init__(how, code)
        self.how, self.code = how, code


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["price", str(EXAMPLE)], ("quick", 0)),  # priced and printed: nothing left to free
        (["price", "/nonexistent.jsonl"], ("normal", 2)),  # an error ends the usual way
        (["prices"], ("normal", 0)),  # a command that did not say it left nothing open
    ],
)
def test_the_console_script_skips_freeing_the_tokenizer_only_after_a_price(
    args: list[str],
    expected: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import runner.cli as cli

    def quick(code: int) -> None:
        raise _Ended("quick", code)

    def normal(code: object = 0) -> None:
        raise _Ended("normal", code)

    monkeypatch.setattr(cli, "_nothing_open", False)
    monkeypatch.setattr(cli.os, "_exit", quick)
    monkeypatch.setattr(cli.sys, "exit", normal)
    monkeypatch.setattr(cli.sys, "argv", ["batchrun", *args])
    with pytest.raises(_Ended) as ended:
        cli.entry()
    assert (ended.value.how, ended.value.code) == expected
    if expected[0] == "quick":
        assert "worst case" in capsys.readouterr().out  # the output was written first
