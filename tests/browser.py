"""A real headless Chromium for tests, driven over its DevTools protocol (a websocket, through
aiohttp): open a page, see every console message, exception and request it made, and evaluate
JavaScript in it.

``find_chromium()`` finds Debian's chromium, installing it with apt-get when it is missing and
this is root; it returns the reason when there is none, so a test can skip saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# Flags that keep a headless Chromium from reaching for the network (updates, sync, field
# trials...) on a machine that refuses it; --remote-debugging-port=0 picks a free port.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)
NAMES = ("chromium", "chromium-browser")


def find_chromium() -> tuple[str | None, str]:
    """(path to chromium, or None; why there is none)."""
    for name in NAMES:
        if found := shutil.which(name):
            return found, ""
    if os.geteuid() != 0:
        return None, "chromium is not installed, and installing it needs root"
    if shutil.which("apt-get") is None:
        return None, "chromium is not installed, and there is no apt-get to install it"
    # An old package list may name a version the mirror no longer has: update, then retry.
    ok, why = _apt("install", "-y", "chromium")
    if not ok:
        ok, why = _apt("update")
        if ok:
            ok, why = _apt("install", "-y", "chromium")
    for name in NAMES:
        if found := shutil.which(name):
            return found, ""
    return None, f"apt-get could not install chromium: {why}"


def _apt(*args: str) -> tuple[bool, str]:
    """Run apt-get; (whether it succeeded, its last line of output)."""
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args], capture_output=True, text=True, env=env, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else f"exit status {done.returncode}"


@dataclass
class Page:
    """What one page did while it loaded and since."""

    console: list[dict[str, Any]] = field(default_factory=list)  # Runtime.consoleAPICalled
    exceptions: list[dict[str, Any]] = field(default_factory=list)  # Runtime.exceptionThrown
    log: list[dict[str, Any]] = field(default_factory=list)  # Log.entryAdded
    requests: list[str] = field(default_factory=list)  # every URL the page asked for

    def problems(self) -> list[str]:
        """Console errors and warnings (plotly warns through console.trace), uncaught
        exceptions, and errors and warnings the browser logged, as text."""
        out = [
            f"console.{m['type']}: "
            + " ".join(str(a.get("value", a.get("description", ""))) for a in m["args"])
            for m in self.console
            if m["type"] in ("error", "assert", "warning", "trace")
        ]
        out += [json.dumps(e["exceptionDetails"])[:500] for e in self.exceptions]
        out += [f"{e['entry']['source']}: {e['entry']['text']}" for e in self.log
                if e["entry"]["level"] in ("error", "warning")]  # fmt: skip
        return out


class DevTools:
    """One page target of a running Chromium, over its websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.page = Page()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                future = self.waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled":
                self.page.console.append(params)
            elif method == "Runtime.exceptionThrown":
                self.page.exceptions.append(params)
            elif method == "Log.entryAdded":
                self.page.log.append(params)
            elif method == "Network.requestWillBeSent":
                self.page.requests.append(params["request"]["url"])
            self.events.put_nowait(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        key = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        await self.ws.send_json({"id": key, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def open(self, url: str, timeout: float = 30) -> Page:
        """Load ``url`` and wait for its load event; what it does is recorded from here on."""
        for domain in ("Runtime", "Log", "Network", "Page"):
            await self.send(f"{domain}.enable")
        while not self.events.empty():
            self.events.get_nowait()
        self.page = Page()
        await self.send("Page.navigate", url=url)
        async with asyncio.timeout(timeout):
            while (await self.events.get()).get("method") != "Page.loadEventFired":
                pass
        return self.page

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium_page(binary: str) -> AsyncIterator[DevTools]:
    """A fresh headless Chromium (its own profile folder), and DevTools on its blank page."""
    with tempfile.TemporaryDirectory(prefix="batchrun-chromium-") as profile:
        # Its own process group, so its renderer and helper processes end with it.
        proc = await asyncio.create_subprocess_exec(
            binary, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            port = await _devtools_port(Path(profile) / "DevToolsActivePort", proc)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as reply:
                    targets = await reply.json()
                page = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    tools = DevTools(ws)
                    try:
                        yield tools
                    finally:
                        tools.reader.cancel()
        finally:
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the browser's process group (it shuts down and lets go of its profile
    folder), SIGKILL if it is still there after a few seconds."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            continue  # a helper process of the group is still running
        return


async def _devtools_port(path: Path, proc: asyncio.subprocess.Process) -> int:
    """Chromium writes the port it listens on into its profile folder."""
    async with asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"chromium exited with status {proc.returncode}")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(path.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
