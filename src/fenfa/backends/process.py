"""The process backend: worker processes owned end to end.

Not a wrapper over ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: their
failure modes (a dead worker hangs ``Pool.map``; one crash breaks every
future of a ``ProcessPoolExecutor``) are what fenfa exists to avoid. Each
worker has its own pipe, so the parent always knows which batches a worker
holds and, since a worker runs its batches in order and reports tasks in
order, which task it is running.

Data flow (who owns what)::

    caller threads                  manager thread                 worker i (process)
    ──────────────                  ──────────────                 ──────────────────
    submit(batch)                   waits on every worker's        recv FUNC/BATCH
      encode items (pickle)           pipe and process sentinel      run tasks
      pending.append ──► _assign ◄── RESULT: deliver pieces,       send RESULT frames
                          │            free room, _assign again
                          ▼          sentinel: blame the running
                 worker i's outbox     task, requeue the rest,
                          │            start a replacement
                 sender thread i ──── send_bytes ───────────────►  pipe i

- ``_lock`` guards ``_pending`` and each worker's ``batches`` and function
  cache; user code never runs under it.
- One sender thread per worker, because ``send_bytes`` of a large batch
  blocks until that worker reads it; the manager thread only reads, so a
  worker blocked writing results is always drained and no cycle of full
  pipes can form.
- The function is cloudpickled once per call and sent once per worker, keyed
  by a hash of its bytes (never its name or id: a function redefined in a
  notebook must not be served stale). Items and results use the standard
  pickle, protocol 5, and cloudpickle only when that fails.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from multiprocessing.connection import wait
from typing import Any

import cloudpickle

from .. import _shadow, autoshare, memory, relay, segments
from ..errors import (
    FenfaError,
    PoolClosed,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    unpack_exception,
)
from ..tasks import Batch, Err, Job, Ok, Piece, Style
from . import _worker, usable_cores, zygote
from ._worker import (
    BATCH,
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
    frame,
    unframe,
)
from .base import Backend
from .thread import fail_batch

# A second batch is queued behind the running one only when that one will end
# soon: it hides the pipe round trip (~100 us) for short batches, while a
# long batch keeps its successor free to go to whichever worker is idle first.
PREFETCH_BELOW_SECONDS = 0.05
# Tasks expected to take longer than this report one by one, so a crash is
# blamed on exactly one task and no finished task runs again. A message costs
# a few microseconds, so one per task costs at most ~2% above this; shorter
# tasks report once per batch.
STREAM_ABOVE_SECONDS = 0.0002
# A task with a timeout is timed from the worker's STARTED; until then (its
# function unpickling, say) it gets this much more before it is given up on.
START_GRACE_SECONDS = 60.0
# The manager wakes at least this often, whatever the deadlines.
MAX_WAIT_SECONDS = 3600.0
# Tasks expected to take longer than this (and shorter than the above) report
# at the end of their batch but store their index in a word the parent reads
# when the worker dies: the task that killed it fails once, without being run
# again to find it. One store costs ~50 ns, at most 1% above this; shorter
# tasks keep the loop that runs in C, and a crash among them may run the
# crashing task a second time (streamed, to pin it).
MARK_ABOVE_SECONDS = 5e-6
# How long a stopping worker may take to exit before it is killed.
STOP_GRACE_SECONDS = 2.0
# shutdown(cancel_futures=True): how long running tasks may take to finish
# before their workers are killed (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0
# Workers that die before they are ready, in a row, before the pool gives up
# (when no worker of the pool was ever ready: the environment is broken).
FAILED_STARTS_BEFORE_ANY_READY = 2

DEFAULT_START_METHOD = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)


def exit_description(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# The two-line fix, as the user would type it.
MAIN_GUARD_FIX = (
    " Put the code that starts work under the main guard:\n\n"
    '    if __name__ == "__main__":\n'
    "        main()   # or the calls themselves, indented\n"
)


def _main_guard_hint(method: str) -> str:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if method == "fork" or path is None:
        return ""
    return (
        f" Under the '{method}' start method each worker first re-imports your main "
        f"script ({path}); if that script starts work at import time, every worker fails "
        "this way." + MAIN_GUARD_FIX
    )


@contextlib.contextmanager
def _main_path_hidden_unless_a_file() -> Iterator[None]:
    """A main script that is no file (``python - <<EOF``: "<stdin>") is not re-imported.

    Under forkserver and spawn a worker runs the main script's file again
    before anything else; "<stdin>" is no file, so every worker died of
    FileNotFoundError and the user was told to add the main guard they had.
    Functions of such a script travel by value, so the workers need none of it.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        yield
        return
    del main.__file__  # type: ignore[union-attr]
    try:
        yield
    finally:
        main.__file__ = path  # type: ignore[union-attr]


