"""The thread backend: a set of threads sharing one queue of batches.

Threads suit tasks that wait (network, disk, subprocesses) and C code that
releases the GIL (NumPy, hashlib, zlib). A running thread cannot be stopped
from outside, so when a task must be given up on (its ``timeout`` passed, the
caller pressed Ctrl-C, ``shutdown(cancel_futures=True)``) the thread is
*abandoned*: the task is reported at once (``TaskTimeout``, ``PoolClosed``),
the rest of its batch goes back to the queue, a fresh thread takes its place,
and the abandoned one leaves as soon as its task returns, its result
discarded. A watchdog thread, started with the first timed batch, keeps the
deadlines.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import memory
from ..batchloop import attach_traceback, caller, run_batch, stamped
from ..errors import PoolClosed, TaskTimeout
from ..tasks import Batch, Err, Job, Ok, Piece
from ..worker import running, set_slot
from .base import Backend

# shutdown(cancel_futures=True): how long running tasks may take before their
# threads are abandoned (the contract: return within 2 s).
CANCEL_GRACE_SECONDS = 1.0
# The watchdog wakes at least this often, whatever the deadlines.
MAX_WAIT = 3600.0


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

    def __len__(self) -> int:
        return len(self._items)

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


class _Slot:
    """What one thread is running, shared with the watchdog under the backend's lock."""

    __slots__ = ("abandoned", "batch", "deadline", "index")

    def __init__(self) -> None:
        self.batch: Batch | None = None
        self.index = 0
        self.deadline: float | None = None
        self.abandoned = False


