"""The dask backend: batches run as tasks on a ``dask.distributed`` cluster.

fenfa does not schedule across machines itself: it hands each batch to a
Dask scheduler as *one* dask task, so the window, the adaptive chunk size,
retries, ``on_error`` and ordering stay where they are for every backend (in
:mod:`fenfa.window`), and Dask does what it is good at: placing work on
workers, moving data between them, noticing when one dies.

Data flow::

    caller thread (Run)                 dask client loop          dask worker (process, anywhere)
    ───────────────────                 ────────────────          ───────────────────────────────
    submit(batch)
      pickle items (bytes) ──► client.submit(_run_remote, ...) ──► _run_remote:
      function: pickled once per call;                              unpickle fn (cached by key)
        inline when small, scattered                                run_batch(...) under a worker
        once per call when large                                    mark (current_worker())
      share() handles: scattered once                               return pickled pieces
        per pool, referenced by id
                                  future done ──► Dask-Callback-Thread: _done(future)
                                                    fetch result, unpickle pieces,
                                                    job.deliver(batch, pieces) (a queue put)

- ``_lock`` guards ``_outstanding`` (future key -> batch): a batch is
  reported exactly once, by whoever pops it first: the done callback, a
  cancelling ``shutdown``, ``abandon``.
- Items and results cross as bytes pickled by fenfa, not by Dask: Dask then
  never walks (or misreads: a tuple starting with a callable is a task in
  Dask's graph format) the user's data, and a value that does not pickle
  fails its own task with :class:`~fenfa.errors.SerializationError`.
- A worker that dies mid-task: the scheduler runs its tasks again elsewhere
  (up to ``distributed.scheduler.allowed-failures`` times, 3 by default),
  then the future fails with ``KilledWorker``, reported as
  :class:`~fenfa.errors.WorkerCrashed` for each task of the batch.
- ``timeout`` is kept inside the worker: the tasks of a timed batch run one
  by one on a helper thread, which the dask thread waits for with the
  deadline. A thread cannot be stopped, so a task past its deadline is
  reported as :class:`~fenfa.errors.TaskTimeout` and *abandoned*: it goes on
  in the background of that dask worker and its result is discarded.
- Cancelling (``abandon``, ``shutdown(cancel_futures=True)``) releases the
  futures: queued tasks never start; running ones finish on their worker,
  unseen, for the same reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import pickle
import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle
import distributed

from .. import sharing
from ..errors import (
    PoolClosed,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    pack_exception,
    unpack_exception,
)
from ..tasks import Batch, Err, Job, Ok, Piece, Stamper, Style, caller, run_batch
from ..worker import restore_slot, set_slot
from ._worker import fail_unpicklable
from .base import Backend

# A pickled function up to this size travels inside every batch (a module
# function pickles to ~60 bytes, a closure to a few hundred); a larger one (a
# closure over a big object) is scattered to the cluster once per call and
# workers fetch it once. At 64 KiB the copy per batch costs ~10 us of
# pickling and a fraction of a dask round trip (~1-2 ms on one machine).
INLINE_FUNCTION_BYTES = 64 * 1024
# Functions a worker keeps unpickled, most recently used first (a call's
# function is unpickled once per worker, not once per batch).
FUNCTION_CACHE_SIZE = 8
# shutdown(cancel_futures=True): how long running batches may take before
# their futures are released (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0
# How long closing the client and a local cluster may take before giving up.
CLOSE_TIMEOUT_SECONDS = 10.0


# -- pickling with share() handles by reference --------------------------------


class _RefPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with each :class:`~fenfa.sharing.Shared` handle written as an id.

    The handle's value crosses once, scattered to the cluster; a task's bytes
    carry only the id, which the worker maps back to the value.
    """

    def __init__(self, file: io.BytesIO, ref: Callable[[sharing.Shared], int]) -> None:
        super().__init__(file, protocol=5)
        self._ref = ref
        self.used: set[int] = set()

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is sharing.Shared:
            hid = self._ref(obj)
            self.used.add(hid)
            return hid
        return None


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, values: dict[int, Any]) -> None:
        super().__init__(file)
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        return self._values[pid]


def _loads(data: bytes, values: dict[int, Any]) -> Any:
    if not values:
        return pickle.loads(data)
    return _RefUnpickler(io.BytesIO(data), values).load()


