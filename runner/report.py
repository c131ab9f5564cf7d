"""Everything batchrun prints about a job: estimates, status, prices and the export.

Text for people, JSON (exact decimal strings for money) for programs. It formats values that
the plan, the run and the store computed; it never queries or writes anything itself.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from .budgets import BudgetBooks, JobDraw, describe, iso
from .calibration import PPM
from .deadline import DeadlinePlan
from .durations import span
from .endpoints import BATCH_WINDOW
from .money import format_exact, format_interval, format_money, format_range, format_usd
from .plan import Estimate, Plan, Totals, projected_pico
from .pricing import TIER_FIELDS, PriceTable
from .projection import Projection, Range
from .settings import Limits
from .store import BatchInfo, JobStatus, RunnerInfo


def _count(n: int, noun: str) -> str:
    """``1 request``, ``2,000 requests``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# -- price -------------------------------------------------------------------------------------


def format_plan(
    plan: Plan, table: PriceTable, rpm: int | None, tpm: int | None, via: str | None = None
) -> str:
    """The ``batchrun price`` table: per model and in total, at synchronous prices (and a line
    with the Batch API's), or at Batch API prices only (``via="batch"``)."""
    header = ("model", "requests", "input tok", "output limit", "no limit", "floor", "worst case")
    rows = [header]
    batch = via == "batch"

    def row(name: str, t: Totals) -> tuple[str, ...]:
        return (
            name,
            f"{t.requests:,}",
            f"{t.input_tokens:,}",
            f"{t.output_limit_tokens:,}",
            f"{t.unlimited_requests:,}",
            format_usd(t.batch_floor_pico if batch else t.floor_pico),
            format_usd(t.batch_worst_pico if batch else t.worst_pico),
        )

    for model in sorted(plan.by_model):
        rows.append(row(model, plan.by_model[model]))
    rows.append(row("total", plan.total))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{plan.path}: {_count(plan.total.requests, 'request')}, prices as of {table.as_of}"]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("floor = input tokens only; worst case = input + every output limit.")
    total = plan.total
    if batch:
        lines.append(
            f"at Batch API prices; at synchronous prices: floor {format_usd(total.floor_pico)}, "
            f"worst case {format_usd(total.worst_pico)}."
        )
    elif via is None:
        lines.append(
            f"Batch API (--via batch, up to 24 h): floor {format_usd(total.batch_floor_pico)}, "
            f"worst case {format_usd(total.batch_worst_pico)} (saves "
            f"{format_usd(total.worst_pico - total.batch_worst_pico)})."
        )
    if plan.tiers:
        lines.append(tier_line(plan.tiers))
    if plan.total.unlimited_requests:
        t = plan.total
        share = t.unlimited_worst_pico / t.worst_pico if t.worst_pico else 0.0
        lines.append(
            f"warning: {t.unlimited_requests:,} request(s) set no output limit; they are priced "
            f"at their model's largest possible output ({t.unlimited_limit_tokens:,} tokens): "
            f"{format_usd(t.unlimited_worst_pico)} of the worst case ({share:.0%}). Setting "
            "max_completion_tokens (or max_output_tokens) lowers it."
        )
    if plan.approximate_parts:
        parts = ", ".join(f"{k} ({n:,})" for k, n in sorted(plan.approximate_parts.items()))
        lines.append(
            f"note: {plan.total.approximate_requests:,} request(s) include parts whose tokens "
            f"are estimated, not exact: {parts}."
        )
    if plan.total.unbounded_requests:
        lines.append(
            f"warning: {plan.total.unbounded_requests:,} request(s) continue a stored conversation"
            " (previous_response_id, conversation): the earlier turns are billed as input, so "
            "their cost is unbounded; `run` sends them only with --allow-unbounded."
        )
    if batch:
        lines.append(
            f"Batch API: each batch has a {BATCH_WINDOW} completion window; most finish far "
            "sooner, but nothing shorter is promised and a batch can sit in_progress for hours "
            "when capacity is short (rate limits do not set its time)."
        )
        return "\n".join(lines)
    minimum = plan.min_seconds(rpm, tpm)
    sustained = plan.sustained_seconds(rpm, tpm)
    if minimum is not None and sustained is not None:
        limits = " and ".join(x for x in (rpm and f"{rpm:,} RPM", tpm and f"{tpm:,} TPM") if x)
        lines.append(
            f"minimum wall time at {limits}: {span(minimum)} with the limits' full first "
            f"minute, {span(sustained)} at their sustained rate (a key already in use)"
        )
    return "\n".join(lines)


