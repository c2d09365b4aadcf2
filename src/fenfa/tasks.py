"""Task records, the loop that runs a batch, and the adaptive chunk size.

Everything here is pure: no threads, no processes. The pool cuts the input
into *batches* (a start index and a list of items, all for one *job*), a
backend runs each batch somewhere, and what comes back is a list of *pieces*:
``Ok(start, values)`` for a run of consecutive successes, ``Err(index, exc)``
for one failed task. Pieces, not one result per task, because a batch of
10,000 tiny tasks must cost one message, not 10,000; and pieces, not one
result per batch, so that a slow batch can stream its results task by task.
"""

from __future__ import annotations

import enum
import inspect
import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .autoshare import Scope
from .errors import RemoteTraceback, format_traceback
from .sharing import handles_alive, resolve, resolve_function
from .worker import current_slot, current_worker


class Style(enum.IntEnum):
    """How an item becomes a call."""

    ONE = 0  # fn(item)
    STAR = 1  # fn(*item)
    CALL = 2  # fn(*item[0], **item[1])


class Ok:
    """Consecutive successful tasks ``start .. start+len(values)-1``."""

    __slots__ = ("start", "times", "values")

    def __init__(self, start: int, values: list[Any]) -> None:
        self.start = start
        self.values = values
        self.times: Times | None = None  # with insights on: see Stamper


class Err:
    """One failed task.

    ``error`` is the exception, its worker traceback attached as ``__cause__``;
    inside a process worker it is the packed form that crosses the pipe.
    """

    __slots__ = ("error", "index", "times")

    def __init__(self, index: int, error: Any) -> None:
        self.index = index
        self.error = error
        self.times: Times | None = None


# Who ran a piece: worker id, pid, process name, thread name, backend.
Who = tuple[int | str | None, int, str, str, str | None]
# When it ran: start and end (time.monotonic, one clock for every process on
# the machine), CPU seconds of the thread that ran it (None: not measurable,
# as for coroutines sharing a loop), and who.
Times = tuple[float, float, float | None, Who]


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


Piece = Ok | Err


class Job:
    """One call's function and where its results go.

    ``deliver`` is called from whatever thread the backend reports on, with
    the batch and the pieces that just finished, and the seconds the worker
    spent on them (the adaptive chunk size feeds on that).
    """

    __slots__ = (
        "cancelled",
        "deliver",
        "fn",
        "payload",
        "remote",
        "shares",
        "stop_on_error",
        "style",
        "timed",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        style: Style,
        deliver: Callable[[Batch, list[Piece], float], None] | None,
    ) -> None:
        self.fn = fn
        self.style = style
        if deliver is not None:  # (None: a subclass defines ``deliver`` as a method)
            self.deliver = deliver
        self.cancelled = False
        # Seconds each task may run (the ``timeout`` option), or None.
        self.timeout: float | None = None
        # Whether tasks after a failed one are wanted (see SerialBackend).
        self.stop_on_error = False
        # (key, pickled fn), filled by a process backend the first time it
        # needs it, so the function is pickled once per call, not per batch.
        self.payload: tuple[bytes, bytes] | None = None
        # What a cluster backend keeps per call (dask: the function as sent,
        # once per call, and the shared handles it refers to).
        self.remote: Any = None
        # The arrays this call shares with process workers on its own (made
        # by the first batch that needs it), released when the call ends.
        self.shares: Scope | None = None
        # Whether backends stamp pieces with times and workers (insights on).
        self.timed = False

    def scope(self) -> Scope:
        if self.shares is None:
            self.shares = Scope()
        return self.shares

    def release_shared(self) -> None:
        """The call is over: free what it shared on its own."""
        if self.shares is not None:
            self.shares.release()

    def claim(self) -> bool:
        """Called by a backend just before it starts a batch: run it or drop it?"""
        return not self.cancelled

    def dropped(self) -> bool:
        """True when nobody wants this job's results any more (no side effects)."""
        return self.cancelled


_batch_ids = itertools.count()


