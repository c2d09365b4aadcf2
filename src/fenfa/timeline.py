"""The HTML timeline of :meth:`fenfa.Insights.to_html`: one file, inline SVG, no scripts.

One lane per worker, one bar per reported piece (a slow task, or a batch of
tiny ones), coloured by outcome, with a hover title (``<title>``: every
browser shows it, no JavaScript). Bars thinner than a pixel are merged with
their neighbours into one *aggregate* bar per lane and pixel run, titled
with how many tasks it stands for: 100,000 tasks draw at most a few
thousand shapes. The summary table sits above the timeline.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .summary import PieceRecord, Summary

WIDTH = 1000  # pixels of timeline
LABEL = 280  # pixels of lane labels
MARGIN = 50  # right of the timeline, for the last tick's label
MAX_ROWS = 12  # rows per lane for tasks that overlap (coroutines)
LANE = 18  # lane height
GAP = 4
AXIS = 24

OK, RETRIED, FAILED = "#43a047", "#fb8c00", "#e53935"

# Scoped to the wrapper: embedded in a notebook, it must not restyle the page.
STYLE = """
.fenfa-insights { font: 13px system-ui, sans-serif; color: #222; }
.fenfa-insights h2 { font-size: 16px; margin: 1.4em 0 0.4em; }
.fenfa-insights table { border-collapse: collapse; margin: 0.4em 0 0.8em; }
.fenfa-insights td, .fenfa-insights th {
  border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.fenfa-insights th:first-child, .fenfa-insights td:first-child { text-align: left; }
.fenfa-insights .note { color: #555; }
.fenfa-insights svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _ms(seconds: float) -> str:
    if abs(seconds) >= 1:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.2f} ms"


def _colour(piece: PieceRecord) -> str:
    if piece.error:
        return FAILED
    return RETRIED if piece.attempt > 1 else OK


def _title(piece: PieceRecord, origin: float) -> str:
    tasks = (
        f"task {piece.start}"
        if piece.count == 1
        else f"tasks {piece.start}..{piece.start + piece.count - 1} (one batch)"
    )
    parts = [
        tasks,
        f"input {piece.input}" + (" ..." if piece.count > 1 else ""),
        f"start {_ms(piece.started - origin)}, end {_ms(piece.ended - origin)}, "
        f"took {_ms(piece.ended - piece.started)}",
    ]
    if piece.cpu is not None:
        parts.append(f"CPU {_ms(piece.cpu)}")
    if piece.attempt > 1:
        parts.append(f"attempt {piece.attempt}")
    if piece.error:
        parts.append(f"failed: {piece.error}")
    return "\n".join(parts)


def _lane_label(who: tuple[Any, ...]) -> str:
    worker, pid, _process, thread, backend = who
    if worker is None:
        return f"caller (pid {pid}, {thread})"
    if backend == "process":
        return f"{backend} {worker} (pid {pid})"
    return f"{backend} {worker} ({thread})"


def _svg(pieces: Sequence[PieceRecord]) -> tuple[str, int, int]:
    """The timeline of one run; also how many lanes and bars (aggregates count as one)."""
    if not pieces:
        return "<p class='note'>No tasks were recorded.</p>", 0, 0
    origin = min(p.submitted if p.submitted is not None else p.started for p in pieces)
    end = max(p.ended for p in pieces)
    span = max(end - origin, 1e-9)
    scale = WIDTH / span
    lanes: dict[tuple[Any, ...], list[PieceRecord]] = {}
    for piece in pieces:
        lanes.setdefault(piece.who[1:4], []).append(piece)
    order = sorted(lanes, key=lambda key: _lane_label(lanes[key][0].who))
    stacked = {key: _stack(lanes[key]) for key in order}
    height = AXIS + sum(len(stacked[key]) * LANE + GAP for key in order)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL + WIDTH + MARGIN}" '
        f'height="{height + 4}" role="img">'
    ]
    # the time axis: five ticks
    for tick in range(6):
        x = LABEL + WIDTH * tick / 5
        out.append(
            f'<line x1="{x:.1f}" y1="{AXIS - 6}" x2="{x:.1f}" y2="{height}" stroke="#ddd"/>'
            f'<text x="{x:.1f}" y="{AXIS - 9}" text-anchor="middle">'
            f"{_e(_ms(span * tick / 5))}</text>"
        )
    bars = 0
    y = AXIS
    for key in order:
        rows = stacked[key]
        who = rows[0][0].who
        tasks = sum(p.count for row in rows for p in row)
        out.append(f'<g class="lane" data-worker="{_e(_lane_label(who))}">')
        out.append(
            f'<text x="4" y="{y + LANE - 5}">{_e(_lane_label(who))} - '
            f"{tasks} task{'s' if tasks != 1 else ''}</text>"
        )
        for row in rows:
            bars += _draw_row(out, row, y, origin, scale)
            y += LANE
        y += GAP
        out.append("</g>")
    out.append("</svg>")
    return "".join(out), len(order), bars


