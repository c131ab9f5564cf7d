"""The synchronous worker pool's own bookkeeping (its behaviour under load is in test_engine)."""

from __future__ import annotations

import pytest

from runner.backends import sync


def test_the_pool_remembers_only_the_last_seconds_of_completions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a known rate nothing asks for the observed throughput, yet a run of millions of
    requests must not keep a timestamp for each of them."""
    now = [1000.0]
    monkeypatch.setattr(sync.time, "monotonic", lambda: now[0])
    pool = sync._Pool(8, 64)
    for _ in range(100_000):  # 1,000 completions a second for 100 s
        now[0] += 0.001
        pool.observe(0.05)
    assert len(pool._finished) <= 1000 * sync._THROUGHPUT_WINDOW + 1
    assert pool.throughput() == pytest.approx(1000, rel=0.01)
