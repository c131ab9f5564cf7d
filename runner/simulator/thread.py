"""A simulator on its own event loop in a background thread, for synchronous callers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..pricing import PriceTable
from .config import SimConfig
from .server import Simulator

_T = TypeVar("_T")
_TIMEOUT_S = 10.0


class SimulatorThread:
    """A ``Simulator`` serving from a daemon thread with its own event loop.

    Use as a context manager (or ``start``/``stop``). State lives on the server's loop, so
    every method here runs its work there and is safe from any thread.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        prices: PriceTable | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.simulator = Simulator(config, prices)
        self.base_url = ""
        self._address = (host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving and return the base URL (``http://host:port/v1``)."""
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name="batchrun-simulator", daemon=True
        )
        self._thread.start()
        try:
            self.base_url = self._run(self.simulator.start(*self._address))
        except BaseException:
            self.stop()  # e.g. the port is taken: do not leak the thread
            raise
        return self.base_url

    def stop(self) -> None:
        """Stop running batches, close the server and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._run(self.simulator.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_TIMEOUT_S)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the simulator thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=_TIMEOUT_S)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the server's loop and return its result."""
        if self._loop is None:
            return fn()

        async def run() -> _T:
            return fn()

        result: _T = self._run(run())
        return result

    @property
    def config(self) -> SimConfig:
        return self.simulator.config

    def ledger_snapshot(self) -> dict[str, Any]:
        """The ledger as ``GET /_sim/ledger`` shows it (with file and batch counts)."""
        return self.call(self.simulator.state)

    def configure(self, **changes: Any) -> None:
        """Patch the config at runtime (validated; all or nothing)."""
        self.call(lambda: self.simulator.config.update(changes))

    def reset(self) -> None:
        """Forget the ledger, files and batches; refill the buckets; reseed the RNGs."""
        self.call(self.simulator.reset)

    def outage(self, seconds: float) -> None:
        """Refuse connections for ``seconds`` (open ones are dropped), then serve again on the
        same port. Returns as soon as the server is down."""
        self._run(self.simulator.outage(seconds))
