"""What a pool knows about how its work went: records, summary, HTML timeline.

With ``insights=True`` (on a Pool, or per call) every backend stamps each
*piece* of results with when it ran (``time.monotonic``, one clock for every
process of the machine, so times from worker processes need no correction),
the CPU time of the thread that ran it, and who ran it (worker id, pid,
process and thread name, backend); the caller adds the task indices, the
attempt, the error type, a short repr of the input and when the batch was
handed to the backend. Nothing is stamped per task: a slow task is reported
alone (so it gets its own times), tiny tasks gathered into one batch share
their batch's span evenly (``TaskRecord.batched`` says how many). Off, it
costs one attribute check per piece.

``decision`` is what ``backend="auto"`` chose and why, recorded either way.
The records it is read out as are :mod:`fenfa.summary`; the timeline that
draws them, :mod:`fenfa.timeline`.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .auto import Decision
    from .summary import PieceRecord, Summary, TaskRecord

# (The records are made when read: :mod:`fenfa.summary`'s dataclasses cost a
# few milliseconds to define, which every script that makes a Pool would pay.)

__all__ = ["Insights"]


class Insights:
    """A pool's (or a call's) records; see the module docstring.

    ``decision``: what ``backend="auto"`` chose and why (None for a fixed
    backend). ``records()``: one :class:`TaskRecord` per task. ``summary()``
    and ``to_html(path)`` read them.
    """

    def __init__(self) -> None:
        self.decision: Decision | None = None
        #: Tasks that ran again because their results died with a crashed
        #: worker (counted whether or not records are kept).
        self.reruns = 0
        #: With ``speculate``: (first task index, "first" or "second") for each
        #: piece of a straggler that got a second attempt: which attempt won.
        self.speculations: list[tuple[int, str]] = []
        self._pieces: list[PieceRecord] = []
        self._raw: list[tuple[Any, ...]] = []  # pieces as recorded, not yet read
        self._lock = threading.Lock()
        self._calls = itertools.count(1)

    def __repr__(self) -> str:
        return f"<fenfa.Insights: {len(self)} tasks recorded>"

    def __len__(self) -> int:
        return sum(piece.count for piece in self._snapshot())

    def clear(self) -> None:
        with self._lock:
            self._pieces.clear()
            self._raw = []

    # -- recording (called by the call's run, in the caller) ------------

    def new_call(self) -> int:
        return next(self._calls)

    def add(
        self,
        call: int,
        start: int,
        count: int,
        times: Any,
        *,
        submitted: float | None,
        attempt: int,
        error: BaseException | None,
        first_input: str,
        first_of_batch: bool,
    ) -> None:
        """One piece of results (called by the caller's thread, once per piece).

        Kept raw (one tuple, made into a record when read): a call of tiny
        tasks records hundreds of pieces, and this is on its path. (The
        input's repr is made now: holding the input itself could hold
        gigabytes.)
        """
        self._raw.append(
            (call, start, count, times, submitted, attempt, error, first_input, first_of_batch)
        )

    # -- reading ----------------------------------------------------------

    def _snapshot(self) -> list[PieceRecord]:
        from .summary import PieceRecord

        with self._lock:
            raw, self._raw = self._raw, []  # (list.append is atomic: no lock to add)
            for call, start, count, times, submitted, attempt, error, text, first in raw:
                started, ended, cpu, who = times
                self._pieces.append(
                    PieceRecord(
                        call,
                        start,
                        count,
                        who,
                        submitted,
                        started,
                        ended,
                        cpu,
                        attempt,
                        None if error is None else type(error).__name__,
                        text,
                        first,
                    )
                )
            return list(self._pieces)

    def records(self) -> list[TaskRecord]:
        """One record per task, in the order they were reported."""
        return list(_expand(self._snapshot()))

    def summary(self, slowest: int = 5) -> Summary:
        from .summary import Summary, WorkerLine, worker_name

        pieces = self._snapshot()
        records = list(_expand(pieces))
        if not pieces:
            return Summary([], 0, 0, 0.0, None, [], self.decision)
        first = min(p.submitted if p.submitted is not None else p.started for p in pieces)
        last = max(p.ended for p in pieces)
        wall = last - first
        lines: dict[tuple[Any, ...], WorkerLine] = {}
        for piece in pieces:
            key = piece.who[1:4]
            line = lines.get(key)
            if line is None:
                line = lines[key] = WorkerLine(worker_name(piece.who), 0, 0.0, 0.0, 0)
            line.tasks += piece.count
            line.busy += piece.ended - piece.started
            line.failed += piece.count if piece.error else 0
        for line in lines.values():
            line.idle = max(0.0, wall - line.busy)
        waits = [
            p.started - p.submitted for p in pieces if p.first_of_batch and p.submitted is not None
        ]
        records.sort(key=lambda r: r.seconds / r.batched, reverse=True)
        return Summary(
            workers=sorted(lines.values(), key=lambda line: line.name),
            tasks=len(records),
            failed=sum(1 for r in records if r.error),
            wall=wall,
            dispatch=sum(waits) / len(waits) if waits else None,
            slowest=records[:slowest],
            decision=self.decision,
        )

    def _repr_html_(self) -> str:
        """Jupyter shows the summary and the timeline inline."""
        from .timeline import STYLE, fragment

        body = fragment([("fenfa insights", self._snapshot(), self.summary())])
        return f"<div class='fenfa-insights'><style>{STYLE}</style>{body}</div>"

    def to_html(self, path: str | os.PathLike[str], *, title: str = "fenfa timeline") -> str:
        """Write a self-contained HTML timeline (inline SVG, no scripts); returns the path."""
        from .timeline import render

        text = render([(title, self._snapshot(), self.summary())])
        target = os.fspath(path)
        temporary = f"{target}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, target)  # never a half-written file
        return target


def _expand(pieces: list[PieceRecord]) -> Iterator[TaskRecord]:
    from .summary import TaskRecord

    for piece in pieces:
        worker, pid, process, thread, backend = piece.who
        step = (piece.ended - piece.started) / piece.count
        cpu = None if piece.cpu is None else piece.cpu / piece.count
        for offset in range(piece.count):
            yield TaskRecord(
                index=piece.start + offset,
                call=piece.call,
                worker=worker,
                pid=pid,
                process_name=process,
                thread_name=thread,
                backend=backend,
                submitted=piece.submitted,
                started=piece.started + step * offset,
                ended=piece.started + step * (offset + 1),
                cpu=cpu,
                attempt=piece.attempt,
                error=piece.error,
                input=piece.input if offset == 0 else "(batched)",
                batched=piece.count,
            )


def __getattr__(name: str) -> Any:
    """``fenfa.insights.TaskRecord`` & co., loaded when named (from :mod:`fenfa.summary`)."""
    if name in ("PieceRecord", "Summary", "TaskRecord", "WorkerLine"):
        from . import summary

        return getattr(summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
