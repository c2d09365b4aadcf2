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

- At most ``AHEAD_PER_THREAD`` batches per dask worker thread are on the
  cluster at once; the rest wait in ``_queue``, here, and go out as results
  come back (from the done callback). A call that ends early (a failure
  under ``on_error="raise"``, a consumer that stops) drops its queued batches
  at once; Dask's own cancel is a message that takes milliseconds to reach
  the workers, in which a worker would start what it already holds.
- ``_lock`` guards ``_queue`` and ``_outstanding`` (future key -> batch): a
  batch is reported exactly once, by whoever pops it first: the done
  callback, a cancelling ``shutdown``, ``abandon``.
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

import atexit
import contextlib
import hashlib
import io
import itertools
import pickle
import queue
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import cloudpickle
import dask.config
import dask.utils
import distributed

from .. import sharing
from ..batchloop import Stamper, caller, run_batch
from ..errors import (
    BackendUnavailable,
    PoolClosed,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    pack_exception,
    unpack_exception,
)
from ..tasks import Batch, Err, Job, Ok, Piece, Style
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
# Batches on the cluster per worker thread: one running, one waiting on the
# worker, so that a worker never idles for the round trip (result here, next
# batch there: ~1-2 ms on one machine); more would only be harder to cancel.
AHEAD_PER_THREAD = 2
# shutdown(cancel_futures=True): how long running batches may take before
# their futures are released (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0
# How long closing the client and a local cluster may take before giving up.
CLOSE_TIMEOUT_SECONDS = 10.0


# -- pickling with share() handles by reference --------------------------------


