"""The Pool: options, lifecycle, and the window that every call runs through.

A call (``map``, ``imap``...) becomes a :class:`_Run`. The run pulls items
from the input only when it has room, cuts them into batches whose size the
:class:`~fenfa.tasks.ChunkSizer` picks from measured task times, hands them
to the backend, and takes the pieces that come back off one queue. Window,
chunking, retries, error handling and ordering live here, once, for every
backend; a backend only runs batches.

The window counts every task pulled from the input and not yet handed to the
consumer, results waiting in the reorder buffer included: a slow first task
in an ordered ``imap`` stops the input being pulled, instead of letting
finished results pile up behind it.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from operator import length_hint
from typing import Any, ParamSpec, TypeVar

from .backends import Backend, backend_class, check_name, default_workers
from .errors import PoolClosed, short_repr
from .tasks import Batch, ChunkSizer, Job, Ok, Piece, Style

P = ParamSpec("P")
R = TypeVar("R")

ON_ERROR = ("raise", "return", "skip")
CALL_OPTIONS = ("chunksize", "window", "timeout", "retries", "on_error")
POOL_ONLY_OPTIONS = ("initializer", "initargs", "start_method", "max_tasks_per_worker")
START_METHODS = ("fork", "forkserver", "spawn")

# The default window holds this many batches per worker: one running, one
# queued behind it, and room for finished results on their way back and in
# the reorder buffer, so workers never wait for the consumer's next pull.
WINDOW_BATCHES_PER_WORKER = 4


def _positive(name: str, value: object, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class CallOptions:
    """The per-call options, validated; a Pool holds the defaults."""

    chunksize: int | None = None
    window: int | None = None
    timeout: float | None = None
    retries: int = 0
    on_error: str = "raise"

    def __post_init__(self) -> None:
        _positive("chunksize", self.chunksize)
        _positive("window", self.window)
        if self.timeout is not None and (
            not isinstance(self.timeout, int | float)
            or isinstance(self.timeout, bool)
            or not self.timeout > 0
        ):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {self.retries!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(
                f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {self.on_error!r}"
            )

    def update(self, overrides: dict[str, Any]) -> CallOptions:
        unknown = [name for name in overrides if name not in CALL_OPTIONS]
        if unknown:
            raise TypeError(
                f"unknown option {unknown[0]!r} for a pool call; "
                f"options are: {', '.join(CALL_OPTIONS)}"
            )
        return replace(self, **overrides) if overrides else self


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {short_repr(fn)}")


def annotate(exc: BaseException, index: int, item: Any, attempts: int) -> BaseException:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    exc.add_note(f"fenfa: task {index} failed{tries}; input: {short_repr(item)}")
    return exc


class _Run:
    """One call over many inputs: window, batches, retries, errors, order."""

    def __init__(
        self,
        pool: Pool,
        fn: Callable[..., Any],
        style: Style,
        inputs: Iterator[Any],
        *,
        total: int | None,
        ordered: bool,
        fail_fast: bool,
        options: CallOptions,
        deadline: float | None = None,
    ) -> None:
        self._pool = pool
        self._backend = pool._backend
        self._inputs = inputs
        self._ordered = ordered
        self._fail_fast = fail_fast
        self._options = options
        self._deadline = deadline
        # A run driven in the background (map_async) was accepted whole: it
        # may go on pulling input after shutdown() has been called.
        self.background = False
        self._job = Job(fn, style, self._deliver)
        self._job.timeout = options.timeout
        # Nothing after a failure will be used: a backend that runs tasks in
        # order (serial) stops there, as builtins.map does.
        self._job.stop_on_error = options.on_error == "raise" and options.retries == 0
        self._results: queue.SimpleQueue[tuple[Batch, list[Piece], float]] = queue.SimpleQueue()
        workers = self._backend.workers
        self._sizer = ChunkSizer(workers, total, options.chunksize)
        self._next = 0  # index of the next item pulled
        self._exhausted = False
        self._in_window = 0  # pulled and not yet handed to the consumer
        self._unfinished = 0  # pulled and without a final outcome yet
        self._probes = 0
        # ordered: start index -> (tasks covered, values or an error to raise)
        self._ready: dict[int, tuple[int, list[Any] | BaseException]] = {}
        self._cursor = 0
        self._out: deque[tuple[int, list[Any] | BaseException]] = deque()

    def _deliver(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        self._results.put((batch, pieces, busy))

    # -- pulling input --------------------------------------------------

    def fill(self) -> None:
        backend = self._backend
        workers = backend.workers
        per_worker = 1 if backend.name == "serial" else WINDOW_BATCHES_PER_WORKER
        while not self._exhausted:
            size = self._sizer.size(self._next)
            if self._options.window is not None:
                window = self._options.window
                size = min(size, max(1, window // workers))
            else:
                window = per_worker * workers * size
            if window - self._in_window < size:
                # Wait for room for a whole batch: filling every small gap
                # would echo small batches through the window forever.
                return
            probing = self._sizer.task_seconds is None and self._options.chunksize is None
            if probing and self._probes >= workers:
                return  # one task per worker until a time is measured
            items = list(itertools.islice(self._inputs, size))
            if len(items) < size:
                self._exhausted = True
            if not items:
                return
            batch = Batch(self._job, self._next, items, expected=self._sizer.expected(len(items)))
            self._next += len(items)
            self._in_window += len(items)
            self._unfinished += len(items)
            self._probes += probing
            self._pool._submit_batch(batch, internal=self.background)
            if self._backend.inline:
                return  # it ran already: look at its outcome before running more

    # -- taking results -------------------------------------------------

    def _wait(self) -> tuple[Batch, list[Piece], float]:
        if self._deadline is None:
            return self._results.get()
        remaining = self._deadline - time.monotonic()
        try:
            return self._results.get(timeout=max(0.0, remaining))
        except queue.Empty:
            raise TimeoutError("the results did not all arrive within the timeout") from None

    def _absorb(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        tasks = 0
        options = self._options
        for piece in pieces:
            if isinstance(piece, Ok):
                count = len(piece.values)
                tasks += count
                self._unfinished -= count
                self._put(piece.start, count, piece.values)
                continue
            tasks += 1
            index = piece.index
            item = batch.item(index)
            if batch.attempt <= options.retries:
                retry = Batch(self._job, index, [item], batch.attempt + 1)
                self._pool._submit_batch(retry, urgent=True, internal=True)
                continue
            self._unfinished -= 1
            error = annotate(piece.error, index, item, batch.attempt)
            if options.on_error == "return":
                self._put(index, 1, [error])
            elif options.on_error == "skip":
                self._put(index, 1, [])
            elif self._fail_fast or not self._ordered:
                raise error
            else:
                # Raised when the consumer reaches it; nothing after it is needed.
                self._put(index, 1, error)
                self._exhausted = True
        self._sizer.measured(busy, tasks)

    def _put(self, start: int, count: int, values: list[Any] | BaseException) -> None:
        if self._ordered:
            self._ready[start] = (count, values)
        else:
            self._out.append((count, values))

    def _take(self) -> tuple[int, list[Any] | BaseException] | None:
        if not self._ordered:
            return self._out.popleft() if self._out else None
        entry = self._ready.pop(self._cursor, None)
        if entry is not None:
            self._cursor += entry[0]
        return entry

    def pieces(self) -> Generator[list[Any], None, None]:
        """Lists of results, in the order the call promised; cleans up however it is left.

        A piece counts against the window until the consumer asks for the
        next one, that is, until it has taken every value of this one.
        """
        try:
            while True:
                self.fill()
                entry = self._take()
                if entry is not None:
                    count, values = entry
                    if isinstance(values, BaseException):
                        raise values
                    yield values
                    self._in_window -= count
                    continue
                if self._exhausted and self._unfinished == 0:
                    return
                self._absorb(*self._wait())
        except KeyboardInterrupt:
            # Ctrl-C: nobody wants these results; stop the tasks now running
            # (process workers are killed and replaced).
            self._backend.abandon(self._job)
            raise
        finally:
            self.cancel()

    def results(self) -> Iterator[Any]:
        """One value at a time; a generator, so ``close()`` cancels the call."""
        pieces = self.pieces()
        try:
            for values in pieces:
                yield from values
        finally:
            pieces.close()

    def collect(self) -> list[Any]:
        out: list[Any] = []
        for values in self.pieces():
            out.extend(values)
        return out

    def cancel(self) -> None:
        """Drop every batch not started yet; running ones finish, unseen."""
        self._job.cancelled = True


class _FutureJob(Job):
    """A single call whose outcome goes to a ``concurrent.futures.Future``."""

    __slots__ = ("claim_lock", "future", "pool", "retries", "started")

    def __init__(
        self, pool: Pool, fn: Callable[..., Any], retries: int, timeout: float | None
    ) -> None:
        super().__init__(fn, Style.CALL, self._done)
        self.pool = pool
        self.retries = retries
        self.timeout = timeout
        self.future: Future[Any] = Future()
        self.started = False
        self.claim_lock = threading.Lock()

    def claim(self) -> bool:
        with self.claim_lock:
            if self.started:  # a retry (the future runs already), or cancelled
                return not self.future.cancelled()
            self.started = True
            return self.future.set_running_or_notify_cancel()

    def cancel(self) -> None:
        """Cancel if not started, and tell waiters at once (``wait()`` counts it done)."""
        with self.claim_lock:
            if not self.started and self.future.cancel():
                self.started = True
                self.future.set_running_or_notify_cancel()

    def dropped(self) -> bool:
        return self.future.cancelled()

    def _done(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        piece = pieces[0]
        if self.future.done():
            return  # e.g. failed by a shutdown while an abandoned thread ran it
        if isinstance(piece, Ok):
            self.future.set_result(piece.values[0])
        elif batch.attempt <= self.retries:
            retry = Batch(self, batch.start, batch.items, batch.attempt + 1)
            try:
                self.pool._submit_batch(retry, urgent=True, internal=True)
            except BaseException as exc:
                self.future.set_exception(exc)
        else:
            self.future.set_exception(annotate(piece.error, 0, batch.items[0], batch.attempt))
        self.pool._forget(self)


class _State(enum.Enum):
    RUNNING = "running"
    CLOSED = "closed"


def resolve_backend(backend: str, workers: int | None) -> str:
    """``auto``, until it measures (a later release): serial for one worker, else process."""
    name = check_name(backend)
    if name != "auto":
        return name
    count = workers if workers is not None else default_workers("process")
    return "serial" if count == 1 else "process"


class Pool:
    """A set of workers of one backend, and the calls that run on them.

    ``Pool(backend="auto", workers=None, **options)``; the per-call options
    given here (``chunksize``, ``window``, ``retries``, ``on_error``) are the
    defaults of every call, which may override them.
    """

    def __init__(
        self,
        backend: str = "auto",
        workers: int | None = None,
        *,
        chunksize: int | None = None,
        window: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        on_error: str = "raise",
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        _positive("workers", workers)
        _positive("max_tasks_per_worker", max_tasks_per_worker)
        if start_method is not None and start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(START_METHODS)}, got {start_method!r}"
            )
        if initializer is not None:
            _check_callable(initializer)
        self._options = CallOptions(chunksize, window, timeout, retries, on_error)
        self.backend: str = resolve_backend(backend, workers)
        count = workers if workers is not None else default_workers(self.backend)
        kwargs: dict[str, Any] = {
            "initializer": initializer,
            "initargs": tuple(initargs),
            "max_tasks_per_worker": max_tasks_per_worker,
        }
        if self.backend == "process":
            kwargs["start_method"] = start_method
        self._backend: Backend = backend_class(self.backend)(count, **kwargs)
        self.workers: int = self._backend.workers
        self._state = _State.RUNNING
        self._lock = threading.Lock()
        self._futures: set[_FutureJob] = set()
        # Threads driving map_async calls; shutdown lets them finish first.
        self._drivers: set[threading.Thread] = set()
        self._stop_after_drivers = False
        # A pool dropped without shutdown() still lets its workers go: as
        # concurrent.futures' executors do when they are garbage collected.
        weakref.finalize(self, self._backend.shutdown, wait=False)

    def __repr__(self) -> str:
        return f"<fenfa.Pool backend={self.backend!r} workers={self.workers} {self._state.value}>"

    # -- lifecycle ------------------------------------------------------

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._state is not _State.RUNNING:
            raise PoolClosed("this pool has been shut down")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; idempotent, as ``concurrent.futures``.

        Work already submitted runs to the end (unless ``cancel_futures``
        cancels the futures not yet started); ``wait=True`` returns once every
        worker has stopped.
        """
        with self._lock:
            self._state = _State.CLOSED
            futures = list(self._futures)
            drivers = list(self._drivers)
            if drivers and not wait:
                # The last map_async to finish stops the backend.
                self._stop_after_drivers = True
        if cancel_futures:
            for job in futures:
                job.cancel()
        if drivers and not wait:
            return
        for thread in drivers:
            thread.join()
        self._backend.shutdown(wait=wait, cancel=cancel_futures)

    def _submit_batch(self, batch: Batch, *, urgent: bool = False, internal: bool = False) -> None:
        if not internal:
            self._check_open()
        self._backend.submit(batch, urgent=urgent)

    def _forget(self, job: _FutureJob) -> None:
        with self._lock:
            self._futures.discard(job)

    # -- single calls ---------------------------------------------------

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` on a worker; a ``concurrent.futures.Future``."""
        return self._submit_call(fn, args, kwargs, self._options.timeout)

    def _submit_call(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Future[R]:
        _check_callable(fn)
        if timeout != self._options.timeout:
            CallOptions(timeout=timeout)  # checks it
        job = _FutureJob(self, fn, self._options.retries, timeout)
        with self._lock:
            self._check_open()
            self._futures.add(job)
        try:
            self._backend.submit(Batch(job, 0, [(args, kwargs)]))
        except BaseException:
            self._forget(job)
            raise
        return job.future

    def apply(
        self, fn: Callable[..., R], args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> R:
        """Run one call and wait for its result, as ``multiprocessing.Pool.apply``."""
        return self.apply_async(fn, args, kwargs).result()

    def apply_async(
        self, fn: Callable[..., R], args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Future[R]:
        return self.submit(fn, *args, **(kwargs or {}))

    # -- many calls -----------------------------------------------------

    def _run(
        self,
        fn: Callable[..., Any],
        style: Style,
        inputs: Iterable[Any],
        *,
        total: int | None,
        ordered: bool,
        fail_fast: bool,
        options: dict[str, Any],
        deadline: float | None = None,
    ) -> _Run:
        _check_callable(fn)
        call_options = self._options.update(options)
        self._check_open()
        return _Run(
            self,
            fn,
            style,
            iter(inputs),
            total=total,
            ordered=ordered,
            fail_fast=fail_fast,
            options=call_options,
            deadline=deadline,
        )

    def _spread(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        ordered: bool,
        fail_fast: bool,
        options: dict[str, Any],
    ) -> _Run:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        # Like builtins.map: several iterables stop at the shortest.
        lengths = [_length(it) for it in iterables]
        total = None if None in lengths else min(lengths)  # type: ignore[type-var]
        if len(iterables) == 1:
            return self._run(
                fn,
                Style.ONE,
                iterables[0],
                total=total,
                ordered=ordered,
                fail_fast=fail_fast,
                options=options,
            )
        return self._run(
            fn,
            Style.STAR,
            zip(*iterables, strict=False),
            total=total,
            ordered=ordered,
            fail_fast=fail_fast,
            options=options,
        )

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> list[R]:
        """``list(map(fn, *iterables))`` on the workers; raises the first failure seen."""
        return self._spread(fn, iterables, True, True, options).collect()

    def imap(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
        """Lazy and ordered; at most ``window`` inputs pulled ahead of the consumer."""
        return self._spread(fn, iterables, True, False, options).results()

    def imap_unordered(
        self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any
    ) -> Iterator[R]:
        """Lazy; results in the order they finish."""
        return self._spread(fn, iterables, False, False, options).results()

    def starmap(
        self, fn: Callable[..., R], iterable: Iterable[Iterable[Any]], **options: Any
    ) -> list[R]:
        """``[fn(*args) for args in iterable]`` on the workers."""
        run = self._run(
            fn,
            Style.STAR,
            iterable,
            total=_length(iterable),
            ordered=True,
            fail_fast=True,
            options=options,
        )
        return run.collect()

    def map_async(
        self, fn: Callable[..., R], iterable: Iterable[Any], **options: Any
    ) -> Future[list[R]]:
        """``map`` in the background; a Future of the list."""
        run = self._spread(fn, (iterable,), True, True, options)
        run.background = True
        future: Future[list[R]] = Future()
        future.set_running_or_notify_cancel()

        def drive() -> None:
            try:
                result = run.collect()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._drivers.discard(thread)
                    stop = self._stop_after_drivers and not self._drivers
                if stop:
                    self._backend.shutdown(wait=False)

        thread = threading.Thread(target=drive, name="fenfa-map-async", daemon=True)
        with self._lock:
            self._check_open()
            self._drivers.add(thread)
        thread.start()
        return future


def _length(iterable: Iterable[Any]) -> int | None:
    hint = length_hint(iterable, -1)
    return None if hint < 0 or not hasattr(iterable, "__len__") else hint


__all__ = ["CallOptions", "Pool"]