# -- in the dask worker ------------------------------------------------------

# current_worker().state of this worker process: lives as long as the process.
_state: dict[str, Any] = {}
_functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
# initializer key -> None (ran) or its packed failure
_initialized: dict[str, Any] = {}
# A dask worker may run several threads (--nthreads > 1).
_worker_lock = threading.Lock()


class _Abandoned(Exception):
    """Stops a helper thread whose task ran past its deadline."""


def _function(key: bytes, data: bytes, values: dict[int, Any]) -> Callable[..., Any]:
    with _worker_lock:
        fn = _functions.get(key)
        if fn is not None:
            _functions.move_to_end(key)
            return fn
    loaded: Callable[..., Any] = _loads(data, values)
    with _worker_lock:
        _functions[key] = loaded
        while len(_functions) > FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    return loaded


def _initialize(init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None, me: str) -> Any:
    """Run the pool's initializer once per worker process; its packed failure, or None."""
    if init is None:
        return None
    key, initializer, initargs = init
    with _worker_lock:
        if key not in _initialized:
            try:
                initializer(*initargs)
                _initialized[key] = None
            except BaseException as exc:
                name = getattr(initializer, "__qualname__", repr(initializer))
                exc.add_note(f"fenfa: raised by the initializer {name}() in dask worker {me}")
                _initialized[key] = pack_exception(exc)
        return _initialized[key]


def _run_remote(
    fn_key: bytes,
    fn_data: bytes,
    init: tuple[str, Callable[..., Any], tuple[Any, ...]] | None,
    items_data: bytes,
    shared: dict[int, Any],
    style: int,
    start: int,
    count: int,
    timed: bool,
    timeout: float | None,
) -> bytes:
    """One batch, in a dask worker: the pickled (pieces, busy seconds, clock offset)."""
    me = str(distributed.get_worker().address)
    previous = set_slot(None, "dask", _state, me)
    pieces: list[Piece] = []
    begin = time.perf_counter()
    try:
        failure = _initialize(init, me)
        if failure is not None:
            pieces = [Err(start + i, failure) for i in range(count)]
        else:
            try:
                fn = _function(fn_key, fn_data, shared)
                items = _loads(items_data, shared)
            except BaseException as exc:
                error = SerializationError(
                    f"the function or arguments of tasks {start}..{start + count - 1} could "
                    f"not be unpickled in dask worker {me}: {type(exc).__name__}: {exc}",
                    what="argument",
                )
                pieces = [Err(start + i, pack_exception(error)) for i in range(count)]
            else:
                call = caller(fn, Style(style))
                if timeout is None:
                    emit = Stamper(pieces.append) if timed else pieces.append
                    run_batch(call, start, items, emit, False, pack_exception)
                else:
                    _run_timed(call, start, items, pieces.append, timed, timeout, me)
    finally:
        restore_slot(previous)
    busy = time.perf_counter() - begin
    return _encode_pieces(pieces, busy)


def _run_timed(
    call: Callable[[Any], Any],
    start: int,
    items: list[Any],
    emit: Callable[[Piece], None],
    timed: bool,
    timeout: float,
    me: str,
) -> None:
    """Each task under its own deadline, counted from when it starts, in this worker."""
    index, end = start, start + len(items)
    while index < end:
        out: queue.SimpleQueue[Piece] = queue.SimpleQueue()
        abandoned = threading.Event()
        helper = threading.Thread(
            target=_helper,
            args=(call, index, items[index - start :], out, abandoned, timed, me),
            name="fenfa-dask-task",
            daemon=True,
        )
        helper.start()
        while index < end:
            try:
                piece = out.get(timeout=timeout)
            except queue.Empty:
                abandoned.set()
                error = TaskTimeout(
                    f"task {index} ran longer than its timeout of {timeout:g} s; a dask "
                    f"worker cannot stop a running thread: the task goes on in the "
                    f"background of {me} and its result is discarded",
                    index=index,
                    limit=timeout,
                )
                emit(Err(index, pack_exception(error)))
                index += 1
                break  # the rest of the batch on a fresh helper thread
            emit(piece)
            index += 1
        else:
            helper.join()


