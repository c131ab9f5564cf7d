"""Run ``batchrun`` in this process with a timestamp at each step of starting a run, up to the
first request leaving; then write the marks as JSON and end the process.

    T0=<epoch seconds at fork> PROBE_OUT=marks.json python bench/_startup_probe.py run JOB ...

Used by ``startup_bench.py --phases``. Nothing is imported ahead of its time: each function is
wrapped when its module is first imported (an import hook), so the imports' own cost stays in the
step that pays it. A mark is (name, seconds since T0). At the first ``OpenAITransport.send`` the
marks are written and the process exits at once (``os._exit``): only the way up to it is timed.
"""

from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

T0 = float(os.environ.get("T0") or time.time())
OUT = os.environ.get("PROBE_OUT", "startup-marks.json")
MARKS: list[tuple[str, float]] = [("interpreter up", time.time() - T0)]


def mark(name: str) -> None:
    MARKS.append((name, time.time() - T0))


def _timed(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    if _is_async(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            mark(f"{name} >")
            try:
                return await fn(*args, **kwargs)
            finally:
                mark(f"{name} <")

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        mark(f"{name} >")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{name} <")

    return run


def _is_async(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _first_send(send: Callable[..., Any]) -> Callable[..., Any]:
    async def first(self: Any, path: str, body: str) -> Any:
        mark("first send")
        with open(OUT, "w") as f:
            json.dump(MARKS, f)
        sys.stdout.flush()
        os._exit(0)

    return first


def _rows_timed(rows: Callable[..., Any]) -> Callable[..., Any]:
    """``plan_rows``: the time spent producing rows (read, validate, count, price) summed."""

    @functools.wraps(rows)
    def timed(planner: Any) -> Any:
        it = iter(rows(planner))
        spent = 0.0
        while True:
            t = time.perf_counter()
            try:
                row = next(it)
            except StopIteration:
                spent += time.perf_counter() - t
                MARKS.append(("producing rows (sum)", spent))
                return
            spent += time.perf_counter() - t
            yield row

    return timed


# module -> [(attribute path, wrapper)]; a str wrapper is the name for _timed
PATCHES: dict[str, list[tuple[str, Any]]] = {
    "runner.cli": [("run", "cli.run")],
    "runner.api": [("run_with", "api.run_with")],
    "runner.run": [
        ("run_job", "run_job"),
        ("load_price_table", "load_price_table"),
        ("_api_key", "api_key"),
        ("open_store", "open_store"),
        ("find_job", "find_job"),
        ("_sha256_or_problem", "sha256"),
        ("open_job", "open_job"),
        ("plan_rows", _rows_timed),
        ("project", "project"),
        ("estimate", "estimate"),
        ("format_estimate", "format_estimate"),
        ("_drive", "drive"),
    ],
    "runner.store.api": [("check_schema", "check_schema")],
    "runner.store.jobs": [("JobsMixin.create_job", "create_job")],
    "runner.transport": [
        ("OpenAITransport.__init__", "transport init"),
        ("OpenAITransport.send", _first_send),
    ],
    "runner.engine": [("Engine.run", "engine.run")],
    "runner.vocab": [("get_encoding", "vocabulary")],
}


def _apply(module: Any) -> None:
    for dotted, how in PATCHES.get(module.__name__, []):
        owner: Any = module
        *path, attr = dotted.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, attr)
        setattr(owner, attr, _timed(fn, how) if isinstance(how, str) else how(fn))


class _Loader(importlib.abc.Loader):
    """The module's own loader, with marks around its execution (all else is the inner's)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, get_filename, ...
        return getattr(self.inner, name)

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        mark(f"import {module.__name__} >")
        self.inner.exec_module(module)
        mark(f"import {module.__name__} <")
        _apply(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in PATCHES and name not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


# imported modules whose time is worth a mark of its own
WATCHED = {"openai", "aiohttp", "httpx2", "sqlalchemy", "alembic", "tiktoken", "runner"}


def use_src() -> None:
    """``STARTUP_BENCH_SRC``: import ``runner`` from that tree (a baseline's ``runner/``, with
    its ``migrations`` inside), not from the editable install."""
    src = os.environ.get("STARTUP_BENCH_SRC")
    if not src:
        return
    sys.meta_path[:] = [
        f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")
    ]
    sys.path.insert(0, src)


def main() -> None:
    use_src()
    # first in line; it asks the others (the editable install's finder too) for the spec
    sys.meta_path.insert(0, _Finder())
    mark("hook in")
    from runner import cli

    mark("cli imported")
    sys.argv = ["batchrun", *sys.argv[1:]]
    cli.entry()
    mark("exited without a send")
    with open(OUT, "w") as f:
        json.dump(MARKS, f)


if __name__ == "__main__":
    main()
