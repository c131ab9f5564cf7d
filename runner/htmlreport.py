"""The run report: one self-contained HTML page about a job, for the morning after.

It formats values the store computed (``JobStatus`` and the bucketed ``Timeline``) into charts
drawn by plotly, whose JavaScript is inlined once, so the page opens offline and fetches
nothing. It never queries anything itself. The headline numbers are ``status_json`` of the same
status, shown as a table and embedded as JSON (``<script id="headline">``), so a program reading
the page gets exactly what ``batchrun status --json`` prints.

plotly is imported here and only here: ``batchrun report`` imports this module lazily, so no
other command pays for it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import __version__
from .budgets import describe
from .money import PICO_PER_USD, format_interval, format_money, format_range, format_usd
from .report import (
    budget_lines,
    calibration_lines,
    lanes_line,
    projected_text,
    status_json,
)
from .store import JobStatus

if TYPE_CHECKING:
    from .store.timeline import Buckets, Timeline

# The charts, in page order: (div id, heading). Tests look for every one.
CHARTS = (
    ("chart-spend", "Spend against the cap"),
    ("chart-throughput", "Throughput"),
    ("chart-latency", "Latency"),
    ("chart-errors", "Errors by kind"),
    ("chart-cost", "Cost by model"),
)
RATE_LIMIT = "rate_limit"  # the error kind of an attempt answered with a rate-limit 429
_PERIOD_LABEL = {"rate_limited": "paused for rate limits", "unreachable": "API unreachable"}
_PERIOD_COLOUR = {"rate_limit": "#ff8c00", "rate_limited": "#d62728", "unreachable": "#7f7f7f"}
# typesetMath off: a title with two dollar amounts is text, not LaTeX waiting for MathJax.
_CONFIG = {"displaylogo": False, "responsive": True, "typesetMath": False}
_HEIGHT = "380px"
_DOLLARS = {"tickprefix": "$", "tickformat": ",.6~f"}  # $0.0005, not 500µ


def render(
    status: JobStatus,
    timeline: Timeline,
    *,
    db: str,
    generated_at: float,
    budgets: list[tuple[Any, dict[int, str], list[tuple[int, float, int]]]] | None = None,
    projections: list[tuple[float, Any]] | None = None,
) -> str:
    """The whole page, as text. ``budgets``: what ``Job.budget_spend`` gives, for a chart of
    each budget's period (the jobs drawing on it, stacked, against its limit)."""
    headline = status_json(status)
    figures = {
        "chart-spend": _spend(status, timeline),
        "chart-throughput": _throughput(timeline),
        "chart-latency": _latency(timeline),
        "chart-errors": _errors(timeline),
        "chart-cost": _cost(status),
    }
    charts = list(CHARTS)
    if status.batches:
        # Results of a batch arrive at once when it ends: a rate from their download times
        # would be fiction. The batches' own timeline instead.
        figures["chart-batches"] = _batch_timeline(status, timeline)
        charts[charts.index(("chart-throughput", "Throughput"))] = ("chart-batches", "Batches")
    if projections:
        figures["chart-projection"] = _projection(status, projections)
        charts.insert(1, ("chart-projection", "What the job will cost, as projected over time"))
    for k, (books, draws, spend) in enumerate(budgets or []):
        div_id = f"chart-budget-{k}"
        figures[div_id] = _budget(books, draws, spend)
        charts.append((div_id, f"Budget {books.budget.name}: this period, every job"))
    sections = []
    for i, (div_id, heading) in enumerate(charts):
        chart = figures[div_id].to_html(
            full_html=False,
            include_plotlyjs=i == 0,  # plotly.js inlined once, before the first chart
            include_mathjax=False,
            div_id=div_id,
            config=_CONFIG,
            default_height=_HEIGHT,
        )
        sections.append(
            f'<section class="chart"><h2>{html.escape(heading)}</h2>'
            f'<p class="explain">{_EXPLAIN.get(div_id, _BUDGET_EXPLAIN)}</p>{chart}</section>'
        )
    job = status.job
    title = f"batchrun report: job {job.id} ({job.path})"
    return _PAGE.format(
        title=html.escape(title),
        heading=html.escape(title),
        about=html.escape(_about(timeline, db, generated_at)),
        cards=_cards(status, timeline),
        charts="\n".join(sections),
        table=_headline_table(headline),
        headline_json=_script_json(headline),
        version=html.escape(__version__),
    )


