"""Every error batchrun raises on purpose, as one hierarchy.

A library caller can catch ``BatchrunError`` alone, or the class that means what it handles;
the command line maps each class to an exit status in its own table.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchrunError(Exception):
    """Base class: an expected failure with a message meant for the user (no traceback)."""


class UsageError(BatchrunError):
    """Bad options or bad input that the user must fix before anything can run."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One defect in a job file, located precisely enough to fix it in an editor."""

    path: str
    line: int  # 1-based; 0 when the problem is about the file as a whole
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


class JobFileError(UsageError):
    """The job file is unreadable or invalid; ``problems`` lists every defect found."""

    def __init__(self, problems: list[Problem], truncated: bool = False) -> None:
        self.problems = problems
        self.truncated = truncated
        lines = [str(p) for p in problems]
        if truncated:
            lines.append(f"... stopped after {len(problems)} problems")
        super().__init__("\n".join(lines))


class PriceError(UsageError):
    """The price table or a user price file is invalid."""


class UnknownModelError(PriceError):
    """A model has no price: pricing it at $0 would defeat the spend cap, so it is an error."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(
            f"no price known for model {model!r}; add it to a price file of your own (the "
            "bundled table's shape)"
        )


class UnknownTierError(PriceError):
    """A service tier the price table has no prices for: priced as standard, a priority
    request's worst case (and the cap's guard) would be too low, so it is an error."""

    def __init__(self, model: str, tier: str) -> None:
        self.model = model
        self.tier = tier
        if tier in ("flex", "priority"):
            why = (
                f"no {tier} prices known for model {model!r}; add {tier}_input and "
                f"{tier}_output to a price file of your own"
            )
        else:
            why = (
                f"service tier {tier!r} has no prices (batchrun prices auto, default, flex and "
                "priority)"
            )
        super().__init__(why)


class VocabularyError(BatchrunError):
    """A tokenizer vocabulary is missing or does not match tiktoken's expected sha256."""


class StoreError(BatchrunError):
    """The database cannot be opened, read or written safely."""


class RunnerLostError(StoreError):
    """This runner was declared dead (it missed its heartbeat) and its requests taken over."""


class ApiKeyError(BatchrunError):
    """The API refused the key before anything was sent."""


class Declined(BatchrunError):
    """The user answered no when asked to confirm the spend."""