class Batch:
    """Consecutive items of one job, sent to a worker as one message."""

    __slots__ = ("attempt", "done", "expected", "id", "items", "job", "start", "submitted", "wire")

    def __init__(
        self,
        job: Job,
        start: int,
        items: list[Any],
        attempt: int = 1,
        expected: float | None = None,
    ) -> None:
        self.id = next(_batch_ids)
        self.job = job
        self.start = start
        self.items = items
        self.attempt = attempt
        # Expected seconds for the whole batch, None while nothing is measured.
        self.expected = expected
        # How many of its tasks have reported (results arrive in order).
        self.done = 0
        # The batch as a process backend sends it, encoded once.
        self.wire: bytes | None = None
        # When the call handed it to the backend (insights on), time.monotonic.
        self.submitted: float | None = None

    def item(self, index: int) -> Any:
        return self.items[index - self.start]

    def tail(self) -> Batch:
        """The tasks that have not reported yet, as a new batch of the same job."""
        rest = Batch(self.job, self.start + self.done, self.items[self.done :], self.attempt)
        if self.expected is not None and self.items:
            rest.expected = self.expected * len(rest.items) / len(self.items)
        return rest


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions, partials of them, objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


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


# Adaptive chunk size. A batch costs about 50-150 us of fixed work (pickle,
# two thread hand-offs, one pipe round trip; measured on 2 cores with the
# tiny-task benchmark), so a batch of 10 ms of work spends ~1% on dispatch.
# Larger batches gain little and hurt balance at the end of the input.
TARGET_BATCH_SECONDS = 0.010
# Near the end of a known input, batches shrink so every worker finishes at
# about the same time, but never below this much work: below it dispatch
# costs more than the imbalance it removes.
MIN_BATCH_SECONDS = 0.002
# Above this, larger batches save nothing measurable and only hold memory.
MAX_CHUNKSIZE = 10_000
# With a known input length, what remains is spread over at least this many
# batches per worker, so no worker idles while another finishes a big one.
TAIL_BATCHES_PER_WORKER = 4
# Slow start: a batch holds at most this many times the tasks measured so
# far. The estimate comes from the first tasks; if they were cheap and the
# rest are not, a batch sized from them alone would swallow an unknown-length
# input whole (seen: 2 instant tasks, then 198 of 3 ms each: 179 of them went
# to one of two workers, 0.61 s, no faster than serial). Measured on 2 cores:
# growth 4x costs 200k tiny tasks 25 % (round trips while ramping up), 16x
# 18 %, 64x nothing measurable (15.3 ms against 15.1 ms without a cap),
# while the bad case improves to 129/71 tasks and 0.39 s (16x: 97/103, 0.31 s).
GROWTH = 64


class ChunkSizer:
    """Chooses how many tasks go into the next batch, from measured task times.

    Before anything is measured a batch holds one task (a probe). Each
    finished batch reports its busy time; the estimate of one task's time is
    busy time over tasks, with older batches' share halved at each report: it
    follows a change of pace within a few batches, and a slow probe (the
    first call in a worker is cold) weighs as one task, not as one batch.
    """

    def __init__(self, workers: int, total: int | None, fixed: int | None) -> None:
        self.workers = workers
        self.total = total
        self.fixed = fixed
        self.task_seconds: float | None = None
        self._busy = 0.0
        self._tasks = 0.0
        self._measured = 0  # tasks measured so far, all told
        self._lock = threading.Lock()

    def measured(self, busy: float, tasks: int) -> None:
        if tasks <= 0:
            return
        with self._lock:
            self._busy = 0.5 * self._busy + busy
            self._tasks = 0.5 * self._tasks + tasks
            self._measured += tasks
            self.task_seconds = self._busy / self._tasks

    def size(self, next_index: int) -> int:
        if self.fixed is not None:
            return self.fixed
        seconds = self.task_seconds
        if seconds is None:
            return 1
        seconds = max(seconds, 1e-9)
        size = min(MAX_CHUNKSIZE, max(1, round(TARGET_BATCH_SECONDS / seconds)))
        size = min(size, GROWTH * self._measured)
        if self.total is not None:
            remaining = self.total - next_index
            balanced = math.ceil(remaining / (self.workers * TAIL_BATCHES_PER_WORKER))
            size = min(size, max(balanced, round(MIN_BATCH_SECONDS / seconds), 1))
        return size

    def expected(self, tasks: int) -> float | None:
        seconds = self.task_seconds
        return None if seconds is None else seconds * tasks
