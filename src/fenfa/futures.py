"""Single calls (``submit``, ``apply``): a job whose outcome goes to a ``Future``.

A single call is a batch of one task whose ``deliver`` sets a
``concurrent.futures.Future``: the result, or the exception (with the same
note as a task of ``map``) once ``retries`` more attempts have failed too. A
future cancelled before its task starts (``Future.cancel``, or
``shutdown(cancel_futures=True)``) is refused by ``claim`` when a worker
picks it up; one already running runs to its end, as in concurrent.futures.

The job reaches its pool (:mod:`fenfa.pool`, above this module) through the
two methods named by ``_Pool``, and never imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .outcomes import annotate
from .tasks import Batch, Job, Ok, Piece, Style

if TYPE_CHECKING:
    from concurrent.futures import Future
    from typing import Protocol

    class _Pool(Protocol):
        """What a single call needs of its :class:`fenfa.Pool`."""

        def _submit_batch(
            self, batch: Batch, *, urgent: bool = False, internal: bool = False
        ) -> None: ...
        def _forget(self, job: FutureJob) -> None: ...


__all__ = ["FutureJob"]


class FutureJob(Job):
    """A single call whose outcome goes to a ``concurrent.futures.Future``."""

    __slots__ = ("claim_lock", "future", "pool", "retries", "started")

    def __init__(
        self, pool: _Pool, fn: Callable[..., Any], retries: int, timeout: float | None
    ) -> None:
        # ``deliver`` is a method, not a bound method stored on the job: no
        # reference cycle keeps the callable and its arguments alive after
        # the call (as concurrent.futures frees them, bpo-16284).
        super().__init__(fn, Style.CALL, None)
        self.pool = pool
        self.retries = retries
        self.timeout = timeout
        from concurrent.futures import Future  # (its import costs ~5 ms: not for map)

        self.future: Future[Any] = Future()
        self.started = False
        self.claim_lock = threading.Lock()

    def claim(self) -> bool:
        with self.claim_lock:
            if self.started:  # a retry (the future runs already), or cancelled
                return not self.future.cancelled()
            self.started = True
            running = self.future.set_running_or_notify_cancel()
        if not running:  # cancelled by its owner before it started
            self.release_shared()
            self.pool._forget(self)
        return running

    def cancel(self) -> None:
        """Cancel if not started, and tell waiters at once (``wait()`` counts it done)."""
        with self.claim_lock:
            if not self.started and self.future.cancel():
                self.started = True
                self.future.set_running_or_notify_cancel()
        if self.future.done():
            self.release_shared()
        self.pool._forget(self)

    def dropped(self) -> bool:
        return self.future.cancelled()

    def deliver(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        piece = pieces[0]
        if self.future.done():
            return  # e.g. failed by a shutdown while an abandoned thread ran it
        if isinstance(piece, Ok):
            self.future.set_result(piece.values[0])
        elif batch.attempt <= self.retries:
            retry = Batch(self, batch.start, batch.items, batch.attempt + 1)
            try:
                self.pool._submit_batch(retry, urgent=True, internal=True)
            except BaseException as exc:
                self.future.set_exception(exc)
        else:
            self.future.set_exception(annotate(piece.error, 0, batch.items[0], batch.attempt))
        if self.future.done():
            self.release_shared()
        self.pool._forget(self)