def _helper(
    call: Callable[[Any], Any],
    start: int,
    items: list[Any],
    out: queue.SimpleQueue[Piece],
    abandoned: threading.Event,
    timed: bool,
    me: str,
) -> None:
    set_slot(None, "dask", _state, me)

    def put(piece: Piece) -> None:
        if abandoned.is_set():
            raise _Abandoned
        out.put(piece)

    emit = Stamper(put) if timed else put
    with contextlib.suppress(_Abandoned):
        run_batch(call, start, items, emit, True, pack_exception)


def _encode_pieces(pieces: list[Piece], busy: float) -> bytes:
    clock = time.time() - time.monotonic()
    try:
        return _dumps((_flat(pieces), busy, clock))
    except Exception:
        pass
    fixed = fail_unpicklable(pieces, _dumps)
    return _dumps((_flat(fixed), busy, clock))


def _flat(pieces: list[Piece]) -> list[tuple[bool, int, Any, Any]]:
    return [
        (True, p.start, p.values, p.times)
        if isinstance(p, Ok)
        else (False, p.index, p.error, p.times)
        for p in pieces
    ]


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]


# -- in the caller -------------------------------------------------------------


class _Call:
    """What a call sends for its function, made once per call (``job.remote``)."""

    __slots__ = ("arg", "key", "refs")

    def __init__(self, key: bytes, arg: Any, refs: dict[int, Any]) -> None:
        self.key = key
        self.arg = arg  # the pickled function, or the future of it scattered
        self.refs = refs  # handle id -> future, for the handles the function holds


