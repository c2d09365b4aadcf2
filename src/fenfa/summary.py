"""What insights are read out as: one record per task, the pieces they come from, the summary.

These records are shared by the two modules that read them:
:mod:`fenfa.insights` (which keeps them as a call runs, and answers
``records()`` and ``summary()``) and :mod:`fenfa.timeline` (which draws them).
Below both, so that the drawing never needs to import the recording; the
text form of a summary (``str(summary)``) lives with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .auto import Decision

__all__ = ["PieceRecord", "Summary", "TaskRecord", "WorkerLine", "worker_name"]


@dataclass(frozen=True)
class TaskRecord:
    """One task: where, when and how it ran. Times are ``time.monotonic`` seconds."""

    index: int
    call: int  # which call of the pool (1, 2, ...) it belonged to
    worker: int | str | None  # a dask worker's id is its address
    pid: int
    process_name: str
    thread_name: str
    backend: str | None
    submitted: float | None  # when its batch was handed to the backend
    started: float
    ended: float
    cpu: float | None  # CPU seconds (None on the async backend: coroutines share a thread)
    attempt: int
    error: str | None  # the exception's type name, if it failed
    input: str  # short repr of its input
    batched: int  # tasks that shared this record's span (1: timed alone)

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class PieceRecord:
    """Consecutive tasks of one batch, reported together (what backends stamp)."""

    call: int
    start: int
    count: int
    who: tuple[int | str | None, int, str, str, str | None]
    submitted: float | None
    started: float
    ended: float
    cpu: float | None
    attempt: int
    error: str | None
    input: str
    first_of_batch: bool


@dataclass
class WorkerLine:
    name: str
    tasks: int
    busy: float
    idle: float
    failed: int


@dataclass
class Summary:
    """Per-worker work, dispatch overhead, the slowest tasks, and auto's decision."""

    workers: list[WorkerLine]
    tasks: int
    failed: int
    wall: float
    dispatch: float | None  # mean seconds from handing a batch over to its first task starting
    slowest: list[TaskRecord]
    decision: Decision | None

    def __str__(self) -> str:
        lines = [
            f"{self.tasks} tasks, {self.failed} failed, {_seconds(self.wall)} from the first "
            f"hand-over to the last result"
            + (f"; mean dispatch {_seconds(self.dispatch)}" if self.dispatch is not None else ""),
        ]
        if self.decision is not None:
            lines.append(f"auto chose {self.decision.backend}: {self.decision.reason}")
        rows = [("worker", "tasks", "failed", "busy", "idle", "busy %")]
        for line in self.workers:
            share = line.busy / (line.busy + line.idle) if line.busy + line.idle else 0.0
            rows.append(
                (
                    line.name,
                    str(line.tasks),
                    str(line.failed),
                    _seconds(line.busy),
                    _seconds(line.idle),
                    f"{share:.0%}",
                )
            )
        lines.append(_table(rows))
        if self.slowest:
            lines.append("slowest tasks:")
            for record in self.slowest:
                shared = f" (1 of {record.batched} timed together)" if record.batched > 1 else ""
                lines.append(
                    f"  task {record.index}: {_seconds(record.seconds)}{shared} on "
                    f"{worker_name(_who(record))}, input {record.input}"
                )
        return "\n".join(lines)


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def _who(record: TaskRecord) -> tuple[Any, ...]:
    return (record.worker, record.pid, record.process_name, record.thread_name, record.backend)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for number, row in enumerate(rows):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def worker_name(who: tuple[Any, ...]) -> str:
    worker, pid, _process, thread, backend = who
    label = f"{backend} {worker}" if worker is not None else "caller"
    return f"{label} (pid {pid})" if backend == "process" else f"{label} (pid {pid}, {thread})"
