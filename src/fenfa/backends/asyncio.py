"""The async backend: coroutine functions on one event loop, in a thread of its own.

::

    caller threads                       loop thread "fenfa-async-loop"
    --------------                       ------------------------------
    submit(batch) --call_soon_threadsafe--> _add: queue of batches (urgent first)
                                            _pump: start tasks while fewer than
                                                   `workers` run; one asyncio Task
                                                   per item
                                            task done -> job.deliver(one piece)
    abandon(job) --call_soon_threadsafe--> cancel the job's tasks (no report)
    shutdown()  --call_soon_threadsafe--> stop when nothing is pending; with
                                          cancel, cancel what runs after 1 s

Every item of a batch is its own asyncio task, so the tasks of one batch wait
concurrently; ``workers`` bounds how many run at once (the concurrency limit,
not a number of threads). Each task reports as soon as it finishes.

A plain (non-coroutine) function works too: its calls run in a thread pool
owned by the backend (``loop.run_in_executor``), at most ``workers`` at once,
so a blocking call never stalls the loop; if such a call returns an awaitable
(a lambda wrapping a coroutine function), it is awaited on the loop. The
thread backend remains the better home for plain functions.

Cancellation: a coroutine *can* be cancelled. A task past its ``timeout`` is
cancelled at its next ``await`` and fails with ``TaskTimeout``; ``abandon``
(Ctrl-C in the caller) cancels the job's running tasks; the grace of
``shutdown(cancel=True)`` over, running tasks are cancelled and fail with
``PoolClosed``. A coroutine that never awaits cannot be interrupted (as with
any asyncio code); a plain function running in a thread cannot be stopped:
it is reported at once and its result discarded when it returns.

``current_worker()`` in a task describes the loop: ``id`` 0, backend
``"async"``, and one ``state`` dict for the backend (tasks share the loop).
An ``initializer`` (a plain or a coroutine function) runs on the loop before
the first task.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..batchloop import attach_traceback, caller, who_runs
from ..errors import PoolClosed, TaskTimeout
from ..tasks import Batch, Err, Job, Ok, Piece, is_coroutine_function
from ..worker import restore_slot, set_slot
from .awaiting import run_coroutine
from .base import Backend
from .thread import fail_batch

# shutdown(cancel=True): how long running tasks may go on before they are
# cancelled, as on the thread and process backends (the contract: ~1 s).
CANCEL_GRACE_SECONDS = 1.0


class _Queued:
    """A batch waiting in line, and how many of its items have started."""

    __slots__ = ("batch", "is_async", "offset")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.offset = 0
        self.is_async = True


class AsyncBackend(Backend):
    name = "async"

    def __init__(self, workers: int, **kwargs: Any) -> None:
        super().__init__(workers, **kwargs)
        # Guards the fields shared with other threads: _pending and _stopped.
        self._lock = threading.Lock()
        self._pending = 0  # tasks submitted and neither reported nor dropped
        self._stopped = False  # the loop no longer takes callbacks
        self._closed = False
        # Loop thread only, from here on.
        self._loop = asyncio.new_event_loop()
        self._queue: deque[_Queued] = deque()
        self._running: dict[asyncio.Task[tuple[Piece, float]], tuple[Batch, int]] = {}
        # Tasks fenfa cancelled: the error to report instead, or None for none.
        self._reasons: dict[asyncio.Task[tuple[Piece, float]], BaseException | None] = {}
        self._ready = False  # the initializer has run
        self._closing = False
        self._grace: asyncio.TimerHandle | None = None
        self._state: dict[str, Any] = {}
        self._started_tasks = 0
        self._executor: ThreadPoolExecutor | None = None
        self._threads_abandoned = False
        self.broken: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fenfa-async-loop", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        with self._lock:
            if not self._stopped:
                self._pending += len(batch.items)
                self._loop.call_soon_threadsafe(self._add, batch, urgent)
                return
        if batch.job.claim():
            fail_batch(batch, PoolClosed("the pool was shut down"))

    def abandon(self, job: Job) -> None:
        job.cancelled = True
        with self._lock:
            if not self._stopped:
                self._loop.call_soon_threadsafe(self._cancel_job, job)

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        with self._lock:
            self._closed = True
            if not self._stopped:
                self._loop.call_soon_threadsafe(self._close, cancel)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the loop thread -------------------------------------------------

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        set_slot(0, self.name, self._state)
        try:
            loop.run_until_complete(self._initialize())
            self._ready = True
            self._pump()
            with self._lock:
                # A shutdown that came while the initializer ran may already have
                # stopped the loop (its stop was used up by run_until_complete).
                stopped = self._stopped
            if not stopped:
                loop.run_forever()
        finally:
            with self._lock:
                self._stopped = True
            self._fail_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            if self._executor is not None:
                # A thread still running an abandoned call cannot be joined.
                self._executor.shutdown(wait=not self._threads_abandoned, cancel_futures=True)
            asyncio.set_event_loop(None)
            loop.close()

    def _fail_leftovers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Only after a failure of fenfa itself: report whatever is still pending."""
        error = PoolClosed("the pool's event loop stopped")
        self._ready = False
        for task in list(self._running):
            self._reasons[task] = error
            task.cancel()
        if self._running:
            loop.run_until_complete(asyncio.wait(list(self._running)))
        while self._queue:
            entry = self._queue.popleft()
            self._drop(entry, error)

    async def _initialize(self) -> None:
        if self.initializer is None:
            return
        try:
            result = self.initializer(*self.initargs)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            # As on the other backends: every task from now on fails with it.
            name = getattr(self.initializer, "__qualname__", repr(self.initializer))
            attach_traceback(exc).add_note(f"fenfa: raised by the initializer {name}()")
            self.broken = exc

    async def _renew(self) -> None:
        """``max_tasks_per_worker`` reached: the one worker (the loop) gets fresh state."""
        self._state = {}
        set_slot(0, self.name, self._state)
        self._started_tasks = 0
        await self._initialize()
        self._ready = True
        self._pump()

    def _add(self, batch: Batch, urgent: bool) -> None:
        entry = _Queued(batch)
        if urgent:
            self._queue.appendleft(entry)
        else:
            self._queue.append(entry)
        self._pump()

    def _pump(self) -> None:
        """Start queued tasks while fewer than ``workers`` run."""
        while self._ready and self._queue and len(self._running) < self.workers:
            entry = self._queue[0]
            batch = entry.batch
            job = batch.job
            if entry.offset == 0:
                if not job.claim():
                    self._queue.popleft()
                    self._left(len(batch.items))
                    continue
                if self.broken is not None:
                    self._queue.popleft()
                    self._drop(entry, self.broken)
                    continue
                entry.is_async = is_coroutine_function(job.fn)
            elif job.cancelled:  # the rest of a batch nobody wants any more
                self._queue.popleft()
                self._left(len(batch.items) - entry.offset)
                continue
            budget = self.max_tasks_per_worker
            if budget is not None and self._started_tasks >= budget:
                self._ready = False
                self._loop.create_task(self._renew())
                return
            self._started_tasks += 1
            index = batch.start + entry.offset
            item = batch.items[entry.offset]
            entry.offset += 1
            if entry.offset == len(batch.items):
                self._queue.popleft()
            task = self._loop.create_task(self._one(job, index, item, entry.is_async))
            self._running[task] = (batch, index)
            task.add_done_callback(self._finished)

    def _drop(self, entry: _Queued, error: BaseException) -> None:
        """Fail the tasks of ``entry`` not started yet (claiming the batch if needed)."""
        batch = entry.batch
        count = len(batch.items) - entry.offset
        try:
            if entry.offset == 0 and not batch.job.claim():
                return
            pieces: list[Piece] = [
                Err(batch.start + i, error) for i in range(entry.offset, len(batch.items))
            ]
            batch.job.deliver(batch, pieces, 0.0)
        finally:
            self._left(count)

    async def _one(self, job: Job, index: int, item: Any, is_async: bool) -> tuple[Piece, float]:
        call = caller(job.fn, job.style)
        begin = time.perf_counter()
        started = time.monotonic()
        piece: Piece
        try:
            if is_async:
                value = await run_coroutine(call, item, index, job.timeout)
            else:
                value = await self._run_plain(call, item, index, job.timeout)
            piece = Ok(index, [value])
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # fenfa cancelled it: _finished reports it
            piece = Err(index, attach_traceback(exc))  # the task's own CancelledError
        except BaseException as exc:
            # Every exception is the task's failure, KeyboardInterrupt and
            # SystemExit included: they must not stop the loop.
            piece = Err(index, attach_traceback(exc))
        if job.timed:
            # (No CPU time: the coroutines of the loop share one thread.)
            piece.times = (started, time.monotonic(), None, who_runs())
        try:
            return piece, time.perf_counter() - begin
        finally:
            # The exception's traceback holds this frame: no cycle through it
            # keeping the task's function and input alive (see run_batch).
            del piece

    async def _run_plain(
        self, call: Callable[[Any], Any], item: Any, index: int, limit: float | None
    ) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="fenfa-async-sync")
        future = self._loop.run_in_executor(self._executor, self._in_thread, call, item)
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                value = await future
                if inspect.isawaitable(value):
                    value = await value
                return value
        except TimeoutError:
            if not scope.expired():
                raise
            raise TaskTimeout(
                f"task {index} ran longer than its timeout of {limit:g} s; its thread was "
                "abandoned (a plain function cannot be stopped: it goes on in the background "
                "and its result is discarded)",
                index=index,
                limit=limit,
            ) from None
        finally:
            if future.cancelled():  # its thread may go on: shutdown cannot join it
                self._threads_abandoned = True
            # The future holds the task's exception, whose traceback holds this
            # frame; the timeout scope holds the asyncio Task, whose result
            # holds the exception: no cycle may keep the task's input alive.
            del future, scope

    def _in_thread(self, call: Callable[[Any], Any], item: Any) -> Any:
        previous = set_slot(0, self.name, self._state)
        try:
            return call(item)
        finally:
            restore_slot(previous)

    def _finished(self, task: asyncio.Task[tuple[Piece, float]]) -> None:
        batch, index = self._running.pop(task)
        try:
            if task in self._reasons:
                reason = self._reasons.pop(task)
                if reason is not None:
                    batch.done += 1
                    batch.job.deliver(batch, [Err(index, reason)], 0.0)
            elif task.cancelled():  # not by fenfa: someone cancelled every task of the loop
                error = PoolClosed("the task was cancelled")
                batch.job.deliver(batch, [Err(index, error)], 0.0)
            else:
                piece, busy = task.result()
                batch.done += 1
                batch.job.deliver(batch, [piece], busy)
        finally:
            self._left(1)
            self._pump()

    def _left(self, count: int) -> None:
        """``count`` tasks were reported or dropped; stop the loop if closing and idle."""
        with self._lock:
            self._pending -= count
            if not (self._closing and self._pending == 0 and not self._stopped):
                return
            self._stopped = True
        if self._grace is not None:
            self._grace.cancel()
        self._loop.stop()

    def _cancel_job(self, job: Job) -> None:
        for task, (batch, _index) in self._running.items():
            if batch.job is job and task not in self._reasons:
                self._reasons[task] = None
                task.cancel()
        kept = [entry for entry in self._queue if entry.batch.job is not job]
        for entry in self._queue:
            if entry.batch.job is job:
                self._left(len(entry.batch.items) - entry.offset)
        self._queue = deque(kept)

    def _close(self, cancel: bool) -> None:
        self._closing = True
        if cancel and self._grace is None:
            self._grace = self._loop.call_later(CANCEL_GRACE_SECONDS, self._cancel_all)
        self._left(0)

    def _cancel_all(self) -> None:
        """The grace of a cancelling shutdown is over: stop everything still pending."""
        error = PoolClosed("the pool was shut down while the task ran")
        for task in self._running:
            if task not in self._reasons:
                self._reasons[task] = error
                task.cancel()
        while self._queue:
            self._drop(self._queue.popleft(), PoolClosed("the pool was shut down"))


__all__ = ["CANCEL_GRACE_SECONDS", "AsyncBackend"]