class ThreadBackend(Backend):
    name = "thread"

    def __init__(self, workers: int, **kwargs: Any) -> None:
        super().__init__(workers, **kwargs)
        self._queue = WorkQueue()
        self._lock = threading.Condition(threading.Lock())
        self._threads: list[threading.Thread] = []
        self._slots: dict[int, _Slot] = {}
        self._ids = itertools.count()
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self.broken: BaseException | None = None
        for _ in range(workers):
            self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        """Start one more worker thread; called with the lock held."""
        worker_id = next(self._ids)
        thread = threading.Thread(
            target=self._work, args=(worker_id,), name=f"fenfa-thread-{worker_id}", daemon=True
        )
        self._threads.append(thread)
        self._slots[worker_id] = _Slot()
        thread.start()

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        if self.broken is not None:
            if batch.job.claim():
                fail_batch(batch, self.broken)
            return
        if batch.job.timeout is not None:
            self._start_watchdog()
        self._queue.put(batch, front=urgent)

    # -- a worker thread --------------------------------------------------

    def _work(self, worker_id: int) -> None:
        slot = self._slots[worker_id]
        state: dict[str, Any] = {}
        set_slot(worker_id, self.name, state)
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:
                # Stay and fail every batch that reaches this thread, so that
                # work never waits for a worker that will not come.
                name = getattr(self.initializer, "__qualname__", repr(self.initializer))
                attach_traceback(exc).add_note(
                    f"fenfa: raised by the initializer {name}() in worker {worker_id}"
                )
                self._break(exc)
        budget = self.max_tasks_per_worker
        try:
            while True:
                batch = None  # hold no finished job (nor its pool) while waiting
                batch = self._queue.get()
                if batch is None:
                    return
                if self.broken is not None:
                    if batch.job.claim():
                        fail_batch(batch, self.broken)
                    continue
                while memory.below_floor(self.memory_floor) and not self._closed:
                    # No new batch while memory is short; it is looked at again soon.
                    time.sleep(memory.POLL_SECONDS)
                if not batch.job.claim():
                    continue
                if budget is not None and budget < len(batch.items):
                    # Run what this worker still may; the rest goes back first in line.
                    rest = Batch(
                        batch.job, batch.start + budget, batch.items[budget:], batch.attempt
                    )
                    batch.items = batch.items[:budget]
                    self._queue.put(rest, front=True)
                ran = self._run(slot, batch)
                if ran is None:
                    return  # abandoned: a replacement already took this thread's place
                if budget is not None:
                    budget -= ran
                    if budget <= 0:
                        # Retire: a fresh thread (new id, new state) takes this one's place.
                        self._start_thread()
                        return
        finally:
            with self._lock:
                self._slots.pop(worker_id, None)
                # Only live threads are kept: a pool that retires or abandons
                # thousands of threads holds none of them.
                self._threads.remove(threading.current_thread())

    def _run(self, slot: _Slot, batch: Batch) -> int | None:
        """Run one batch; the number of tasks run, or None if this thread was abandoned."""
        job = batch.job
        call = caller(job.fn, job.style)
        running(job)  # (current_worker().cancelled reads it)
        try:
            return self._run_batch(slot, batch, call)
        finally:
            running(None)

    def _run_batch(self, slot: _Slot, batch: Batch, call: Callable[[Any], Any]) -> int | None:
        job = batch.job
        if job.timeout is None:
            with self._lock:
                slot.batch = batch
            pieces: list[Piece] = []
            begin = time.perf_counter()
            emit = stamped(pieces.append, batch.job)
            ran = run_batch(call, batch.start, batch.items, emit, False, attach_traceback)
            busy = time.perf_counter() - begin
            with self._lock:
                slot.batch = None
                if slot.abandoned:
                    return None
            batch.done = ran
            job.deliver(batch, pieces, busy)
            del pieces, emit  # (no cycle through this frame: see run_batch)
            return ran
        # Timed: one task at a time, each under the watchdog's eye.
        for offset, item in enumerate(batch.items):
            index = batch.start + offset
            begin = time.perf_counter()
            with self._lock:
                slot.batch, slot.index = batch, index
                slot.deadline = time.monotonic() + job.timeout
                self._lock.notify_all()
            piece: Piece
            try:
                piece = Ok(index, [call(item)])
            except BaseException as exc:
                piece = Err(index, attach_traceback(exc))
            with self._lock:
                slot.batch, slot.deadline = None, None
                if slot.abandoned:
                    return None
                batch.done = offset + 1
            job.deliver(batch, [piece], time.perf_counter() - begin)
            del piece  # (no cycle through this frame: see run_batch)
        return len(batch.items)

    # -- giving up on running tasks --------------------------------------

    def _abandon(self, slot: _Slot, error: BaseException | None, reports: list[Any]) -> None:
        """Give up on the task ``slot`` runs (called with the lock held).

        Its task is reported with ``error`` (added to ``reports``, to be
        delivered once the lock is released; nothing when None), the rest of
        its batch is requeued, and a fresh thread takes its place.
        """
        batch = slot.batch
        if batch is None or slot.abandoned:
            return
        slot.abandoned = True
        timed = batch.job.timeout is not None
        index = slot.index if timed else batch.start
        rest_start = index + 1 if timed else batch.start + len(batch.items)
        if rest_start < batch.start + len(batch.items):
            tail = batch.items[rest_start - batch.start :]
            rest = Batch(batch.job, rest_start, tail, batch.attempt)
            self._queue.put(rest, front=True)
        if error is not None:
            report = Batch(batch.job, index, [batch.item(index)], batch.attempt)
            reports.append((report, [Err(index, error)]))
        self._spawn()

    @staticmethod
    def _deliver(reports: list[Any]) -> None:
        for batch, pieces in reports:
            batch.job.deliver(batch, pieces, 0.0)

    def _start_watchdog(self) -> None:
        with self._lock:
            if self._watchdog is None and not self._closed:
                self._watchdog = threading.Thread(
                    target=self._watch, name="fenfa-thread-watchdog", daemon=True
                )
                self._watchdog.start()

    def _watch(self) -> None:
        reports: list[Any] = []
        while True:
            with self._lock:
                if self._closed and not any(s.batch for s in self._slots.values()):
                    return
                deadline = self._expire(reports)
                if not reports:
                    # (Capped: Condition.wait overflows on a wait of ~1e10 s.)
                    self._lock.wait(min(max(0.0, deadline - time.monotonic()), MAX_WAIT))
            self._deliver(reports)
            reports.clear()

    def _expire(self, reports: list[Any]) -> float:
        """Abandon every task past its deadline; returns the next deadline (lock held)."""
        now = time.monotonic()
        deadlines = []
        for slot in list(self._slots.values()):
            batch = slot.batch
            if slot.deadline is None or slot.abandoned or batch is None:
                continue
            if now < slot.deadline:
                deadlines.append(slot.deadline)
                continue
            limit = batch.job.timeout
            error = TaskTimeout(
                f"task {slot.index} ran longer than its timeout of {limit:g} s; its thread "
                "was abandoned (a thread cannot be stopped: the task goes on in the "
                "background and its result is discarded)",
                index=slot.index,
                limit=limit,
            )
            self._abandon(slot, error, reports)
        return min(deadlines) if deadlines else now + 0.5

    def idle_workers(self) -> int:
        with self._lock:
            waiting = sum(1 for slot in self._slots.values() if slot.batch is None)
            return max(0, waiting - len(self._queue))

    def abandon(self, job: Job) -> None:
        job.cancelled = True
        with self._lock:
            for slot in list(self._slots.values()):
                if slot.batch is not None and slot.batch.job is job:
                    self._abandon(slot, None, [])

    def _break(self, exc: BaseException) -> None:
        """An initializer failed: every task still queued, and every later one, fails."""
        self.broken = exc
        for batch in self._queue.drain():
            if batch is None:
                self._queue.put(None)  # keep the stop signal for another thread
            elif batch.job.claim():
                fail_batch(batch, exc)

    # -- stopping ----------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        with self._lock:
            threads = list(self._threads)
            if not self._closed:
                self._closed = True
                self._lock.notify_all()
                # One stop signal per running thread, behind the queued work. A
                # thread that retires hands its signal on to its replacement.
                for _ in range(sum(t.is_alive() for t in threads)):
                    self._queue.put(None)
        if not wait:
            return
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS if cancel else None
        if not self._join(deadline):
            # The grace is over: give up on what still runs.
            reports: list[Any] = []
            with self._lock:
                error = PoolClosed("the pool was shut down while the task ran")
                for slot in list(self._slots.values()):
                    self._abandon(slot, error, reports)
            self._deliver(reports)
            return
        watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join()

    def _join(self, deadline: float | None) -> bool:
        """Join every worker thread, replacements included; False if the deadline passed.

        A thread leaves ``_threads`` as it ends, so what is listed is what still runs.
        """
        current = threading.current_thread()
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not current]
            if not threads:
                return True
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    return False
