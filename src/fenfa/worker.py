"""Who is running the current task: :func:`current_worker` and its record.

Every backend marks the thread that runs tasks with a *slot* (worker id,
backend name, and the worker's ``state`` dict). A process worker marks its
main thread once; a thread worker marks itself; the serial backend marks the
caller's thread only while a task runs. Outside any task the caller gets a
record describing itself, with ``id`` and ``backend`` set to ``None``.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = ["WorkerInfo", "current_worker"]


@dataclass(frozen=True)
class WorkerInfo:
    """Who runs the current task.

    ``state`` is a dict that lives as long as the worker: put a connection or
    a loaded model there (an ``initializer`` can fill it before the first task).
    ``cancelled`` turns True when the call of the task now running was given
    up (Ctrl-C, a kernel interrupt, ``break``, a shutdown that cancels): a
    thread cannot be stopped from outside, so a long task on the thread or
    serial backend may look at it, from a fresh ``current_worker()``, and
    return early. (Process workers are killed instead.)

    ``id`` is a small int on the local backends; on the dask backend it is
    the dask worker's address (``"tcp://10.0.0.5:40231"``), and ``state``
    lives as long as that worker process.
    """

    id: int | str | None
    pid: int
    process_name: str
    thread_name: str
    backend: str | None
    state: dict[str, Any] = field(repr=False, compare=False)
    cancelled: bool = field(default=False, repr=False, compare=False)


class _Slot:
    __slots__ = ("address", "backend", "id", "job", "state")

    def __init__(
        self,
        worker_id: int | None,
        backend: str | None,
        state: dict[str, Any],
        address: str | None = None,
    ) -> None:
        self.id = worker_id
        self.backend = backend
        self.state = state
        # A worker known by its address instead of a number (a dask worker).
        self.address = address
        self.job: Any = None  # the job whose task this thread runs (has .cancelled)


_local = threading.local()


def set_slot(
    worker_id: int | None, backend: str | None, state: dict[str, Any], address: str | None = None
) -> _Slot | None:
    """Mark the calling thread as a worker; returns the previous mark.

    A worker with an ``address`` (a dask worker) is known by it: it becomes
    ``current_worker().id``.
    """
    previous: _Slot | None = getattr(_local, "slot", None)
    _local.slot = _Slot(worker_id, backend, state, address)
    return previous


def running(job: Any) -> None:
    """Mark which job's tasks the calling (worker) thread runs now; None when idle."""
    slot: _Slot | None = getattr(_local, "slot", None)
    if slot is not None:
        slot.job = job


def current_slot() -> _Slot | None:
    """The calling thread's worker mark (an identity for caches), or None."""
    slot: _Slot | None = getattr(_local, "slot", None)
    return slot


def restore_slot(previous: _Slot | None) -> None:
    _local.slot = previous


def current_worker() -> WorkerInfo:
    """Describe the worker running the calling code (or the caller itself)."""
    slot: _Slot | None = getattr(_local, "slot", None)
    if slot is None:
        # The caller, outside any task: give it a state dict of its own too,
        # so code that uses ``state`` runs unchanged outside fenfa.
        slot = _Slot(None, None, {})
        _local.slot = slot
    return WorkerInfo(
        id=slot.id if slot.address is None else slot.address,
        pid=os.getpid(),
        process_name=multiprocessing.current_process().name,
        thread_name=threading.current_thread().name,
        backend=slot.backend,
        state=slot.state,
        cancelled=bool(getattr(slot.job, "cancelled", False)),
    )
