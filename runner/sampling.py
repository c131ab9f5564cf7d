"""Which requests ``price --sample`` sends: seeded, stratified by model, spread over endpoints
and output limits.

The strata are the models, each split by output limit: into powers of two (so a stratum's
limits are within a factor of two of each other), and the requests priced at the model's largest
output (no limit: what they write does not follow that limit). Each
stratum gets a share of the sample in proportion to its output allowance (worst case less floor:
where the uncertainty is, so a model ten times the price gets ten times the requests, a Neyman
allocation when spreads follow the allowance; a request without a limit weighs as if it had
1,024 tokens), at least two requests (so its spread can be estimated) and at most all it has.
Within a stratum the sample is systematic over its requests
ordered by endpoint, output limit and file order, from a seeded random start: every endpoint and
output-limit bucket is represented in proportion. The same seed draws the same sample, so
drawing again sends nothing new; memory holds the sample, never the job.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .errors import UsageError
from .pricing import PriceTable
from .settings import Sample
from .store import UNLIMITED_STRATUM, RequestState

if TYPE_CHECKING:
    from .store import Store

K = TypeVar("K")
Stratum = tuple[str, int]  # (model, output-limit bucket, or UNLIMITED_STRATUM)


def open_from(store: Store, job_id: int, table: PriceTable) -> dict[str, int]:
    """Per model of the job, the output limit from which a request is priced at its largest
    output (it set none, or one as large)."""
    out = {}
    for model in store.models_of(job_id):
        most = table.resolve(model).max_output
        if most:
            out[model] = most
    return out


@dataclass(frozen=True, slots=True)
class Drawn:
    """A drawn sample: every sequence number in it, and those still to send."""

    seqs: frozenset[int]
    pending: frozenset[int]
    worst_pico: int = 0  # of the pending ones (set by the run that sends them)


def sample_size(sample: Sample, requests: int) -> int:
    if sample.size is not None:
        n = sample.size
    elif sample.share is not None:
        # A share of a very large job is held to the largest sample (its interval is already
        # tight there); an explicit size above it is refused.
        return max(1, min(math.ceil(sample.share * requests), sample.most, requests))
    else:
        raise UsageError("a sample needs a size or a share")
    if n < 1:
        raise UsageError("a sample must hold at least one request")
    if n > sample.most:
        raise UsageError(f"a sample of {n:,} requests is more than the {sample.most:,} allowed")
    return min(n, requests)


_OPEN_OUTPUT = 1024  # output tokens a request without a limit is weighed at, for the split


def weights(strata: Mapping[Stratum, tuple[int, int, int]]) -> dict[Stratum, float]:
    """What each stratum weighs in the split (``strata``: requests, output allowance and output
    limits of each): its allowance; for requests priced at their model's largest output, the
    allowance of ``_OPEN_OUTPUT`` tokens each (what they write does not follow that limit)."""
    out = {}
    for key, (k, allowance, limits) in strata.items():
        _, bucket = key
        if bucket == UNLIMITED_STRATUM and limits > 0:
            allowance = allowance * min(1.0, _OPEN_OUTPUT * k / limits)
        out[key] = float(max(allowance, 0))
    return out


def allocate(strata: Mapping[K, tuple[int, float]], n: int) -> dict[K, int]:
    """``n`` split over the strata (``strata``: requests and weight of each) in proportion to
    their weights (largest remainder), each at least two (or all it has) while ``n`` allows,
    none more than it has."""
    sizes = {m: k for m, (k, _) in strata.items() if k > 0}
    if not sizes:
        return {}
    weights = {m: max(strata[m][1], 0.0) for m in sizes}
    if not sum(weights.values()):
        weights = dict(sizes)  # nothing to weigh by (no output anywhere): by requests
    floor = {m: min(k, 2) for m, k in sizes.items()}
    if sum(floor.values()) >= n:
        # Too small a sample for two of each: the heaviest models first.
        out: dict[K, int] = {}
        left = n
        for m in sorted(sizes, key=lambda m: (-weights[m], m)):
            take = min(floor[m], left)
            if take:
                out[m] = take
            left -= take
        return out
    out = dict(floor)
    left = n - sum(out.values())
    # Share out the rest by weight among the models with room, again while some fill up.
    while left > 0:
        open_ = [m for m in sizes if out[m] < sizes[m]]
        if not open_:
            break
        total = sum(weights[m] for m in open_) or len(open_)
        quota = {m: left * (weights[m] if total else 1) / total for m in open_}
        given = {m: min(sizes[m] - out[m], math.floor(q)) for m, q in quota.items()}
        rest = left - sum(given.values())
        for m in sorted(open_, key=lambda m: (-(quota[m] - math.floor(quota[m])), m)):
            if rest <= 0:
                break
            if out[m] + given[m] < sizes[m]:
                given[m] += 1
                rest -= 1
        if not any(given.values()):
            break
        for m, k in given.items():
            out[m] += k
        left = n - sum(out.values())
    return {m: k for m, k in out.items() if k}


def draw(store: Store, job_id: int, sample: Sample, table: PriceTable) -> Drawn:
    """The job's sample for ``sample``'s seed (see the module's docstring)."""
    unset = open_from(store, job_id, table)
    strata = store.model_strata(job_id, unset)
    sizes = {m: k for m, (k, _, _) in strata.items()}
    weighed = weights(strata)
    n = sample_size(sample, sum(sizes.values()))
    rng = random.Random(f"batchrun-sample:{sample.seed}")
    seqs: set[int] = set()
    pending: set[int] = set()
    for stratum, k in sorted(allocate({m: (sizes[m], weighed[m]) for m in sizes}, n).items()):
        size = sizes[stratum]
        step = size / k
        start = rng.random() * step
        picks = iter(math.floor(start + j * step) for j in range(k))
        want = next(picks, None)
        for position, (seq, state) in enumerate(store.iter_strata(job_id, stratum, unset)):
            if want is None:
                break
            if position == want:
                seqs.add(seq)
                if state == RequestState.PENDING:
                    pending.add(seq)
                want = next(picks, None)
    return Drawn(frozenset(seqs), frozenset(pending))