# -- the figures ---------------------------------------------------------------------------------


def _local(epoch: float) -> str:
    """A time for plotly's date axis, in this machine's time zone (the axis says which)."""
    return datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="milliseconds")


def _zone(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).astimezone().tzname() or "local time"


def _usd(pico: int) -> float:
    return pico / PICO_PER_USD


def _middles(b: Buckets) -> list[str]:
    return [_local(b.edge(i) + b.width / 2) for i in range(b.count)]


def _layout(fig: go.Figure, title: str, b: Buckets | None, **extra: Any) -> go.Figure:
    layout: dict[str, Any] = {
        "title": {"text": html.escape(title), "x": 0, "xanchor": "left"},
        "template": "plotly_white",
        "margin": {"l": 70, "r": 30, "t": 60, "b": 40},
        "legend": {"orientation": "h", "x": 0, "y": -0.3, "yanchor": "top"},
        "showlegend": True,  # also for a single trace: a chart says what its line is
        "hovermode": "x unified",
    }
    fig.update_layout(**(layout | extra))
    if b is not None:
        fig.update_xaxes(title_text=f"time ({_zone(b.start)})", type="date")
    return fig


def _nothing(fig: go.Figure, text: str) -> go.Figure:
    """An empty chart still renders, with a word on why it is empty."""
    fig.add_annotation(
        text=html.escape(text), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
        font={"size": 16, "color": "#666"},
    )  # fmt: skip
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def _spend(status: JobStatus, t: Timeline) -> go.Figure:
    cap = status.job.cap_pico
    spent = status.spend.settled_pico
    share = f" ({100 * spent / cap:.3g}%)" if cap else ""
    title = f"Spent {format_usd(spent)} of cap {format_money(cap)}{share}"
    fig = go.Figure()
    b = t.buckets
    if b is None:
        return _nothing(_layout(fig, title, None), "nothing sent yet")
    edges = [_local(b.edge(i)) for i in range(b.count + 1)]
    total, unknown = [0], [0]
    for amount, charged in zip(t.spent_pico, t.unknown_pico, strict=True):
        total.append(total[-1] + amount)
        unknown.append(unknown[-1] + charged)
    fig.add_scatter(
        x=edges, y=[_usd(p) for p in total], name="spent (settled)", mode="lines",
        line={"color": "#1f77b4", "width": 2.5}, fill="tozeroy",
        customdata=[format_usd(p) for p in total], hovertemplate="%{customdata}",
    )  # fmt: skip
    if any(t.unknown_pico):
        fig.add_scatter(
            x=edges, y=[_usd(p) for p in unknown], name="of which unknown outcomes (worst case)",
            mode="lines", line={"color": "#d62728", "dash": "dot"},
            customdata=[format_usd(p) for p in unknown], hovertemplate="%{customdata}",
        )  # fmt: skip
    fig.add_scatter(
        x=[edges[0], edges[-1]], y=[_usd(cap)] * 2, name=f"cap {format_money(cap)}",
        mode="lines", line={"color": "#d62728", "dash": "dash", "width": 2},
        hovertemplate=f"cap {format_money(cap)}",
    )  # fmt: skip
    yaxis: dict[str, Any] = {"title": {"text": "USD"}, "rangemode": "tozero", **_DOLLARS}
    if cap > 5 * spent:  # the cap would flatten the spend: the cap line stays, off the top
        yaxis["range"] = [0, _usd(max(spent, 1)) * 1.15]
        fig.add_annotation(
            text=f"cap {format_money(cap)} is above this chart", showarrow=False, xref="paper",
            yref="paper", x=0, y=1, xanchor="left", yanchor="bottom", font={"color": "#d62728"},
        )  # fmt: skip
    return _layout(fig, title, b, yaxis=yaxis)