def tier_line(tiers: dict[str, int]) -> str:
    """Which requests the plan priced at a service tier's own prices."""
    parts = []
    for tier, n in sorted(tiers.items()):
        how = " (the Batch API's unless the table has flex prices)" if tier == "flex" else ""
        parts.append(f"{n:,} at {tier} prices{how}")
    return f"service tiers: {', '.join(parts)}; the rest at standard prices."


def _totals_json(t: Totals) -> dict[str, Any]:
    d: dict[str, Any] = t.as_dict()
    d["floor_usd"] = format_exact(d.pop("floor_pico"))
    d["worst_usd"] = format_exact(d.pop("worst_pico"))
    d["unlimited_worst_usd"] = format_exact(d.pop("unlimited_worst_pico"))
    return d


def plan_json(
    plan: Plan, table: PriceTable, rpm: int | None, tpm: int | None, via: str | None = None
) -> dict[str, Any]:
    total = plan.total
    return {
        "file": plan.path,
        "via": via,
        "sync": {
            "floor_usd": format_exact(total.floor_pico),
            "worst_usd": format_exact(total.worst_pico),
        },
        "batch": {
            "floor_usd": format_exact(total.batch_floor_pico),
            "worst_usd": format_exact(total.batch_worst_pico),
        },
        "sha256": plan.sha256,
        "prices_as_of": table.as_of,
        "models": {m: _totals_json(t) for m, t in sorted(plan.by_model.items())},
        "total": _totals_json(plan.total),
        "approximate_parts": plan.approximate_parts,
        "service_tiers": dict(sorted(plan.tiers.items())),
        "rate_limits": {"rpm": rpm, "tpm": tpm},
        "min_seconds": plan.min_seconds(rpm, tpm),
        "sustained_seconds": plan.sustained_seconds(rpm, tpm),
    }


# -- run ---------------------------------------------------------------------------------------


def _range(r: Range) -> str:
    return format_range(r.total_pico, r.low_pico, r.high_pico)


def format_projection(p: Projection, via: str | None = None) -> str:
    """What ``price --sample`` prints: the projected cost per model and in total with its
    interval, beside the floor and the worst case, at the lane's prices (and the other's)."""
    batch = via == "batch"
    header = ("model", "requests", "sampled", "projected", f"{p.confidence:.0%} interval")
    rows = [header]
    for model in sorted(p.by_model):
        m = p.by_model[model]
        r = m.lane(batch)
        rows.append(
            (
                model, f"{m.requests:,}", f"{m.sampled:,}", format_usd(r.total_pico),
                format_interval(r.low_pico, r.high_pico),
            )
        )  # fmt: skip
    r = p.lane(batch)
    rows.append(
        (
            "total", f"{p.requests:,}", f"{p.sampled:,}", format_usd(r.total_pico),
            format_interval(r.low_pico, r.high_pico),
        )
    )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lane = "Batch API" if batch else "synchronous"
    lines = [
        f"projected at {lane} prices from {_count(p.sampled, 'result')} of "
        f"{_count(p.requests, 'request')}:"
    ]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    other = p.lane(not batch)
    lines.append(
        f"{'synchronous' if batch else 'Batch API (--via batch)'}: projected {_range(other)}; "
        f"floor {format_usd(p.floor_pico(not batch))}, worst case "
        f"{format_usd(p.worst_pico(not batch))}."
    )
    lines.append(
        f"{lane}: floor {format_usd(p.floor_pico(batch))}, worst case "
        f"{format_usd(p.worst_pico(batch))}."
    )
    lines.append(f"method: {p.method}.")
    return "\n".join(lines)


def projection_json(p: Projection, via: str | None = None) -> dict[str, Any]:
    """``--json``'s ``projection``: exact dollar strings at the lane's prices, and the other
    lane's beside them."""
    batch = via == "batch"

    def lane(r: Range) -> dict[str, str]:
        return {
            "total_usd": format_exact(r.total_pico),
            "low_usd": format_exact(r.low_pico),
            "high_usd": format_exact(r.high_pico),
        }

    return {
        **lane(p.lane(batch)),
        "lane": "batch" if batch else "sync",
        "sampled": p.sampled,
        "requests": p.requests,
        "confidence": p.confidence,
        "method": p.method,
        "floor_usd": format_exact(p.floor_pico(batch)),
        "worst_usd": format_exact(p.worst_pico(batch)),
        "sync": lane(p.sync),
        "batch": lane(p.batch),
        "by_model": {
            model: {
                **lane(m.lane(batch)),
                "requests": m.requests,
                "sampled": m.sampled,
                "floor_usd": format_exact(m.floor(batch)),
                "worst_usd": format_exact(m.worst(batch)),
            }
            for model, m in sorted(p.by_model.items())
        },
    }


