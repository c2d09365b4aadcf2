"""fenfa inside an event loop: ``await amap(...)`` and ``async for r in aimap(...)``.

A coroutine function runs on the caller's own loop (not on the async
backend's thread): at most ``workers`` of its calls at once (default: the
async backend's, see :func:`fenfa.backends.default_workers`). A plain
function goes to fenfa's default pool for ``backend=`` (as ``fenfa.map``
would), one call per task, and the loop awaits the calls' futures: it never
blocks. For a great many tiny plain tasks, ``await asyncio.to_thread(fenfa.map,
fn, xs)`` is faster (it batches them).

Input is pulled lazily, at most ``window`` items ahead of what the consumer
has taken (default: twice ``workers`` for coroutines, four times the pool's
workers for plain functions). An async iterable is awaited; a plain iterable
is pulled on the loop, so it should not block. ``timeout``, ``retries`` and
``on_error`` behave as in ``fenfa.map``; ``chunksize`` is accepted and has no
effect (each task is dispatched on its own).

Cancellation: when the caller's task is cancelled (or an ``aimap`` is closed
or left early), every pending task is cancelled: coroutines at their next
``await``; calls of a plain function that have not started are dropped, those
running finish unseen. A coroutine's ``KeyboardInterrupt`` propagates, as on
the serial backend: it runs in the caller's thread.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sized,
)
from typing import Any, TypeVar

from . import api
from .backends import check_name, default_workers, usable_cores
from .backends.awaiting import run_coroutine
from .batchloop import attach_traceback
from .errors import FenfaError
from .options import CallOptions, check_callable
from .outcomes import annotate, from_input
from .progress import Progress
from .tasks import is_coroutine_function

R = TypeVar("R")

# Coroutines in flight, per `workers`: one running and one ready behind it.
# They wait on the loop, so a deeper window would only hold more input.
COROUTINE_WINDOW_PER_WORKER = 2
# Plain calls in flight, per pool worker: as the sync window (one running,
# one queued, results in transit), since each call is its own batch here.
CALL_WINDOW_PER_WORKER = 4

# How fenfa's own errors name the task in their message ("task 0 ran longer...").
_TASK_ZERO = re.compile(r"\btask 0\b")

_SKIP = object()  # on_error="skip": a task that stands for nothing


async def amap(
    fn: Callable[..., Any], iterable: Iterable[Any] | AsyncIterable[Any], **options: Any
) -> list[Any]:
    """``[fn(x) for x in iterable]``, awaited; raises the first failure seen, cancels the rest."""
    run = _Run(fn, iterable, ordered=True, options=options)
    results = run.results()
    try:
        return [value async for value in results]
    finally:
        await results.aclose()


def aimap(
    fn: Callable[..., Any],
    iterable: Iterable[Any] | AsyncIterable[Any],
    *,
    ordered: bool = True,
    **options: Any,
) -> AsyncIterator[Any]:
    """Results as they are ready: in input order (``ordered=True``) or as they finish.

    Options are checked now, at the call; nothing runs until the first ``__anext__``.
    """
    return _Run(fn, iterable, ordered=ordered, options=options).results()


def _renumber(error: BaseException, index: int) -> None:
    """A single call through the pool is "task 0": give the error this run's index.

    Its note (the packed call as input) goes too: :func:`annotate` writes the
    run's own. fenfa's errors that name a task (``TaskTimeout``, ``WorkerCrashed``,
    ``SerializationError``) get the right ``index`` and message.
    """
    notes = getattr(error, "__notes__", None)
    if notes:
        notes[:] = [n for n in notes if not n.startswith("fenfa: task ")]
    if isinstance(error, FenfaError) and getattr(error, "index", None) == 0:
        error.index = index  # type: ignore[attr-defined]
        if error.args and isinstance(error.args[0], str):
            message = _TASK_ZERO.sub(f"task {index}", error.args[0], count=1)
            error.args = (message, *error.args[1:])


class _Run:
    """One async call over many inputs: window, retries, errors, order, cancellation."""

    def __init__(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool,
        options: dict[str, Any],
    ) -> None:
        check_callable(fn)
        backend, workers, rest = api._split(dict(options))
        backend = check_name(backend)
        self.options = CallOptions().update(rest)
        self.fn = fn
        self.ordered = ordered
        self.backend = backend
        self.workers = workers
        self.is_async = is_coroutine_function(fn)
        if self.is_async and backend not in ("auto", "async"):
            raise ValueError(
                f"{fn!r} is a coroutine function: it runs on the caller's event loop, "
                f"not on backend {backend!r} (use backend='auto' or 'async')"
            )
        self._aiter: AsyncIterator[Any] | None = None
        self._iter: Iterator[Any] | None = None
        self._total = len(iterable) if isinstance(iterable, Sized) else None
        self._progress: Progress | None = None
        if isinstance(iterable, AsyncIterable):
            self._aiter = aiter(iterable)
        else:
            self._iter = iter(iterable)
        self._limit: asyncio.Semaphore | None = None
        self._pool: Any = None

    async def _pull(self) -> Any:
        """The next input item; ``StopAsyncIteration`` at the end."""
        if self._aiter is not None:
            return await anext(self._aiter)
        assert self._iter is not None
        try:
            return next(self._iter)
        except StopIteration:
            raise StopAsyncIteration from None

    async def _once(self, index: int, item: Any) -> Any:
        timeout = self.options.timeout
        if self._limit is not None:
            async with self._limit:
                return await run_coroutine(self.fn, item, index, timeout)
        future = self._pool._submit_call(self.fn, (item,), {}, timeout)
        return await asyncio.wrap_future(future)

    async def _task(self, index: int, item: Any) -> Any:
        """One task to its final outcome: retried, then reported as ``on_error`` says."""
        attempt = 1
        while True:
            try:
                return await self._once(index, item)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # cancelled by the run: nobody wants the result
                error: BaseException = exc  # the task's own CancelledError
            except KeyboardInterrupt:
                raise  # in the caller's thread: cannot be told from Ctrl-C
            except BaseException as exc:
                error = exc
            if self._limit is not None:
                attach_traceback(error)
            else:
                _renumber(error, index)
            if attempt <= self.options.retries:
                attempt += 1
                continue
            annotate(error, index, item, attempt)
            if self._progress is not None:
                self._progress.failure()
            if self.options.on_error == "return":
                return error
            if self.options.on_error == "skip":
                return _SKIP
            raise error

    async def _start(self) -> int:
        """Make ready to run; returns the window."""
        if self.is_async:
            workers = self.workers or default_workers("async")
            self._limit = asyncio.Semaphore(workers)
            per_worker = COROUTINE_WINDOW_PER_WORKER
        else:
            # Starting a pool may start processes: not on the loop.
            self._pool = await asyncio.to_thread(api._default_pool, self.backend, self.workers)
            workers = self._pool.workers or usable_cores()
            per_worker = CALL_WINDOW_PER_WORKER
        return self.options.window or per_worker * workers

    async def results(self) -> AsyncGenerator[Any, None]:
        window = await self._start()
        loop = asyncio.get_running_loop()
        tasks: dict[int, asyncio.Task[Any]] = {}  # pulled and not yet handed over
        finished: deque[int] = deque()
        wake = asyncio.Event()

        def done(index: int, _task: asyncio.Task[Any]) -> None:
            finished.append(index)
            wake.set()

        next_index = 0
        cursor = 0  # ordered: the next index to hand over
        exhausted = failed = False
        input_error: Exception | None = None
        if self.options.progress:
            self._progress = Progress(self.options.progress, self._total, self.fn)
        try:
            while True:
                while not exhausted and not failed and len(tasks) < window:
                    try:
                        item = await self._pull()
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    except Exception as exc:
                        # As builtins.map: the results before it first, then this.
                        input_error = from_input(exc, next_index)
                        exhausted = True
                        break
                    task = loop.create_task(self._task(next_index, item))
                    task.add_done_callback(functools.partial(done, next_index))
                    tasks[next_index] = task
                    next_index += 1
                ready: list[int] = []
                while finished:
                    index = finished.popleft()
                    done_task = tasks.get(index)
                    if done_task is None:
                        continue  # handed over already (ordered: found done at the cursor)
                    if done_task.exception() is not None:
                        if not self.ordered:
                            tasks.pop(index).result()  # raises it
                        failed = True  # ordered: raised when the consumer reaches it
                    ready.append(index)
                if self.ordered:
                    ready = []
                    while cursor in tasks and tasks[cursor].done():
                        ready.append(cursor)
                        cursor += 1
                else:
                    ready.sort()
                for index in ready:
                    value = tasks.pop(index).result()
                    if self._progress is not None:
                        self._progress.advance(1)
                    if value is not _SKIP:
                        yield value
                if not tasks and (exhausted or failed):
                    if input_error is not None and not failed:
                        raise input_error
                    return
                if not ready:
                    wake.clear()
                    await wake.wait()
        finally:
            for task in tasks.values():
                task.cancel()
            if self._progress is not None:
                self._progress.close()
