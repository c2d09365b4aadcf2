"""The Pool: options, lifecycle, backend selection, and single calls.

Calls over many inputs run through :class:`fenfa.window.Run`; single calls
(``submit``, ``apply``) through a :class:`_FutureJob` whose outcome goes to a
``concurrent.futures.Future``.
"""

from __future__ import annotations

import enum
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from operator import length_hint
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import _shadow
from .auto import Decision, unmeasured
from .backends import Backend, backend_class, check_name, default_workers
from .errors import PoolClosed
from .insights import Insights
from .options import (
    START_METHODS,
    WORKER_OUTPUT,
    CallOptions,
    check_callable,
    check_native_threads,
    positive,
    size_in_bytes,
    worker_count,
)
from .tasks import Batch, Job, Ok, Piece, Style, is_coroutine_function
from .window import Run, annotate

if TYPE_CHECKING:
    from concurrent.futures import Future

# The per-call options that hand a call to fenfa.journaled (imported only then).
_JOURNAL_OPTIONS = frozenset({"journal", "journal_fsync", "journal_retry_failed"})

P = ParamSpec("P")
R = TypeVar("R")


class _FutureJob(Job):
    """A single call whose outcome goes to a ``concurrent.futures.Future``."""

    __slots__ = ("claim_lock", "future", "pool", "retries", "started")

    def __init__(
        self, pool: Pool, fn: Callable[..., Any], retries: int, timeout: float | None
    ) -> None:
        # ``deliver`` is a method, not a bound method stored on the job: no
        # reference cycle keeps the callable and its arguments alive after
        # the call (as concurrent.futures frees them, bpo-16284).
        super().__init__(fn, Style.CALL, None)
        self.pool = pool
        self.retries = retries
        self.timeout = timeout
        from concurrent.futures import Future  # (its import costs ~5 ms: not for map)

        self.future: Future[Any] = Future()
        self.started = False
        self.claim_lock = threading.Lock()

    def claim(self) -> bool:
        with self.claim_lock:
            if self.started:  # a retry (the future runs already), or cancelled
                return not self.future.cancelled()
            self.started = True
            running = self.future.set_running_or_notify_cancel()
        if not running:  # cancelled by its owner before it started
            self.release_shared()
            self.pool._forget(self)
        return running

    def cancel(self) -> None:
        """Cancel if not started, and tell waiters at once (``wait()`` counts it done)."""
        with self.claim_lock:
            if not self.started and self.future.cancel():
                self.started = True
                self.future.set_running_or_notify_cancel()
        if self.future.done():
            self.release_shared()
        self.pool._forget(self)

    def dropped(self) -> bool:
        return self.future.cancelled()

    def deliver(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
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
        if self.future.done():
            self.release_shared()
        self.pool._forget(self)


class _State(enum.Enum):
    RUNNING = "running"
    CLOSED = "closed"


def resolve_backend(backend: str, workers: int | None) -> str:
    """The backend a pool starts with: ``auto`` stays undecided unless one worker is asked for.

    With one worker nothing runs in parallel, so ``auto`` is ``serial`` at once.
    """
    name = check_name(backend)
    if name == "auto" and workers == 1:
        return "serial"
    return name


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
        progress: bool | dict[str, Any] = False,
        insights: bool | Insights = False,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        start_method: str | None = None,
        max_tasks_per_worker: int | None = None,
        native_threads: int | str | bool = "auto",
        worker_output: str = "relay",
        address: str | None = None,
        speculate: bool = False,
        memory_floor: int | str | None = None,
        max_worker_memory: int | str | None = None,
    ) -> None:
        workers = worker_count(workers)
        if address is not None and not isinstance(address, str):
            raise ValueError(
                f"address must be a dask scheduler address such as 'tcp://host:8786', "
                f"got {address!r}"
            )
        check_native_threads(native_threads)
        if worker_output not in WORKER_OUTPUT:
            raise ValueError(
                f"worker_output must be one of {', '.join(map(repr, WORKER_OUTPUT))}, "
                f"got {worker_output!r}"
            )
        positive("max_tasks_per_worker", max_tasks_per_worker)
        if start_method is not None and start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(START_METHODS)}, got {start_method!r}"
            )
        if initializer is not None:
            check_callable(initializer)
        if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
            raise TypeError(
                f"initargs must be a tuple of the initializer's arguments, got {initargs!r} "
                f"(for one argument: initargs=({initargs!r},))"
            )
        self._options = CallOptions(
            chunksize, window, timeout, retries, on_error, progress, insights, speculate
        )
        self._backend_options: dict[str, Any] = {
            "memory_floor": size_in_bytes("memory_floor", memory_floor),
            "max_worker_memory": size_in_bytes("max_worker_memory", max_worker_memory),
            "initializer": initializer,
            "initargs": tuple(initargs),
            "max_tasks_per_worker": max_tasks_per_worker,
            "start_method": start_method,
            "native_threads": native_threads,
            "worker_output": worker_output,
            "address": address,
        }
        #: The resolved backend; "auto" until the first call has been measured.
        self.backend: str = resolve_backend(backend, workers)
        if address is not None and self.backend != "dask":
            raise ValueError(f"address is an option of the 'dask' backend, not {backend!r}")
        #: The number of workers (None while "auto" is undecided).
        self.workers: int | None = workers
        #: ``insights.decision``: what "auto" chose, and the evidence.
        self.insights = Insights()
        # Module-level calls with backend "auto" measure every call and send
        # the rest to the default pool of the chosen backend.
        self._router: Callable[[Decision], Pool] | None = None
        self._backend: Backend | None = None
        if self.backend != "auto":
            self._start_backend(self.backend)
        elif initializer is not None:
            # Measuring runs tasks on probe threads, where the initializer has
            # not run: decide without measuring.
            self._start_backend("process")
            self.insights.decision = unmeasured(
                lambda: None, "an initializer was given, which measuring cannot run"
            )
        self._state = _State.RUNNING
        self._lock = threading.Lock()
        self._futures: set[_FutureJob] = set()
        # Threads driving map_async calls; shutdown lets them finish first.
        self._drivers: set[threading.Thread] = set()
        self._stop_after_drivers = False

    def _check_fits(self, fn: Callable[..., Any]) -> None:
        if self._backend is not None and self.backend != "async" and is_coroutine_function(fn):
            raise TypeError(
                f"{fn!r} is a coroutine function: the {self.backend!r} backend would only "
                "return un-awaited coroutines; use backend='async' (or 'auto')"
            )

    def _start_backend(self, name: str) -> Backend:
        options = dict(self._backend_options)
        if name != "process":
            del options["start_method"]
            del options["native_threads"]
            del options["worker_output"]
            del options["max_worker_memory"]  # (a process worker's: documented)
        if name not in ("process", "thread"):
            del options["memory_floor"]
        if name == "dask":
            options["workers_from_cluster"] = self.workers is None
        else:
            del options["address"]
        count = self.workers if self.workers is not None else default_workers(name)
        try:
            backend = backend_class(name)(count, **options)
        except (AttributeError, ImportError):
            _shadow.check()  # a file beside the script hides a standard module?
            raise
        self._backend = backend
        if hasattr(backend, "reruns"):
            backend.insights = self.insights  # type: ignore[attr-defined]
        self.backend = name
        self.workers = backend.workers
        # A pool dropped without shutdown() still lets its workers go: as
        # concurrent.futures' executors do when they are garbage collected.
        weakref.finalize(self, backend.shutdown, wait=False)
        return backend

    def _settle(self, decision: Decision) -> Pool:
        """Adopt what "auto" decided on the first call (later calls keep it)."""
        if self._router is not None:
            self.insights.decision = decision  # the latest call's
            return self._router(decision)
        with self._lock:
            if self._backend is None:
                self._check_open()
                self._start_backend(decision.backend)
                self.insights.decision = decision
        return self

    def _ready_backend(self, fn: Callable[..., Any]) -> Backend:
        """The backend for a single call: on an undecided pool, chosen without measuring."""
        if self._backend is None:
            why = "the first call was a single one, which cannot be measured"
            self._settle(unmeasured(fn, why))
        assert self._backend is not None
        return self._backend

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
        if self._backend is not None:
            self._backend.shutdown(wait=wait, cancel=cancel_futures)

    def _submit_batch(self, batch: Batch, *, urgent: bool = False, internal: bool = False) -> None:
        if not internal:
            self._check_open()
        assert self._backend is not None, "an auto pool settles before its first batch"
        if batch.job.timed:
            batch.submitted = time.monotonic()
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
        check_callable(fn)
        self._check_fits(fn)
        if timeout != self._options.timeout:
            CallOptions(timeout=timeout)  # checks it
        if self._router is not None:
            why = "a single call cannot be measured against the cost of dispatching it"
            return self._router(unmeasured(fn, why))._submit_call(fn, args, kwargs, timeout)
        job = _FutureJob(self, fn, self._options.retries, timeout)
        with self._lock:
            self._check_open()
            self._futures.add(job)
        try:
            self._ready_backend(fn).submit(Batch(job, 0, [(args, kwargs)]))
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
        options: dict[str, Any],
        deadline: float | None = None,
    ) -> Run:
        check_callable(fn)
        self._check_fits(fn)
        call_options = self._options.update(options)
        self._check_open()
        undecided = self._router is not None or self._backend is None
        chooser = self._settle if undecided else None
        recorder = call_options.insights
        if recorder is True:
            recorder = self.insights
        elif recorder is False:
            recorder = None
        return Run(
            self,
            fn,
            style,
            iter(inputs),
            total=total,
            ordered=ordered,
            options=call_options,
            deadline=deadline,
            chooser=chooser,
            recorder=recorder,
        )

    def _spread(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        ordered: bool,
        options: dict[str, Any],
    ) -> Run:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        given: tuple[Any, ...] = iterables  # (typed as iterables; checked as anything)
        for position, iterable in enumerate(given[1:], 2):
            if not isinstance(iterable, Iterable):
                hint = (
                    f" (multiprocessing's positional chunksize? here it is a keyword: "
                    f"chunksize={iterable!r})"
                    if isinstance(iterable, int) and position == 2
                    else ""
                )
                raise TypeError(
                    f"argument {position} after the function must be an iterable of inputs, "
                    f"got {iterable!r}{hint}"
                )
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
                options=options,
            )
        return self._run(
            fn,
            Style.STAR,
            zip(*iterables, strict=False),
            total=total,
            ordered=ordered,
            options=options,
        )

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> list[R]:
        """``list(map(fn, *iterables))`` on the workers; raises the first failure seen."""
        if _JOURNAL_OPTIONS & options.keys():  # journal=: see fenfa.journaled
            from .journaled import journaled_list

            if (done := journaled_list(self, fn, iterables, options)) is not None:
                return done
        return self._spread(fn, iterables, True, options).collect()

    def imap(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
        """Lazy and ordered; at most ``window`` inputs pulled ahead of the consumer."""
        if _JOURNAL_OPTIONS & options.keys():
            from .journaled import journaled

            if (call := journaled(self, fn, iterables, options, ordered=True)) is not None:
                return call
        return self._spread(fn, iterables, True, options).results()

    def imap_unordered(
        self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any
    ) -> Iterator[R]:
        """Lazy; results in the order they finish."""
        if _JOURNAL_OPTIONS & options.keys():
            from .journaled import journaled

            if (call := journaled(self, fn, iterables, options, ordered=False)) is not None:
                return call
        return self._spread(fn, iterables, False, options).results()

    def starmap(
        self, fn: Callable[..., R], iterable: Iterable[Iterable[Any]], **options: Any
    ) -> list[R]:
        """``[fn(*args) for args in iterable]`` on the workers."""
        if _JOURNAL_OPTIONS & options.keys():
            from .journaled import journaled_list

            if (done := journaled_list(self, fn, (iterable,), options, star=True)) is not None:
                return done
        run = self._run(
            fn,
            Style.STAR,
            iterable,
            total=_length(iterable),
            ordered=True,
            options=options,
        )
        return run.collect()

    def map_async(
        self, fn: Callable[..., R], iterable: Iterable[Any], **options: Any
    ) -> Future[list[R]]:
        """``map`` in the background; a Future of the list."""
        from concurrent.futures import Future

        run = self._spread(fn, (iterable,), True, options)
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
                if stop and self._backend is not None:
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
