"""The API key never leaves the environment: not into the database, an export, the output, or
a message, even when a server reflects it or a key-like string is pasted where a path goes."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from runner.cli import main
from runner.redact import redact
from runner.simulator import SimulatorThread

from .helpers import BATCHRUN, batchrun_env, write_job

SimFactory = Callable[..., SimulatorThread]


def test_redact_hides_the_key_and_key_shaped_strings(monkeypatch: object) -> None:
    import os

    os.environ["OPENAI_API_KEY"] = "custom-key-without-prefix-123"
    try:
        text = "echo custom-key-without-prefix-123 and sk-abc123DEF456 and sess-ABCDEFGH12"
        assert redact(text) == "echo [redacted] and [redacted] and [redacted]"
        assert redact("sk-1 is too short to be a key") == "sk-1 is too short to be a key"
    finally:
        del os.environ["OPENAI_API_KEY"]


SENTINEL = "sk-proj-SENTINEL0123456789abcdefghijKLMNOP"
KEYLIKE = "sk-live-PASTEDKEY9876543210zyxwvutsrqpo"


def test_the_api_key_is_never_written_or_printed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(api_key=SENTINEL)
    wrong_key = make_simulator(api_key="sk-the-other-key-0000000000000")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp_path)}
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=12)
    outputs: list[subprocess.CompletedProcess[str]] = []

    def cli(*args: str | Path, base: SimulatorThread = sim) -> subprocess.CompletedProcess[str]:
        """The command in this process (the first run below is a real process)."""
        full = [str(a) for a in args]
        if args[0] == "run":
            full += ["--base-url", base.base_url]
        result = CliRunner().invoke(main, full, env={"OPENAI_API_KEY": SENTINEL, **env})
        assert result.exception is None or isinstance(result.exception, SystemExit)
        out = subprocess.CompletedProcess(full, result.exit_code, result.stdout, result.stderr)
        outputs.append(out)
        return out

    first = subprocess.run(
        [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "1", "--base-url", sim.base_url],
        env=batchrun_env(SENTINEL, **env), cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    outputs.append(first)
    assert first.returncode == 0, first.stderr  # progress log on stderr
    assert cli("status", "--db", db).returncode == 0
    assert cli("status", "--db", db, "--json").returncode == 0
    assert cli("export", "--db", db, "-o", tmp_path / "out.jsonl").returncode == 0
    assert cli("export", "--db", db).returncode == 0
    other = tmp_path / "other.jsonl"
    write_job(other, 10, seed=13)
    denied = cli("run", other, "--db", db, "--cap", "1", base=wrong_key)
    assert denied.returncode == 4 and "API key" in denied.stderr
    # A key-like string where a path or an option value is expected is not echoed back.
    keylike_db = tmp_path / f"{KEYLIKE}.db"
    assert cli("run", job, "--db", keylike_db, "--cap", "1").returncode == 0
    runner = CliRunner()
    for args in (
        ["run", KEYLIKE, "--db", str(db), "--cap", "1"],
        ["run", str(job), "--db", str(db), "--cap", KEYLIKE],
        ["run", str(job), "--db", str(db), "--cap", "1", "--rpm", KEYLIKE],
        ["status", "--db", str(tmp_path / KEYLIKE)],
        ["price", str(job), "--prices", KEYLIKE],
    ):
        result = runner.invoke(main, args, env={"OPENAI_API_KEY": SENTINEL})
        assert result.exit_code == 2, result.output
        assert KEYLIKE not in result.output, args
    for out in outputs:
        for secret in (SENTINEL, KEYLIKE):
            assert secret not in out.stdout + out.stderr, (out.args, secret)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert tmp_path / "out.jsonl" in files and db in files
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path
