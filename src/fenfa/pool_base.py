"""The ground floor of :class:`fenfa.Pool`: options, lifecycle, backend selection, single calls.

A pool's life: its options are checked when it is made; its backend is
started then, or, with ``backend="auto"``, once the first call has measured
its tasks (``_settle``; a single call cannot be measured, and gets one
chosen without measuring). ``shutdown`` stops the backend, after the threads
driving ``map_async`` calls. Single calls (``submit``, ``apply``) are
:class:`~fenfa.futures.FutureJob` batches of one task.

Calls over many inputs (``map``, ``imap``...) are :class:`fenfa.Pool`'s, in
:mod:`fenfa.pool`; they become a :class:`fenfa.window.Run`, which reaches
the pool through what is here (``_backend``, ``_submit_batch``,
``insights``). So this class sits below the window, and the window never
needs the module above it.
"""

from __future__ import annotations

import enum
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import _shadow
from .auto import Decision, unmeasured
from .backends import Backend, backend_class, check_name, default_workers
from .errors import PoolClosed
from .futures import FutureJob
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
from .tasks import Batch, is_coroutine_function

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Self

    from .deciding import Memory

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["PoolBase", "resolve_backend"]


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


class PoolBase:
    """A set of workers of one backend: :class:`fenfa.Pool` without its calls over many inputs.

    Options and their checks, the backend (started at once, or chosen by
    ``auto`` at the first call), lifecycle, and single calls. A run
    (:mod:`fenfa.window`) reaches its pool only through what is here.
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
        self._router: Callable[[Decision], PoolBase] | None = None
        self._memory: Memory | None = None  # (a router's: fenfa.deciding)
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
        self._futures: set[FutureJob] = set()
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

    def _settle(self, decision: Decision) -> PoolBase:
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

    def __enter__(self) -> Self:
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

    def _forget(self, job: FutureJob) -> None:
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
        job = FutureJob(self, fn, self._options.retries, timeout)
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


# Users make a Pool, never a PoolBase: its methods are named Pool's, as they
# were when they lived in Pool ("Pool.__init__() got an unexpected keyword
# argument ...", "<bound method Pool.submit of ...>").
for _name, _member in vars(PoolBase).items():
    if isinstance(_member, types.FunctionType):
        _member.__qualname__ = f"Pool.{_name}"
del _name, _member
