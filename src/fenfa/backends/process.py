"""The process backend: worker processes owned end to end.

Not a wrapper over ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: their
failure modes (a dead worker hangs ``Pool.map``; one crash breaks every
future of a ``ProcessPoolExecutor``) are what fenfa exists to avoid. Each
worker has its own pipe, so the parent always knows which batches a worker
holds and, since a worker runs its batches in order and reports tasks in
order, which task it is running.

The backend is cut along its seams, each module importing only those below::

    process.py      ProcessBackend: submitting, dispatch (_assign), the manager thread
    _lifecycle.py   WorkerLifecycle, its base: workers started, reaped (the crash
                    blamed on one task), replaced, stopped; the pool broken
    _handle.py      WorkerHandle: one worker as the parent sees it; its end in words
    _protocol.py    the pipe protocol: frames, message kinds, batch and result bodies
    _worker.py      the child's side: the worker's loop (of these, imports _protocol)

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
import os
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from .. import memory, relay, segments
from ..errors import FenfaError, PoolClosed
from ..tasks import Batch, Job
from ._handle import WorkerHandle
from ._lifecycle import WorkerLifecycle
from ._protocol import (
    FORGET,
    LOG,
    OUTPUT,
    RESULT,
    STARTED,
    decode_results,
    encode,
    frame,
    function_payload,
    receive_buffers,
    unframe,
)
from .thread import fail_batch

# A second batch is queued behind the running one only when that one will end
# soon: it hides the pipe round trip (~100 us) for short batches, while a
# long batch keeps its successor free to go to whichever worker is idle first.
PREFETCH_BELOW_SECONDS = 0.05
# The manager wakes at least this often, whatever the deadlines.
MAX_WAIT_SECONDS = 3600.0
# shutdown(cancel_futures=True): how long running tasks may take to finish
# before their workers are killed (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0


_live: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


@atexit.register
def _terminate_live_backends() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first:
    # nobody can consume results any more, so workers are stopped at once.
    for backend in list(_live):
        backend.terminate()


class ProcessBackend(WorkerLifecycle):
    name = "process"
    remote = True

    def __init__(self, workers: int, **kwargs: Any) -> None:
        # (The options of the workers themselves are WorkerLifecycle's.)
        super().__init__(workers, **kwargs)
        # True while memory_floor holds dispatch back: the manager looks again soon.
        self._memory_held = False
        self._closing = False
        self._cancel_at: float | None = None
        self._terminated = False
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

    # -- submitting -----------------------------------------------------

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        job = batch.job
        if job.payload is None:
            job.payload = function_payload(job)
        for part in encode(batch):
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

    @staticmethod
    def _has_room(worker: WorkerHandle, batch: Batch) -> bool:
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
                worker.send_function(*batch.job.payload)
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
        cancel_running: list[WorkerHandle] = []
        with self._lock:
            for worker in self._workers.values():
                deadline = worker.deadline()
                if deadline is not None and now >= deadline:
                    worker.kill(worker.timed_out())
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
            _live.discard(self)

    def _handle(
        self,
        ready: list[Any],
        by_conn: dict[Any, WorkerHandle],
        by_sentinel: dict[Any, WorkerHandle],
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

    def _receive(self, worker: WorkerHandle) -> bool:
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
            buffers = receive_buffers(worker.sock, header[3])
            if buffers is None:
                return False  # died halfway: as if nothing had come
            self._results(worker, header, body, buffers)
        elif kind == STARTED:
            with self._lock:
                if worker.batches and worker.batches[0].id == header[0]:
                    worker.task_started = time.monotonic()
                    worker.running = True
        else:  # READY, RETIRE, INIT_FAILED: the worker's life, _lifecycle's
            self._life_event(worker, kind, header)
        return True

    def _results(
        self, worker: WorkerHandle, header: Any, body: memoryview, buffers: list[bytearray]
    ) -> None:
        batch_id, busy, spans, _sizes = header
        if not worker.batches or worker.batches[0].id != batch_id:
            return  # the pool broke and already failed this batch
        batch = worker.batches[0]
        pieces = decode_results(spans, body, buffers)
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