_BUDGET_EXPLAIN = (
    "What every job drawing on the budget has booked in its current period (settled costs and "
    "unknown outcomes at worst case), stacked, against the budget's limit."
)


def _budget(books: Any, draws: dict[int, str], spend: list[tuple[int, float, int]]) -> go.Figure:
    limit = books.budget.amount_pico
    title = describe(books)
    fig = go.Figure()
    if not spend:
        return _nothing(_layout(fig, title, None), "nothing booked in this period yet")
    times = sorted({t for _, t, _ in spend})
    start = [books.period.start] if books.period.start else [times[0]]
    for job_id in sorted({j for j, _, _ in spend}):
        booked = {t: a for j, t, a in spend if j == job_id}
        total, ys = 0, [0]
        for t in times:
            total += booked.get(t, 0)
            ys.append(total)
        fig.add_scatter(
            x=[_local(t) for t in start + times], y=[_usd(p) for p in ys], mode="lines",
            stackgroup="jobs", name=f"job {job_id} ({draws.get(job_id, '?')})",
            customdata=[format_usd(p) for p in ys], hovertemplate="%{customdata}",
        )  # fmt: skip
    edges = [_local(start[0]), _local(times[-1])]
    fig.add_scatter(
        x=edges, y=[_usd(limit)] * 2, name=f"limit {format_money(limit)}", mode="lines",
        line={"color": "#d62728", "dash": "dash", "width": 2},
        hovertemplate=f"limit {format_money(limit)}",
    )  # fmt: skip
    yaxis: dict[str, Any] = {"title": {"text": "USD"}, "rangemode": "tozero", **_DOLLARS}
    fig.update_xaxes(type="date")
    return _layout(fig, title, None, yaxis=yaxis)


def _projection(status: JobStatus, series: list[tuple[float, Any]]) -> go.Figure:
    batch = bool(status.batches)
    x = [_local(t) for t, _ in series]
    ranges = [p.lane(batch) for _, p in series]
    last = ranges[-1]
    title = (
        f"Projected {format_range(last.total_pico, last.low_pico, last.high_pico)} at "
        f"{'Batch API' if batch else 'synchronous'} prices"
    )
    fig = go.Figure()
    fig.add_scatter(
        x=x, y=[_usd(r.high_pico) for r in ranges], mode="lines", line={"width": 0},
        name="95% interval, high", showlegend=False, hoverinfo="skip",
    )  # fmt: skip
    fig.add_scatter(
        x=x, y=[_usd(r.low_pico) for r in ranges], mode="lines", line={"width": 0},
        fill="tonexty", fillcolor="rgba(31,119,180,0.2)", name="95% interval",
        customdata=[format_interval(r.low_pico, r.high_pico) for r in ranges],
        hovertemplate="%{customdata}",
    )  # fmt: skip
    fig.add_scatter(
        x=x, y=[_usd(r.total_pico) for r in ranges], mode="lines+markers", name="projected",
        line={"color": "#1f77b4", "width": 2.5},
        customdata=[format_usd(r.total_pico) for r in ranges], hovertemplate="%{customdata}",
    )  # fmt: skip
    spent = status.spend.settled_pico
    fig.add_scatter(
        x=[x[0], x[-1]], y=[_usd(spent)] * 2, mode="lines", name=f"spent {format_usd(spent)}",
        line={"color": "#2ca02c", "dash": "dash"}, hovertemplate=f"spent {format_usd(spent)}",
    )  # fmt: skip
    fig.update_xaxes(type="date")
    yaxis: dict[str, Any] = {"title": {"text": "USD"}, "rangemode": "tozero", **_DOLLARS}
    return _layout(fig, title, None, yaxis=yaxis)


