"""A server that does not speak the API is said at once (issue 21, point 10): a web page
answering 200, and a redirect, stop the run after the first few answers with what came back,
and the rows stay pending. The server here is not the simulator: a plain HTTP server, as a
captive portal or a web server's default page would be."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from runner.engine import RunOutcome

from .helpers import query, run_in_process
from .jobgen import write_job

PAGE = b"<html><head><title>Welcome to nginx!</title></head><body><h1>It works</h1></body></html>"


class _Site(BaseHTTPRequestHandler):
    posts: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.posts.append(self.path)
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", "https://portal.example.com/login")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[tuple[str, list[str]]]:
    posts: ClassVar[list[str]] = []
    handler = type("Site", (_Site,), {"posts": posts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", posts
    server.shutdown()
    server.server_close()


async def test_a_web_page_answering_200_stops_the_run_at_once_and_says_what_came_back(
    tmp_path: Path, site: tuple[str, list[str]]
) -> None:
    url, posts = site
    job = tmp_path / "job.jsonl"
    write_job(job, 200)
    ran = await run_in_process(job, tmp_path / "b.db", f"{url}/v1", cap="1", timeout=5)
    assert ran.report.outcome is RunOutcome.REFUSED and ran.exit_code == 2
    assert ran.message is not None
    assert "the first 5 answers were unreadable" in ran.message
    assert f"{url}/v1 answered HTTP 200 with text/html: 'Welcome to nginx!'" in ran.message
    assert "Check the base URL" in ran.message and "--base-url" not in ran.message
    assert ran.status.states == {"pending": 200}
    # Not every request six times over: only what was in flight when the fifth answer came.
    assert len(posts) <= 64
    # Each unreadable answer is booked as an unknown outcome, in case it was billed.
    charged = query(tmp_path / "b.db", "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")
    assert 5 <= charged[0][0] <= len(posts)


async def test_a_redirect_is_reported_with_its_target_and_not_followed(
    tmp_path: Path, site: tuple[str, list[str]]
) -> None:
    url, posts = site
    job = tmp_path / "job.jsonl"
    write_job(job, 100)
    ran = await run_in_process(job, tmp_path / "b.db", f"{url}/moved/v1", cap="1", timeout=5)
    assert ran.report.outcome is RunOutcome.REFUSED and ran.exit_code == 2
    assert ran.message is not None
    assert "HTTP 302 redirect to https://portal.example.com/login" in ran.message
    assert ran.status.states == {"pending": 100}
    assert posts and all(p.startswith("/moved/") for p in posts)  # nothing sent on
    assert len(posts) <= 64
