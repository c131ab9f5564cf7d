"""What a person sees at a terminal, through a real pseudo-terminal: the question before the
first request, the progress line (wide, narrow, piped), Ctrl-C acknowledged at once, -q, and
money with enough digits."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

from runner.simulator import SimulatorThread

from .helpers import BATCHRUN, batchrun, batchrun_env, write_job

SimFactory = Callable[..., SimulatorThread]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``batchrun`` with a pseudo-terminal for stdin, stdout and stderr, ``columns`` wide."""

    def __init__(self, args: list[str], columns: int = 120) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = batchrun_env(COLUMNS=str(columns), LINES="40")
        self.proc = subprocess.Popen(
            [BATCHRUN, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never appeared in {self.text!r}"
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    time.sleep(0.05)
        return self.text

    @property
    def text(self) -> str:
        """What was shown, each redraw of a line on a line of its own."""
        return ANSI.sub("", self.seen).replace("\r\n", "\n").replace("\r", "\n")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or select.select([self.master], [], [], 0.05)[0]:
            assert time.monotonic() < deadline, "the run did not finish"
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.seen += chunk.decode(errors="replace")
        code = self.proc.wait()
        os.close(self.master)
        return code, self.text


def _run_args(job: Path, db: Path, sim: SimulatorThread, *extra: str) -> list[str]:
    return ["run", str(job), "--db", str(db), "--base-url", sim.base_url, *extra]


def test_on_a_terminal_run_asks_before_the_first_request(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, seed=1)
    term = Terminal(_run_args(job, db, sim, "--cap", "0.005"))
    # the worst case as the price table shows it, and a $0.005 cap never shown as $0.01
    term.read_until("Send 40 requests, worst case $0.001976 of cap $0.005? [y/N]")
    term.type("n\n")
    code, out = term.finish()
    assert code == 1 and "nothing sent" in out
    assert sim.ledger_snapshot()["requests_received"] == 0
    term = Terminal(_run_args(job, db, sim, "--cap", "0.005"))
    term.read_until("[y/N]")
    term.type("y\n")
    code, out = term.finish()
    assert code == 0, out
    assert sim.ledger_snapshot()["requests_billed"] == 40
    # --yes skips the question; without a terminal nothing is asked either
    again = batchrun("run", job, "--db", db, "--cap", "0.005", "--base-url", sim.base_url)
    assert again.returncode == 0 and "[y/N]" not in again.stdout + again.stderr


def test_progress_on_a_wide_terminal_shows_a_bar_rate_eta_ok_and_failed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=40)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 120, seed=2)
    term = Terminal(_run_args(job, db, sim, "--cap", "1", "--yes", "--concurrency", "4"), 140)
    out = term.read_until("req/s")
    code, out = term.finish()
    assert code == 0, out
    assert "|" in out and "ok, 0 failed)" in out and "ETA" in out and "of $1.00" in out
    assert "120/120 (120 ok, 0 failed)" in out


def test_a_narrow_terminal_keeps_spend_cap_and_failures_and_drops_the_bar(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=40)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 60, seed=3)
    term = Terminal(_run_args(job, db, sim, "--cap", "1", "--yes", "--concurrency", "4"), 60)
    code, out = term.finish()
    assert code == 0, out
    progress = [line for line in out.splitlines() if "ETA" in line]
    assert progress and all(len(line) <= 60 for line in progress), progress
    assert all("failed" in line and "of $1.00" in line for line in progress)
    assert not any("|" in line for line in progress)


def test_piped_output_is_timestamped_lines_with_rate_and_eta(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=4)
    out = batchrun("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "req/s" in line]
    assert lines, out.stderr
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d batchrun: 30/30 \(30 ok", lines[-1]
    )
    assert "ETA" in lines[-1] and "spend $" in lines[-1]


def test_ctrl_c_is_acknowledged_at_once(tmp_path: Path, make_simulator: SimFactory) -> None:
    sim = make_simulator(latency_ms=1500)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 100, seed=5)
    term = Terminal(_run_args(job, db, sim, "--cap", "1", "--yes", "--concurrency", "8"))
    term.read_until("ETA")
    while sim.ledger_snapshot()["requests_received"] < 8:
        time.sleep(0.02)
    os.killpg(term.proc.pid, signal.SIGINT)
    sent = time.monotonic()
    term.read_until("Ctrl-C again to stop now", timeout=5)
    assert time.monotonic() - sent < 1.0
    out = term.read_until("request(s) in flight")
    assert "stopping: waiting up to 10 s for" in out
    code, _ = term.finish()
    assert code == 130


def test_quiet_prints_nothing_on_stdout_but_errors_still_reach_stderr(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=6)
    out = batchrun("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url, "-q")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    capped = batchrun("run", job, "--db", tmp_path / "b.db", "--cap", "0.000001", "-q",
                      "--base-url", sim.base_url)  # fmt: skip
    assert capped.returncode == 3 and capped.stdout == "" and "spend cap" in capped.stderr
