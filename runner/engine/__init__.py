"""The engine: one runner's run of a job, whatever carries its requests.

A backend (``backends.sync``: a worker pool on the synchronous API; ``backends.batch``: the
OpenAI Batch API; ``backends.auto``: both, by a deadline) decides how requests travel.
Everything about money is here, the same for every backend, in three parts:

- the books (``Books``): claims under the cap, outcomes settled at what the server billed, the
  calibration of reservations, and the Batch API's chunks (``Chunks``);
- the group-commit writer (``GroupWriter``), which makes those outcomes durable on a thread of
  its own so the event loop never waits on disk per result;
- runner membership (``Membership``): heartbeats, take-overs of dead runners' claims, pauses
  shared with the job's other runners.

``Control`` says when to stop: a signal, a fatal answer, the cap, an overrun. Time comes from
one ``runner.clock.Clock``.
"""

from ._books import Books, Chunks
from ._control import Control, RunOutcome, RunReport, RunStats
from ._engine import Backend, Engine
from ._membership import Membership, process_alive
from ._writer import GroupWriter

__all__ = [
    "Backend",
    "Books",
    "Chunks",
    "Control",
    "Engine",
    "GroupWriter",
    "Membership",
    "RunOutcome",
    "RunReport",
    "RunStats",
    "process_alive",
]
