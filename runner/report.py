"""Everything batchrun prints about a job: estimates, status, prices and the export.

Text for people, JSON (exact decimal strings for money) for programs. It formats values that
the plan, the run and the store computed; it never queries or writes anything itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .money import format_exact, format_usd
from .plan import Estimate, Plan, Totals
from .pricing import PriceTable
from .settings import Limits
from .store import ExportRow, Job, JobStatus, RunnerInfo


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


# -- price -------------------------------------------------------------------------------------


def format_plan(plan: Plan, table: PriceTable, rpm: int | None, tpm: int | None) -> str:
    """The ``batchrun price`` table: per model and in total."""
    header = ("model", "requests", "input tok", "output limit", "no limit", "floor", "worst case")
    rows = [header]

    def row(name: str, t: Totals) -> tuple[str, ...]:
        return (
            name,
            f"{t.requests:,}",
            f"{t.input_tokens:,}",
            f"{t.output_limit_tokens:,}",
            f"{t.unlimited_requests:,}",
            format_usd(t.floor_pico),
            format_usd(t.worst_pico),
        )

    for model in sorted(plan.by_model):
        rows.append(row(model, plan.by_model[model]))
    rows.append(row("total", plan.total))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{plan.path}: {plan.total.requests:,} requests, prices as of {table.as_of}"]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("floor = input tokens only; worst case = input + every output limit.")
    if plan.total.unlimited_requests:
        lines.append(
            f"warning: {plan.total.unlimited_requests:,} request(s) set no output limit; they "
            "are priced at their model's largest possible output."
        )
    if plan.approximate_parts:
        parts = ", ".join(f"{k} ({n:,})" for k, n in sorted(plan.approximate_parts.items()))
        lines.append(
            f"note: {plan.total.approximate_requests:,} request(s) include parts whose tokens "
            f"are estimated, not exact: {parts}."
        )
    minimum = plan.min_seconds(rpm, tpm)
    if minimum is not None:
        limits = " and ".join(x for x in (rpm and f"{rpm:,} RPM", tpm and f"{tpm:,} TPM") if x)
        lines.append(f"minimum wall time at {limits}: {_duration(minimum)}")
    return "\n".join(lines)


def _totals_json(t: Totals) -> dict[str, Any]:
    d: dict[str, Any] = t.as_dict()
    d["floor_usd"] = format_exact(d.pop("floor_pico"))
    d["worst_usd"] = format_exact(d.pop("worst_pico"))
    return d


def plan_json(plan: Plan, table: PriceTable, rpm: int | None, tpm: int | None) -> dict[str, Any]:
    return {
        "file": plan.path,
        "sha256": plan.sha256,
        "prices_as_of": table.as_of,
        "models": {m: _totals_json(t) for m, t in sorted(plan.by_model.items())},
        "total": _totals_json(plan.total),
        "approximate_parts": plan.approximate_parts,
        "rate_limits": {"rpm": rpm, "tpm": tpm},
        "min_seconds": plan.min_seconds(rpm, tpm),
    }


# -- run ---------------------------------------------------------------------------------------


def format_estimate(est: Estimate, plan: Plan | None, table: PriceTable, limits: Limits) -> str:
    """What ``run`` prints before sending: the estimate against the cap."""
    lines = []
    if plan is not None:
        lines.append(format_plan(plan, table, limits.rpm, limits.tpm))
        lines.append(f"imported as job {est.job_id} into {est.db}")
    else:
        lines.append(
            f"resuming job {est.job_id} ({est.requests:,} requests, floor "
            f"{format_usd(est.floor_pico)}, worst case {format_usd(est.worst_pico)}) from {est.db}"
        )
    if est.orphans:
        lines.append(
            f"{est.orphans:,} request(s) were in flight when a run died: charged "
            f"{format_usd(est.orphan_pico)} at worst case (their outcome is unknown) and queued "
            "again"
        )
    lines.append(
        f"cap {format_usd(est.cap_pico, 2)}: spent so far {format_usd(est.spent_pico)};"
        f" {est.fits:,} of {est.pending:,} pending request(s) fit under the cap at worst case"
        f" ({format_usd(est.pending_worst_pico)} for all of them)"
    )
    return "\n".join(lines)


# -- status ------------------------------------------------------------------------------------


def _projected_pico(s: JobStatus) -> int:
    """Spent so far, plus what is left with its output allowance used at the ratio observed in
    finished requests (the worst case until something has finished)."""
    pending_out = s.pending_worst_pico - s.pending_floor_pico
    if s.done_output_limit:
        pending_out = pending_out * s.output_tokens // s.done_output_limit
    return s.spend.settled_pico + s.pending_floor_pico + pending_out


def status_json(s: JobStatus) -> dict[str, Any]:
    j = s.job
    return {
        "job": j.id,
        "path": j.path,
        "sha256": j.sha256,
        "state": j.state,
        "requests": j.requests,
        "by_state": s.states,
        "cap_usd": format_exact(j.cap_pico),
        "spent_usd": format_exact(s.spend.settled_pico),
        "reserved_usd": format_exact(s.spend.reserved_pico),
        "unknown_outcome_usd": format_exact(s.unknown_pico),
        "estimate_floor_usd": format_exact(j.floor_pico),
        "estimate_worst_usd": format_exact(j.worst_pico),
        "projected_total_usd": format_exact(_projected_pico(s)),
        "input_tokens": s.input_tokens,
        "cached_tokens": s.cached_tokens,
        "output_tokens": s.output_tokens,
        "reasoning_tokens": s.reasoning_tokens,
        "errors": s.errors,
        "runners": [
            {
                "id": r.id,
                "host": r.host,
                "pid": r.pid,
                "via": r.via,
                "started_at": r.started_at,
                "heartbeat_at": r.heartbeat_at,
                "seconds_since_heartbeat": round(r.seen_ago, 3),
                "in_flight": r.in_flight,
                "claimed": r.holding,
                "rate_share": r.share if r.holding else 0.0,
            }
            for r in s.runners
        ],
    }


def format_status(s: JobStatus) -> str:
    j = s.job
    states = ", ".join(f"{n:,} {k}" for k, n in sorted(s.states.items()))
    lines = [
        f"job {j.id}: {j.path}",
        f"  state      {j.state}; {j.requests:,} requests: {states}",
        f"  spend      {format_usd(s.spend.settled_pico)} of cap {format_usd(j.cap_pico, 2)}"
        + (f" (+{format_usd(s.spend.reserved_pico)} reserved)" if s.spend.reserved_pico else "")
        + (
            f"; includes {format_usd(s.unknown_pico)} charged for unknown outcomes"
            if s.unknown_pico
            else ""
        ),
        f"  estimate   floor {format_usd(j.floor_pico)}, worst case {format_usd(j.worst_pico)},"
        f" projected total {format_usd(_projected_pico(s))}",
        f"  tokens     {s.input_tokens:,} in ({s.cached_tokens:,} cached),"
        f" {s.output_tokens:,} out ({s.reasoning_tokens:,} reasoning)",
    ]
    if s.errors:
        lines.append(
            "  errors     " + ", ".join(f"{k}: {n:,}" for k, n in sorted(s.errors.items()))
        )
    if s.runners:
        lines.append(f"  runners    {len(s.runners)} live")
        lines.extend(f"    {_runner_line(r)}" for r in s.runners)
    return "\n".join(lines)


def _runner_line(r: RunnerInfo) -> str:
    """One live runner: where it runs, since when, its last heartbeat, its load and share."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at))
    share = f"rate share 1/{round(1 / r.share)}" if r.holding else "idle (nothing claimed)"
    return (
        f"#{r.id} {r.host} pid {r.pid} ({r.via}): started {started}, last heartbeat "
        f"{r.seen_ago:.1f}s ago, {r.in_flight:,} in flight ({r.holding:,} claimed), {share}"
    )