def format_estimate(est: Estimate, plan: Plan | None, table: PriceTable, limits: Limits) -> str:
    """What ``run`` prints before sending: the estimate against the cap."""
    lines = []
    batch = est.via == "batch"
    lane = " at Batch API prices" if batch else ""
    if plan is not None:
        lines.append(format_plan(plan, table, limits.rpm, limits.tpm, via=est.via))
        lines.append(f"imported as job {est.job_id} into {est.db}")
    else:
        lines.append(
            f"resuming job {est.job_id} ({_count(est.requests, 'request')}, floor "
            f"{format_money(est.floor_pico)}, worst case {format_money(est.worst_pico)}{lane}) "
            f"from {est.db}"
        )
        if batch:
            lines.append(
                f"(at synchronous prices: floor {format_money(est.sync_floor_pico)}, worst "
                f"case {format_money(est.sync_worst_pico)})"
            )
    if est.orphans:
        lines.append(
            f"{est.orphans:,} request(s) were in flight when a run died: charged "
            f"{format_money(est.orphan_pico)} at worst case (their outcome is unknown) and "
            "queued again"
        )
    if est.sampling:
        return "\n".join(lines)  # the sample's own cap is in its note
    if est.projected is not None and est.pending:
        total, low, high = est.projected
        lines.append(
            f"projected {format_range(total, low, high, ', 95%')} for the "
            f"whole job, from the results in; worst case {format_usd(est.worst_pico)}"
        )
    left = (
        f"{est.fits:,} of {est.pending:,} pending request(s) fit under the cap at worst case"
        f"{lane} ({format_money(est.pending_worst_pico)} for all of them)"
        if est.pending
        else "nothing is left to send"
        + (
            f"; waiting for {_count(est.in_batches, 'request')} in {est.open_batches:,} open "
            "batch(es) (no question: nothing new is sent)"
            if est.in_batches
            else ""
        )
    )
    lines.append(
        f"cap {format_money(est.cap_pico)}: spent so far {format_money(est.spent_pico)}; {left}"
    )
    if not est.finishes:
        projected = (
            f"; projected at the output seen so far ~{est.projected_fits:,}"
            if est.projected_fits is not None
            else ""
        )
        lines.append(
            f"the cap covers ~{est.fits:,} of {est.pending:,} requests at worst case{projected}"
        )
    return "\n".join(lines)


def confirm_question(est: Estimate) -> str:
    """The question ``run`` asks on a terminal before its first request."""
    if est.sample:
        return (
            f"Send a sample of {_count(est.sample, 'request')}, worst case "
            f"{format_money(est.sample_worst_pico)}?"
        )
    worst = min(est.pending_worst_pico, est.cap_pico - est.spent_pico)
    send = _count(est.pending, "request")
    if not est.finishes:
        send = f"up to {est.fits:,} of {send}"
    projected = ""
    if est.projected is not None:
        # What is still to spend: the projection less what is spent.
        total, low, high = (max(0, x - est.spent_pico) for x in est.projected)
        projected = f"projected {format_range(total, low, high)}, "
    budget = ""
    if est.budget_name is not None:
        budget = (
            f" (budget {est.budget_name}: {format_money(est.budget_left_pico)} left "
            f"{est.budget_period})"
        )
    missed = (
        "The deadline cannot be met even all sync at the limits: " if est.deadline_missed else ""
    )
    return (
        f"{missed}Send {send}, {projected}worst case {format_money(worst)} of cap "
        f"{format_money(est.cap_pico)}{budget}"
        + (", all sync, as fast as the limits allow?" if est.deadline_missed else "?")
    )


# -- status ------------------------------------------------------------------------------------


def _via(s: JobStatus) -> str:
    """The lane a job's money is shown in: the Batch API's once it has used batches."""
    return "batch" if s.batches else "sync"


def _bounds(s: JobStatus) -> tuple[int, int]:
    """The job's floor and worst case at its lane's prices (batch prices need the price table:
    without the projection's, the synchronous figures)."""
    if _via(s) == "batch" and s.projection is not None:
        return s.projection.floor_pico(True), s.projection.worst_pico(True)
    return s.job.floor_pico, s.job.worst_pico


def _lane_note(s: JobStatus) -> str:
    if _via(s) == "batch" and s.projection is not None:
        return f" at Batch API prices (synchronous: worst case {format_money(s.job.worst_pico)})"
    return ""