class _RefPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with share() handles and large arrays written as ids.

    Each :class:`~fenfa.sharing.Shared` handle, and each plain NumPy array of
    ``sharing.AUTO_SHARE_BYTES`` or more, crosses once, scattered to the
    cluster; a task's bytes carry only the id, which the worker maps back to
    the value. ``ref`` gives an object's (id, future); ``used`` collects them.
    """

    def __init__(self, file: io.BytesIO, ref: Callable[[Any], tuple[int, Any]]) -> None:
        super().__init__(file, protocol=5)
        self._ref = ref
        self.used: dict[int, Any] = {}

    def persistent_id(self, obj: Any) -> int | tuple[str, int] | None:
        if type(obj) is sharing.Shared or (
            sharing._is_plain_array(obj) and obj.nbytes >= sharing.AUTO_SHARE_BYTES
        ):
            hid, future = self._ref(obj)
            self.used[hid] = future
            if type(obj) is sharing.Shared and isinstance(obj.value, memoryview):
                return ("view", hid)  # bytes cross; the task gets a memoryview, as elsewhere
            return hid
        return None


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, values: dict[int, Any]) -> None:
        super().__init__(file)
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple):
            return memoryview(self._values[pid[1]])
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


def local_cluster(workers: int, **options: Any) -> Any:
    """The ``LocalCluster`` a dask pool starts without an address (``options`` added).

    Processes, one thread each: the process backend's model, on Dask; on
    127.0.0.1, no dashboard (the scheduler's HTTP server, for health and
    metrics, is there anyway: on any free port, never clashing on 8787).
    """
    return distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        **options,
    )


class _Call:
    """What a call sends for its function, made once per call (``job.remote``)."""

    __slots__ = ("arg", "arrays", "key", "refs")

    def __init__(
        self, key: bytes, arg: Any, refs: dict[int, Any], arrays: dict[int, tuple[Any, int, Any]]
    ) -> None:
        self.key = key
        self.arg = arg  # the pickled function, or the future of it scattered
        self.refs = refs  # id -> future, for the handles and arrays the function holds
        # The large arrays this call scattered: id(array) -> (array, id, future).
        self.arrays = arrays


def _check_reachable(address: str, wait: Any) -> None:
    """Raise OSError if nothing listens at a ``tcp://host:port`` scheduler address.

    Checked with a plain socket before a Client is made: a Client that cannot
    connect leaves distributed's IO-loop thread running behind its error.
    """
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://") :].rpartition(":")
    seconds = dask.utils.parse_timedelta(wait, default="s")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=seconds):
        pass


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
            # Dask's own setting (DASK_SCHEDULER_ADDRESS, or dask.config.set) names
            # a cluster to use, as it does for a bare distributed.Client().
            address = dask.config.get("scheduler-address", None) or None
        if address is None:
            self._cluster = local_cluster(workers)
            address = self._cluster.scheduler_address
        # How long to try to reach the scheduler: dask's own setting
        # (distributed.comm.timeouts.connect, 30 s unless configured, e.g. by
        # DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s).
        connect = dask.config.get("distributed.comm.timeouts.connect")
        try:
            if self._cluster is None:
                _check_reachable(address, connect)
            self._client: Any = distributed.Client(address, set_as_default=False, timeout=connect)
        except (OSError, TimeoutError) as exc:
            if self._cluster is not None:
                self._cluster.close()
            raise BackendUnavailable(
                f"no dask scheduler answered at {address!r} within {connect} "
                f"({type(exc).__name__}: {exc}); the wait is dask's setting "
                "distributed.comm.timeouts.connect (DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT)"
            ) from exc
        except BaseException:
            if self._cluster is not None:
                self._cluster.close()
            raise
        threads = max(1, sum(self._client.nthreads().values()))
        if self._cluster is None and workers_from_cluster:
            self.workers = threads
        self._ahead = AHEAD_PER_THREAD * max(threads, self.workers)
        #: The scheduler's address: another pool may connect to the same cluster.
        self.address: str = str(address)
        self._lock = threading.Condition(threading.Lock())
        self._outstanding: dict[str, tuple[Any, Batch]] = {}
        self._queue: deque[tuple[Batch, bool]] = deque()  # (batch, urgent), not sent yet
        self._delivering = 0
        self._handles: weakref.WeakKeyDictionary[sharing.Shared, tuple[int, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._hids = itertools.count()
        self._init = (
            None if initializer is None else (uuid.uuid4().hex, initializer, tuple(initargs))
        )
        self._released = False
        self._closer: threading.Thread | None = None
        # At interpreter exit: close the client, then the cluster, before
        # distributed's own exit hook (registered earlier, so run later: LIFO)
        # closes the cluster under a live client, which then logs its failed
        # reconnection. (Through a weak reference: the hook keeps nothing alive.)
        this = weakref.ref(self)

        def close_at_exit() -> None:
            backend = this()
            if backend is not None:
                backend._close()

        self._exit_hook = close_at_exit
        atexit.register(close_at_exit)

    # -- sending -----------------------------------------------------------

    def _scatter(self, value: Any) -> Any:
        if isinstance(value, memoryview):
            value = value.tobytes()
        # (In a list: scatter would split a list or dict value into many futures.)
        return self._client.scatter([value], hash=False)[0]

    def _ref(self, obj: Any, arrays: dict[int, tuple[Any, int, Any]]) -> tuple[int, Any]:
        """(id, future) of a share() handle (once per pool) or a large array (once per call).

        ``arrays`` is the call's: id(array) -> (array, id, future); it holds
        the array, so that its ``id()`` is not reused while the call lasts.
        """
        if type(obj) is sharing.Shared:
            if obj.writable:
                raise ValueError(
                    "a writable fenfa.share() handle cannot go to the dask backend: its "
                    "workers may be on other machines, and their writes would be lost; "
                    "return the values instead, or use the process backend"
                )
            with self._lock:
                entry = self._handles.get(obj)
            if entry is None:
                future = self._scatter(obj.value)
                with self._lock:
                    entry = self._handles.setdefault(obj, (next(self._hids), future))
            return int(entry[0]), entry[1]
        with self._lock:
            known = arrays.get(id(obj))
        if known is None:
            future = self._scatter(obj)
            with self._lock:
                known = arrays.setdefault(id(obj), (obj, next(self._hids), future))
        return int(known[1]), known[2]

    def _encode(
        self, obj: Any, arrays: dict[int, tuple[Any, int, Any]], *, function: bool
    ) -> tuple[bytes, dict[int, Any]]:
        """``obj`` pickled, and the futures of the ids it refers to.

        The plain pickle is tried first (fast on small items); only when there
        are share() handles about, or the result is large enough to hold a
        large array, is it pickled again with handles and arrays as ids.
        """
        if not sharing.handles_alive():
            try:
                data: bytes = (cloudpickle if function else pickle).dumps(obj, protocol=5)
            except Exception:
                if function:
                    raise
            else:
                if len(data) < sharing.AUTO_SHARE_BYTES:
                    return data, {}
        buffer = io.BytesIO()
        pickler = _RefPickler(buffer, lambda o: self._ref(o, arrays))
        pickler.dump(obj)
        return buffer.getvalue(), pickler.used

    def _call(self, job: Job) -> _Call:
        call: _Call | None = job.remote
        if call is None:
            arrays: dict[int, tuple[Any, int, Any]] = {}
            data, used = self._encode(job.fn, arrays, function=True)
            key = hashlib.blake2b(data, digest_size=16).digest()
            arg: Any = data
            if len(data) > INLINE_FUNCTION_BYTES:
                arg = self._client.scatter([data], hash=False)[0]
            call = job.remote = _Call(key, arg, used, arrays)
        return call

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        with self._lock:
            if urgent:
                self._queue.appendleft((batch, urgent))
            else:
                self._queue.append((batch, urgent))
        self._pump()

    def _pump(self) -> None:
        """Send queued batches while the cluster has room for them."""
        while True:
            with self._lock:
                if not self._queue or len(self._outstanding) >= self._ahead:
                    return
                batch, urgent = self._queue.popleft()
            self._send(batch, urgent)

    def _send(self, batch: Batch, urgent: bool) -> None:
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
            items, used = self._encode(batch.items, call.arrays, function=False)
        except Exception:
            self._split(batch, urgent)
            return
        refs = {**call.refs, **used}
        with self._lock:
            # (Under the lock: the client may have been closed meanwhile. Until
            # then, work still comes: a map_async accepted before shutdown().)
            closed = self._released
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
                self._encode(item, batch.job.remote.arrays, function=False)
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
        self._pump()

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
            kept = [entry for entry in self._queue if job is not None and entry[0].job is not job]
            queued = [(None, b) for b, _ in self._queue if job is None or b.job is job]
            self._queue = deque(kept)
            self._lock.notify_all()
        if job is None:
            return taken + queued
        # (A dropped job's queued batches are dropped unseen, as claim() would.)
        return taken

    def _release(self, taken: list[tuple[Any, Batch]]) -> None:
        if taken and not self._released:
            # (If the client is closing anyway, there is nothing more to release.)
            futures = [future for future, _ in taken if future is not None]
            with contextlib.suppress(Exception):
                self._client.cancel(futures)

    def _release_job(self, job: Job) -> None:
        self._release(self._take(job))

    def abandon(self, job: Job) -> None:
        job.cancelled = True
        self._release_job(job)

    def drop(self, job: Job) -> None:
        # (Queued on the cluster: claim() cannot stop them, the scheduler can.)
        self._release_job(job)

    def idle(self) -> bool:
        with self._lock:
            return not self._outstanding and not self._queue and not self._delivering

    def _drained(self, deadline: float | None) -> bool:
        with self._lock:
            while self._outstanding or self._queue or self._delivering:
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
        atexit.unregister(self._exit_hook)
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
