"""Which fault a request gets, from seeded RNGs, and how a faulty 200 body is spoiled.

One uniform number per request picks at most one fault; the same seed gives the same faults in
the same order. Latency jitter and batch-line failures have RNGs of their own, so turning them
on does not change which requests get which fault.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ..endpoints import EMBEDDINGS, Endpoint
from .config import _FAULTS, SimConfig


class _Dice:
    """The seeded RNGs; reseeded when the config's seed changes or on reset."""

    def __init__(self, seed: int) -> None:
        self._faults = random.Random()
        self._jitter = random.Random()
        self._batch = random.Random()
        self._timing = random.Random()  # batch queue delays and stuck batches
        self._flex = random.Random()
        self._seeded = seed
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self._faults.seed(seed)
        self._jitter.seed(seed + 1)
        self._batch.seed(seed + 2)
        self._timing.seed(seed + 3)
        self._flex.seed(seed + 4)
        self._seeded = seed

    def _follow(self, config: SimConfig) -> None:
        if config.seed != self._seeded:
            self.reseed(config.seed)

    def fault(self, config: SimConfig) -> str | None:
        """The fault for the next request, or None."""
        self._follow(config)
        u = self._faults.random()
        for name in _FAULTS:
            p = getattr(config, f"p_{name}")
            if u < p:
                return name
            u -= p
        return None

    def latency(self, config: SimConfig) -> float:
        """Seconds of service time for the next request."""
        self._follow(config)
        delay = config.latency_ms / 1000
        if delay and config.latency_jitter:
            delay *= 1 + config.latency_jitter * (2 * self._jitter.random() - 1)
        return delay

    def batch_line_fails(self, config: SimConfig) -> bool:
        """Whether the next batch line gets an injected 500."""
        self._follow(config)
        return bool(config.batch_p_500) and self._batch.random() < config.batch_p_500

    def batch_timing(self, config: SimConfig) -> tuple[float, bool]:
        """(queue delay in seconds, whether it is stuck) for the next batch to start."""
        self._follow(config)
        mean = config.batch_queue_s
        if not mean or config.batch_queue_dist == "fixed":
            delay = mean
        elif config.batch_queue_dist == "exponential":
            delay = self._timing.expovariate(1 / mean)
        else:
            delay = self._timing.lognormvariate(math.log(mean), 1.0)
        stuck = bool(config.batch_p_stuck) and self._timing.random() < config.batch_p_stuck
        return delay, stuck

    def flex_unavailable(self, config: SimConfig) -> bool:
        """Whether the next flex request meets a capacity 429."""
        self._follow(config)
        p = config.flex_p_unavailable
        return bool(p) and self._flex.random() < p

    def batch_line_garbled(self, config: SimConfig) -> bool:
        """Whether the next billed batch line is written to the output file cut short."""
        self._follow(config)
        return bool(config.batch_p_garbled) and self._batch.random() < config.batch_p_garbled


def _spoil(payload: dict[str, Any], fault: str | None, endpoint: Endpoint) -> None:
    """Apply a body fault to a billed 200 body in place (other faults leave it alone)."""
    if fault == "no_usage":
        payload.pop("usage", None)
    elif fault == "empty_usage":
        payload["usage"] = {}
    elif fault == "bad_usage":
        usage = payload["usage"]
        for key, value in usage.items():
            if isinstance(value, int):
                usage[key] = str(value)
    elif fault == "short_embeddings" and endpoint is EMBEDDINGS:
        payload["data"] = payload["data"][:-1]
