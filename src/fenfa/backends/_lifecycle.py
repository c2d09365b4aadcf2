"""The process backend's workers: started, replaced when they die, stopped.

``WorkerLifecycle`` is the lower half of ``ProcessBackend`` (``process.py``):
the state both halves share (``_lock``, the queue of pending batches, the
workers by id) and everything about the worker processes themselves::

    _start_worker ──► WorkerHandle (_handle.py) ──► READY ... RESULT ... (the manager)
         ▲                                            │ exits, crashes, is killed
         │                                            ▼
         └── a replacement ◄──────── _reap: read what it sent last; blame the
             (none for a retired        task it ran (by its marks, its stream, or
              worker: RETIRE got one    a rerun that pins it); requeue the rest;
              at once; none once the    too many failed starts break the pool
              pool is broken)

    _break: fail everything queued or held (a broken pool, a forced stop)
    _stop_workers: STOP, a grace, then kill; every handle closed

It knows nothing of dispatch or the manager's loop: the two it needs from
there, ``_receive`` (a worker's last messages) and ``_assign`` (hand pending
batches on), are abstract here and ``process.py``'s. The manager hands it the
messages that are about a worker's life: READY, RETIRE, INIT_FAILED.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import multiprocessing
import os
import threading
import time
from collections import deque
from typing import Any

import cloudpickle

from .. import _shadow, relay
from ..errors import FenfaError, SerializationError, WorkerCrashed, unpack_exception
from ..tasks import Batch, Err
from . import _worker, usable_cores, zygote
from ._handle import (
    MAIN_GUARD_FIX,
    WorkerHandle,
    exit_description,
    main_guard_hint,
    main_path_hidden_unless_a_file,
)
from ._protocol import INIT_FAILED, READY, RETIRE, STOP, Marks, frame, streams, wire
from .base import Backend
from .thread import fail_batch

# How long a stopping worker may take to exit before it is killed.
STOP_GRACE_SECONDS = 2.0
# Workers that die before they are ready, in a row, before the pool gives up
# (when no worker of the pool was ever ready: the environment is broken).
FAILED_STARTS_BEFORE_ANY_READY = 2

DEFAULT_START_METHOD = (
    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
)


class WorkerLifecycle(Backend):
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
            with main_path_hidden_unless_a_file():
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
        self._workers: dict[int, WorkerHandle] = {}
        self._ids = itertools.count()
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

    @abc.abstractmethod
    def _receive(self, worker: WorkerHandle) -> bool:
        """Handle one message of ``worker``; False at end of file."""

    @abc.abstractmethod
    def _assign(self) -> None:
        """Hand pending batches to workers with room. Called with ``_lock`` held."""

    def _start_worker(self) -> None:
        worker_id = next(self._ids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        marks = Marks()
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
            with main_path_hidden_unless_a_file():
                process.start()
        except BaseException:
            marks.close()
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        try:
            worker = WorkerHandle(worker_id, process, parent_conn, marks)
        except BaseException:
            process.kill()
            process.join()
            parent_conn.close()
            marks.close()
            raise
        worker.sender.start()
        with self._lock:
            self._workers[worker_id] = worker

    def _life_event(self, worker: WorkerHandle, kind: bytes, header: Any) -> None:
        """A READY, RETIRE or INIT_FAILED message of ``worker`` (the manager's thread)."""
        if kind == READY:
            with self._lock:
                worker.ready = True
                self._ever_ready = True
                self._failed_starts = 0
                # Its first task starts now, not when it was sent: start-up
                # time does not count against a timeout.
                worker.task_started = time.monotonic()
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

    def _requeue(self, worker: WorkerHandle) -> None:
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
            self._resend(batch.tail())

    def _resend(self, batch: Batch) -> None:
        """Queue a crashed worker's ``batch`` again, first; if it will not encode, it fails."""
        try:
            batch.wire = wire(batch)
        except Exception as exc:
            error = FenfaError(f"a batch of a crashed worker could not be sent again: {exc}")
            error.__cause__ = exc
            fail_batch(batch, error)
            return
        self._pending.appendleft(batch)

    def _reap(self, worker: WorkerHandle) -> None:
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
                marked = worker.marked_task(batch)
                if marked is not None and worker.blame is None:
                    # Which task ran is in the marks: it alone fails; the
                    # finished ones before it, whose results died with the
                    # worker, run again.
                    self._note_reruns(batch, marked - index)
                    blamed = (batch, marked, worker.crashed(code, marked))
                    self._split_around(batch, marked)
                elif worker.blame is not None or streams(batch) or last:
                    # Tasks reported one by one: the first unreported one was running.
                    error = worker.blame or worker.crashed(code, index)
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
                    + main_guard_hint(self.start_method)
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
                self._resend(part)
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


__all__ = ["DEFAULT_START_METHOD", "WorkerLifecycle"]
