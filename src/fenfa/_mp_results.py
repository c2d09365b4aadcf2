"""The result objects of :mod:`fenfa.multiprocessing`: AsyncResult and the imap iterator.

::

    fenfa backend thread ──outcome──> AsyncResult._finish ──(callbacks?)──> callback thread
                                            │ no callbacks                        │ runs them,
                                            └──────────> _deliver <───────────────┘ in order
                                                         (ready; leaves the registry)

    pump thread: run.pieces() ──values──> IMapState buffer (bounded) ──next()──> caller

An outcome is *known* as soon as fenfa has it; a result is *ready* once its
callback has run, as in the standard library, where ``get()`` returns only
after the callback. Callbacks run one at a time, in order, on one thread of
their own (the standard library's promise: they never run concurrently), but
never on a thread fenfa needs to deliver results: a slow callback delays only
other callbacks, and a callback that waits for another result gets it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.pool
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any

from .errors import PoolClosed, RemoteTraceback

_log = logging.getLogger("fenfa.multiprocessing")

Callback = Callable[[Any], object] | None


def translate(exc: BaseException) -> BaseException:
    """Give ``exc`` the standard library's ``RemoteTraceback`` as cause (same text)."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        # (typeshed does not know the stdlib's RemoteTraceback.)
        exc.__cause__ = multiprocessing.pool.RemoteTraceback(str(cause))  # type: ignore[attr-defined]
    return exc


def failed(value: object) -> bool:
    """Whether ``value`` stands for a failed task in an ``on_error="return"`` run.

    fenfa puts the exception in place of the result and notes the task on it;
    a task that *returns* an exception carries no such note.
    """
    if not isinstance(value, BaseException):
        return False
    notes = getattr(value, "__notes__", ())
    return any(n.startswith("fenfa: task ") and " failed" in n for n in notes)


