"""What comes back from a call's tasks, on its way to the caller: reports, notes, records.

A backend reports each batch's *pieces* (``Ok`` runs of results, ``Err``
failures) by calling its job's ``deliver``; for a call over many inputs that
is a :class:`Report`, which puts them on the call's queue, and the run takes
them off with :func:`next_report` (in the consumer's thread). A failure
leaving fenfa carries a note naming its task and input (:func:`annotate`), or
saying it came from the input itself (:func:`from_input`), the same on every
backend and for single calls, ``journal=`` and ``amap``; with ``insights``,
each timed piece becomes a task record (:func:`record`).

Nothing here knows the window, the pool or a backend: the run
(:mod:`fenfa.window`) and the single calls (:mod:`fenfa.futures`) use it.
"""

from __future__ import annotations

import math
import queue
import time
from typing import TYPE_CHECKING, Any, Protocol

from .errors import short_repr
from .tasks import Batch, Ok, Piece

if TYPE_CHECKING:
    from .insights import Insights

#: One delivery from a backend: the batch, its pieces, the worker's busy time.
Delivery = tuple[Batch, list[Piece], float]


class Witness(Protocol):
    """Told each final outcome of a run as it comes (``journal=``: see fenfa.journal_fast)."""

    def __call__(self, batch: Batch, start: int, values: list[Any], failed: bool) -> None: ...

    def flush(self) -> None:
        """A report's outcomes were all told: record them before they are handed out."""


__all__ = ["Delivery", "Report", "Witness", "annotate", "from_input", "next_report", "record"]


def annotate(exc: BaseException, index: int, item: Any, attempts: int) -> BaseException:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    exc.add_note(f"fenfa: task {index} failed{tries}; input: {short_repr(item)}")
    return exc


def from_input(exc: Exception, given: int) -> Exception:
    """Say that ``exc`` came from the input itself, after ``given`` items, not from a task."""
    after = f"after item {given - 1} ({given} items given)" if given else "before its first item"
    exc.add_note(f"fenfa: raised by the input {after}, not by a task")
    return exc


class Report:
    """A job's ``deliver``: puts what a backend reports on the run's queue."""

    __slots__ = ("_queue",)

    def __init__(self, results: queue.SimpleQueue[Delivery]) -> None:
        self._queue: queue.SimpleQueue[Delivery] | None = results

    def __call__(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        results = self._queue
        if results is not None:
            results.put((batch, pieces, busy))

    def close(self) -> None:
        """The call is over: drop what came and what comes (a batch queued
        here refers to the job, whose ``deliver`` is this: a cycle)."""
        results, self._queue = self._queue, None
        while results is not None and not results.empty():
            results.get_nowait()


def next_report(
    results: queue.SimpleQueue[Delivery], deadline: float | None, within: float | None = None
) -> Delivery | None:
    """The next report; None if ``within`` seconds pass first (speculation looks again).

    ``TimeoutError`` once ``deadline`` (``time.monotonic()``) has passed.
    """
    if deadline is None and within is None:
        return results.get()
    remaining = math.inf if deadline is None else deadline - time.monotonic()
    try:
        return results.get(timeout=max(0.0, min(remaining, within or math.inf)))
    except queue.Empty:
        if within is not None and remaining > within:
            return None
        raise TimeoutError("the results did not all arrive within the timeout") from None


def record(recorder: Insights, call: int, batch: Batch, piece: Piece) -> None:
    """Add a timed piece's tasks to the insights of call ``call``."""
    if isinstance(piece, Ok):
        start, count, error = piece.start, len(piece.values), None
    else:
        start, count, error = piece.index, 1, piece.error
    recorder.add(
        call,
        start,
        count,
        piece.times,
        submitted=batch.submitted,
        attempt=batch.attempt,
        error=error,
        first_input=short_repr(batch.item(start)),
        first_of_batch=start == batch.start,
    )