class DaskBackend(Backend):
    """Runs each batch as one task on a dask cluster (``address``, or a local one)."""

    name = "dask"
    remote = True

    def __init__(
        self,
        workers: int,
        *,
        address: str | None = None,
        workers_from_cluster: bool = False,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
    ) -> None:
        if max_tasks_per_worker is not None:
            raise ValueError(
                "max_tasks_per_worker is not supported by the dask backend: dask manages "
                "the lifetime of its workers (see its --lifetime option)"
            )
        super().__init__(workers, initializer=initializer, initargs=initargs)
        self._cluster: Any = None
        if address is None:
            # Processes, one thread each: the process backend's model, on Dask.
            self._cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # No dashboard; the scheduler's HTTP server (health, metrics) is
                # there anyway: on any free port, never clashing on 8787.
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            )
            address = self._cluster.scheduler_address
        try:
            self._client: Any = distributed.Client(address, set_as_default=False)
        except BaseException:
            if self._cluster is not None:
                self._cluster.close()
            raise
        if address is not None and self._cluster is None and workers_from_cluster:
            threads = sum(self._client.nthreads().values())
            self.workers = max(1, threads)
        self.address: str = str(address)
        self._lock = threading.Condition(threading.Lock())
        self._outstanding: dict[str, tuple[Any, Batch]] = {}
        self._delivering = 0
        self._handles: weakref.WeakKeyDictionary[sharing.Shared, tuple[int, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._hids = itertools.count()
        self._init = (
            None if initializer is None else (uuid.uuid4().hex, initializer, tuple(initargs))
        )
        self._closed = False
        self._released = False
        self._closer: threading.Thread | None = None

    # -- sending -----------------------------------------------------------

    def _handle_ref(self, handle: sharing.Shared) -> int:
        """The id of ``handle`` on the cluster, scattering its value the first time."""
        with self._lock:
            entry = self._handles.get(handle)
        if entry is None:
            value = handle.value
            if isinstance(value, memoryview):
                value = value.tobytes()
            # (In a list: scatter would split a list or dict value into many futures.)
            future = self._client.scatter([value], hash=False)[0]
            with self._lock:
                entry = self._handles.setdefault(handle, (next(self._hids), future))
        return int(entry[0])

    def _refs(self, used: set[int]) -> dict[int, Any]:
        with self._lock:
            by_id = dict(self._handles.values())
        return {hid: by_id[hid] for hid in used}

    def _encode(self, obj: Any, *, function: bool) -> tuple[bytes, set[int]]:
        if not sharing.handles_alive():
            if not function:
                try:
                    return pickle.dumps(obj, protocol=5), set()
                except Exception:
                    pass
            else:
                return cloudpickle.dumps(obj, protocol=5), set()
        buffer = io.BytesIO()
        pickler = _RefPickler(buffer, self._handle_ref)
        pickler.dump(obj)
        return buffer.getvalue(), pickler.used

    def _call(self, job: Job) -> _Call:
        call: _Call | None = job.remote
        if call is None:
            data, used = self._encode(job.fn, function=True)
            key = hashlib.blake2b(data, digest_size=16).digest()
            arg: Any = data
            if len(data) > INLINE_FUNCTION_BYTES:
                arg = self._client.scatter([data], hash=False)[0]
            call = job.remote = _Call(key, arg, self._refs(used))
        return call

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        job = batch.job
        if not job.claim():
            return
        try:
            call = self._call(job)
        except Exception as exc:
            name = getattr(job.fn, "__qualname__", repr(job.fn))
            why = f"the function {name} could not be pickled: {type(exc).__name__}: {exc}"
            self._fail(batch, lambda i: SerializationError(why, index=i, what="function"))
            return
        try:
            items, used = self._encode(batch.items, function=False)
        except Exception:
            self._split(batch, urgent)
            return
        refs = {**call.refs, **self._refs(used)}
        with self._lock:
            # (Again under the lock: a shutdown may have begun meanwhile.)
            closed = self._closed
            if not closed:
                future = self._client.submit(
                    _run_remote,
                    call.key,
                    call.arg,
                    self._init,
                    items,
                    refs,
                    int(job.style),
                    batch.start,
                    len(batch.items),
                    job.timed,
                    job.timeout,
                    pure=False,
                    priority=1 if urgent else 0,
                )
                self._outstanding[future.key] = (future, batch)
        if closed:
            self._fail(batch, lambda i: PoolClosed("the pool was shut down"))
            return
        future.add_done_callback(self._done)

    def _split(self, batch: Batch, urgent: bool) -> None:
        """Some input of ``batch`` does not pickle: fail those tasks alone, send the rest."""
        run: list[Any] = []
        run_start = batch.start
        for offset, item in enumerate(batch.items):
            index = batch.start + offset
            try:
                self._encode(item, function=False)
            except Exception as exc:
                if run:
                    self.submit(Batch(batch.job, run_start, run, batch.attempt), urgent=urgent)
                    run = []
                error = SerializationError(
                    f"the input of task {index} could not be pickled: {type(exc).__name__}: {exc}",
                    index=index,
                    what="argument",
                )
                one = Batch(batch.job, index, [item], batch.attempt)
                one.done = 1
                batch.job.deliver(one, [Err(index, error)], 0.0)
                run_start = index + 1
            else:
                run.append(item)
        if run:
            self.submit(Batch(batch.job, run_start, run, batch.attempt), urgent=urgent)

    @staticmethod
    def _fail(batch: Batch, error: Callable[[int], BaseException]) -> None:
        """Report every task of ``batch`` failed, each with its own exception."""
        pieces: list[Piece] = [
            Err(i, error(i)) for i in range(batch.start, batch.start + len(batch.items))
        ]
        batch.done = len(batch.items)
        batch.job.deliver(batch, pieces, 0.0)

    # -- receiving -----------------------------------------------------------

    def _done(self, future: Any) -> None:
        """A future finished (or failed, or was cancelled); on Dask's callback thread."""
        with self._lock:
            entry = self._outstanding.pop(future.key, None)
            if entry is None:
                return  # reported already (cancelled by a shutdown or abandon)
            self._delivering += 1
        batch = entry[1]
        try:
            try:
                pieces, busy = self._outcome(future, batch)
            except BaseException as exc:  # never lose a batch
                pieces, busy = self._crashed(batch, exc), 0.0
            batch.done = len(batch.items)
            batch.job.deliver(batch, pieces, busy)
            if batch.job.dropped():
                self._release_job(batch.job)
        finally:
            with self._lock:
                self._delivering -= 1
                self._lock.notify_all()

    def _outcome(self, future: Any, batch: Batch) -> tuple[list[Piece], float]:
        status = future.status
        if status == "cancelled":
            return self._closed_pieces(batch), 0.0
        if status != "finished":
            return self._crashed(batch, future.exception()), 0.0
        data = future.result()
        try:
            flat, busy, clock = pickle.loads(data)
        except Exception as exc:
            why = (
                f"the results of tasks {batch.start}..{batch.start + len(batch.items) - 1} "
                f"could not be unpickled here: {type(exc).__name__}: {exc}"
            )
            return [
                Err(i, SerializationError(why, index=i, what="result"))
                for i in range(batch.start, batch.start + len(batch.items))
            ], 0.0
        # time.monotonic of that worker's machine, as this process's clock.
        shift = clock - (time.time() - time.monotonic())
        pieces: list[Piece] = []
        for ok, start, payload, times in flat:
            piece: Piece = Ok(start, payload) if ok else Err(start, unpack_exception(payload))
            if times is not None:
                began, ended, cpu, who = times
                piece.times = (began + shift, ended + shift, cpu, who)
            pieces.append(piece)
        return pieces, float(busy)

    def _crashed(self, batch: Batch, exc: BaseException | None) -> list[Piece]:
        killed = isinstance(exc, distributed.KilledWorker)
        last = batch.start + len(batch.items) - 1
        pieces: list[Piece] = []
        for index in range(batch.start, last + 1):
            if killed:
                error = WorkerCrashed(
                    f"the dask workers running tasks {batch.start}..{last} died "
                    f"(dask gave up after retrying on other workers: {exc})",
                    index=index,
                )
            else:
                error = WorkerCrashed(
                    f"the dask task running tasks {batch.start}..{last} failed: "
                    f"{type(exc).__name__}: {exc}",
                    index=index,
                )
            error.__cause__ = exc
            pieces.append(Err(index, error))
        return pieces

    @staticmethod
    def _closed_pieces(batch: Batch) -> list[Piece]:
        return [
            Err(i, PoolClosed("the pool was shut down before the task ran"))
            for i in range(batch.start, batch.start + len(batch.items))
        ]

    # -- cancelling and stopping -----------------------------------------------

    def _take(self, job: Job | None) -> list[tuple[Any, Batch]]:
        """Remove (and return) the outstanding batches of ``job`` (None: all)."""
        with self._lock:
            keys = [k for k, (_, b) in self._outstanding.items() if job is None or b.job is job]
            taken = [self._outstanding.pop(k) for k in keys]
            self._lock.notify_all()
        return taken

    def _release(self, taken: list[tuple[Any, Batch]]) -> None:
        if taken and not self._released:
            # (If the client is closing anyway, there is nothing more to release.)
            with contextlib.suppress(Exception):
                self._client.cancel([future for future, _ in taken])

    def _release_job(self, job: Job) -> None:
        self._release(self._take(job))

    def abandon(self, job: Job) -> None:
        job.cancelled = True
        self._release_job(job)

    def idle(self) -> bool:
        with self._lock:
            return not self._outstanding and not self._delivering

    def _drained(self, deadline: float | None) -> bool:
        with self._lock:
            while self._outstanding or self._delivering:
                if deadline is None:
                    self._lock.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._lock.wait(remaining)
        return True

    def _cancel_all(self) -> None:
        taken = self._take(None)
        self._release(taken)
        for _, batch in taken:
            self._fail(batch, lambda i: PoolClosed("the pool was shut down while the task ran"))

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        with self._lock:
            self._closed = True
        if not wait:
            if cancel:
                self._cancel_all()
            with self._lock:
                if self._closer is not None or self._released:
                    return
                self._closer = threading.Thread(
                    target=self._close_when_drained, name="fenfa-dask-close", daemon=True
                )
            self._closer.start()
            return
        if cancel and not self._drained(time.monotonic() + CANCEL_GRACE_SECONDS):
            self._cancel_all()
        self._drained(None)
        self._close()
        closer = self._closer
        if closer is not None and closer is not threading.current_thread():
            closer.join()

    def _close_when_drained(self) -> None:
        self._drained(None)
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            self._client.close(timeout=CLOSE_TIMEOUT_SECONDS)
        finally:
            if self._cluster is not None:
                self._cluster.close(timeout=CLOSE_TIMEOUT_SECONDS)
            # Whatever a dead connection left unreported fails now: nothing waits forever.
            for _, batch in self._take(None):
                self._fail(batch, lambda i: PoolClosed("the pool was shut down"))

    def terminate(self) -> None:
        self.shutdown(wait=False, cancel=True)
