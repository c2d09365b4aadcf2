"""The loop that runs a batch, and what a worker needs around it.

Every backend runs its batches through :func:`run_batch`, in the caller,
a thread, a process worker or a dask worker alike: the function is called
on each item (:func:`caller` makes the call an item stands for), and the
outcomes are handed on as pieces (:mod:`fenfa.tasks`), gathered into one
``Ok`` for tiny tasks or emitted task by task for slow ones. With insights
on, :class:`Stamper` stamps each piece with when and where it ran.

Kept apart from the records: this is the code on a worker's hot path
(measured per task), while the records are shared by every layer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import RemoteTraceback, format_traceback
from .sharing import handles_alive, resolve, resolve_function
from .tasks import Err, Job, Ok, Piece, Style, Who
from .worker import current_slot, current_worker

_who = threading.local()


def who_runs() -> Who:
    """Who this thread is, as insights record it (cached while its worker mark holds)."""
    slot = current_slot()
    cached = getattr(_who, "cached", None)
    if cached is not None and cached[0] is slot and cached[1] == os.getpid():
        return cached[2]  # type: ignore[no-any-return]
    me = current_worker()
    who: Who = (me.id, me.pid, me.process_name, me.thread_name, me.backend)
    _who.cached = (slot, me.pid, who)
    return who


class Stamper:
    """Wraps a batch's ``emit``: stamps each piece with when it ran, for insights.

    A piece's span runs from the previous piece's end (or the batch's start)
    to its own emission. Slow tasks are emitted one by one, so each gets its
    own span; tiny tasks gathered into one piece share its span. Two clock
    reads per piece: nothing per task.
    """

    __slots__ = ("_cpu", "_emit", "_last", "_who")

    def __init__(self, emit: Callable[[Piece], None]) -> None:
        self._emit = emit
        self._who = who_runs()
        self._last = time.monotonic()
        self._cpu = time.thread_time()

    def __call__(self, piece: Piece) -> None:
        now, cpu = time.monotonic(), time.thread_time()
        piece.times = (self._last, now, cpu - self._cpu, self._who)
        self._last, self._cpu = now, cpu
        self._emit(piece)


def stamped(emit: Callable[[Piece], None], job: Job) -> Callable[[Piece], None]:
    """``emit``, stamping pieces when the job records insights."""
    return Stamper(emit) if job.timed else emit


def caller(fn: Callable[..., Any], style: Style) -> Callable[[Any], Any]:
    """A one-argument callable that makes the call an item stands for.

    In a process that holds :class:`~fenfa.sharing.Shared` handles (tasks run
    here: thread, serial, async, auto's probe), handles in the function and
    in each item are replaced by their values first, as unpickling does in a
    process worker.
    """
    if handles_alive():
        plain = _caller(resolve_function(fn), style)
        return lambda item: plain(resolve(item))
    return _caller(fn, style)


def _caller(fn: Callable[..., Any], style: Style) -> Callable[[Any], Any]:
    if style is Style.ONE:
        return fn
    if style is Style.STAR:
        return lambda item: fn(*item)
    return lambda item: fn(*item[0], **item[1])


_running = threading.local()


def current_task_index() -> int | None:
    """The index of the task this thread is running inside ``run_batch`` (None outside).

    Log records relayed from process workers carry it.
    """
    values = getattr(_running, "values", None)
    if values is not None:
        return int(_running.first) + len(values)
    index: int | None = getattr(_running, "index", None)
    return index


def run_batch(
    call: Callable[[Any], Any],
    start: int,
    items: list[Any],
    emit: Callable[[Piece], None],
    stream: bool,
    on_error: Callable[[BaseException], Any],
    stop: bool = False,
    marks: Any = None,
    started: Callable[[int], None] | None = None,
) -> int:
    """Run ``call`` over ``items`` and hand the pieces to ``emit``.

    With ``stream`` every task is emitted as soon as it ends (slow tasks);
    otherwise successes are gathered and emitted at the end (tiny tasks: one
    message per batch). ``on_error`` turns a raised exception into what is
    reported (a local backend attaches the traceback; a process worker packs
    it). Every ``BaseException`` is the task's failure: a task that raises
    ``SystemExit`` fails, it does not stop the worker. With ``stop``, the
    batch ends at its first failure. With ``marks`` (a process worker's
    shared words), each task's index is stored before it runs, so a parent
    whose worker died knows which task killed it; ``started`` is told each
    task's index before it runs. Returns the count run.
    """
    try:
        running = _running
        if stream:
            index = start - 1
            running.values = None
            for index, item in enumerate(items, start):
                running.index = index
                if marks is not None:
                    marks[1] = index  # (shared with the parent: which task runs)
                if started is not None:
                    started(index)
                try:
                    value = call(item)
                except BaseException as exc:
                    emit(Err(index, on_error(exc)))
                    if stop:
                        break
                else:
                    emit(Ok(index, [value]))
            return index + 1 - start
        # The fast path: ``list.extend`` drives ``map`` in C, about twice as fast
        # as a Python loop on tiny tasks. When a call raises, ``extend`` keeps
        # what it had appended and ``map`` resumes after the failed item, so the
        # failure's index is simply the count so far.
        values: list[Any] = []
        first = start
        results = map(call, items)
        while True:
            # (Where the batch is, for current_task_index(): two stores per batch.)
            running.first, running.values = first, values
            try:
                values.extend(results)
            except BaseException as exc:
                failed = first + len(values)
                if values:
                    emit(Ok(first, values))
                    values = []
                emit(Err(failed, on_error(exc)))
                first = failed + 1
                if stop:
                    return first - start
                continue
            break
        if values:
            emit(Ok(first, values))
        return first + len(values) - start
    finally:
        _running.values = _running.index = None  # (nor hold the last results)
        # A task's exception keeps its frame, whose f_back is this one: what
        # this frame holds must not lead back to that exception (the pieces,
        # through emit), or a cycle keeps the call's arguments alive.
        del emit, call, items


def attach_traceback(exc: BaseException) -> BaseException:
    """For backends that run in this process: the traceback becomes ``__cause__``."""
    exc.__cause__ = RemoteTraceback(format_traceback(exc))
    return exc
