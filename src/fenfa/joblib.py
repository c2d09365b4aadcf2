"""The joblib backend ``"fenfa"``: ``joblib.Parallel`` and scikit-learn on fenfa's pools.

``import fenfa.joblib`` registers it::

    with joblib.parallel_config(backend="fenfa", n_jobs=4):
        GridSearchCV(...).fit(X, y)
    with joblib.parallel_config(backend=fenfa.joblib.Backend("thread", retries=2)):
        ...

joblib keeps its own dispatching: it cuts the tasks into ``BatchedCalls``,
keeps ``pre_dispatch`` of them in flight and sends the next one from the
callback of each that finishes. This module only runs those batches::

    joblib (caller)                 Backend                          fenfa Pool (cached)
    ───────────────                 ───────                          ───────────────────
    Parallel.__call__ ─ configure ─► acquire a warm pool for
                                      (backend, n_jobs, options)
    dispatch_one_batch ─ submit ───► process: pickle the batch here,
                                      large arrays shared once per call
                                      pool.submit(_run_pickled, bytes) ─► a worker runs it
    BatchCompletionCallBack ◄─────── Future done callback ◄──────────── (the pool's thread)
      retrieve, dispatch the next
    error / timeout ─ abort_everything ► cancel what has not started;
                                      kill process workers still running
                                      this call's batches
    end of call ─ terminate ───────► release the pool: it stays warm

The pools are kept between calls (see :mod:`fenfa._joblib_pools`);
:func:`shutdown` closes them, and so does interpreter exit. A crashed worker
fails only the batch it was running (``fenfa.WorkerCrashed``, or a retry with
``retries=``); the pool, and so the next call, is not affected.

The function a process worker receives is :func:`_run_pickled` of this
module, so the worker imports ``fenfa.joblib`` before the first batch runs: code there can
name the backend too (it then runs sequentially, see :meth:`Backend.effective_n_jobs`).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from . import autoshare
from ._joblib_pools import Call, Entry, acquire, release, shutdown, stop_running, taint
from .backends import usable_cores
from .errors import SerializationError, short_repr
from .insights import Insights
from .options import CALL_OPTIONS, POOL_ONLY_OPTIONS
from .pool import Pool
from .worker import current_worker

__all__ = ["Backend", "shutdown"]

#: The fenfa backends a joblib call may run on, and whether each shares the
#: caller's memory (threads, the caller itself) or not (processes, dask).
SHARED_MEMORY = {"process": False, "thread": True, "serial": True, "dask": False}

# Pool options that do not fit joblib's model, and what to use instead.
_REFUSED = {
    "workers": "n_jobs= sets the number of workers",
    "chunksize": "joblib batches the tasks itself: use Parallel(batch_size=...)",
    "window": "joblib keeps pre_dispatch batches in flight: use Parallel(pre_dispatch=...)",
    "on_error": "joblib raises the first error of a call",
    "progress": "use Parallel(verbose=...)",
}
_ACCEPTED = (
    *(name for name in CALL_OPTIONS if name not in _REFUSED),
    *POOL_ONLY_OPTIONS,
)


# -- what runs in the worker --------------------------------------------------


def _run_batch(calls: Callable[[], list[Any]]) -> list[Any]:
    """Run one joblib ``BatchedCalls`` (on threads: passed as it is)."""
    return calls()


def _run_pickled(data: bytes) -> list[Any]:
    """Run one joblib ``BatchedCalls`` pickled by :func:`_dumps`.

    A module-level function, so the process backend sends it once per worker
    (by name: unpickling it imports this module, which registers the backend
    in the worker).
    """
    calls: Callable[[], list[Any]] = pickle.loads(data)
    return calls()


def _timed(run: Callable[[Any], list[Any]], batch: Any) -> tuple[list[Any], tuple[Any, ...]]:
    """``run(batch)``, with when, where and how much CPU, for ``insights``.

    (fenfa records its own calls over many inputs; a joblib batch is a single
    call, which the pool does not time, so the backend does it here.)
    """
    me = current_worker()
    started, cpu = time.monotonic(), time.thread_time()
    results = run(batch)
    who = (me.id, me.pid, me.process_name, me.thread_name, me.backend)
    return results, (started, time.monotonic(), time.thread_time() - cpu, who)


def _dumps(calls: Any, scope: autoshare.Scope) -> bytes:
    """Pickle a batch as fenfa pickles task inputs: the standard pickle, cloudpickle
    where needed (lambdas, ``__main__``), large arrays shared within ``scope``."""
    try:
        return autoshare.dumps_items(calls, scope)
    except Exception as exc:
        raise SerializationError(
            f"a joblib batch could not be pickled: {type(exc).__name__}: {exc}",
            what="argument",
        ) from exc


class _NestedThreads(ThreadingBackend):
    """joblib's threads for a nested ``Parallel`` in a worker, at most ``max_jobs`` of them.

    ``max_jobs`` is the worker's share of the cores, so N workers x threads
    never exceeds the machine; at one, joblib runs the nested call sequentially.
    """

    def __init__(self, nesting_level: int | None = None, max_jobs: int = 1, **kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, **kwargs)
        self.max_jobs = max_jobs

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        return min(int(super().effective_n_jobs(n_jobs)), self.max_jobs)

    def get_nested_backend(self) -> tuple[Any, int | None]:
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None


# -- the backend --------------------------------------------------------------


class Backend(AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend that runs ``Parallel`` calls on a fenfa pool.

    ``Backend(backend="process", **options)``: ``backend`` is the fenfa
    backend (``"process"``, ``"thread"``, ``"serial"``, ``"dask"``); the
    options are fenfa Pool options (``retries``, ``timeout`` per joblib
    batch, ``insights``, ``initializer``, ``native_threads``,
    ``start_method``, ``max_tasks_per_worker``, ``worker_output``,
    ``address``). ``n_jobs`` is the number of workers (``-1``: every usable
    core; ``None``, as on joblib's own backends: 1, the caller runs the tasks).
    """

    #: ``Parallel(n_jobs=None)`` runs in the caller, as on loky: scikit-learn
    #: leaves n_jobs at None where parallelism does not pay (a forest's refit
    #: of 10 trees sent to processes took ~60 ms more than fitting it in place).
    default_n_jobs = 1
    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    # The class defaults describe the default backend, "process"; each
    # instance sets its own (scikit-learn's require="sharedmem" reads them).
    uses_threads = False
    supports_sharedmem = False

    def __init__(
        self,
        backend: str = "process",
        *,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        **options: Any,
    ) -> None:
        if backend not in SHARED_MEMORY:
            raise ValueError(
                f"fenfa.joblib.Backend runs on one of {', '.join(map(repr, SHARED_MEMORY))}, "
                f"not {backend!r}"
            )
        for name in options:
            if name in _REFUSED:
                raise TypeError(
                    f"{name!r} is not an option of the joblib backend: {_REFUSED[name]}"
                )
            if name not in _ACCEPTED:
                raise TypeError(
                    f"unknown option {name!r}; the joblib backend takes: {', '.join(_ACCEPTED)}"
                )
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self.fenfa_backend = backend
        self.options = options
        self.uses_threads = self.supports_sharedmem = SHARED_MEMORY[backend]
        self._entry: Entry | None = None
        self._call = Call()
        self._last_pool: Pool | None = None
        self._recorder: Insights | None = None

    def __repr__(self) -> str:
        return f"fenfa.joblib.Backend({self.fenfa_backend!r})"

    @property
    def pool(self) -> Pool | None:
        """The fenfa pool of the call in progress, or of the last call."""
        return self._last_pool

    @property
    def insights(self) -> Insights | None:
        """With ``insights``: the records, one per joblib batch's tasks (failed batches
        are not recorded). ``insights=True`` records on the pool's, shared by the
        calls of every backend on the same pool."""
        recording = self.options.get("insights", False)
        if isinstance(recording, Insights):
            return recording
        return None if self._last_pool is None or not recording else self._last_pool.insights

    # -- configuration -------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Workers for ``n_jobs``; 1 (joblib then runs the call in the caller) when nested.

        A call inside a fenfa worker, or below another joblib call
        (``nesting_level`` > 0), runs sequentially: the outer call already
        keeps the cores busy.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or self.fenfa_backend == "serial":
            return 1
        if self.nesting_level or current_worker().backend is not None:
            return 1
        if n_jobs < 0:
            return max(usable_cores() + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **joblib_options: Any,
    ) -> int:
        """Get a warm pool for ``n_jobs`` workers.

        joblib's memmapping options (``max_nbytes``, ``mmap_mode``,
        ``temp_folder``) are ignored: large arrays go through fenfa's shared
        memory instead.
        """
        self.parallel = parallel
        workers = self.effective_n_jobs(n_jobs)
        if workers == 1:
            return 1
        options = dict(self.options)
        if self.inner_max_num_threads is not None:
            options["native_threads"] = self.inner_max_num_threads
        entry = acquire(self.fenfa_backend, workers, options)
        if self._entry is not None:
            release(self._entry)  # reconfigured without a terminate in between
        self._entry = entry
        self._last_pool = entry.pool
        recording = self.options.get("insights", False)
        if recording is True:
            recording = entry.pool.insights
        # (not `recording or None`: an empty Insights is falsy, it has a length)
        self._recorder = recording if isinstance(recording, Insights) else None
        if self._recorder is not None:
            self._call.number = self._recorder.new_call()
        return workers

    def compute_batch_size(self) -> int:
        if self.options.get("timeout") is not None:
            return 1  # fenfa's timeout is per batch: one task each, so per task
        return int(super().compute_batch_size())

    def get_nested_backend(self) -> tuple[Any, int | None]:
        """What a ``Parallel`` inside a task runs on: threads, up to the worker's share
        of the cores (so sequentially when every core has a worker)."""
        level = (self.nesting_level or 0) + 1
        if self.fenfa_backend in ("process", "dask") and self._entry is not None:
            share = usable_cores() // self._entry.workers
            if share > 1:
                return _NestedThreads(nesting_level=level, max_jobs=share), None
        return SequentialBackend(nesting_level=level), None

    # -- running -------------------------------------------------------

    def submit(self, func: Any, callback: Callable[[Any], None] | None = None) -> Future[Any]:
        """Run one ``BatchedCalls`` on the pool; the future joblib's callback waits on.

        Never raises: joblib calls this from the callback of the previous
        batch, in the pool's own thread, where an exception would be lost and
        the call would wait forever; a batch that cannot be sent fails instead.
        """
        call = self._call
        future: Future[Any]
        try:
            if self._entry is None:
                raise RuntimeError("the fenfa joblib backend was used before configure()")
            pool = self._entry.pool
            run: Callable[[Any], list[Any]] = _run_batch
            batch = func
            if self.fenfa_backend == "process":
                run, batch = _run_pickled, _dumps(func, call.scope)
            # (threads share memory; dask scatters large arrays itself)
            if self._recorder is None:
                future = pool.submit(run, batch)
            else:
                submitted = time.monotonic()
                future = pool.submit(_timed, run, batch)
                with call.lock:
                    call.started[future] = (call.tasks, submitted, _first_input(func))
                    call.tasks += len(func)
        except BaseException as exc:
            future = Future()
            future.set_running_or_notify_cancel()
            future.set_exception(exc)
        with call.lock:
            call.futures.add(future)
        future.add_done_callback(call.forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future[Any]) -> Any:
        try:
            result = future.result()
        except BaseException as exc:
            _rename_note(exc)
            raise
        if self._recorder is None:
            return result
        results, times = result
        call = self._call
        with call.lock:
            start, submitted, first = call.started.pop(future, (0, None, ""))
        self._recorder.add(
            call.number,
            start,
            len(results),
            times,
            submitted=submitted,
            attempt=1,
            error=None,
            first_input=first,
            first_of_batch=True,
        )
        return results

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Drop the call's batches not started; kill the process workers running the others.

        The pool stays up either way (``ensure_ready`` needs nothing more):
        only the workers that ran this call's batches are replaced.
        """
        call = self._call
        with call.lock:
            futures = list(call.futures)
        running = {future for future in futures if not future.cancel() and not future.done()}
        entry = self._entry
        if running and entry is not None and not stop_running(entry.pool, running):
            # Threads cannot be stopped: a later call must not wait behind them.
            taint(entry)

    def terminate(self) -> None:
        """End of a call: the pool stays warm for the next one; shared arrays are released."""
        entry, self._entry = self._entry, None
        call, self._call = self._call, Call()
        call.release_when_done()
        if entry is not None:
            release(entry)
        self.reset_batch_stats()


def _first_input(calls: Any) -> str:
    items = getattr(calls, "items", None)
    if not items:
        return ""
    func, args, kwargs = items[0]
    return short_repr((getattr(func, "__name__", func), args, kwargs))


def _rename_note(exc: BaseException) -> None:
    """fenfa's note names "task 0" and its input, a ``BatchedCalls``: say what it was."""
    notes = getattr(exc, "__notes__", None)
    if notes and notes[-1].startswith("fenfa: task 0 failed"):
        notes[-1] = notes[-1].split(";")[0].replace("task 0", "a joblib batch")


joblib.register_parallel_backend("fenfa", Backend)