# -- prices ------------------------------------------------------------------------------------


def format_prices(table: PriceTable) -> str:
    rows = [("model", "input", "cached", "output", "batch in", "batch out", "max out", "from")]
    for name in sorted(table.prices):
        p = table.prices[name]
        rows.append(
            (
                name,
                _per_mtok(p.input),
                _per_mtok(p.cached_input),
                _per_mtok(p.output),
                _per_mtok(p.batch_input),
                _per_mtok(p.batch_output),
                "?" if p.max_output is None else f"{p.max_output:,}",
                p.origin if p.origin != "bundled" else f"bundled ({p.source})",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"USD per 1M tokens, as of {table.as_of}"]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
        cells.append(r[-1])
        out.append("  ".join(cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    if table.sources:
        out.append("sources: " + "; ".join(f"{k}: {v}" for k, v in table.sources.items()))
    return "\n".join(out)


def _per_mtok(pico_per_token: int) -> str:
    return format_exact(pico_per_token * 10**6)


def prices_json(table: PriceTable) -> dict[str, Any]:
    return {
        "as_of": table.as_of,
        "user_file": table.user_file,
        "models": {
            name: {
                "input": _per_mtok(p.input),
                "cached_input": _per_mtok(p.cached_input),
                "output": _per_mtok(p.output),
                "batch_input": _per_mtok(p.batch_input),
                "batch_output": _per_mtok(p.batch_output),
                "max_output": p.max_output,
                "source": p.source,
                "origin": p.origin,
            }
            for name, p in sorted(table.prices.items())
        },
    }


# -- export ------------------------------------------------------------------------------------


def export_lines(job: Job, rows: Iterable[ExportRow]) -> Iterator[str]:
    """The Batch API output format, one line per request, in job-file order."""
    prefix = job.sha256[:12]
    for row in rows:
        yield _export_line(prefix, row)


def _export_line(prefix: str, r: ExportRow) -> str:
    rid = "batch_req_" + hashlib.sha256(f"{prefix}:{r.seq}".encode()).hexdigest()[:24]
    head = f'{{"id":"{rid}","custom_id":{json.dumps(r.custom_id, ensure_ascii=False)},'
    if r.has_result and r.status_code is not None:
        body = r.body if r.body is not None else "null"
        if r.state != "done" and not _is_json(body):
            # An HTML error page or a truncated body: keep it, as the message of an error.
            body = json.dumps({"error": {"message": body, "code": r.error_code}})
        response = (
            f'{{"status_code":{r.status_code},"request_id":{json.dumps(r.api_request_id)},'
            f'"body":{body}}}'
        )
        return f'{head}"response":{response},"error":null}}'
    if r.has_result:
        code, message = r.error_code or "request_failed", r.error_message or "request failed"
    elif r.state in ("pending", "reserved"):
        code = "not_completed"
        message = r.last_error or "not sent yet: run the job again (it may have reached its cap)"
    else:
        code, message = "unknown", r.last_error or "no result recorded"
    error = json.dumps({"code": code, "message": message}, ensure_ascii=False)
    return f'{head}"response":null,"error":{error}}}'


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
