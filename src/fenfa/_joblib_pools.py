"""The pools the joblib backend keeps between calls, and what one call owns.

Kept as loky keeps its reusable executor: one pool per distinct
configuration (fenfa backend, workers, options), at most one idle pool per
fenfa backend, so that ``n_jobs=2, 3, 4...`` do not pile up workers.
:func:`shutdown` closes them all, and so does interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from . import autoshare
from .pool import Pool


@dataclass(eq=False)
class Entry:
    backend: str
    workers: int
    options: dict[str, Any]
    pool: Pool
    users: int = 0
    # Set when an aborted call left thread tasks running that cannot be
    # stopped: the pool is not handed out again, and closes once released.
    tainted: bool = False


_entries: list[Entry] = []
_entries_lock = threading.Lock()


def acquire(backend: str, workers: int, options: dict[str, Any]) -> Entry:
    """A warm pool for this configuration, started if there is none."""
    with _entries_lock:
        for entry in _entries:
            if (
                not entry.tainted
                and (entry.backend, entry.workers) == (backend, workers)
                and entry.options == options
            ):
                entry.users += 1
                return entry
        # As loky replaces its executor when n_jobs changes: keep at most one
        # idle pool per backend, so that n_jobs=2, 3, 4... do not pile up workers.
        stale = [e for e in _entries if e.backend == backend and e.users == 0]
        for entry in stale:
            _entries.remove(entry)
        entry = Entry(backend, workers, options, Pool(backend, workers, **options), users=1)
        _entries.append(entry)
    for old in stale:
        old.pool.shutdown(wait=True)
    return entry


def release(entry: Entry) -> None:
    with _entries_lock:
        entry.users -= 1
        close = entry.tainted and entry.users == 0
        if close and entry in _entries:
            _entries.remove(entry)
    if close:
        entry.pool.shutdown(wait=False, cancel_futures=True)


def taint(entry: Entry) -> None:
    """Hand this pool out no more (it has tasks running that cannot be stopped)."""
    with _entries_lock:
        entry.tainted = True


@atexit.register
def shutdown() -> None:
    """Shut down the pools kept between joblib calls (at exit; tests call it too)."""
    with _entries_lock:
        entries = list(_entries)
        _entries.clear()
    for entry in entries:
        entry.pool.shutdown(wait=True, cancel_futures=True)


class Call:
    """What one configured call owns: its futures, and the arrays it shared."""

    __slots__ = ("futures", "lock", "number", "scope", "started", "tasks")

    def __init__(self) -> None:
        self.futures: set[Future[Any]] = set()
        # With insights: the call's number in the recorder, and per future the
        # index of its first task and when it was handed over.
        self.number = 0
        self.tasks = 0
        self.started: dict[Future[Any], tuple[int, float, str]] = {}
        self.lock = threading.Lock()
        # One scope for the whole call, not one per batch (a batch is one fenfa
        # call here): a grid search sends the same X to every batch, and it is
        # copied into shared memory once.
        self.scope = autoshare.Scope()

    def forget(self, future: Future[Any]) -> None:
        with self.lock:
            self.futures.discard(future)

    def release_when_done(self) -> None:
        """Release the shared arrays once no batch of the call can still need them."""
        with self.lock:
            pending = list(self.futures)
        if not pending:
            self.scope.release()
            return
        remaining = [len(pending)]

        def one_done(_: object) -> None:
            with self.lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self.scope.release()

        for future in pending:
            future.add_done_callback(one_done)


def stop_running(pool: Pool, futures: set[Future[Any]]) -> bool:
    """Kill the process workers running these futures' calls, without retrying them.

    False when the backend cannot stop a running task (threads). Reaches into
    the pool: fenfa has no public "cancel this future even while it runs".
    """
    # Each private name is looked up defensively: if the pool's insides change,
    # the call is then treated as unstoppable (its pool retired), not broken.
    backend = getattr(pool, "_backend", None)
    lock = getattr(pool, "_lock", None)
    held = getattr(pool, "_futures", None)
    if getattr(backend, "name", None) != "process" or lock is None or held is None:
        return False
    assert backend is not None
    with lock:
        jobs = [job for job in held if getattr(job, "future", None) in futures]
    for job in jobs:
        job.retries = 0  # killed on purpose: not a crash to retry
        backend.abandon(job)
    return True


__all__ = ["Call", "Entry", "acquire", "release", "shutdown", "stop_running", "taint"]