def _lane_of(s: JobStatus) -> Range:
    """The job's projection at its lane, on top of what it really spent."""
    assert s.projection is not None
    return s.projection.lane(_via(s) == "batch").after(s.spend.settled_pico)


def projected_text(s: JobStatus) -> str:
    """The projected total, with its interval while requests are open (then it is exact)."""
    if s.projection is None:
        return format_money(projected_pico(s))
    r = _lane_of(s)
    if r.low_pico == r.high_pico:
        return format_money(r.total_pico)
    return format_range(r.total_pico, r.low_pico, r.high_pico, ", 95%")


def status_json(s: JobStatus) -> dict[str, Any]:
    j = s.job
    return {
        "job": j.id,
        "path": j.path,
        "sha256": j.sha256,
        "state": _state(s),  # who runs it: "runners"
        "requests": j.requests,
        "by_state": s.states,
        "cap_usd": format_exact(j.cap_pico),
        "spent_usd": format_exact(s.spend.settled_pico),
        "reserved_usd": format_exact(s.spend.reserved_pico),
        "unknown_outcome_usd": format_exact(s.unknown_pico),
        "lane": _via(s),
        "estimate_floor_usd": format_exact(_bounds(s)[0]),
        "estimate_worst_usd": format_exact(_bounds(s)[1]),
        "sync_estimate_worst_usd": format_exact(j.worst_pico),
        "projected_total_usd": format_exact(
            projected_pico(s) if s.projection is None else _lane_of(s).total_pico
        ),
        "projection": None if s.projection is None else projection_json(s.projection, _via(s)),
        "input_tokens": s.input_tokens,
        "cached_tokens": s.cached_tokens,
        "output_tokens": s.output_tokens,
        "reasoning_tokens": s.reasoning_tokens,
        "errors": s.errors,
        "reused": s.reused,
        "reused_usd": format_exact(s.reused_pico),
        "usage_missing": s.usage_missing,
        "outputs_not_json": s.outputs_not_json,
        "outputs_mismatch": s.outputs_mismatch,
        "unpriced_models": s.unpriced_models,
        "unpriced_tiers": s.unpriced_tiers,
        "by_model": {m: _group_json(g) for m, g in s.by_model.items()},
        "by_endpoint": {u: _group_json(g) for u, g in s.by_endpoint.items()},
        "budgets": [_status_budget_json(b, d) for b, d in s.budgets],
        "lanes": _lanes_json(s),
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
                "rate_share": r.share if r.holding and not r.expired else 0.0,
                "heartbeat_expired": r.expired,
            }
            for r in s.runners
        ],
        "batches": [_batch_json(b) for b in s.batches],
        "calibration": {
            m: {
                "input_ratio": _ppm(c.input_ppm),
                "output_to_limit_ratio": _ppm(c.output_ppm),
                "results": c.results,
            }
            for m, c in sorted(s.calibration.items())
        },
    }


def unpriced_lines(s: JobStatus) -> list[str]:
    """Results the price table could not price (their books hold their worst case)."""
    lines = []
    if s.unpriced_models:
        named = ", ".join(f"{m!r} ({n:,})" for m, n in s.unpriced_models.items())
        lines.append(
            f"{sum(s.unpriced_models.values()):,} response(s) named a model the price table "
            f"does not know: {named}; booked at worst case (add its prices with --prices, or "
            "stop at the first with --strict-models)"
        )
    if s.unpriced_tiers:
        lines.append(
            f"{s.unpriced_tiers:,} response(s) reported a service tier without prices; booked "
            "at worst case"
        )
    return lines


def _ppm(value: int) -> str:
    """A ratio in ppm as an exact decimal string."""
    return str(Decimal(value) / PPM)


def _saved(s: JobStatus) -> int | None:
    """What the job's results cost less than the same results at synchronous prices."""
    if s.projection is None:
        return None
    return max(0, s.projection.sync.known_pico - s.spend.settled_pico)


def lanes_line(s: JobStatus) -> str:
    """How the results came back: through batches and the synchronous API, what each cost,
    when a ``--deadline`` run switched, and what that saved against all-sync."""
    parts = [
        f"{lane}: {n:,} result(s), {format_money(cost)}"
        for lane, (n, cost) in sorted(s.lanes.items())
    ]
    if s.switched_at is not None:
        parts.append(f"switched to sync at {_when(s.switched_at)}")
    saved = _saved(s)
    if saved is not None:
        parts.append(f"{format_money(saved)} less than all at synchronous prices")
    return "; ".join(parts)


