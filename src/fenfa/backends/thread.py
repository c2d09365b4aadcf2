"""The thread backend: a fixed set of threads sharing one queue of batches.

Threads suit tasks that wait (network, disk, subprocesses) and C code that
releases the GIL (NumPy, hashlib, zlib). A running thread cannot be stopped
from outside: when a call is cancelled, batches not yet started are dropped
and a task already running finishes, its result discarded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any

from ..tasks import Batch, Err, Piece, attach_traceback, caller, run_batch
from ..worker import set_slot
from .base import Backend


class WorkQueue:
    """A FIFO of batches that also takes urgent work at the front (retries)."""

    def __init__(self) -> None:
        self._items: deque[Batch | None] = deque()
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Batch | None, *, front: bool = False) -> None:
        with self._ready:
            if front:
                self._items.appendleft(item)
            else:
                self._items.append(item)
            self._ready.notify()

    def get(self) -> Batch | None:
        with self._ready:
            while not self._items:
                self._ready.wait()
            return self._items.popleft()

    def drain(self) -> list[Batch | None]:
        with self._ready:
            items = list(self._items)
            self._items.clear()
            return items


def fail_batch(batch: Batch, exc: BaseException) -> None:
    """Report every task of ``batch`` as failed with ``exc``."""
    pieces: list[Piece] = [Err(batch.start + i, exc) for i in range(len(batch.items))]
    batch.done = len(batch.items)
    batch.job.deliver(batch, pieces, 0.0)


class ThreadBackend(Backend):
    name = "thread"

    def __init__(self, workers: int, **kwargs: Any) -> None:
        super().__init__(workers, **kwargs)
        self._queue = WorkQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count()
        self._closed = False
        self.broken: BaseException | None = None
        for _ in range(workers):
            self._start_thread()

    def _start_thread(self) -> None:
        worker_id = next(self._ids)
        thread = threading.Thread(
            target=self._work, args=(worker_id,), name=f"fenfa-thread-{worker_id}", daemon=True
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        if self.broken is not None:
            if batch.job.claim():
                fail_batch(batch, self.broken)
            return
        self._queue.put(batch, front=urgent)

    def _work(self, worker_id: int) -> None:
        state: dict[str, Any] = {}
        set_slot(worker_id, self.name, state)
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:
                # Stay and fail every batch that reaches this thread, so that
                # work never waits for a worker that will not come.
                self._break(attach_traceback(exc))
        budget = self.max_tasks_per_worker
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            if self.broken is not None:
                if batch.job.claim():
                    fail_batch(batch, self.broken)
                continue
            job = batch.job
            if not job.claim():
                continue
            items = batch.items
            if budget is not None and budget < len(items):
                # Run what this worker still may; the rest goes back first in line.
                rest = Batch(job, batch.start + budget, items[budget:], batch.attempt)
                items = items[:budget]
                self._queue.put(rest, front=True)
            pieces: list[Piece] = []
            begin = time.perf_counter()
            ran = run_batch(
                caller(job.fn, job.style),
                batch.start,
                items,
                pieces.append,
                False,
                attach_traceback,
            )
            busy = time.perf_counter() - begin
            batch.done = ran
            job.deliver(batch, pieces, busy)
            if budget is not None:
                budget -= ran
                if budget <= 0:
                    # Retire: a fresh thread (new id, new state) takes this one's place.
                    self._start_thread()
                    return

    def _break(self, exc: BaseException) -> None:
        """An initializer failed: every task still queued, and every later one, fails."""
        self.broken = exc
        for batch in self._queue.drain():
            if batch is None:
                self._queue.put(None)  # keep the stop signal for another thread
            elif batch.job.claim():
                fail_batch(batch, exc)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            if self._closed:
                threads = list(self._threads)
            else:
                self._closed = True
                threads = list(self._threads)
                # One stop signal per running thread, behind the queued work. A
                # thread that retires hands its signal on to its replacement.
                alive = sum(t.is_alive() for t in threads)
                for _ in range(alive):
                    self._queue.put(None)
        if wait:
            current = threading.current_thread()
            while True:
                for thread in threads:
                    if thread is not current:
                        thread.join()
                with self._lock:
                    if len(self._threads) == len(threads):
                        break
                    threads = list(self._threads)
