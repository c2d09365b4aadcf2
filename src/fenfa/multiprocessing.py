"""``multiprocessing.pool.Pool`` and ``ThreadPool``, with fenfa underneath.

Change one import and keep the rest of the code::

    from fenfa.multiprocessing import Pool        # was: from multiprocessing import Pool
    with Pool(4) as pool:
        pool.map(f, xs, chunksize=100)

Every method of the standard library's pool is here, with its signature,
its ``ValueError``\\ s and its ``multiprocessing.TimeoutError``; a task's
exception is re-raised with the worker's traceback as ``__cause__`` (a
``multiprocessing.pool.RemoteTraceback``). ``Pool`` runs on fenfa's process
backend, ``ThreadPool`` on its thread backend.

Where the standard library hangs or misbehaves, fenfa's behaviour wins:

- A worker killed mid-task (signal, ``os._exit``, segfault) fails that task:
  ``get()`` raises ``fenfa.WorkerCrashed`` (the stdlib's waits for ever).
- A result that will not pickle fails its task with ``fenfa.SerializationError``
  (the stdlib's raises ``MaybeEncodingError``); an exception that pickles but
  will not unpickle (an ``__init__`` taking other arguments than it passes
  on) reaches the caller with its type (the stdlib's result thread dies and
  every later ``get()`` hangs).
- ``imap``/``imap_unordered`` pull their input lazily, at most a window ahead
  of the consumer (the stdlib's reads a generator to the end, into memory);
  an iterator dropped unread stops its call. After ``close()`` what was
  submitted still runs to the end, as in the stdlib.
- Callbacks run one at a time on a thread of their own, never on the thread
  that delivers results: a slow callback delays only later callbacks, a
  callback may wait for another result, and one that raises is logged
  (logger ``fenfa.multiprocessing``) instead of killing the pool.
- ``terminate()`` fails every unfinished result with ``fenfa.PoolClosed``
  (the stdlib's leave them unready: ``get()`` hangs).
- The start method is fenfa's safe default, forkserver, unless ``context=``
  names another (a context object or a start-method name).
- ``map``/``starmap`` raise at the first failure and drop the tasks not yet
  started (the stdlib's runs every task first); ``chunksize=None`` sizes
  batches by measured task time (the stdlib's: a quarter of the input per
  worker); ``maxtasksperchild`` counts calls, not chunks; an exception carries
  a note naming the failed task's index and input.
- An argument that will not pickle fails its task with ``SerializationError``
  (the stdlib's raises the pickling error itself); an input that raises
  mid-``imap`` comes after every result before it, whatever the chunk size
  (the stdlib's loses the rest of that chunk).
- No ``ResourceWarning`` for a pool dropped unclosed (fenfa lets its workers
  go when it is collected); ``_pool`` is fenfa's pool, not a list of workers.
- ``processes=None`` is the number of CPUs this process may use (affinity),
  not ``os.cpu_count()``; workers are named by fenfa, not ``ForkPoolWorker-N``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from ._mp_results import AsyncResult, Callback, IMapIterator, IMapState, Registry, translate
from .backends import default_workers
from .errors import PoolClosed
from .pool import Pool as _FenfaPool
from .tasks import Style

R = TypeVar("R")

# The pool's states, named as the standard library's (they show in repr()).
RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"

# Values an imap's pump thread may hold beyond fenfa's window, per worker and
# chunk: enough that workers never wait for a consumer that reads steadily.
IMAP_BUFFER_CHUNKS_PER_WORKER = 2


def _start_method(context: Any) -> str | None:
    if context is None or isinstance(context, str):
        return context
    method: str = context.get_start_method()
    return method


def _length(iterable: Iterable[Any]) -> int | None:
    return len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]


class Pool:
    """``multiprocessing.pool.Pool`` on fenfa's process backend; see the module docstring."""

    _backend = "process"

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
    ) -> None:
        self._state = RUN
        if processes is None:
            processes = default_workers("process")
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        options: dict[str, Any] = {"initializer": initializer, "initargs": initargs}
        if self._backend == "process":
            options["max_tasks_per_worker"] = maxtasksperchild
            options["start_method"] = _start_method(context)
        self._pool = _FenfaPool(self._backend, processes, **options)
        self._processes = processes
        self._registry = Registry()
        self._lock = threading.Lock()
        # Set by terminate(): every call's input stops yielding, so a call
        # driven in the background ends with the tasks already handed out.
        self._stopped = threading.Event()
        self._threads: set[threading.Thread] = set()

    def __repr__(self) -> str:
        cls = type(self)
        return (
            f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={self._processes}>"
        )

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _guard(self, iterable: Iterable[Any]) -> Iterator[Any]:
        stopped = self._stopped
        for item in iterable:
            if stopped.is_set():
                return
            yield item

    def _start(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name="fenfa-mp-map", daemon=True)
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            self._threads.add(thread)
        thread.start()
        return thread

    # -- single calls ---------------------------------------------------

    def apply(
        self, func: Callable[..., R], args: Iterable[Any] = (), kwds: Mapping[str, Any] = {}
    ) -> R:
        """``func(*args, **kwds)`` on a worker, waited for.

        (``kwds={}`` as in the standard library's signature: it is never mutated.)
        """
        result: R = self.apply_async(func, args, kwds).get()
        return result

    def apply_async(
        self,
        func: Callable[..., object],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> AsyncResult:
        self._check_running()
        result = AsyncResult(self._registry, callback, error_callback)
        try:
            future = self._pool.submit(func, *args, **kwds)
        except BaseException:
            self._registry.discard(result)
            raise
        result.follow(future)
        return result

    # -- many calls -----------------------------------------------------

    def _many(
        self,
        func: Callable[..., object],
        iterable: Iterable[Any],
        style: Style,
        *,
        ordered: bool = True,
        **options: Any,
    ) -> Any:
        self._check_running()
        if options.get("chunksize") is None:
            options.pop("chunksize", None)
        return self._pool._run(
            func,
            style,
            self._guard(iterable),
            total=_length(iterable),
            ordered=ordered,
            options=options,
        )

    def _collect(self, run: Any) -> list[Any]:
        try:
            values: list[Any] = run.collect()
        except BaseException as exc:
            raise translate(exc) from exc.__cause__
        return values

    def map(
        self, func: Callable[..., R], iterable: Iterable[Any], chunksize: int | None = None
    ) -> list[R]:
        """``list(map(func, iterable))`` on the workers."""
        return self._collect(self._many(func, iterable, Style.ONE, chunksize=chunksize))

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
    ) -> list[R]:
        """``[func(*args) for args in iterable]`` on the workers."""
        return self._collect(self._many(func, iterable, Style.STAR, chunksize=chunksize))

    def _map_async(
        self,
        func: Callable[..., object],
        iterable: Iterable[Any],
        style: Style,
        chunksize: int | None,
        callback: Callback,
        error_callback: Callback,
    ) -> AsyncResult:
        run = self._many(func, iterable, style, chunksize=chunksize)
        run.background = True  # accepted whole: it may go on after close()
        result = AsyncResult(self._registry, callback, error_callback)

        def drive() -> None:
            try:
                values = run.collect()
            except BaseException as exc:
                result._finish(False, translate(exc))
            else:
                result._finish(True, values)

        self._start(drive)
        return result

    def map_async(
        self,
        func: Callable[..., object],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> AsyncResult:
        return self._map_async(func, iterable, Style.ONE, chunksize, callback, error_callback)

    def starmap_async(
        self,
        func: Callable[..., object],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callback = None,
        error_callback: Callback = None,
    ) -> AsyncResult:
        return self._map_async(func, iterable, Style.STAR, chunksize, callback, error_callback)

    def _imap(
        self, func: Callable[..., object], iterable: Iterable[Any], chunksize: int, ordered: bool
    ) -> IMapIterator:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        # on_error="return": a failed task's exception stands in its place and
        # is raised when the consumer reaches it; later results still come, as
        # in the standard library.
        run = self._many(
            func,
            iterable,
            Style.ONE,
            ordered=ordered,
            chunksize=chunksize,
            on_error="return",
        )
        run.background = True
        limit = IMAP_BUFFER_CHUNKS_PER_WORKER * self._processes * chunksize
        state = IMapState(self._registry, run.pieces(), limit)
        with self._lock:
            self._threads.add(state.thread)
        return IMapIterator(state)

    def imap(
        self, func: Callable[..., object], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Lazy and ordered: at most a window of ``iterable`` pulled ahead of you."""
        return self._imap(func, iterable, chunksize, True)

    def imap_unordered(
        self, func: Callable[..., object], iterable: Iterable[Any], chunksize: int = 1
    ) -> IMapIterator:
        """Lazy; results in the order they finish."""
        return self._imap(func, iterable, chunksize, False)

    # -- lifecycle ------------------------------------------------------

    def close(self) -> None:
        """Accept no more work; what was submitted runs to the end."""
        if self._state == RUN:
            self._state = CLOSE
            self._registry.drain()

    def terminate(self) -> None:
        """Stop now: workers are killed and unfinished results fail with ``PoolClosed``."""
        self._state = TERMINATE
        self._stopped.set()
        self._registry.fail_all(PoolClosed("the pool was terminated"))
        self._registry.stop()
        backend = self._pool._backend
        self._pool.shutdown(wait=False, cancel_futures=True)
        if backend is not None and backend.remote:
            backend.terminate()  # kill the workers: the results are not wanted
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._join_threads()

    def join(self) -> None:
        """Wait for every submitted task and its callback; after ``close`` or ``terminate``."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        self._registry.wait_empty()
        self._registry.stop()
        self._pool.shutdown(wait=True)
        self._join_threads()

    def _join_threads(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()


class ThreadPool(Pool):
    """``multiprocessing.pool.ThreadPool`` on fenfa's thread backend."""

    _backend = "thread"

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
    ) -> None:
        super().__init__(processes, initializer, initargs)


__all__ = ["AsyncResult", "IMapIterator", "Pool", "ThreadPool"]