def _receive_into(sock: socket.socket, buffer: bytearray) -> bool:
    """Fill ``buffer`` from ``sock``; False if the other end closed first."""
    view = memoryview(buffer)
    while view:
        try:
            count = sock.recv_into(view)
        except OSError:
            return False
        if count == 0:
            return False
        view = view[count:]
    return True


def _unpicklable_part(item: Any, style: Style) -> str:
    """Which argument of a task's input does not pickle, in words."""
    if style is Style.ONE:
        return "the argument"
    args, kwargs = (item, {}) if style is Style.STAR else item
    for position, value in enumerate(args):
        try:
            _worker.dumps(value)
        except Exception:
            return f"argument {position}"
    for name, value in kwargs.items():
        try:
            _worker.dumps(value)
        except Exception:
            return f"argument {name!r}"
    return "the arguments"


class _Worker:
    __slots__ = (
        "batches",
        "blame",
        "conn",
        "functions",
        "id",
        "marks",
        "oom_kills",
        "outbox",
        "process",
        "ready",
        "retiring",
        "running",
        "sender",
        "sock",
        "task_started",
    )

    def __init__(self, worker_id: int, process: Any, conn: Any, marks: Any) -> None:
        self.id = worker_id
        # Shared with the worker: (batch id, index of the task it runs), for MARKED batches.
        self.marks = marks
        # The kernel's OOM-kill count when it started: a SIGKILL after a rise names the cause.
        self.oom_kills = memory.oom_kills()
        self.process = process
        self.conn = conn
        # The same socket as ``conn``, for the raw out-of-band result buffers.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.batches: deque[Batch] = deque()
        # Mirror of the worker's function cache: same size, same order of use.
        self.functions: OrderedDict[bytes, None] = OrderedDict()
        self.ready = False
        self.retiring = False
        # Set when fenfa kills the worker on purpose: the error its running task gets.
        self.blame: BaseException | None = None
        # When the task now running started (or was sent), for timeouts.
        self.task_started = 0.0
        # Whether the worker said STARTED for its current timed task.
        self.running = False
        self.sender = threading.Thread(
            target=self._send_loop, daemon=True, name=f"fenfa-send-{worker_id}"
        )

    def _send_loop(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the worker is gone; the manager reaps it and requeues
            except Exception as exc:  # a bug of fenfa's: never a silent, starved worker
                self.kill(FenfaError(f"fenfa could not send a batch to worker {self.id}: {exc!r}"))
                return

    def deadline(self) -> float | None:
        """When the running task's timeout expires; before it has started, a grace."""
        if not self.batches or self.blame is not None:
            return None
        limit = self.batches[0].job.timeout
        if limit is None:
            return None
        if not self.running:
            # Sent, not started yet (its function unpickling, a worker
            # starting): not the task's time, but not forever either.
            return self.task_started + limit + START_GRACE_SECONDS
        return self.task_started + limit

    def kill(self, blame: BaseException | None) -> None:
        if self.blame is None:
            self.blame = blame
        if self.process.exitcode is None:
            self.process.kill()


_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


@atexit.register
def _terminate_live_backends() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first:
    # nobody can consume results any more, so workers are stopped at once.
    for backend in list(_live):
        backend.terminate()


class ProcessBackend(Backend):
    name = "process"
    remote = True

    def __init__(
        self,
        workers: int,
        *,
        start_method: str | None = None,
        native_threads: int | str | bool = "auto",
        worker_output: str = "relay",
        max_worker_memory: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(workers, **kwargs)
        self.worker_output = worker_output
        self.max_worker_memory = max_worker_memory
        # True while memory_floor holds dispatch back: the manager looks again soon.
        self._memory_held = False
        if native_threads == "auto":
            # N workers each running a BLAS with every core's worth of threads
            # would start N x cores threads on cores cores.
            self.native_threads: int | None = max(1, usable_cores() // workers)
        elif native_threads is False:
            self.native_threads = None
        else:
            assert isinstance(native_threads, int)
            self.native_threads = native_threads
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # We are a worker being started, re-importing the main script,
            # and that script starts a pool at import time.
            raise FenfaError(
                "a process pool was started while a worker process was importing the main "
                "script (each worker imports it under the forkserver and spawn start "
                "methods, so the script's top-level code runs again there)." + MAIN_GUARD_FIX
            )
        method = start_method or DEFAULT_START_METHOD
        self._ctx = multiprocessing.get_context(method)
        self.start_method = method
        if method == "forkserver":
            # Forked from a server that has already imported the worker code
            # (and cloudpickle), a worker starts in milliseconds.
            self._ctx.set_forkserver_preload(["__main__", _worker.__name__])
            with _main_path_hidden_unless_a_file():
                # A fork of this process, while it is still single-threaded.
                zygote.ensure_running()
        self._setup: bytes | None = None
        if self.initializer is not None:
            try:
                self._setup = cloudpickle.dumps((self.initializer, self.initargs))
            except Exception as exc:
                raise SerializationError(
                    f"the initializer or its initargs could not be pickled: {exc}",
                    what="initializer",
                ) from exc
        self._lock = threading.RLock()
        self._pending: deque[Batch] = deque()
        self._workers: dict[int, _Worker] = {}
        self._ids = itertools.count()
        self._closing = False
        self._cancel_at: float | None = None
        self._terminated = False
        self._stopped = False
        self.broken: BaseException | None = None
        #: Tasks run again because their results died with a crashed worker.
        self.reruns = 0
        self.insights: Any = None  # the pool's Insights, which counts them too
        # Workers that died before they were ready, in a row: a pool whose
        # workers cannot even start must fail its tasks, not respawn forever.
        self._failed_starts = 0
        self._ever_ready = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Only this process holds the write end: its death is the workers' cue.
        self._lifeline_r, self._lifeline_w = self._ctx.Pipe(duplex=False)
        try:
            for _ in range(workers):
                self._start_worker()
            self._manager = threading.Thread(
                target=self._manage, daemon=True, name="fenfa-process-manager"
            )
            self._manager.start()
        except BaseException:
            # Nobody will ever stop the workers already started: stop them now,
            # or interpreter exit waits for them (multiprocessing joins its
            # children) and the script hangs after printing its error.
            self._stop_started_workers()
            raise
        _live.add(self)
        segments.add_listener(self)

    # -- workers --------------------------------------------------------

    def _start_worker(self) -> None:
        worker_id = next(self._ids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        marks = _worker.Marks()
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker.worker_main,
            name=f"fenfa-process-{worker_id}",
            args=(
                child_conn,
                self._lifeline_r,
                self._lifeline_w,
                worker_id,
                self._setup,
                self.max_tasks_per_worker,
                os.getpid(),
                self.native_threads,
                relay.levels() if self.worker_output == "relay" else None,
                marks,
                self.max_worker_memory,
            ),
        )
        try:
            with _main_path_hidden_unless_a_file():
                process.start()
        except BaseException:
            marks.close()
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        try:
            worker = _Worker(worker_id, process, parent_conn, marks)
        except BaseException:
            process.kill()
            process.join()
            parent_conn.close()
            marks.close()
            raise
        worker.sender.start()
        with self._lock:
            self._workers[worker_id] = worker

    def _stop_started_workers(self) -> None:
        """Kill and reap the workers of a backend that failed to start."""
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            self._stopped = True
        for worker in workers:
            worker.kill(None)
            worker.process.join()
            worker.outbox.put(None)
            worker.sender.join()
            worker.conn.close()
            worker.sock.close()
            worker.marks.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._lifeline_w.close()
        self._lifeline_r.close()

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):
            # Under the lock: _stop_workers closes the pipe under it too. A
            # full pipe means the manager will wake anyway.
            if not self._stopped:
                os.write(self._wake_w, b"x")

    # -- submitting -----------------------------------------------------

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        job = batch.job
        if job.payload is None:
            try:
                data, paths = autoshare.dumps_function(job.fn, job.scope())
            except Exception as exc:
                raise SerializationError(
                    f"the function {job.fn!r} could not be pickled: {type(exc).__name__}: {exc}",
                    what="function",
                ) from exc
            key = hashlib.blake2b(data, digest_size=16).digest()
            segments.note_function(key, paths)
            job.payload = (key, data)
        for part in self._encode(batch):
            with self._lock:
                if self._stopped:
                    raise PoolClosed("the pool has been shut down")
                if self.broken is not None:
                    if job.claim():
                        fail_batch(part, self.broken)
                    continue
                if urgent:
                    self._pending.appendleft(part)
                else:
                    self._pending.append(part)
                self._assign()

    def _encode(self, batch: Batch) -> list[Batch]:
        """Give ``batch`` its wire form; a task whose input will not pickle fails alone."""
        try:
            batch.wire = self._frame(batch, self._dumps(batch))
            return [batch]
        except Exception:
            pass
        parts: list[Batch] = []
        good: list[Any] = []
        first = batch.start
        for index, item in enumerate(batch.items, batch.start):
            try:
                _worker.dumps(item)
            except Exception as exc:
                if good:
                    parts.append(Batch(batch.job, first, good, batch.attempt))
                    good = []
                which = _unpicklable_part(item, batch.job.style)
                error = SerializationError(
                    f"{which} of task {index} could not be pickled: {type(exc).__name__}: {exc}",
                    index=index,
                    what="argument",
                )
                error.__cause__ = exc
                bad = Batch(batch.job, index, [item], batch.attempt)
                batch.job.deliver(bad, [Err(index, error)], 0.0)
                first = index + 1
            else:
                good.append(item)
        if good:
            parts.append(Batch(batch.job, first, good, batch.attempt))
        for part in parts:
            part.wire = self._frame(part, self._dumps(part))
        return parts

    @staticmethod
    def _dumps(batch: Batch) -> bytes:
        """The items of ``batch`` pickled; large arrays among them shared, once per call."""
        return autoshare.dumps_items(batch.items, batch.job.scope())

    @staticmethod
    def _streams(batch: Batch) -> bool:
        count = len(batch.items)
        return count > 1 and (
            batch.job.timeout is not None
            or batch.expected is None
            or batch.expected / count > STREAM_ABOVE_SECONDS
        )

    @staticmethod
    def _marks(batch: Batch) -> bool:
        count = len(batch.items)
        return (
            count > 1 and batch.expected is not None and batch.expected / count > MARK_ABOVE_SECONDS
        )

    @classmethod
    def _mode(cls, batch: Batch) -> int:
        if batch.job.timeout is not None:
            return TIMED_MODE
        if cls._streams(batch):
            return STREAM_MODE
        return MARKED_MODE if cls._marks(batch) else FAST_MODE

    @classmethod
    def _frame(cls, batch: Batch, body: bytes) -> bytes:
        job = batch.job
        assert job.payload is not None
        count = len(batch.items)
        mode = cls._mode(batch)
        header = (batch.id, job.payload[0], int(job.style), batch.start, count, mode, job.timed)
        return frame(BATCH, header, body)

    @staticmethod
    def _has_room(worker: _Worker, batch: Batch) -> bool:
        if worker.retiring or worker.blame is not None:
            return False
        held = worker.batches
        if not held:
            return True
        # A timed task must start when it is sent, so it never waits in line,
        # and nothing waits in line behind one.
        return (
            len(held) == 1
            and batch.job.timeout is None
            and held[0].job.timeout is None
            and held[0].expected is not None
            and held[0].expected < PREFETCH_BELOW_SECONDS
        )

    def _assign(self) -> None:
        """Hand pending batches to workers with room. Called with ``_lock`` held."""
        pending = self._pending
        held = bool(pending) and memory.below_floor(self.memory_floor)
        if held and not self._memory_held:
            self._wake()  # the manager must wait with the memory poll in view
        self._memory_held = held
        if held:
            return  # (the manager looks again in memory.POLL_SECONDS)
        now = time.monotonic()
        timed = False
        # Idle ready workers first: a replacement still starting (importing),
        # or a busy worker taking a batch in line behind its running one (a
        # straggler's, perhaps), would hold a batch an idle one starts at once.
        workers = sorted(self._workers.values(), key=lambda w: (not w.ready, len(w.batches)))
        for worker in workers:
            while pending and self._has_room(worker, pending[0]):
                batch = pending.popleft()
                if not batch.job.claim():
                    continue
                assert batch.job.payload is not None
                assert batch.wire is not None
                key, data = batch.job.payload
                if key in worker.functions:
                    worker.functions.move_to_end(key)
                else:
                    worker.functions[key] = None
                    if len(worker.functions) > _worker.FUNCTION_CACHE_SIZE:
                        worker.functions.popitem(last=False)
                    worker.outbox.put(frame(FUNC, (key,), data))
                if not worker.batches:
                    worker.task_started = now
                    worker.running = False
                timed = timed or batch.job.timeout is not None
                worker.batches.append(batch)
                worker.outbox.put(batch.wire)
            if not pending:
                break
        if timed:
            self._wake()  # a new deadline: the manager must wait with it in view

    def idle_workers(self) -> int:
        with self._lock:
            return sum(
                1
                for w in self._workers.values()
                if w.ready and not w.batches and not w.retiring and w.blame is None
            )

    def idle(self) -> bool:
        with self._lock:
            if any(batch.job.dropped() for batch in self._pending):
                self._pending = deque(b for b in self._pending if not b.job.dropped())
            return not self._pending and not any(w.batches for w in self._workers.values())

    # -- the manager thread ---------------------------------------------

    def _next_timeout(self) -> float | None:
        """Seconds until the next deadline (a task's timeout, the cancel grace)."""
        deadlines = [d for w in self._workers.values() if (d := w.deadline()) is not None]
        if self._cancel_at is not None:
            deadlines.append(self._cancel_at)
        if self._memory_held:
            deadlines.append(time.monotonic() + memory.POLL_SECONDS)
        if not deadlines:
            return None
        # (Capped: the selector overflows on a wait of ~1e10 s.)
        return min(max(0.0, min(deadlines) - time.monotonic()), MAX_WAIT_SECONDS)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        cancel_running: list[_Worker] = []
        with self._lock:
            for worker in self._workers.values():
                deadline = worker.deadline()
                if deadline is not None and now >= deadline:
                    batch = worker.batches[0]
                    index = batch.start + batch.done
                    limit = batch.job.timeout
                    what = (
                        f"ran longer than its timeout of {limit:g} s"
                        if worker.running
                        else f"did not start within {START_GRACE_SECONDS:g} s of being due "
                        f"(with its timeout of {limit:g} s)"
                    )
                    worker.kill(
                        TaskTimeout(
                            f"task {index} {what}; its worker (pid {worker.process.pid}) "
                            "was killed",
                            index=index,
                            limit=limit,
                        )
                    )
            if self._memory_held:
                self._assign()  # memory may have been freed: dispatch again
            if self._cancel_at is not None and now >= self._cancel_at:
                self._cancel_at = None
                cancel_running = [w for w in self._workers.values() if w.batches]
        if cancel_running:
            # shutdown(cancel_futures=True) and the grace is over: what still
            # runs fails, and its workers are killed.
            self._break(PoolClosed("the pool was shut down while the task ran"), final=False)
            for worker in cancel_running:
                worker.kill(None)

    def _manage(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing and self.idle():
                        break
                    by_conn = {w.conn: w for w in self._workers.values()}
                    by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
                    timeout = self._next_timeout()
                ready = wait([self._wake_r, *by_conn, *by_sentinel], timeout)
                try:
                    self._handle(ready, by_conn, by_sentinel)
                except Exception as exc:  # a bug in fenfa itself: survive it
                    self._recover(exc)
        except BaseException as exc:  # pragma: no cover - the wait itself failed
            self._break(FenfaError(f"fenfa's process manager failed: {exc!r}"))
            raise
        finally:
            self._stop_workers()

    def _handle(
        self, ready: list[Any], by_conn: dict[Any, _Worker], by_sentinel: dict[Any, _Worker]
    ) -> None:
        for obj in ready:
            if obj == self._wake_r:
                os.read(self._wake_r, 4096)
            elif obj in by_conn:
                self._receive(by_conn[obj])
        for obj in ready:
            if obj in by_sentinel and by_sentinel[obj].id in self._workers:
                self._reap(by_sentinel[obj])
        self._enforce_deadlines()

    def _recover(self, exc: Exception) -> None:
        """The manager met a bug of fenfa's: fail what is in flight, keep the pool serving.

        Which batches the workers hold is no longer certain, so every task in
        flight fails with a FenfaError naming the bug, and the workers that
        held any are replaced; new calls run as before.
        """
        error = FenfaError(
            f"fenfa's process manager failed while tasks were in flight ({exc!r}); "
            "they failed, and the pool goes on serving new calls"
        )
        error.__cause__ = exc
        with self._lock:
            busy = [w for w in self._workers.values() if w.batches]
            for worker in busy:
                worker.blame = error  # (no new batch goes to a worker about to be killed)
        self._break(error, final=False)
        for worker in busy:
            worker.kill(None)

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message; False at end of file (the worker is gone)."""
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return False  # the worker died; its sentinel fires and _reap blames
        kind, header, body = unframe(message)
        if kind == OUTPUT:
            relay.deliver_output(*header)
        elif kind == LOG:
            relay.deliver_log(header)
        elif kind == RESULT:
            buffers = []
            for size in header[3]:
                buffer = bytearray(size)
                if not _receive_into(worker.sock, buffer):
                    return False  # died halfway: as if nothing had come
                buffers.append(buffer)
            self._results(worker, header, body, buffers)
        elif kind == READY:
            with self._lock:
                worker.ready = True
                self._ever_ready = True
                self._failed_starts = 0
                # Its first task starts now, not when it was sent: start-up
                # time does not count against a timeout.
                worker.task_started = time.monotonic()
        elif kind == STARTED:
            with self._lock:
                if worker.batches and worker.batches[0].id == header[0]:
                    worker.task_started = time.monotonic()
                    worker.running = True
        elif kind == RETIRE:
            with self._lock:
                worker.retiring = True
                self._requeue(worker)
                self._start_worker()
                self._assign()
        elif kind == INIT_FAILED:
            error = unpack_exception(header)
            name = getattr(self.initializer, "__qualname__", repr(self.initializer))
            error.add_note(f"fenfa: raised by the initializer {name}() in worker {worker.id}")
            self._break(error)
        return True

    def _results(
        self, worker: _Worker, header: Any, body: memoryview, buffers: list[bytearray]
    ) -> None:
        batch_id, busy, spans, _sizes = header
        if not worker.batches or worker.batches[0].id != batch_id:
            return  # the pool broke and already failed this batch
        batch = worker.batches[0]
        pieces: list[Piece] = []
        try:
            payloads = pickle.loads(body, buffers=buffers)
        except Exception as exc:
            for start, count, _ok, _times in spans:
                for index in range(start, start + count):
                    error = SerializationError(
                        f"the result of task {index} could not be unpickled: "
                        f"{type(exc).__name__}: {exc}",
                        index=index,
                        what="result",
                    )
                    pieces.append(Err(index, error))
        else:
            for (start, _count, ok, times), payload in zip(spans, payloads, strict=True):
                piece = Ok(start, payload) if ok else Err(start, unpack_exception(payload))
                piece.times = times
                pieces.append(piece)
        with self._lock:
            if not worker.batches or worker.batches[0] is not batch:
                return  # failed meanwhile (the pool broke, a shutdown's grace ran out)
            batch.done += sum(span[1] for span in spans)
            worker.task_started = time.monotonic()
            worker.running = False
            if batch.done >= len(batch.items):
                worker.batches.popleft()
                self._assign()
        batch.job.deliver(batch, pieces, busy)

    def _requeue(self, worker: _Worker) -> None:
        """Put what a departing worker had not reported back at the front of the queue.

        A batch of a call that has ended (it raised, its consumer broke off)
        is dropped: nobody wants it, and what it shared may already be gone.
        One that cannot be encoded again fails alone; the manager goes on.
        """
        held = list(worker.batches)
        worker.batches.clear()
        for batch in reversed(held):
            if batch.done >= len(batch.items) or batch.job.dropped():
                continue
            rest = batch.tail()
            try:
                rest.wire = self._frame(rest, self._dumps(rest))
            except Exception as exc:
                error = FenfaError(f"a batch of a crashed worker could not be sent again: {exc}")
                error.__cause__ = exc
                fail_batch(rest, error)
                continue
            self._pending.appendleft(rest)

    def _reap(self, worker: _Worker) -> None:
        # Results written just before the exit are still in the pipe: read them first.
        try:
            while worker.conn.poll() and self._receive(worker):
                pass
        except OSError:
            pass
        worker.process.join()
        code = worker.process.exitcode
        worker.outbox.put(None)
        worker.conn.close()
        worker.sock.close()
        blamed: tuple[Batch, int, BaseException] | None = None
        with self._lock:
            del self._workers[worker.id]
            if worker.batches and (worker.blame is not None or worker.ready):
                batch = worker.batches[0]
                index = batch.start + batch.done
                last = index + 1 == batch.start + len(batch.items)
                marked = self._marked_task(worker, batch)
                if marked is not None and worker.blame is None:
                    # Which task ran is in the marks: it alone fails; the
                    # finished ones before it, whose results died with the
                    # worker, run again.
                    self._note_reruns(batch, marked - index)
                    blamed = (batch, marked, self._crashed(worker, code, marked))
                    self._split_around(batch, marked)
                elif worker.blame is not None or self._streams(batch) or last:
                    # Tasks reported one by one: the first unreported one was running.
                    error = worker.blame or self._crashed(worker, code, index)
                    blamed = (batch, index, error)
                    batch.done += 1
                else:
                    # Results of this batch come at its end, so which task was
                    # running is unknown: run the rest again, reporting task by
                    # task, and the crash, if it comes again, is pinned exactly.
                    self._note_reruns(batch, len(batch.items) - batch.done)
                    batch.expected = None
            elif not worker.ready and not worker.retiring:
                self._failed_starts += 1
            self._requeue(worker)
            # Replaced even while closing: queued work must still run.
            replace = self.broken is None and not worker.retiring
        worker.marks.close()
        if blamed is not None:
            batch, index, error = blamed
            batch.job.deliver(batch, [Err(index, error)], 0.0)
        limit = 2 * self.workers + 2 if self._ever_ready else FAILED_STARTS_BEFORE_ANY_READY
        if self._failed_starts >= limit:
            self._break(
                WorkerCrashed(
                    f"worker processes keep dying before they are ready (the last one "
                    f"{exit_description(code)})."
                    + _main_guard_hint(self.start_method)
                    + _shadow.hint(),
                    exitcode=code,
                )
            )
            return
        if replace:
            try:
                self._start_worker()
            except Exception as exc:
                self._break(FenfaError(f"could not start a worker process: {exc!r}"))
                return
        with self._lock:
            self._assign()

    @staticmethod
    def _crashed(worker: _Worker, code: int | None, index: int) -> WorkerCrashed:
        cause = ""
        if code == -signal.SIGKILL and memory.oom_kills() > worker.oom_kills:
            cause = (
                " (most likely by the kernel's OOM killer: the machine ran out of memory; "
                "see the Pool options memory_floor and max_worker_memory)"
            )
        return WorkerCrashed(
            f"worker {worker.id} (pid {worker.process.pid}) "
            f"{exit_description(code)}{cause} while running task {index}",
            index=index,
            exitcode=code,
        )

    @classmethod
    def _marked_task(cls, worker: _Worker, batch: Batch) -> int | None:
        """The task a dead worker's marks say it ran, if they speak of ``batch``."""
        if cls._mode(batch) != MARKED_MODE or worker.marks.view[0] != batch.id:
            return None
        index = int(worker.marks.view[1])
        first = batch.start + batch.done
        return index if first <= index < batch.start + len(batch.items) else None

    def _split_around(self, batch: Batch, index: int) -> None:
        """Requeue ``batch``'s unreported tasks but ``index`` (lock held)."""
        first = batch.start + batch.done
        offset = index - batch.start
        for start, items in (
            (index + 1, batch.items[offset + 1 :]),
            (first, batch.items[batch.done : offset]),
        ):
            if items and not batch.job.dropped():
                part = Batch(batch.job, start, items, batch.attempt)
                if batch.expected is not None:
                    part.expected = batch.expected * len(items) / len(batch.items)
                try:
                    part.wire = self._frame(part, self._dumps(part))
                except Exception as exc:
                    error = FenfaError(
                        f"a batch of a crashed worker could not be sent again: {exc}"
                    )
                    error.__cause__ = exc
                    fail_batch(part, error)
                    continue
                self._pending.appendleft(part)
        batch.done = len(batch.items)

    def _note_reruns(self, batch: Batch, count: int) -> None:
        """Tasks that finished but whose results died with their worker run again."""
        if count > 0:
            self.reruns += count
            if self.insights is not None:
                self.insights.reruns += count

    def _break(self, error: BaseException, *, final: bool = True) -> None:
        """Fail everything queued or held; with ``final``, every later task too."""
        with self._lock:
            if final and self.broken is None:
                self.broken = error
            failed = list(self._pending)
            self._pending.clear()
            for worker in self._workers.values():
                failed.extend(b.tail() for b in worker.batches if b.done < len(b.items))
                worker.batches.clear()
        for batch in failed:
            if batch.job.claim():
                fail_batch(batch, error)
        self._wake()

    def abandon(self, job: Job) -> None:
        """The caller gave up on ``job`` (Ctrl-C): kill the workers running its tasks."""
        job.cancelled = True
        with self._lock:
            for worker in self._workers.values():
                if worker.batches and worker.batches[0].job is job:
                    worker.kill(PoolClosed("the call was interrupted"))

    def forget(self, paths: list[str], keys: list[bytes]) -> None:
        """Shared segments were released: workers drop them, and the functions using them."""
        with self._lock:
            if self._stopped:
                return
            message = frame(FORGET, (paths, keys))
            for worker in self._workers.values():
                for key in keys:
                    worker.functions.pop(key, None)
                worker.outbox.put(message)

    # -- stopping -------------------------------------------------------

    def _stop_workers(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            self._stopped = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        for worker in workers:
            worker.outbox.put(frame(STOP, None))
            worker.outbox.put(None)
        for worker in workers:
            worker.process.join(STOP_GRACE_SECONDS)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            worker.sender.join()
            worker.conn.close()
            worker.sock.close()
            worker.marks.close()
        self._lifeline_w.close()
        self._lifeline_r.close()
        _live.discard(self)

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        with self._lock:
            self._closing = True
            if cancel and self._cancel_at is None:
                self._cancel_at = time.monotonic() + CANCEL_GRACE_SECONDS
        self._wake()
        if wait and self._manager is not threading.current_thread():
            self._manager.join()

    def terminate(self) -> None:
        """Stop now: kill every worker, fail whatever they held."""
        with self._lock:
            self._closing = True
            self._terminated = True
            workers = list(self._workers.values())
        self._break(PoolClosed("the pool was terminated"))
        for worker in workers:
            worker.kill(None)
        if self._manager.is_alive() and self._manager is not threading.current_thread():
            self._manager.join()
