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
import threading
import weakref
from collections import OrderedDict, deque
from multiprocessing.connection import wait
from typing import Any

import cloudpickle

from ..errors import FenfaError, PoolClosed, SerializationError, WorkerCrashed, unpack_exception
from ..tasks import Batch, Err, Ok, Piece
from . import _worker
from ._worker import BATCH, FUNC, INIT_FAILED, RESULT, RETIRE, STOP, frame, unframe
from .base import Backend
from .thread import fail_batch

# A second batch is queued behind the running one only when that one will end
# soon: it hides the pipe round trip (~100 us) for short batches, while a
# long batch keeps its successor free to go to whichever worker is idle first.
PREFETCH_BELOW_SECONDS = 0.05
# Tasks expected to take longer than this report one by one (so a crash can
# be blamed on exactly one task and progress is seen); shorter ones report
# once per batch, because a message per 1-us task would cost 20x the task.
STREAM_ABOVE_SECONDS = 0.001
# How long a stopping worker may take to exit before it is terminated.
STOP_GRACE_SECONDS = 2.0

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


class _Worker:
    __slots__ = (
        "batches",
        "conn",
        "functions",
        "id",
        "outbox",
        "process",
        "retiring",
        "sender",
        "started_work",
    )

    def __init__(self, worker_id: int, process: Any, conn: Any) -> None:
        self.id = worker_id
        self.process = process
        self.conn = conn
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.batches: deque[Batch] = deque()
        # Mirror of the worker's function cache: same size, same order of use.
        self.functions: OrderedDict[bytes, None] = OrderedDict()
        self.retiring = False
        self.started_work = False
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

    def __init__(self, workers: int, *, start_method: str | None = None, **kwargs: Any) -> None:
        super().__init__(workers, **kwargs)
        method = start_method or DEFAULT_START_METHOD
        self._ctx = multiprocessing.get_context(method)
        self.start_method = method
        if method == "forkserver":
            # Forked from a server that has already imported the worker code
            # (and cloudpickle), a worker starts in milliseconds.
            self._ctx.set_forkserver_preload(["__main__", _worker.__name__])
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
        self._terminated = False
        self._stopped = False
        self.broken: BaseException | None = None
        # Workers that died before finishing any work, in a row: a pool whose
        # workers cannot even start must fail its tasks, not respawn forever.
        self._failed_starts = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        for _ in range(workers):
            self._start_worker()
        self._manager = threading.Thread(
            target=self._manage, daemon=True, name="fenfa-process-manager"
        )
        self._manager.start()
        _live.add(self)

    # -- workers --------------------------------------------------------

    def _start_worker(self) -> None:
        worker_id = next(self._ids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker.worker_main,
            name=f"fenfa-process-{worker_id}",
            args=(child_conn, worker_id, self._setup, self.max_tasks_per_worker),
        )
        try:
            process.start()
        finally:
            child_conn.close()
        worker = _Worker(worker_id, process, parent_conn)
        worker.sender.start()
        with self._lock:
            self._workers[worker_id] = worker

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
                data = cloudpickle.dumps(job.fn, protocol=5)
            except Exception as exc:
                raise SerializationError(
                    f"the function {job.fn!r} could not be pickled: {type(exc).__name__}: {exc}",
                    what="function",
                ) from exc
            job.payload = (hashlib.blake2b(data, digest_size=16).digest(), data)
        for part in self._encode(batch):
            with self._lock:
                if self._stopped:
                    raise PoolClosed("the pool has been shut down")
                if self.broken is not None or self._terminated:
                    error = self.broken or FenfaError("the pool was terminated")
                    if job.claim():
                        fail_batch(part, error)
                    continue
                if urgent:
                    self._pending.appendleft(part)
                else:
                    self._pending.append(part)
                self._assign()

    def _encode(self, batch: Batch) -> list[Batch]:
        """Give ``batch`` its wire form; a task whose input will not pickle fails alone."""
        try:
            batch.wire = self._frame(batch, _worker.dumps(batch.items))
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
                error = SerializationError(
                    f"the input of task {index} could not be pickled: {type(exc).__name__}: {exc}",
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
            part.wire = self._frame(part, _worker.dumps(part.items))
        return parts

    @staticmethod
    def _streams(batch: Batch) -> bool:
        count = len(batch.items)
        return count > 1 and (
            batch.expected is None or batch.expected / count > STREAM_ABOVE_SECONDS
        )

    @classmethod
    def _frame(cls, batch: Batch, body: bytes) -> bytes:
        assert batch.job.payload is not None
        count = len(batch.items)
        stream = cls._streams(batch)
        header = (batch.id, batch.job.payload[0], int(batch.job.style), batch.start, count, stream)
        return frame(BATCH, header, body)

    def _has_room(self, worker: _Worker) -> bool:
        if worker.retiring:
            return False
        held = worker.batches
        if not held:
            return True
        return (
            len(held) == 1
            and held[0].expected is not None
            and held[0].expected < PREFETCH_BELOW_SECONDS
        )

    def _assign(self) -> None:
        """Hand pending batches to workers with room. Called with ``_lock`` held."""
        pending = self._pending
        for worker in self._workers.values():
            while pending and self._has_room(worker):
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
                worker.batches.append(batch)
                worker.outbox.put(batch.wire)
            if not pending:
                return

    def idle(self) -> bool:
        with self._lock:
            return not self._pending and not any(w.batches for w in self._workers.values())

    # -- the manager thread ---------------------------------------------

    def _manage(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing and self.idle():
                        break
                    by_conn = {w.conn: w for w in self._workers.values()}
                    by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
                ready = wait([self._wake_r, *by_conn, *by_sentinel])
                for obj in ready:
                    if obj == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif obj in by_conn:
                        self._receive(by_conn[obj])
                for obj in ready:
                    if obj in by_sentinel:
                        self._reap(by_sentinel[obj])
        except BaseException as exc:  # pragma: no cover - a bug in fenfa itself
            self._break(FenfaError(f"fenfa's process manager failed: {exc!r}"))
            raise
        finally:
            self._stop_workers()

    def _receive(self, worker: _Worker) -> bool:
        """Handle one message; False at end of file (the worker is gone)."""
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):
            return False  # the worker died; its sentinel fires and _reap blames
        kind, header, body = unframe(message)
        if kind == RESULT:
            self._results(worker, header, body)
        elif kind == RETIRE:
            with self._lock:
                worker.retiring = True
                self._requeue(worker)
                if not self._closing:
                    self._start_worker()
                self._assign()
        elif kind == INIT_FAILED:
            error = unpack_exception(header)
            error.add_note(f"fenfa: raised by the initializer of worker {worker.id}")
            self._break(error)
        return True

    def _results(self, worker: _Worker, header: Any, body: memoryview) -> None:
        batch_id, busy, spans = header
        if not worker.batches or worker.batches[0].id != batch_id:
            return  # the pool broke and already failed this batch
        batch = worker.batches[0]
        worker.started_work = True
        self._failed_starts = 0
        pieces: list[Piece] = []
        try:
            payloads = pickle.loads(body)
        except Exception as exc:
            for start, count, _ok in spans:
                for index in range(start, start + count):
                    error = SerializationError(
                        f"the result of task {index} could not be unpickled: "
                        f"{type(exc).__name__}: {exc}",
                        index=index,
                        what="result",
                    )
                    pieces.append(Err(index, error))
        else:
            for (start, _count, ok), payload in zip(spans, payloads, strict=True):
                pieces.append(Ok(start, payload) if ok else Err(start, unpack_exception(payload)))
        with self._lock:
            batch.done += sum(span[1] for span in spans)
            if batch.done >= len(batch.items):
                worker.batches.popleft()
                self._assign()
        batch.job.deliver(batch, pieces, busy)

    def _requeue(self, worker: _Worker) -> None:
        """Put what a departing worker had not reported back at the front of the queue."""
        held = list(worker.batches)
        worker.batches.clear()
        for batch in reversed(held):
            if batch.done < len(batch.items):
                rest = batch.tail()
                rest.wire = self._frame(rest, _worker.dumps(rest.items))
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
        crashed: tuple[Batch, int] | None = None
        with self._lock:
            del self._workers[worker.id]
            if not worker.retiring and worker.batches:
                batch = worker.batches[0]
                if self._streams(batch) or len(batch.items) - batch.done == 1:
                    # Tasks reported one by one: the first unreported one was running.
                    crashed = (batch, batch.start + batch.done)
                    batch.done += 1
                else:
                    # Results of this batch come at its end, so which task was
                    # running is unknown: run the rest again, reporting task by
                    # task, and the crash, if it comes again, is pinned exactly.
                    batch.expected = None
            elif not worker.retiring:
                self._failed_starts += 1
            self._requeue(worker)
            replace = not self._closing and self.broken is None
        if crashed is not None:
            batch, index = crashed
            error = WorkerCrashed(
                f"worker {worker.id} (pid {worker.process.pid}) {exit_description(code)} "
                f"while running task {index}",
                index=index,
                exitcode=code,
            )
            batch.job.deliver(batch, [Err(index, error)], 0.0)
        if self._failed_starts > 2 * self.workers + 2:
            self._break(
                WorkerCrashed(
                    f"worker processes keep dying before they run anything (the last one "
                    f"{exit_description(code)}); is the environment able to start "
                    f"'{self.start_method}' workers?",
                    exitcode=code,
                )
            )
            return
        if replace and not worker.retiring:
            try:
                self._start_worker()
            except Exception as exc:
                self._break(FenfaError(f"could not start a worker process: {exc!r}"))
                return
        with self._lock:
            self._assign()

    def _break(self, error: BaseException) -> None:
        """The pool cannot run tasks any more: fail everything queued or held."""
        with self._lock:
            if self.broken is None:
                self.broken = error
            failed = list(self._pending)
            self._pending.clear()
            for worker in self._workers.values():
                failed.extend(b.tail() for b in worker.batches if b.done < len(b.items))
                worker.batches.clear()
        for batch in failed:
            if batch.job.claim():
                fail_batch(batch, self.broken)
        self._wake()

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
        _live.discard(self)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closing = True
        self._wake()
        if wait and self._manager is not threading.current_thread():
            self._manager.join()

    def terminate(self) -> None:
        """Stop now: kill every worker, fail whatever they held."""
        with self._lock:
            self._closing = True
            self._terminated = True
            workers = list(self._workers.values())
        self._break(FenfaError("the pool was terminated"))
        for worker in workers:
            if worker.process.exitcode is None:
                worker.process.kill()
        if self._manager.is_alive() and self._manager is not threading.current_thread():
            self._manager.join()