def _lanes_json(s: JobStatus) -> dict[str, Any] | None:
    if not s.lanes:
        return None
    saved = _saved(s)
    return {
        **{
            lane: {"results": n, "cost_usd": format_exact(cost)}
            for lane, (n, cost) in sorted(s.lanes.items())
        },
        "switched_at": s.switched_at,
        "saved_usd": None if saved is None else format_exact(saved),
    }


def calibration_lines(s: JobStatus) -> list[str]:
    """How the server's bills compare with what batchrun counted, per model, where they differ:
    what the cap's reservations are scaled by."""
    return [line for m, c in sorted(s.calibration.items()) if (line := c.describe(m)) is not None]


def _group_json(g: dict[str, int]) -> dict[str, Any]:
    return {
        "requests": g["requests"],
        "input_tokens": g["input_tokens"],
        "output_tokens": g["output_tokens"],
        "cost_usd": format_exact(g["cost_pico"]),
    }


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(sep=" ", timespec="seconds")


def _live(s: JobStatus) -> list[RunnerInfo]:
    """The runners at work: registered and still beating."""
    return [r for r in s.runners if not r.expired]


def _state(s: JobStatus) -> str:
    """``running`` while a live runner holds the job; ``interrupted`` when its runners are gone
    (killed, cut off) and none took over yet; else the state its last run left."""
    if _live(s):
        return "running"
    return "interrupted" if s.runners else s.job.state


def _running(s: JobStatus) -> str:
    """The job's state, and who runs it or what to do."""
    state = _state(s)
    if state == "interrupted":
        return "interrupted (its runner is gone: run the same command again to resume)"
    if state != "running":
        return state
    who = ", ".join(f"pid {r.pid} on {r.host} since {_when(r.started_at)}" for r in _live(s))
    return f"running ({who})"


def _batch_json(b: BatchInfo) -> dict[str, Any]:
    return {
        "chunk": b.id,
        "batch_id": b.batch_id,
        "state": b.state,
        "status": b.status,
        "model": b.model,
        "endpoint": b.url,
        "requests": b.requests,
        "completed": b.completed,
        "failed": b.failed,
        "worst_usd": format_exact(b.worst_pico),
        "created_at": b.created_at,
        "expires_at": b.expires_at,
        "error": b.error,
    }


