"""The simulated API's own books: the ground truth batchrun's spend accounting must match."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..money import format_exact


@dataclass(slots=True)
class Ledger:
    """What the simulated API billed, for synchronous requests and batch lines alike.

    ``bill`` is called once for every billed request or completed batch line (subclass it to
    watch bills one by one); ``requests_billed`` and ``billed_pico`` cover both, and the
    ``batch_*`` counters say how much of that came through the Batch API.
    """

    requests_received: int = 0  # HTTP requests to the API (control endpoints excluded)
    requests_billed: int = 0
    billed_pico: int = 0
    duplicate_bodies: int = 0  # billed bodies byte-identical to one billed before
    rate_limited: int = 0  # 429s of type requests/tokens, injected ones included
    flex_unavailable: int = 0  # flex requests answered 429 resource_unavailable (not billed)
    status_counts: dict[str, int] = field(default_factory=dict)  # also "reset", "reset_after_bill"
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)  # by requested model
    batch_lines_billed: int = 0
    batch_billed_pico: int = 0
    batches_created: int = 0
    files_uploaded: int = 0
    seen_bodies: set[bytes] = field(default_factory=set, repr=False)

    @property
    def billed_usd(self) -> str:
        """Exact decimal dollars, never rounded."""
        return format_exact(self.billed_pico)

    def clear(self) -> None:
        """Back to zero in place, so references held by callers stay live."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)

    def count(self, status: str) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def bill(self, model: str, digest: bytes, usage: tuple[int, int, int], pico: int) -> None:
        """Record one billed request; ``usage`` is (input, cached, output) tokens."""
        self.requests_billed += 1
        self.billed_pico += pico
        if digest in self.seen_bodies:
            self.duplicate_bodies += 1
        else:
            self.seen_bodies.add(digest)
        row = self.by_model.get(model)
        if row is None:
            row = self.by_model[model] = dict.fromkeys(
                ("requests", "input_tokens", "cached_tokens", "output_tokens", "billed_pico"), 0
            )
        row["requests"] += 1
        row["input_tokens"] += usage[0]
        row["cached_tokens"] += usage[1]
        row["output_tokens"] += usage[2]
        row["billed_pico"] += pico

    def count_batch_line(self, pico: int) -> None:
        """Mark the bill just recorded as a batch line's (billed at Batch API prices)."""
        self.batch_lines_billed += 1
        self.batch_billed_pico += pico

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests_received": self.requests_received,
            "requests_billed": self.requests_billed,
            "billed_pico": self.billed_pico,
            "billed_usd": self.billed_usd,
            "duplicate_bodies": self.duplicate_bodies,
            "rate_limited": self.rate_limited,
            "flex_unavailable": self.flex_unavailable,
            "status_counts": dict(self.status_counts),
            "by_model": {m: dict(row) for m, row in self.by_model.items()},
            "batch_lines_billed": self.batch_lines_billed,
            "batch_billed_pico": self.batch_billed_pico,
            "batches_created": self.batches_created,
            "files_uploaded": self.files_uploaded,
        }
