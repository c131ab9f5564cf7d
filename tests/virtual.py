"""Tests on virtual time: ``@on_virtual_time`` runs an async test on the ``clock`` fixture's
event loop (a ``runner.clock.VirtualClock``), so sleeps, timeouts, aiolimiter's buckets and
whatever reads the clock go by fake time that jumps whenever only a timer is left to wait for."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from runner.clock import VirtualClock


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def on_virtual_time(
    fn: Callable[..., Coroutine[Any, Any, None]],
) -> Callable[..., None]:
    @functools.wraps(fn)
    def test(*args: Any, **kwargs: Any) -> None:
        kwargs["clock"].run(fn(*args, **kwargs))

    return test