def _throughput(t: Timeline) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    b = t.buckets
    if b is None:
        return _nothing(_layout(fig, "Throughput", None), "nothing sent yet")
    x = _middles(b)
    per_s = 1 / b.width
    window = min(SMOOTH, b.count)
    for counts, name, style in (
        (t.done, "requests done /s", {"color": "#2ca02c", "width": 2.5}),
        (t.failed, "requests failed /s", {"color": "#d62728"}),
        (t.attempts, "attempts sent /s", {"color": "#7f7f7f", "dash": "dot"}),
    ):
        fig.add_scatter(
            x=x, y=[n * per_s for n in _smooth(counts, window)], name=name, mode="lines",
            line=style, customdata=counts,
            hovertemplate=f"%{{y:.3g}} ({name}; %{{customdata}} in bucket)", secondary_y=False,
        )  # fmt: skip
    fig.add_scatter(
        x=x, y=[n * 60 / b.width for n in _smooth(t.tokens, window)], name="tokens /min",
        mode="lines", line={"color": "#9467bd"}, customdata=t.tokens,
        hovertemplate="%{y:,.0f} tokens/min (%{customdata} in bucket)", secondary_y=True,
    )  # fmt: skip
    notes = []
    limited = t.errors.get(RATE_LIMIT, [0] * b.count)
    if any(limited):
        notes.append(f"{sum(limited):,} rate-limit 429s")
    first = True
    for i, (n, sent) in enumerate(zip(limited, t.attempts, strict=True)):
        if n:  # the larger the share of the bucket's attempts that met a 429, the darker
            alpha = 0.12 + 0.4 * n / max(sent, 1)
            _shade(fig, b.edge(i), b.edge(i + 1), "429s", "rate_limit", alpha, legend=first)
            first = False
    for period, spans in t.periods.items():
        label = _PERIOD_LABEL.get(period, period)
        for k, (start, end) in enumerate(spans):
            _shade(fig, start, end, label, period, 0.3, legend=k == 0)
        if spans:
            seconds = sum(end - start for start, end in spans)
            notes.append(f"{label} {seconds:,.1f}s in all")
    if window > 1:
        notes.insert(0, f"rates averaged over {window} buckets, {_seconds(window * b.width)}")
    title = "Throughput" + (" (" + "; ".join(notes) + ")" if notes else "")
    fig = _layout(fig, title, b)
    fig.update_yaxes(title_text="requests / s", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="tokens / min", rangemode="tozero", secondary_y=True)
    return fig


_STATUS_COLOUR = {
    "validating": "#bcbd22", "in_progress": "#1f77b4", "finalizing": "#17becf",
    "completed": "#2ca02c", "failed": "#d62728", "expired": "#ff7f0e", "cancelling": "#9467bd",
    "cancelled": "#8c564b",
}  # fmt: skip


def _batch_timeline(status: JobStatus, t: Timeline) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        row_heights=[0.4, 0.6])  # fmt: skip
    total = sum(b.total or b.requests for b in status.batches)
    done = sum(b.completed or 0 for b in status.batches)
    title = f"{len(status.batches):,} batch(es): {done:,} of {total:,} requests completed"
    if not t.batch_polls:
        return _nothing(_layout(fig, title, None), "no poll recorded yet")
    names = {b.id: b.batch_id or f"chunk {b.id}" for b in status.batches}
    shown: set[str] = set()
    for chunk, polls in sorted(t.batch_polls.items()):
        name = names.get(chunk, f"chunk {chunk}")
        for k, (at, state, *_counts) in enumerate(polls):
            end = polls[k + 1][0] if k + 1 < len(polls) else at
            fig.add_scatter(
                x=[_local(at), _local(end)], y=[name, name], mode="lines+markers",
                line={"color": _STATUS_COLOUR.get(state, "#7f7f7f"), "width": 14},
                marker={"size": 6}, name=state, legendgroup=state,
                showlegend=state not in shown, hovertemplate=f"{state}", row=1, col=1,
            )  # fmt: skip
            shown.add(state)
        fig.add_scatter(
            x=[_local(p[0]) for p in polls], y=[p[2] for p in polls], mode="lines+markers",
            line_shape="hv", name=f"{name}: completed",
            customdata=[f"{p[2]:,} of {p[4]:,} ({p[3]:,} failed)" for p in polls],
            hovertemplate="%{customdata}", row=2, col=1,
        )  # fmt: skip
    fig = _layout(fig, title, None)
    fig.update_xaxes(type="date")
    fig.update_yaxes(title_text="requests completed", rangemode="tozero", row=2, col=1)
    return fig


