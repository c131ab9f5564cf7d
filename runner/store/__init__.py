"""The database: jobs, their requests, every attempt and result, the spend ledger, runners.

``open_store(target)`` opens (and migrates) a database; ``Store`` is the whole API. Its parts:
``schema`` (the tables, which Alembic's environment imports), ``records`` (the values that cross
the boundary, and the request states), ``jobs`` (import and lookup), ``claims`` (runners, claims
under the cap, group-committed outcomes), ``reads`` (what reports read), ``migrate``, and one
module per dialect (``sqlite``, ``postgres``) for everything database-specific.

Every method is synchronous and short; the engine runs them on one dedicated thread so the event
loop never waits on the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import (
    OPEN_STATES,
    SWITCH_EVENT,
    UNLIMITED_STRATUM,
    AttemptRecord,
    BatchInfo,
    Beat,
    ChargeRecord,
    Claim,
    EventRecord,
    ExportRow,
    Job,
    JobStatus,
    ModelSample,
    NewRequest,
    Outcomes,
    PendingRequest,
    ReleaseRecord,
    RequestState,
    ResultFlag,
    ResultRecord,
    RunnerInfo,
    Spend,
)

if TYPE_CHECKING:
    from .api import Store, open_store

__all__ = [
    "OPEN_STATES",
    "SWITCH_EVENT",
    "UNLIMITED_STRATUM",
    "AttemptRecord",
    "BatchInfo",
    "Beat",
    "ChargeRecord",
    "Claim",
    "EventRecord",
    "ExportRow",
    "Job",
    "JobStatus",
    "ModelSample",
    "NewRequest",
    "Outcomes",
    "PendingRequest",
    "ReleaseRecord",
    "RequestState",
    "ResultFlag",
    "ResultRecord",
    "RunnerInfo",
    "Spend",
    "Store",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # The records are light; the Store pulls in SQLAlchemy and Alembic, which `batchrun price`
    # does not need: load it on first use.
    if name in ("Store", "open_store"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