def _batch_lines(batches: list[BatchInfo]) -> list[str]:
    """``status``: the job's Batch API batches, one line each."""
    shown = batches[-20:]
    rows = [("batch", "status", "requests", "completed", "failed", "created", "expires")]
    for b in shown:
        rows.append(
            (
                b.batch_id or f"(chunk {b.id})",
                b.status or b.state if b.state != "abandoned" else "never created",
                f"{b.requests:,}",
                f"{b.completed:,}",
                f"{b.failed:,}",
                _when(b.created_at),
                _when(b.expires_at) if b.open else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    opened = sum(b.open for b in batches)
    lines = [f"  batches    {len(batches):,} ({opened:,} open)"]
    if len(batches) > len(shown):
        lines.append(f"    (the last {len(shown)} of them)")
    for r in rows:
        lines.append(
            "    " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        )
    return lines


def format_status(s: JobStatus) -> str:
    j = s.job
    states = ", ".join(f"{n:,} {k}" for k, n in sorted(s.states.items()))
    lines = [
        f"job {j.id}: {j.path}",
        f"  state      {_running(s)}; {j.requests:,} requests: {states}",
        f"  spend      {format_money(s.spend.settled_pico)} of cap {format_money(j.cap_pico)}"
        + (f" (+{format_money(s.spend.reserved_pico)} reserved)" if s.spend.reserved_pico else "")
        + (
            f"; includes {format_money(s.unknown_pico)} charged for unknown outcomes"
            if s.unknown_pico
            else ""
        ),
        f"  estimate   floor {format_money(_bounds(s)[0])}, worst case "
        f"{format_money(_bounds(s)[1])}{_lane_note(s)}, projected total {projected_text(s)}",
        f"  tokens     {s.input_tokens:,} in ({s.cached_tokens:,} cached),"
        f" {s.output_tokens:,} out ({s.reasoning_tokens:,} reasoning)",
    ]
    if s.reused:
        lines.append(
            f"  reused     {s.reused:,} result(s) copied from an earlier job "
            f"({format_money(s.reused_pico)}, not spent again)"
        )
    if s.usage_missing:
        lines.append(
            f"  usage      {s.usage_missing:,} result(s) came without readable usage: "
            "charged at worst case"
        )
    for line in unpriced_lines(s):
        lines.append(f"  unpriced   {line}")
    for line in calibration_lines(s):
        lines.append(f"  counting   {line}")
    for line in budget_lines(s):
        lines.append(f"  budget     {line}")
    if s.lanes:
        lines.append(f"  lanes      {lanes_line(s)}")
    for title, groups in (("models", s.by_model), ("endpoints", s.by_endpoint)):
        if len(groups) > 1 or title == "models":
            cost = ", ".join(
                f"{name} {format_money(g['cost_pico'])} ({g['requests']:,})"
                for name, g in groups.items()
            )
            if cost:
                lines.append(f"  {title:<11}{cost}")
    if s.errors:
        lines.append(
            "  errors     " + ", ".join(f"{k}: {n:,}" for k, n in sorted(s.errors.items()))
        )
    failed = s.states.get("failed", 0)
    if failed:
        lines.append(
            f"  failed     {failed:,} request(s) failed for good: `batchrun status --job {j.id} "
            f"--failed` lists them; `batchrun run --job {j.id} --retry-failed` sends them again"
        )
    invalid = invalid_outputs_line(s)
    if invalid:
        lines.append(f"  outputs    {invalid}")
    if s.runners:
        live = len(_live(s))
        gone = len(s.runners) - live
        lines.append(
            f"  runners    {live} live" + (f", {gone} gone (heartbeat expired)" if gone else "")
        )
        lines.extend(f"    {_runner_line(r)}" for r in s.runners)
    if s.batches:
        lines.extend(_batch_lines(s.batches))
    return "\n".join(lines)


def invalid_outputs_line(s: JobStatus) -> str | None:
    """``status``: the results whose outputs are not the JSON their requests asked for, and how
    to send them again (they were billed: sending them again is paid again)."""
    parts = []
    if s.outputs_mismatch:
        parts.append(f"{s.outputs_mismatch:,} output(s) do not match their JSON schema")
    if s.outputs_not_json:
        parts.append(f"{s.outputs_not_json:,} output(s) are not JSON")
    if not parts:
        return None
    return (
        f"{' and '.join(parts)} (billed, kept as results; their reasons are in the export's "
        f"error column): `batchrun run --job {s.job.id} --retry-failed --invalid` sends them "
        "again, paid again"
    )


def _runner_line(r: RunnerInfo) -> str:
    """One live runner: where it runs, since when, its last heartbeat, its load and share."""
    started = _when(r.started_at)
    head = f"#{r.id} {r.host} pid {r.pid} ({r.via}): started {started}, last heartbeat "
    if r.expired:
        held = f"; the next run takes over its {r.holding:,} claimed request(s)" * bool(r.holding)
        return f"{head}{r.seen_ago:.1f}s ago: gone (killed or cut off){held}"
    if r.via == "batch":  # no rate to share: its requests wait in batches at OpenAI
        return f"{head}{r.seen_ago:.1f}s ago, watching {r.in_flight:,} request(s) in open batches"
    share = f"rate share 1/{round(1 / r.share)}" if r.holding else "idle (nothing claimed)"
    return (
        f"{head}{r.seen_ago:.1f}s ago, {r.in_flight:,} in flight ({r.holding:,} claimed), {share}"
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
    tiers = [
        f"{name} {tier} {' / '.join(_per_mtok(r) for r in p.rates(tier=tier))}"
        for name, p in sorted(table.prices.items())
        for tier in ("priority", "flex")
        if getattr(p, f"{tier}_input") is not None
    ]
    if tiers:  # flex without prices of its own bills at the Batch API's; priority is refused
        out.append("service tiers (input / cached / output): " + "; ".join(tiers))
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
                **{
                    key: _per_mtok(value)
                    for key in TIER_FIELDS
                    if (value := getattr(p, key)) is not None
                },
            }
            for name, p in sorted(table.prices.items())
        },
    }


# -- failed requests -------------------------------------------------------------------------


def format_failed(job_id: int, failed: list[tuple[str, str | None, str | None]]) -> str:
    """``status --failed``: one line per failed request, custom_id first."""
    if not failed:
        return f"job {job_id}: no failed requests"
    lines = [f"job {job_id}: {len(failed):,} failed request(s)"]
    for custom_id, code, message in failed:
        lines.append(f"{custom_id}\t{code or 'error'}\t{message or ''}")
    return "\n".join(lines)


def failed_json(job_id: int, failed: list[tuple[str, str | None, str | None]]) -> dict[str, Any]:
    return {
        "job": job_id,
        "failed": [{"custom_id": c, "code": code, "message": m} for c, code, m in failed],
    }


# -- budgets -----------------------------------------------------------------------------------