class Registry:
    """The results a pool has not finished yet (``join`` waits for them), and the
    callback thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[AsyncResult | IMapState] = set()
        self._calls: queue.SimpleQueue[AsyncResult | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.stopped = False  # terminated: no callback runs any more
        self.draining = False  # closed: imap buffers no longer bound the input

    def add(self, item: AsyncResult | IMapState) -> None:
        with self._cond:
            self._pending.add(item)

    def discard(self, item: AsyncResult | IMapState) -> None:
        with self._cond:
            self._pending.discard(item)
            self._cond.notify_all()

    def wait_empty(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._pending)

    def drain(self) -> None:
        with self._cond:
            self.draining = True
            imaps = [p for p in self._pending if isinstance(p, IMapState)]
        for state in imaps:
            state.wake()

    def fail_all(self, error: BaseException) -> None:
        """Terminate: every unfinished result fails with ``error``; no callback runs."""
        with self._cond:
            self.stopped = True
            pending = list(self._pending)
        for item in pending:
            if isinstance(item, IMapState):
                item.stop(error)
            else:
                item._finish(False, error)
                item._deliver()

    def post(self, result: AsyncResult) -> None:
        with self._cond:
            if self._thread is None and not self.stopped:
                self._thread = threading.Thread(
                    target=self._serve, name="fenfa-mp-callbacks", daemon=True
                )
                self._thread.start()
        self._calls.put(result)

    def in_callback_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def _serve(self) -> None:
        while (result := self._calls.get()) is not None:
            result._deliver()
            del result  # hold no result (nor its value) while waiting

    def stop(self) -> None:
        """Let the callback thread finish what is queued, and join it."""
        with self._cond:
            thread = self._thread
        if thread is None:
            return
        self._calls.put(None)
        if thread is not threading.current_thread():
            thread.join()


class AsyncResult:
    """What ``apply_async`` and ``map_async`` return, as ``multiprocessing.pool.AsyncResult``."""

    def __init__(self, registry: Registry, callback: Callback, error_callback: Callback) -> None:
        self._registry = registry
        self._callback = callback
        self._error_callback = error_callback
        self._known = threading.Event()
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._delivering = False
        self._success = False
        self._value: Any = None
        registry.add(self)

    def follow(self, future: Future[Any]) -> None:
        """Take the outcome of a fenfa future (in the thread that completes it)."""

        def done(f: Future[Any]) -> None:
            if f.cancelled():
                self._finish(False, PoolClosed("the pool was terminated"))
            elif (exc := f.exception()) is not None:
                self._finish(False, translate(exc))
            else:
                self._finish(True, f.result())

        future.add_done_callback(done)

    def _finish(self, success: bool, value: Any) -> None:
        """The outcome is known (the first one wins); deliver it, through callbacks if any."""
        with self._lock:
            if self._known.is_set():
                return
            self._success, self._value = success, value
            self._known.set()
        callback = self._callback if success else self._error_callback
        if callback is None or self._registry.stopped:
            self._deliver()
        else:
            self._registry.post(self)

    def _deliver(self) -> None:
        with self._lock:
            if self._delivering:
                return
            self._delivering = True
        callback = self._callback if self._success else self._error_callback
        if callback is not None and not self._registry.stopped:
            try:
                callback(self._value)
            except Exception:
                # The standard library's result thread dies here, and the pool
                # hangs; concurrent.futures logs and goes on, as here.
                _log.exception("exception calling callback for %r", self)
        self._event.set()
        self._registry.discard(self)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        if self._registry.in_callback_thread():
            # A callback waiting for a result whose own callback is queued
            # behind it: run that callback now instead of waiting for ever.
            if self._known.wait(timeout):
                self._deliver()
            return
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self._event.is_set() and not (
            self._registry.in_callback_thread() and self._known.is_set()
        ):
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value


class IMapState:
    """The buffer between a pump thread, which drives a fenfa run, and the consumer."""

    def __init__(self, registry: Registry, pieces: Generator[list[Any], None, None], limit: int):
        self._registry = registry
        self._limit = limit
        self._cond = threading.Condition()
        self._items: deque[tuple[bool, Any]] = deque()
        self._done = False
        self._stopped = False
        registry.add(self)
        self.thread = threading.Thread(
            target=self._pump, args=(pieces,), name="fenfa-mp-imap", daemon=True
        )
        self.thread.start()

    def _pump(self, pieces: Generator[list[Any], None, None]) -> None:
        try:
            for values in pieces:
                with self._cond:
                    # Hold this piece (not yet the consumer's) until there is room.
                    self._cond.wait_for(self._room)
                    if self._stopped:
                        return  # (terminated, or dropped: nothing more to read)
                    self._items.extend(
                        (False, translate(v)) if failed(v) else (True, v) for v in values
                    )
                    del values
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                if not self._stopped:
                    self._items.append((False, translate(exc)))
        finally:
            pieces.close()  # cancels what the run has not started
            with self._cond:
                self._done = True
                self._cond.notify_all()
            self._registry.discard(self)

    def _room(self) -> bool:
        return len(self._items) < self._limit or self._registry.draining or self._stopped

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self, error: BaseException | None = None) -> None:
        """Nobody will read on (terminated, or the iterator was dropped): stop the run."""
        with self._cond:
            if error is not None and not self._done:
                self._items.append((False, error))
            self._stopped = True
            self._cond.notify_all()

    def next(self, timeout: float | None) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._done, timeout):
                raise multiprocessing.TimeoutError
            if not self._items:
                raise StopIteration
            success, value = self._items.popleft()
            self._cond.notify_all()  # room for the pump
        if success:
            return value
        raise value


class IMapIterator:
    """What ``imap`` and ``imap_unordered`` return; ``next(timeout)`` as the standard library's.

    Dropping it unread stops its call: nobody can read the results any more.
    """

    def __init__(self, state: IMapState) -> None:
        self._state = state
        weakref.finalize(self, state.stop)

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        return self._state.next(timeout)

    __next__ = next


__all__ = ["AsyncResult", "IMapIterator", "IMapState", "Registry", "failed", "translate"]
