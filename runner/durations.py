"""Durations as people and servers write them: parsed from ``90s``, ``1h30m`` or ``6m0s``, and
shown as ``12m30s`` or ``1:02:03``. The one home of both directions, for the governor's reset
headers, ``--deadline`` and everything batchrun prints."""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration (``12ms``, ``1.5s``, ``6m0s``, ``1h2m3s``, ``2d``), or
    None when ``text`` is not one (a plain number is not: its unit would be a guess)."""
    if not text:
        return None
    text = text.strip().lower()
    end, total = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != end:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        end = m.end()
    return total if end and end == len(text) else None


def span(seconds: float) -> str:
    """``45s``, ``12m30s``, ``3h05m``: rounded up (a wait is never shown shorter than it is)."""
    s = max(0, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def clock(seconds: float) -> str:
    """``4:05`` or ``1:02:03``: an ETA on a progress line."""
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