def budget_summary(b: BudgetBooks) -> str:
    """One line: "budget team: $5.00 of $100.00 this month; resets 2027-01-01 00:00 UTC"."""
    return describe(b)


def budget_fit(
    b: BudgetBooks, worst_pico: int, projected: tuple[int, int, int] | None = None
) -> str:
    """``price --budget``: whether the job's worst case (what it still has to spend) fits what
    the budget has left, and with a sample whether its projection does."""
    left = format_money(b.left_pico)

    def fits(amount: int) -> str:
        return "fits" if amount <= b.left_pico else "does not fit"

    worst = format_money(worst_pico)
    verdict = f"the job's worst case {worst} {fits(worst_pico)} in the {left} left"
    if projected is not None:
        total, low, high = projected
        how = (
            "fits, even at the high end"
            if high <= b.left_pico
            else f"{fits(total)} as projected, {fits(high)} at the high end"
        )
        shown = format_range(total, low, high)
        verdict += f"; projected {shown} {how}"
    return f"{describe(b)}: {verdict}"


def _draw_json(d: JobDraw) -> dict[str, Any]:
    return {
        "job": d.job_id,
        "path": d.path,
        "spent_usd": format_exact(d.settled_pico),
        "reserved_usd": format_exact(d.reserved_pico),
        "unknown_outcome_usd": format_exact(d.unknown_pico),
    }


def budget_json(b: BudgetBooks, draws: list[JobDraw] | None = None) -> dict[str, Any]:
    """A budget's period as ``budget show --json`` prints it (exact amounts as strings)."""
    out: dict[str, Any] = {
        "name": b.budget.name,
        "amount_usd": format_exact(b.budget.amount_pico),
        "per": b.budget.per,
        "tz": b.budget.tz,
        "default": b.budget.is_default,
        "period_start": iso(b.period.start, b.budget.tz) if b.period.end is not None else None,
        "resets_at": iso(b.period.end, b.budget.tz),
        "spent_usd": format_exact(b.settled_pico),
        "reserved_usd": format_exact(b.reserved_pico),
        "unknown_outcome_usd": format_exact(b.unknown_pico),
        "left_usd": format_exact(b.left_pico),
    }
    if draws is not None:
        out["jobs"] = [_draw_json(d) for d in draws]
    return out


def format_budget(b: BudgetBooks, draws: list[JobDraw]) -> str:
    """``budget show``: the period's books and the jobs drawing on it."""
    lines = [describe(b) + (" (the database's default)" if b.budget.is_default else "")]
    lines.append(
        f"  spent      {format_money(b.settled_pico)}"
        + (f" (includes {format_money(b.unknown_pico)} charged for unknown outcomes)"
           if b.unknown_pico else "")
    )  # fmt: skip
    lines.append(f"  reserved   {format_money(b.reserved_pico)} by requests in flight")
    lines.append(f"  left       {format_money(b.left_pico)}")
    for d in draws:
        extra = f" (+{format_money(d.reserved_pico)} reserved)" if d.reserved_pico else ""
        lines.append(f"  job {d.job_id:<6} {format_money(d.settled_pico)}{extra}  {d.path}")
    if not draws:
        lines.append("  no job has drawn on it this period")
    return "\n".join(lines)


def _status_budget_json(b: BudgetBooks, d: JobDraw) -> dict[str, Any]:
    return {
        **budget_json(b),
        "job_spent_usd": format_exact(d.settled_pico),
        "job_reserved_usd": format_exact(d.reserved_pico),
    }


def budget_lines(s: JobStatus) -> list[str]:
    """``status``: each budget the job draws on, and this job's part of its period."""
    return [
        f"{describe(b).removeprefix('budget ')}; this job {format_money(d.settled_pico)}"
        + (f" (+{format_money(d.reserved_pico)} reserved)" if d.reserved_pico else "")
        for b, d in s.budgets
    ]