SMOOTH = 5  # buckets the throughput's rates are averaged over (said in the chart's title)


def _smooth(values: list[int], window: int) -> list[float]:
    """A centred moving average over ``window`` buckets (fewer at the ends): a rate read from
    one 0.1 s bucket jumps between 0 and twice the truth."""
    if window <= 1:
        return [float(v) for v in values]
    half, out = window // 2, []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _shade(
    fig: go.Figure, start: float, end: float, label: str, group: str, alpha: float, *,
    legend: bool,
) -> None:  # fmt: skip
    """A period marked across the whole height of the chart."""
    fig.add_shape(
        type="rect", xref="x", yref="paper", x0=_local(start), x1=_local(end), y0=0, y1=1,
        fillcolor=_PERIOD_COLOUR.get(group, "#bcbd22"), opacity=min(alpha, 0.6),
        line={"width": 0}, layer="below", name=label, legendgroup=group, showlegend=legend,
    )  # fmt: skip


def _latency(t: Timeline) -> go.Figure:
    fig = go.Figure()
    b, overall = t.buckets, t.latency_overall
    if b is None or overall is None:
        return _nothing(
            _layout(fig, "Latency", None), "no request answered through the synchronous API"
        )
    parts = " · ".join(f"p{p} {ms:,} ms" for p, ms in overall.values.items())
    title = f"Latency of answered attempts: {parts} · max {overall.max:,} ms ({overall.count:,})"
    x = _middles(b)
    for (p, _ms), colour in zip(
        overall.values.items(), ("#1f77b4", "#ff7f0e", "#d62728"), strict=True
    ):
        fig.add_scatter(
            x=x, y=[None if v is None else v[p] for v in t.latency], name=f"p{p}",
            mode="lines+markers", marker={"size": 4}, line={"color": colour},
            connectgaps=False, hovertemplate=f"p{p} %{{y:,}} ms",
        )  # fmt: skip
    return _layout(fig, title, b, yaxis={"title": {"text": "ms"}, "rangemode": "tozero"})


def _errors(t: Timeline) -> go.Figure:
    fig = go.Figure()
    b = t.buckets
    total = sum(sum(counts) for counts in t.errors.values())
    title = f"Failed attempts by kind ({total:,} in all)"
    if b is None or not total:
        return _nothing(_layout(fig, title, b), "no failed attempts")
    x = _middles(b)
    for kind, counts in t.errors.items():
        fig.add_bar(
            x=x, y=counts, name=kind, width=b.width * 1000 * 0.9,
            hovertemplate=f"%{{y}} {html.escape(kind)}",
        )  # fmt: skip
    return _layout(fig, title, b, barmode="stack", yaxis={"title": {"text": "attempts per bucket"}})


