"""The interface every backend implements.

A backend owns workers and runs *batches* (see :mod:`fenfa.tasks`) on them.
It knows nothing of windows, chunk sizes, retries or ordering: the pool does
all of that once, above every backend. What a backend promises:

- ``submit(batch)`` never blocks for long and never runs user code in a
  thread that holds a fenfa lock. The serial backend is the exception by
  design: it runs the batch right there, in the caller.
- Before it starts a batch it asks ``batch.job.claim()``; a batch whose job
  was cancelled (a consumer stopped early, a future was cancelled) is dropped.
- Every task of every claimed batch is reported exactly once through
  ``batch.job.deliver``, as a success or as a failure: none is lost.
- ``shutdown`` is idempotent and, with ``wait=True``, returns only when every
  thread and process it started is gone.

Cancellation, per backend: serial runs in the caller, so there is nothing to
cancel but the batches not yet started; a thread cannot be stopped, so a
running task finishes and its result is discarded; a process worker can be
killed (the pool does so on timeouts and at a forced shutdown); a coroutine
on the async backend is cancelled at its next ``await``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

from ..tasks import Batch, Job


class Backend(abc.ABC):
    """Runs batches on workers. One instance per pool."""

    name: ClassVar[str]
    #: Whether results must cross a process boundary (so must be picklable).
    remote: ClassVar[bool] = False
    #: Whether ``submit`` runs the batch right away, in the caller.
    inline: ClassVar[bool] = False

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        memory_floor: int | None = None,
    ) -> None:
        self.workers = workers
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_worker = max_tasks_per_worker
        #: Bytes of available memory below which no new batch starts.
        self.memory_floor = memory_floor

    @abc.abstractmethod
    def submit(self, batch: Batch, *, urgent: bool = False) -> None:
        """Queue ``batch`` to run; ``urgent`` puts it ahead of queued work (retries)."""

    @abc.abstractmethod
    def shutdown(self, wait: bool = True, *, cancel: bool = False) -> None:
        """Stop the workers once queued work is done; idempotent.

        With ``cancel`` (``shutdown(cancel_futures=True)``), tasks still
        running after a short grace are stopped where the backend can.
        """

    def idle_workers(self) -> int | None:
        """How many workers wait for work now; None where the backend cannot tell."""
        return None

    def abandon(self, job: Job) -> None:
        """The caller gave up on ``job`` (Ctrl-C): drop its queued batches,
        and stop its running tasks where the backend can."""
        job.cancelled = True

    def drop(self, job: Job) -> None:  # noqa: B027 - a hook: most backends need nothing
        """The call of ``job`` is over (done, failed or stopped early).

        Its batches not started yet are dropped by ``job.claim()``; a backend
        that hands batches on ahead of time (dask) takes them back here.
        """

    def terminate(self) -> None:
        """Stop at once (interpreter exit): nothing will consume results any more."""
        self.shutdown(wait=False, cancel=True)

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        return True
