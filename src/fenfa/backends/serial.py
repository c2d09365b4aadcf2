"""The serial backend: every task runs in the caller's thread, one after another.

It is the oracle every other backend is tested against, and what a user
reaches for under a debugger: breakpoints and tracebacks work as in a plain
loop, and a failing ``map`` stops at the failure, as ``builtins.map`` does.
A ``KeyboardInterrupt`` raised in a task propagates at once instead of being
recorded as that task's failure: in the caller's own thread it cannot be
told apart from the user pressing Ctrl-C. Nothing can interrupt the caller's
own thread, so a ``timeout`` is checked when the task returns: a task that
ran over fails with ``TaskTimeout``, its result discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..batchloop import attach_traceback, caller, run_batch, stamped
from ..errors import TaskTimeout
from ..tasks import Batch, Err, Ok, Piece
from ..worker import restore_slot, running, set_slot
from .base import Backend
from .thread import fail_batch


def _report(exc: BaseException) -> BaseException:
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return attach_traceback(exc)


def _run_timed(
    call: Callable[[Any], Any],
    start: int,
    items: list[Any],
    limit: float,
    stop: bool,
    emit: Callable[[Piece], None],
) -> int:
    """Run the tasks in order, each checked against ``limit`` when it returns."""
    for index, item in enumerate(items, start):
        begin = time.monotonic()
        try:
            piece: Piece = Ok(index, [call(item)])
        except BaseException as exc:
            piece = Err(index, _report(exc))
        if (took := time.monotonic() - begin) > limit:
            piece = Err(
                index,
                TaskTimeout(
                    f"task {index} took {took:.3g} s, longer than its timeout of {limit:g} s "
                    "(the serial backend runs in the caller and cannot interrupt a task: "
                    "its result was discarded)",
                    index=index,
                    limit=limit,
                ),
            )
        emit(piece)
        failed = isinstance(piece, Err)
        del piece  # (no cycle through this frame: see run_batch)
        if stop and failed:
            return index + 1 - start
    return len(items)


class SerialBackend(Backend):
    name = "serial"
    inline = True

    def __init__(self, workers: int = 1, **kwargs: Any) -> None:
        super().__init__(1, **kwargs)
        self._state: dict[str, Any] = {}
        self._started = False
        self._tasks_run = 0
        self.broken: BaseException | None = None

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        job = batch.job
        if not job.claim():
            return
        pieces: list[Piece] = []
        previous = set_slot(0, self.name, self._state)
        running(job)
        try:
            if not self._started:
                self._started = True
                self._initialize()
            if self.broken is not None:
                fail_batch(batch, self.broken)
                return
            begin = time.perf_counter()
            call = caller(job.fn, job.style)
            emit = stamped(pieces.append, job)
            if job.timeout is None:
                ran = run_batch(
                    call,
                    batch.start,
                    batch.items,
                    emit,
                    False,
                    _report,
                    job.stop_on_error,
                )
            else:
                ran = _run_timed(
                    call,
                    batch.start,
                    batch.items,
                    job.timeout,
                    job.stop_on_error,
                    emit,
                )
            busy = time.perf_counter() - begin
        finally:
            restore_slot(previous)
        batch.done = ran
        self._tasks_run += ran
        if self.max_tasks_per_worker and self._tasks_run >= self.max_tasks_per_worker:
            # The one "worker" is the caller: renewing it means fresh state.
            self._state = {}
            self._started = False
            self._tasks_run = 0
        job.deliver(batch, pieces, busy)
        del pieces, emit  # (no cycle through this frame: see run_batch)

    def _initialize(self) -> None:
        if self.initializer is None:
            return
        try:
            self.initializer(*self.initargs)
        except Exception as exc:
            # As on the other backends: this and every later task fails with it.
            name = getattr(self.initializer, "__qualname__", repr(self.initializer))
            attach_traceback(exc).add_note(f"fenfa: raised by the initializer {name}()")
            self.broken = exc

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        pass