def _cost(status: JobStatus) -> go.Figure:
    rows = [(model, sums["cost_pico"], sums["requests"]) for model, sums in status.by_model.items()]
    rows.sort(key=lambda r: (r[1], r[0]))
    if status.unknown_pico:
        rows.insert(0, ("(unknown outcomes)", status.unknown_pico, 0))
    total = sum(cost for _model, cost, _n in rows)
    fig = go.Figure()
    title = f"Cost by model ({format_usd(total)})"
    if not rows:
        return _nothing(_layout(fig, title, None), "no results yet")
    fig.add_bar(
        y=[html.escape(m) for m, _c, _n in rows], x=[_usd(c) for _m, c, _n in rows],
        orientation="h", text=[format_usd(c) for _m, c, _n in rows], textposition="auto",
        customdata=[[format_usd(c), n] for _m, c, n in rows], marker={"color": "#1f77b4"},
        hovertemplate="%{y}: %{customdata[0]} (%{customdata[1]:,} requests)<extra></extra>",
        name="cost",
    )  # fmt: skip
    fig = _layout(fig, title, None, hovermode="closest", showlegend=False)
    fig.update_xaxes(title_text="USD", rangemode="tozero", **_DOLLARS)
    # A left margin wide enough for the longest model name, rather than plotly's automargin,
    # which can redraw back and forth with the bars' inside/outside labels (and then warns
    # "Too many auto-margin redraws"): about 7 px a character at the axis' font.
    widest = max(len(m) for m, _c, _n in rows)
    fig.update_layout(margin={"l": min(320, max(70, 16 + 7 * widest))})
    return fig


# -- the text ------------------------------------------------------------------------------------


_EXPLAIN = {
    "chart-spend": "Settled spend over time (actual costs, plus worst-case charges for requests "
    "whose outcome is unknown) against the job's cap.",
    "chart-throughput": "Requests finished and attempts sent per second, and tokens (input + "
    "output) per minute, averaged over a few time buckets (the title says over how long; the "
    "hover gives each bucket's own count). Shaded: periods when the API rate-limited the run "
    "(429s and the pauses they caused) or could not be reached.",
    "chart-batches": "Each Batch API batch as its polls saw it: its status over time (top) and "
    "the requests it reported completed (bottom). Results are recorded when a batch ends, so "
    "no request rate is drawn for a batch job.",
    "chart-latency": "Percentiles of the time from sending a request to its full answer, per "
    "time bucket; the title gives them over the whole job. Failed attempts are left out.",
    "chart-errors": "Attempts that did not get a usable answer, by kind, per time bucket. "
    "Retried ones are included: a request can fail several times and still succeed.",
    "chart-projection": "The projected total of the whole job (and its 95% interval) from the "
    "results in at each moment: a ratio estimator per model and output-limit stratum (see "
    "`batchrun price --sample`). It closes in on what was spent as results come in.",
    "chart-cost": "What the finished requests cost, per model (reused results excluded), and "
    "what was charged at worst case for requests whose outcome is unknown.",
}


def _about(t: Timeline, db: str, generated_at: float) -> str:
    when = datetime.fromtimestamp(generated_at).strftime("%Y-%m-%d %H:%M:%S")
    text = f"from {db}, written {when} {_zone(generated_at)}"
    b = t.buckets
    if b is not None:
        text += (
            f"; activity from {_local(b.start)[:19]} to {_local(b.end)[:19]}, "
            f"in buckets of {_seconds(b.width)}"
        )
    return text


