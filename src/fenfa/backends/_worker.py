"""The child side of the process backend: one loop, one pipe.

Besides the loop, one daemon thread watches the *lifeline*, a pipe whose
write end only the parent holds: when the parent dies, even by SIGKILL, the
pipe reads end-of-file and the worker exits at once, whatever task it is in.

This module is what a worker process imports (and what the forkserver
preloads), so it imports little. What crosses the pipe, and how, is
``_protocol.py``'s; this side reads FUNC, BATCH, FORGET and STOP frames, runs
the batches, and encodes their results into RESULT frames.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from .. import memory, segments
from ..batchloop import Stamper, caller, run_batch
from ..errors import SerializationError, pack_exception
from ..tasks import Err, Ok, Piece, Style
from ..worker import set_slot
from ._protocol import (
    FAST_MODE,
    FORGET,
    FUNC,
    INIT_FAILED,
    LOG,
    MARKED_MODE,
    OUTPUT,
    READY,
    RESULT,
    RETIRE,
    STARTED,
    STOP,
    STREAM_MODE,
    TIMED_MODE,
    dumps,
    frame,
    unframe,
)

# The exit code of a worker that left because its parent died.
EXIT_ORPHANED = 70
# The environment variables that size the thread pools of native libraries.
NATIVE_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS",
)


Span = tuple[int, int, bool, Any]


def fail_unpicklable(pieces: list[Piece], dumps: Callable[[Any], bytes]) -> list[Piece]:
    """``pieces`` with each result that ``dumps`` refuses replaced by its own failure.

    The slow path, taken once a batch's results failed to pickle together:
    the one bad value fails its task, its neighbours still succeed. A
    piece's times (insights) are shared out evenly among its tasks.
    """
    fixed: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Err):
            fixed.append(piece)
            continue
        count = len(piece.values)
        for offset, value in enumerate(piece.values):
            index = piece.start + offset
            try:
                dumps(value)
            except Exception as exc:
                error = SerializationError(
                    f"the result of task {index} could not be pickled: {type(exc).__name__}: {exc}",
                    index=index,
                    what="result",
                )
                one: Piece = Err(index, pack_exception(error))
            else:
                one = Ok(index, [value])
            if piece.times is not None:
                began, ended, cpu, who = piece.times
                step = (ended - began) / count
                share = None if cpu is None else cpu / count
                one.times = (began + offset * step, began + (offset + 1) * step, share, who)
            fixed.append(one)
    return fixed


def _spans(pieces: list[Piece]) -> list[Span]:
    return [
        (p.start, len(p.values), True, p.times)
        if isinstance(p, Ok)
        else (p.index, 1, False, p.times)
        for p in pieces
    ]


Encoded = tuple[list[Span], bytes, list[memoryview]]


def encode_results(pieces: list[Piece]) -> Encoded:
    """Spans, body and out-of-band buffers for a RESULT frame.

    A value that will not pickle fails its task only.
    """
    spans = _spans(pieces)
    payloads = [p.values if isinstance(p, Ok) else p.error for p in pieces]
    buffers: list[memoryview] = []
    try:
        return spans, dumps(payloads, buffers), buffers
    except Exception:
        buffers.clear()
    fixed = fail_unpicklable(pieces, dumps)
    spans = _spans(fixed)
    body = dumps([p.values if isinstance(p, Ok) else p.error for p in fixed], buffers)
    return spans, body, buffers


# Sends a frame, then writes the raw bytes of its out-of-band buffers.
Send = Callable[..., None]


class _Reporter:
    """Sends a batch's pieces: each at once when streaming, else all at the end."""

    def __init__(self, send: Send, batch_id: int, stream: bool) -> None:
        self.send = send  # sends a frame, then writes the raw buffers that follow it
        self.batch_id = batch_id
        self.stream = stream
        self.pieces: list[Piece] = []
        self.last = time.perf_counter()

    def emit(self, piece: Piece) -> None:
        self.pieces.append(piece)
        if self.stream:
            self.flush()

    def flush(self) -> None:
        if self.pieces:
            now = time.perf_counter()
            spans, data, buffers = encode_results(self.pieces)
            sizes = [buffer.nbytes for buffer in buffers]
            self.send(frame(RESULT, (self.batch_id, now - self.last, spans, sizes), data), buffers)
            self.pieces.clear()
            self.last = now


def _serve_batch(
    send: Send,
    fn: Callable[..., Any] | BaseException,
    header: Any,
    body: memoryview,
    budget: int | None,
    marks: Any,
) -> int:
    """Run one BATCH frame and report it; returns how many tasks ran."""
    batch_id, _key, style, start, count, mode, timed = header
    # mode: FAST (results at the end, no per-task work), MARKED (results at
    # the end, each task's index stored in the shared marks) or STREAM.
    reporter = _Reporter(send, batch_id, mode in (STREAM_MODE, TIMED_MODE))
    try:
        if isinstance(fn, BaseException):
            raise fn
        items = pickle.loads(body)
    except BaseException as exc:
        error = (
            exc
            if isinstance(exc, SerializationError)
            else SerializationError(
                f"the arguments of tasks {start}..{start + count - 1} could not be "
                f"unpickled in the worker: {type(exc).__name__}: {exc}",
                what="argument",
            )
        )
        packed = pack_exception(error)
        spans = [(start + i, 1, False, None) for i in range(count)]
        send(frame(RESULT, (batch_id, 0.0, spans, []), dumps([packed] * count)))
        return 0
    if budget is not None and budget < count:
        items = items[:budget]
    emit = Stamper(reporter.emit) if timed else reporter.emit
    marked = marks.view if mode == MARKED_MODE and marks is not None else None
    if marked is not None:
        marked[0], marked[1] = batch_id, start
    try:
        return run_batch(
            caller(fn, Style(style)),
            start,
            items,
            emit,
            mode != FAST_MODE,
            pack_exception,
            marks=marked,
            started=(lambda index: send(frame(STARTED, (batch_id, index))))
            if mode == TIMED_MODE
            else None,
        )
    finally:
        # A line the batch left unfinished goes out before its results.
        for stream_ in _relayed:
            stream_.flush()
        reporter.flush()


