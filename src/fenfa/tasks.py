"""The records a call is made of: jobs, batches, and the pieces of results.

The pool cuts the input into *batches* (a start index and a list of items,
all for one *job*), a backend runs each batch somewhere, and what comes back
is a list of *pieces*: ``Ok(start, values)`` for a run of consecutive
successes, ``Err(index, exc)`` for one failed task. Pieces, not one result
per task, because a batch of 10,000 tiny tasks must cost one message, not
10,000; and pieces, not one result per batch, so that a slow batch can
stream its results task by task.

These are plain records that every layer shares (the run, the backends, the
worker processes), kept apart from what acts on them: the loop that runs a
batch is :mod:`fenfa.batchloop`, the adaptive chunk size :mod:`fenfa.chunking`.
"""

from __future__ import annotations

import enum
import inspect
import itertools
from collections.abc import Callable
from typing import Any

from .autoshare import Scope


class Style(enum.IntEnum):
    """How an item becomes a call."""

    ONE = 0  # fn(item)
    STAR = 1  # fn(*item)
    CALL = 2  # fn(*item[0], **item[1])


class Ok:
    """Consecutive successful tasks ``start .. start+len(values)-1``."""

    __slots__ = ("start", "times", "values")

    def __init__(self, start: int, values: list[Any]) -> None:
        self.start = start
        self.values = values
        self.times: Times | None = None  # with insights on: see batchloop.Stamper


class Err:
    """One failed task.

    ``error`` is the exception, its worker traceback attached as ``__cause__``;
    inside a process worker it is the packed form that crosses the pipe.
    """

    __slots__ = ("error", "index", "times")

    def __init__(self, index: int, error: Any) -> None:
        self.index = index
        self.error = error
        self.times: Times | None = None


# Who ran a piece: worker id, pid, process name, thread name, backend.
Who = tuple[int | str | None, int, str, str, str | None]
# When it ran: start and end (time.monotonic, one clock for every process on
# the machine), CPU seconds of the thread that ran it (None: not measurable,
# as for coroutines sharing a loop), and who.
Times = tuple[float, float, float | None, Who]


Piece = Ok | Err


class Job:
    """One call's function and where its results go.

    ``deliver`` is called from whatever thread the backend reports on, with
    the batch and the pieces that just finished, and the seconds the worker
    spent on them (the adaptive chunk size feeds on that).
    """

    __slots__ = (
        "cancelled",
        "deliver",
        "fn",
        "payload",
        "remote",
        "shares",
        "stop_on_error",
        "style",
        "timed",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        style: Style,
        deliver: Callable[[Batch, list[Piece], float], None] | None,
    ) -> None:
        self.fn = fn
        self.style = style
        if deliver is not None:  # (None: a subclass defines ``deliver`` as a method)
            self.deliver = deliver
        self.cancelled = False
        # Seconds each task may run (the ``timeout`` option), or None.
        self.timeout: float | None = None
        # Whether tasks after a failed one are wanted (see SerialBackend).
        self.stop_on_error = False
        # (key, pickled fn), filled by a process backend the first time it
        # needs it, so the function is pickled once per call, not per batch.
        self.payload: tuple[bytes, bytes] | None = None
        # What a cluster backend keeps per call (dask: the function as sent,
        # once per call, and the shared handles it refers to).
        self.remote: Any = None
        # The arrays this call shares with process workers on its own (made
        # by the first batch that needs it), released when the call ends.
        self.shares: Scope | None = None
        # Whether backends stamp pieces with times and workers (insights on).
        self.timed = False

    def scope(self) -> Scope:
        if self.shares is None:
            self.shares = Scope()
        return self.shares

    def release_shared(self) -> None:
        """The call is over: free what it shared on its own."""
        if self.shares is not None:
            self.shares.release()

    def claim(self) -> bool:
        """Called by a backend just before it starts a batch: run it or drop it?"""
        return not self.cancelled

    def dropped(self) -> bool:
        """True when nobody wants this job's results any more (no side effects)."""
        return self.cancelled


_batch_ids = itertools.count()


class Batch:
    """Consecutive items of one job, sent to a worker as one message."""

    __slots__ = ("attempt", "done", "expected", "id", "items", "job", "start", "submitted", "wire")

    def __init__(
        self,
        job: Job,
        start: int,
        items: list[Any],
        attempt: int = 1,
        expected: float | None = None,
    ) -> None:
        self.id = next(_batch_ids)
        self.job = job
        self.start = start
        self.items = items
        self.attempt = attempt
        # Expected seconds for the whole batch, None while nothing is measured.
        self.expected = expected
        # How many of its tasks have reported (results arrive in order).
        self.done = 0
        # The batch as a process backend sends it, encoded once.
        self.wire: bytes | None = None
        # When the call handed it to the backend (insights on), time.monotonic.
        self.submitted: float | None = None

    def item(self, index: int) -> Any:
        return self.items[index - self.start]

    def tail(self) -> Batch:
        """The tasks that have not reported yet, as a new batch of the same job."""
        rest = Batch(self.job, self.start + self.done, self.items[self.done :], self.attempt)
        if self.expected is not None and self.items:
            rest.expected = self.expected * len(rest.items) / len(self.items)
        return rest


def is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions, partials of them, objects with an async ``__call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )
