"""The dask backend's caller side: batches out to the cluster, pieces back.

One :class:`DaskBackend` per pool. It sends each batch as one dask task
(:func:`.remote.run_remote`), keeps no more of them on the cluster than the
workers can start at once, and reports every batch exactly once, whatever
ends it: its result, a dead worker, a cancel, the pool's shutdown.

- At most ``AHEAD_PER_THREAD`` batches per dask worker thread are on the
  cluster at once; the rest wait in ``_queue``, here, and go out as results
  come back (from the done callback). A call that ends early (a failure
  under ``on_error="raise"``, a consumer that stops) drops its queued batches
  at once; Dask's own cancel is a message that takes milliseconds to reach
  the workers, in which a worker would start what it already holds.
- ``_lock`` guards ``_queue`` and ``_outstanding`` (future key -> batch): a
  batch is reported exactly once, by whoever pops it first: the done
  callback, a cancelling ``shutdown``, ``abandon``.
- A worker that dies mid-task: the scheduler runs its tasks again elsewhere
  (up to ``distributed.scheduler.allowed-failures`` times, 3 by default),
  then the future fails with ``KilledWorker``, reported as
  :class:`~fenfa.errors.WorkerCrashed` for each task of the batch.
- Cancelling (``abandon``, ``shutdown(cancel_futures=True)``) releases the
  futures: queued tasks never start; running ones finish on their worker,
  unseen (a dask worker runs tasks on threads, which cannot be stopped).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import distributed

from ...errors import PoolClosed, SerializationError, WorkerCrashed
from ...tasks import Batch, Err, Job, Piece
from ..base import Backend
from .cluster import Connection
from .remote import run_remote
from .sending import Sender
from .wire import decode_pieces

# Batches on the cluster per worker thread: one running, one waiting on the
# worker, so that a worker never idles for the round trip (result here, next
# batch there: ~1-2 ms on one machine); more would only be harder to cancel.
AHEAD_PER_THREAD = 2
# shutdown(cancel_futures=True): how long running batches may take before
# their futures are released (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0


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
        self._connection = Connection(address, workers)
        self._client: Any = self._connection.client
        threads = self._connection.threads
        if self._connection.cluster is None and workers_from_cluster:
            self.workers = threads
        self._ahead = AHEAD_PER_THREAD * max(threads, self.workers)
        #: The scheduler's address: another pool may connect to the same cluster.
        self.address: str = self._connection.address
        self._sender = Sender(self._client)
        self._lock = threading.Condition(threading.Lock())
        self._outstanding: dict[str, tuple[Any, Batch]] = {}
        self._queue: deque[tuple[Batch, bool]] = deque()  # (batch, urgent), not sent yet
        self._delivering = 0
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
            call = self._sender.call(job)
        except Exception as exc:
            name = getattr(job.fn, "__qualname__", repr(job.fn))
            why = f"the function {name} could not be pickled: {type(exc).__name__}: {exc}"
            self._fail(batch, lambda i: SerializationError(why, index=i, what="function"))
            return
        try:
            items, used = self._sender.encode(batch.items, call.arrays, function=False)
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
                    run_remote,
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
                self._sender.encode(item, batch.job.remote.arrays, function=False)
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
        return decode_pieces(future.result(), batch)

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
            self._connection.close()
        finally:
            # Whatever a dead connection left unreported fails now: nothing waits forever.
            for _, batch in self._take(None):
                self._fail(batch, lambda i: PoolClosed("the pool was shut down"))

    def terminate(self) -> None:
        self.shutdown(wait=False, cancel=True)