def _summary_table(summary: Summary) -> str:
    rows = [
        "<table><tr><th>worker</th><th>tasks</th><th>failed</th><th>busy</th>"
        "<th>idle</th><th>busy %</th></tr>"
    ]
    for line in summary.workers:
        total = line.busy + line.idle
        share = f"{line.busy / total:.0%}" if total else "-"
        rows.append(
            f"<tr><td>{_e(line.name)}</td><td>{line.tasks}</td><td>{line.failed}</td>"
            f"<td>{_e(_ms(line.busy))}</td><td>{_e(_ms(line.idle))}</td><td>{share}</td></tr>"
        )
    rows.append("</table>")
    facts = [f"{summary.tasks} tasks, {summary.failed} failed, wall {_ms(summary.wall)}"]
    if summary.dispatch is not None:
        facts.append(f"mean dispatch (hand-over to start) {_ms(summary.dispatch)}")
    if summary.decision is not None:
        facts.append(
            f"auto chose <b>{_e(summary.decision.backend)}</b>: {_e(summary.decision.reason)}"
        )
    return "<p>" + "<br>".join(facts) + "</p>" + "".join(rows)


def _stack(pieces: list[PieceRecord]) -> list[list[PieceRecord]]:
    """Pieces of one worker in rows, so that ones running at once (coroutines) do not overlap.

    Greedy, by start time: each piece goes to the first row that is free by
    then. At most MAX_ROWS rows; beyond that, the last row takes the rest.
    """
    rows: list[list[PieceRecord]] = []
    ends: list[float] = []
    for piece in sorted(pieces, key=lambda p: p.started):
        free = [number for number, end in enumerate(ends) if piece.started >= end]
        if free:
            number = free[0]
        elif len(rows) < MAX_ROWS:
            number = len(rows)
            rows.append([])
            ends.append(piece.ended)
        else:
            number = len(rows) - 1
        rows[number].append(piece)
        ends[number] = max(ends[number], piece.ended)
    return rows


def _draw_row(out: list[str], row: list[PieceRecord], y: int, origin: float, scale: float) -> int:
    """Bars for one row of a lane; returns how many (an aggregate counts as one)."""
    bars = 0
    group: list[PieceRecord] = []
    group_end = -1.0
    for piece in row:
        x0 = LABEL + (piece.started - origin) * scale
        x1 = LABEL + (piece.ended - origin) * scale
        if x1 - x0 >= 1.0:
            bars += _aggregate(out, group, y, origin, scale)
            group = []
            out.append(
                f'<rect class="task" data-tasks="{piece.count}" x="{x0:.2f}" y="{y}" '
                f'width="{x1 - x0:.2f}" height="{LANE - 1}" fill="{_colour(piece)}" '
                f'stroke="#fff" stroke-width="0.5"><title>{_e(_title(piece, origin))}</title>'
                "</rect>"
            )
            bars += 1
            continue
        if group and x0 > group_end + 1.0:
            bars += _aggregate(out, group, y, origin, scale)
            group = []
        group.append(piece)
        group_end = max(x1, group_end if len(group) > 1 else x1)
    return bars + _aggregate(out, group, y, origin, scale)


def _aggregate(
    out: list[str], group: list[PieceRecord], y: int, origin: float, scale: float
) -> int:
    """One faded bar standing for ``group`` (pieces too thin to draw); returns bars drawn."""
    if not group:
        return 0
    end = max(p.ended for p in group)
    x0 = LABEL + (group[0].started - origin) * scale
    x1 = LABEL + (end - origin) * scale
    tasks = sum(p.count for p in group)
    failed = sum(p.count for p in group if p.error)
    title = (
        f"{tasks} tasks in {len(group)} pieces, too short to draw one by one\n"
        f"from {_ms(group[0].started - origin)} to {_ms(end - origin)}"
        + (f"\n{failed} failed" if failed else "")
    )
    out.append(
        f'<rect class="agg" data-tasks="{tasks}" x="{x0:.2f}" y="{y}" '
        f'width="{max(x1 - x0, 1.0):.2f}" height="{LANE - 1}" fill="{FAILED if failed else OK}" '
        f'fill-opacity="0.6"><title>{_e(title)}</title></rect>'
    )
    return 1


def render(runs: Sequence[tuple[str, Sequence[PieceRecord], Summary]]) -> str:
    """A whole HTML page: for each run, its summary and its timeline."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(runs[0][0] if runs else 'fenfa')}</title><style>{STYLE}</style></head>"
        f"<body style='margin: 1.5em'><div class='fenfa-insights'>{fragment(runs)}</div>"
        "</body></html>\n"
    )


def fragment(runs: Sequence[tuple[str, Sequence[PieceRecord], Summary]]) -> str:
    """The same, as a fragment to embed (a notebook cell's output)."""
    body = []
    for title, pieces, summary in runs:
        svg, _lanes, _bars = _svg(pieces)
        body.append(f"<section><h2>{_e(title)}</h2>{_summary_table(summary)}{svg}</section>")
    legend = (
        f'<p class="note">Bars: <span style="color:{OK}">&#9632; done</span> '
        f'<span style="color:{RETRIED}">&#9632; done on a retry</span> '
        f'<span style="color:{FAILED}">&#9632; failed</span>; faded bars stand for many '
        "tasks too short to draw one by one. Hover a bar for its tasks and times.</p>"
    )
    return f"{legend}{''.join(body)}"


__all__ = ["fragment", "render"]