def _seconds(width: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if width >= size and width % size == 0:
            return f"{width / size:g} {unit}"
    return f"{width:g} s"


def _cards(status: JobStatus, t: Timeline) -> str:
    job, states = status.job, status.states
    cards = [
        (
            "spent",
            f"{format_usd(status.spend.settled_pico)}",
            f"of cap {format_money(job.cap_pico)}",
        ),
        (
            "requests",
            f"{states.get('done', 0):,} done",
            f"{states.get('failed', 0):,} failed · "
            f"{states.get('pending', 0) + states.get('reserved', 0):,} open of {job.requests:,}",
        ),
        (
            "tokens",
            f"{status.input_tokens:,} in",
            f"{status.output_tokens:,} out ({status.cached_tokens:,} cached input)",
        ),
    ]
    if status.unpriced_models or status.unpriced_tiers:
        models = status.unpriced_models
        cards.append(
            (
                "unpriced",
                f"{sum(models.values()) + status.unpriced_tiers:,} result(s)",
                "booked at worst case: "
                + ", ".join(
                    [f"{m} ({n:,})" for m, n in models.items()]
                    + (
                        [f"service tier ({status.unpriced_tiers:,})"]
                        if status.unpriced_tiers
                        else []
                    )
                ),
            )
        )
    if status.projection is not None and states.get("pending", 0) + states.get("reserved", 0):
        cards.append(("projected", projected_text(status), "the job's total, from the results in"))
    if status.lanes:
        spent = status.spend.settled_pico
        at_sync = status.projection.sync.known_pico if status.projection is not None else None
        cards.append((
            "by lane",
            f"{format_usd(spent)} spent",
            lanes_line(status)
            + (f"; the same results at synchronous prices: {format_usd(at_sync)}"
               if at_sync is not None else ""),
        ))  # fmt: skip
    for line in calibration_lines(status):
        model, _, how = line.partition(": ")
        cards.append(("counting", model, how))
    for line in budget_lines(status):
        name, _, how = line.partition(": ")
        cards.append(("budget", name, how))
    if t.latency_overall is not None:
        v = t.latency_overall.values
        cards.append(("latency", f"p50 {v[50]:,} ms", f"p90 {v[90]:,} ms · p99 {v[99]:,} ms"))
    return "\n".join(
        f'<div class="card" data-card="{name}"><div class="label">{name}</div>'
        f'<div class="big">{html.escape(big)}</div><div class="small">{html.escape(small)}</div>'
        "</div>"
        for name, big, small in cards
    )


def _flatten(value: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, item in value.items():
        if isinstance(item, dict) and item:
            yield from _flatten(item, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", item


def cell_text(value: Any) -> str:
    """How a headline value is shown: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def key_label(key: str) -> str:
    """A ``status --json`` key as a person reads it: "by_model.gpt-4o.cost_usd" is
    "by model · gpt-4o · cost ($)"."""
    parts = []
    for part in key.split("."):
        dollars = part.endswith("_usd")
        words = part.removesuffix("_usd").replace("_", " ")
        parts.append(f"{words} ($)" if dollars else words)
    return " · ".join(parts)


def _cell(value: Any) -> str:
    """A headline value as HTML: a list of records (batches, runners, budgets) as a table of
    its own, anything else as text."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{html.escape(key_label(k))}</th>" for k in keys)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(cell_text(v.get(k)) if v.get(k) is not None else '')}</td>"
                for k in keys
            )
            + "</tr>"
            for v in value
        )
        return f'<table class="records"><tr>{head}</tr>{body}</table>'
    return html.escape(cell_text(value))


def _headline_table(headline: dict[str, Any]) -> str:
    rows = "\n".join(
        f'<tr data-key="{html.escape(key)}"><th>{html.escape(key_label(key))}</th>'
        f"<td>{_cell(value)}</td></tr>"
        for key, value in _flatten(headline)
    )
    return f'<table id="headline-table">\n{rows}\n</table>'


def _script_json(value: Any) -> str:
    """JSON that cannot end its <script> element early."""
    text = json.dumps(value, indent=1, ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="batchrun {version}">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em;
  color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; word-break: break-all; }}
h2 {{ font-size: 1.2em; margin: 1.6em 0 0.2em; }}
.about, .explain {{ color: #555; margin-top: 0; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.7em 1em; min-width: 13em; }}
.card .label {{ color: #777; font-size: 0.85em; text-transform: uppercase; }}
.card .big {{ font-size: 1.5em; font-weight: 600; }}
.card .small {{ color: #555; font-size: 0.9em; }}
section.chart {{ border-top: 1px solid #eee; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; border-bottom: 1px solid #eee;
  font-family: ui-monospace, monospace; }}
th {{ color: #555; font-weight: normal; }}
</style>
</head>
<body>
<h1>{heading}</h1>
<p class="about">{about}</p>
<div class="cards">
{cards}
</div>
{charts}
<section id="headline-section">
<h2>Headline numbers</h2>
<p class="explain">Exactly what <code>batchrun status --json</code> prints for this job (also
embedded in this page as JSON, in the script element with id "headline").</p>
{table}
</section>
<script type="application/json" id="headline">
{headline_json}
</script>
</body>
</html>
"""