def format_deadline_plan(plan: DeadlinePlan) -> str:
    """The ``--deadline`` plan, as ``run --via auto`` shows it before sending and ``price
    --deadline`` prints it: what goes where, by when, and the cost range."""
    from .deadline import clock_text

    now = plan.now
    lines = [
        f"deadline {plan.spec + ': ' if plan.spec else ''}{clock_text(plan.deadline, now)}; "
        f"{plan.requests:,} request(s) not yet finished",
        f"  all by batch (Batch API prices): {format_usd(plan.batch_floor_pico)} floor, "
        f"{format_usd(plan.batch_worst_pico)} worst case; the Batch API promises only "
        f"{BATCH_WINDOW}",
        f"  all sync (standard prices):      {format_usd(plan.sync_floor_pico)} floor, "
        f"{format_usd(plan.sync_worst_pico)} worst case",
    ]
    flex = plan.flex
    if flex is not None:
        lines.append(
            f"  flex lane (service_tier flex; {', '.join(flex.models)}): {flex.requests:,} "
            f"request(s) at flex prices: {format_usd(flex.floor_pico)} floor, "
            f"{format_usd(flex.worst_pico)} worst case; at the switch they go flex, then "
            "standard near the deadline (reserved at standard worst case: a flex request "
            "can be served, and billed, at standard)"
        )
    lines += [
        f"  cost range: {format_usd(plan.batch_floor_pico)} (all by batch, at floor) .. "
        f"{format_usd(plan.sync_worst_pico)} (all sync, at worst case)",
        f"  rate limits: {plan.limits.describe()}",
    ]
    if plan.tail_seconds is None:
        lines.append(
            "  sync tail: unknown until a rate limit is known (give --rpm/--tpm, or the run "
            "learns them from one synchronous request first)"
        )
        return "\n".join(lines)
    assert plan.planned is not None and plan.latest_switch is not None
    lines.append(
        f"  sync tail at the limits: {span(plan.tail_seconds)}; planned "
        f"{span(plan.planned)} ({plan.margin:.0%} margin for retries and 429s, plus "
        f"{plan.slack:g} s)"
    )
    if plan.cancel:
        lines.append(
            f"  cancelling the batches: up to {span(plan.cancel)} planned (--deadline-cancel; "
            "a cancelled batch's lines come back only when it has cancelled)"
        )
    if flex is not None and flex.planned is not None and plan.flex_fallback is not None:
        lines.append(
            f"  flex window: {span(flex.planned)} (the flex lane's {flex.requests:,} "
            f"request(s) at the limits, {span(flex.tail_seconds or 0)} with answers planned at "
            f"flex's slower latency, plus the margin); flex falls back to standard by "
            f"{clock_text(plan.flex_fallback, now)} at the latest"
        )
    if plan.feasible is False:
        lines.append(
            f"  the deadline cannot be met even all sync at the limits: the "
            f"{plan.requests:,} request(s) need {span(plan.tail_seconds)}, and "
            f"{span(max(0.0, plan.deadline - now))} are left; the run goes all sync at once, "
            "as fast as it can"
        )
    elif plan.latest_switch <= now:
        lines.append(
            "  latest switch: now (the margin leaves the batches no time): all sync at once"
        )
    else:
        lines.append(
            f"  latest switch: {clock_text(plan.latest_switch, now)}: batches still open then "
            "are cancelled (what they finished is kept, billed at batch prices) and the rest "
            "goes sync; batches that finish sooner finish the job at half price"
        )
    return "\n".join(lines)


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")


def deadline_plan_json(plan: DeadlinePlan) -> dict[str, Any]:
    """The ``--deadline`` plan for ``--json`` (exact dollar strings, epoch seconds)."""
    return {
        "deadline": plan.deadline,
        "deadline_iso": _iso(plan.deadline),
        "spec": plan.spec or None,
        "now": plan.now,
        "requests": plan.requests,
        "tokens": plan.weight,
        "batch": {
            "floor_usd": format_exact(plan.batch_floor_pico),
            "worst_usd": format_exact(plan.batch_worst_pico),
        },
        "sync": {
            "floor_usd": format_exact(plan.sync_floor_pico),
            "worst_usd": format_exact(plan.sync_worst_pico),
        },
        "cost_range_usd": [format_exact(plan.batch_floor_pico), format_exact(plan.sync_worst_pico)],
        "limits": {"rpm": plan.limits.rpm, "tpm": plan.limits.tpm, "source": plan.limits.source},
        "sync_tail_seconds": plan.tail_seconds,
        "planned_seconds": plan.planned,
        "margin": plan.margin,
        "slack_seconds": plan.slack,
        "latest_switch": plan.latest_switch,
        "latest_switch_iso": _iso(plan.latest_switch),
        "cancel_seconds": plan.cancel,
        "flex": None
        if plan.flex is None
        else {
            "models": list(plan.flex.models),
            "requests": plan.flex.requests,
            "tokens": plan.flex.weight,
            "floor_usd": format_exact(plan.flex.floor_pico),
            "worst_usd": format_exact(plan.flex.worst_pico),
            "tail_seconds": plan.flex.tail_seconds,
            "window_seconds": plan.flex.planned,
            "fallback_by": plan.flex_fallback,
            "fallback_by_iso": _iso(plan.flex_fallback),
        },
        "feasible": plan.feasible,
    }