def _watch_parent(lifeline: Any, parent: int) -> None:
    try:
        lifeline.poll(None)  # nothing is ever written: this returns at end of file
        # The parent died without cleaning up (SIGKILL): its shared segments
        # would outlive everyone. Whichever worker gets here first removes them.
        segments.sweep(parent)
    finally:
        _silence()
        os._exit(EXIT_ORPHANED)


def _silence() -> None:
    """Point stdout and stderr at /dev/null: the parent that read them is gone.

    Otherwise the interpreter's exit flushes into a pipe nobody reads, and
    prints "BrokenPipeError ... lost sys.stderr" where the user sees it.
    """
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)


# The relayed sys.stdout and sys.stderr of this worker (empty: not relayed).
_relayed: tuple[Any, ...] = ()


def _relay_output(send: Send, worker_id: int, log_levels: dict[str, int]) -> None:
    global _relayed
    from .. import relay

    def send_output(stream: int, text: str) -> None:
        send(frame(OUTPUT, (stream, text)))

    def send_log(record: dict[str, Any]) -> None:
        send(frame(LOG, record))

    _relayed = relay.install(send_output, send_log, worker_id, log_levels)


def cap_native_threads(limit: int | None) -> None:
    """Size native thread pools (BLAS, OpenMP) to ``limit`` threads in this worker.

    Environment variables reach libraries loaded from now on; a variable the
    user set is left as it is. Libraries already loaded (imported by the main
    script the forkserver preloaded, or inherited through fork) are resized
    through threadpoolctl when it is installed.
    """
    if limit is None:
        return
    chosen = [name for name in NATIVE_THREAD_VARIABLES if name in os.environ]
    for name in NATIVE_THREAD_VARIABLES:
        os.environ.setdefault(name, str(limit))
    if chosen or not any(name in sys.modules for name in ("numpy", "scipy", "torch")):
        return
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        return
    threadpool_limits(limits=limit)


def _sender(conn: Any) -> Send:
    """Sends a frame, then the raw bytes of its out-of-band buffers, in order."""
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    send_bytes = conn.send_bytes
    # Threads a task starts may print or log while the main thread reports.
    lock = threading.Lock()

    def send(message: bytes, buffers: list[memoryview] | None = None) -> None:
        with lock:
            send_bytes(message)
            for buffer in buffers or ():
                sock.sendall(buffer)

    return send


def worker_main(
    conn: Any,
    lifeline: Any,
    lifeline_w: Any,
    worker_id: int,
    setup: bytes | None,
    max_tasks: int | None,
    parent: int,
    native_threads: int | None,
    log_levels: dict[str, int] | None,
    marks: Any = None,
    max_memory: int | None = None,
) -> None:
    # Under fork the child inherits the parent's write end too: close it, or
    # the parent's death would never read as end of file.
    lifeline_w.close()
    threading.Thread(
        target=_watch_parent, args=(lifeline, parent), daemon=True, name="fenfa-lifeline"
    ).start()
    # Ctrl-C reaches the whole process group; the parent decides what it
    # means and stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cap_native_threads(native_threads)
    state: dict[str, Any] = {}
    set_slot(worker_id, "process", state)
    send = _sender(conn)
    if log_levels is not None:
        _relay_output(send, worker_id, log_levels)
    if setup is not None:
        try:
            initializer, initargs = cloudpickle.loads(setup)
            initializer(*initargs)
        except BaseException as exc:
            send(frame(INIT_FAILED, pack_exception(exc)))
            return
    send(frame(READY, None))
    functions: dict[bytes, Callable[..., Any] | BaseException] = {}
    budget = max_tasks
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            _silence()
            return  # the parent is gone
        kind, header, body = unframe(message)
        if kind == FUNC:
            # The parent decides what this cache holds: it names the key to
            # evict (its mirror's oldest), so the two can never disagree.
            key, evicted = header
            try:
                functions[key] = cloudpickle.loads(body)
            except BaseException as exc:
                functions[key] = SerializationError(
                    f"the function could not be unpickled in the worker: "
                    f"{type(exc).__name__}: {exc}",
                    what="function",
                )
            if evicted is not None:
                functions.pop(evicted, None)
            continue
        if kind == FORGET:
            paths, keys = header
            segments.forget(paths)
            for key in keys:
                functions.pop(key, None)
            continue
        if kind == STOP:
            return
        key = header[1]
        fn = functions[key]
        ran = _serve_batch(send, fn, header, body, budget, marks)
        if budget is not None:
            budget -= ran
        too_big = max_memory is not None and memory.rss_bytes() > max_memory
        if (budget is not None and budget <= 0) or too_big:
            # Retire: a fresh worker takes this one's place (and what it holds goes).
            send(frame(RETIRE, (header[0],)))
            conn.close()
            return


__all__ = ["encode_results", "fail_unpicklable", "worker_main"]
