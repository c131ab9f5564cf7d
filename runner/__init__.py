"""batchrun: run OpenAI batch job files under a spend cap that cannot be passed.

The public API (everything else in the package is private)::

    import runner

    plan = runner.price("jobs/example.jsonl")          # offline: plan.worst_usd, plan.by_model
    with runner.Database("batchrun.db") as db:
        job = db.import_rows(rows, cap="5.00")         # or db.import_job(path, cap=...)
        result = job.run(api_key=key, base_url=url)    # await job.arun(...) in a notebook
        for line in job.results():                     # Batch API output format
            ...

Names load on first use, so ``import runner`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public name -> the module that holds it.
_PUBLIC = {
    "price": "api",
    "price_table": "api",
    "check_budget": "api",
    "to_requests": "api",
    "build_requests": "build",
    "build_job": "build",
    "Database": "api",
    "Job": "api",
    "RunResult": "api",
    "run_with": "api",
    "cancel_with": "api",
    "sample_with": "api",
    "deadline_plan": "deadline",
    "resolve_deadline": "deadline",
    "Projection": "projection",
    "Sample": "settings",
    "Plan": "plan",
    "STDIN": "jobfile",
    "RunOutcome": "engine",
    "RunStats": "engine",
    "Limits": "settings",
    "Retry": "settings",
    "Transport": "settings",
    "Batching": "settings",
    "Stopping": "settings",
    "Deadline": "settings",
    "RunSettings": "settings",
    "Clock": "clock",
    "VirtualClock": "clock",
    "BatchrunError": "errors",
    "UsageError": "errors",
    "JobFileError": "errors",
    "Problem": "errors",
    "PriceError": "errors",
    "UnknownModelError": "errors",
    "VocabularyError": "errors",
    "StoreError": "errors",
    "RunnerLostError": "errors",
    "ApiKeyError": "errors",
    "Declined": "errors",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'runner' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
