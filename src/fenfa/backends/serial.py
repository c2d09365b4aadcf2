"""The serial backend: every task runs in the caller's thread, one after another.

It is the oracle every other backend is tested against, and what a user
reaches for under a debugger: breakpoints and tracebacks work as in a plain
loop. A ``KeyboardInterrupt`` raised in a task propagates at once instead of
being recorded as that task's failure: in the caller's own thread it cannot
be told apart from the user pressing Ctrl-C. Nothing can interrupt the
caller's own thread, so a ``timeout`` is checked when the task returns: a
task that ran over fails with ``TaskTimeout``, its result discarded.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import TaskTimeout
from ..tasks import Batch, Err, Ok, Piece, attach_traceback, caller, run_batch
from ..worker import restore_slot, set_slot
from .base import Backend


def _report(exc: BaseException) -> BaseException:
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    return attach_traceback(exc)


def _run_timed(fn: Any, start: int, items: list[Any], limit: float, emit: Any) -> int:
    for index, item in enumerate(items, start):
        begin = time.monotonic()
        try:
            piece: Piece = Ok(index, [fn(item)])
        except BaseException as exc:
            piece = Err(index, _report(exc))
        took = time.monotonic() - begin
        if took > limit:
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
    return len(items)


class SerialBackend(Backend):
    name = "serial"

    def __init__(self, workers: int = 1, **kwargs: Any) -> None:
        super().__init__(1, **kwargs)
        self._state: dict[str, Any] = {}
        self._started = False
        self._tasks_run = 0

    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        job = batch.job
        if not job.claim():
            return
        pieces: list[Piece] = []
        previous = set_slot(0, self.name, self._state)
        try:
            if not self._started:
                self._started = True
                if self.initializer is not None:
                    self.initializer(*self.initargs)
            begin = time.perf_counter()
            call = caller(job.fn, job.style)
            if job.timeout is None:
                ran = run_batch(call, batch.start, batch.items, pieces.append, False, _report)
            else:
                ran = _run_timed(call, batch.start, batch.items, job.timeout, pieces.append)
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

    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        pass
