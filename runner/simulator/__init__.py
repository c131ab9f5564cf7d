"""An OpenAI-compatible HTTP server for tests, benchmarks and demos.

It serves the chat, responses and embeddings endpoints, the Files API and the Batch API, with
the real API's shapes, limits and headers, deterministic replies, seeded fault injection and an
exact billing ledger (see ``server``). ``SimConfig`` holds every setting; ``batchrun simulate``
(``cli``) exposes each one as an option.

The server and its dependencies (aiohttp, tiktoken) load on first use of ``Simulator``,
``SimulatorThread`` or ``serve``, so importing the CLI stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import SimConfig
from .ledger import Ledger

if TYPE_CHECKING:
    from .limits import go_duration
    from .server import Simulator, serve
    from .thread import SimulatorThread

__all__ = ["Ledger", "SimConfig", "Simulator", "SimulatorThread", "go_duration", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("Simulator", "serve"):
        from . import server

        return getattr(server, name)
    if name == "go_duration":
        from .limits import go_duration

        return go_duration
    if name == "SimulatorThread":
        from .thread import SimulatorThread

        return SimulatorThread
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
