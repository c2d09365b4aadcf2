"""fenfa's own exceptions, and how a worker's failure reaches the caller.

::

    FenfaError(Exception)
    ├── BackendUnavailable(FenfaError, ImportError)   an optional extra is missing
    ├── PoolClosed(FenfaError, RuntimeError)          the pool was used after shutdown
    ├── WorkerCrashed(FenfaError, RuntimeError)       a worker died while running a task
    ├── SerializationError(FenfaError, TypeError)     a task, argument or result did not pickle
    └── TaskTimeout(FenfaError, TimeoutError)         a task ran past `timeout`

A user's own exception is never wrapped: it reaches the caller with its own
type. What fenfa adds is context: the worker's formatted traceback as
``__cause__`` (a :class:`RemoteTraceback`, as ``concurrent.futures`` does) and a
note naming the task index and a short repr of its input.
"""

from __future__ import annotations

import pickle
import reprlib
import traceback
from typing import Any

__all__ = [
    "BackendUnavailable",
    "FenfaError",
    "PoolClosed",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
]

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6


def short_repr(obj: object) -> str:
    """A repr that stays readable for a 100 MB input."""
    return _short.repr(obj)


class FenfaError(Exception):
    """Base of every error fenfa raises on its own account."""


class BackendUnavailable(FenfaError, ImportError):
    """A backend needs an optional extra that is not installed, or a cluster that is not there."""


class PoolClosed(FenfaError, RuntimeError):
    """The pool was used after ``shutdown()``."""


class WorkerCrashed(FenfaError, RuntimeError):
    """The worker running a task died (killed by a signal or exited)."""

    def __init__(
        self, message: str, *, index: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class SerializationError(FenfaError, TypeError):
    """A function, argument or result could not be pickled or unpickled."""

    def __init__(self, message: str, *, index: int | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class TaskTimeout(FenfaError, TimeoutError):
    """A task ran longer than the ``timeout`` it was given."""

    def __init__(
        self, message: str, *, index: int | None = None, limit: float | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, as text.

    It is set as ``__cause__`` of the exception the caller receives, so the
    caller's own traceback print shows where in the worker things went wrong.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class UnpicklableError(Exception):
    """Stands in for a user exception that could not cross a process boundary.

    Raised in the caller as an exception whose type name and message are the
    original's, so the error still says what went wrong.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


def format_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def pack_exception(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """Everything the caller needs to re-raise ``exc``: (pickle or None, tb, type, message).

    The exception is pickled and unpickled here, in the worker, so that a
    failure shows now and not in the parent's reader thread. Plain pickle
    rebuilds an exception as ``cls(*args)``, which fails for the many classes
    whose ``__init__`` takes other arguments than it passes on; those are
    rebuilt without calling ``__init__`` (type, args and attributes kept).
    Only when even that fails does the caller get an :class:`UnpicklableError`.
    """
    import cloudpickle  # only workers pack exceptions; keep the parent's import light

    tb = format_traceback(exc)
    state = getattr(exc, "__dict__", {})
    for candidate in (
        lambda: pickle.dumps(exc, protocol=5),
        lambda: cloudpickle.dumps(_Rebuilt(type(exc), exc.args, state), protocol=5),
        lambda: cloudpickle.dumps(_Rebuilt(type(exc), exc.args, {}), protocol=5),
    ):
        try:
            data = candidate()
            pickle.loads(data)
        except Exception:
            continue
        return data, tb, type(exc).__qualname__, str(exc)
    return None, tb, type(exc).__qualname__, str(exc)


def pack_failure(error: BaseException) -> tuple[bytes | None, str, str, str]:
    """:func:`pack_exception` of a task's failure as the caller got it: with the
    worker's traceback (its ``RemoteTraceback`` cause), not the caller's re-raise."""
    data, tb, type_name, message = pack_exception(error)
    if isinstance(error.__cause__, RemoteTraceback):
        tb = error.__cause__.tb
    return data, tb, type_name, message


class _Rebuilt:
    """Pickles as "make this exception type without calling its ``__init__``"."""

    def __init__(
        self, cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
    ) -> None:
        self.cls, self.args, self.state = cls, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.cls, self.args, self.state))


def unpack_exception(packed: tuple[bytes | None, str, str, str]) -> BaseException:
    data, tb, type_name, message = packed
    exc: BaseException
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = UnpicklableError(type_name, message)
    else:
        exc = UnpicklableError(type_name, message)
    _drop_tracebacks(exc)
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def _drop_tracebacks(exc: BaseException) -> None:
    """Forget tracebacks rebuilt by unpickling (the worker's is kept as text).

    With ``distributed`` imported, tblib's pickling support rebuilds an
    exception's traceback in the caller by raising it there: its frames link
    back (``f_back``) to the caller's frames that were unpickling it, which
    hold the batch, so the task's function and input lived on in a cycle.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        todo += (current.__cause__, current.__context__)
