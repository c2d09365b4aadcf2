"""The dask backend's worker side: what one dask task does with one batch.

Runs in a dask worker process, on one of its threads (``--nthreads`` may be
more than one, hence the lock), anywhere on the network: it imports nothing
of the caller's side. A call's function is unpickled once per worker process
(cached by the key of its pickle) and the pool's initializer runs once per
worker process; the batch runs through the same :func:`~fenfa.tasks.run_batch`
as on every backend, under a worker mark (``current_worker()``), and its
pieces go back as bytes (:mod:`.wire`).

``timeout`` is kept here: the tasks of a timed batch run one by one on a
helper thread, which the dask thread waits for with the deadline. A thread
cannot be stopped, so a task past its deadline is reported as
:class:`~fenfa.errors.TaskTimeout` and *abandoned*: it goes on in the
background of that dask worker and its result is discarded.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import distributed

from ...batchloop import Stamper, caller, run_batch
from ...errors import SerializationError, TaskTimeout, pack_exception
from ...tasks import Err, Piece, Style
from ...worker import restore_slot, set_slot
from .wire import encode_pieces, loads

# Functions a worker keeps unpickled, most recently used first (a call's
# function is unpickled once per worker, not once per batch).
FUNCTION_CACHE_SIZE = 8

# current_worker().state of this worker process: lives as long as the process.
_state: dict[str, Any] = {}
_functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
# initializer key -> None (ran) or its packed failure
_initialized: dict[str, Any] = {}
# A dask worker may run several threads (--nthreads > 1).
_worker_lock = threading.Lock()

#: What a pool sends for its initializer: (a key unique to the pool, it, its args).
Init = tuple[str, Callable[..., Any], tuple[Any, ...]]


class _Abandoned(Exception):
    """Stops a helper thread whose task ran past its deadline."""


def _function(key: bytes, data: bytes, values: dict[int, Any]) -> Callable[..., Any]:
    with _worker_lock:
        fn = _functions.get(key)
        if fn is not None:
            _functions.move_to_end(key)
            return fn
    loaded: Callable[..., Any] = loads(data, values)
    with _worker_lock:
        _functions[key] = loaded
        while len(_functions) > FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    return loaded


def _initialize(init: Init | None, me: str) -> Any:
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


def run_remote(
    fn_key: bytes,
    fn_data: bytes,
    init: Init | None,
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
                items = loads(items_data, shared)
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
    return encode_pieces(pieces, busy)


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
