"""Module-level calls: ``fenfa.map(fn, xs)`` and friends, on reused pools.

Each distinct ``(backend, workers)`` gets one default pool, started on first
use and kept for the next call (as loky's reusable executor), so a script
that calls ``fenfa.map`` a hundred times pays the start-up once. The pools are
shut down when the interpreter exits.
"""

from __future__ import annotations

import atexit
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from .insights import Insights
from .options import POOL_ONLY_OPTIONS, worker_count
from .pool import Pool
from .pool_base import resolve_backend

P = ParamSpec("P")
R = TypeVar("R")

_defaults: dict[tuple[str, int | None], Pool] = {}
_last = threading.local()
_defaults_lock = threading.Lock()


def _split(options: dict[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    for name in POOL_ONLY_OPTIONS:
        if name in options:
            raise TypeError(
                f"{name!r} is a Pool option: use `with fenfa.Pool({name}=...) "
                f"as pool:` and call the pool's methods"
            )
    backend = options.pop("backend", "auto")
    workers = worker_count(options.pop("workers", None))
    if options.get("insights") is True:
        # A default pool serves every caller: each call records on its own.
        options["insights"] = _last.insights = Insights()
    return backend, workers, options


def _default_pool(backend: str, workers: int | None) -> Pool:
    """The shared pool for these options.

    For ``auto`` it is a router: each call measures its own first tasks (see
    :mod:`fenfa.auto`) and sends the rest to the default pool of the backend
    it chose, so ``fenfa.map(download, urls)`` and ``fenfa.map(crunch, xs)``
    in one script each get the right one.
    """
    key = (resolve_backend(backend, workers), workers)
    with _defaults_lock:
        pool = _defaults.get(key)
        if pool is None:
            pool = _defaults[key] = Pool(key[0], workers)
            if pool.backend == "auto":
                from .deciding import Memory

                pool._router = lambda decision: _default_pool(decision.backend, workers)
                pool._memory = Memory()
        return pool


@atexit.register
def _shutdown_default_pools() -> None:
    """Shut down every default pool (at exit; tests call it to check for leaks)."""
    with _defaults_lock:
        pools = list(_defaults.values())
        _defaults.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def map(fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> list[R]:
    """Like ``builtins.map`` but on workers, returning a list in input order.

    Options: ``backend``, ``workers``, ``chunksize``, ``window``, ``retries``,
    ``on_error``. Several iterables stop at the shortest, as ``builtins.map``.
    """
    backend, workers, rest = _split(options)
    return _default_pool(backend, workers).map(fn, *iterables, **rest)


def imap(fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
    """Lazy, ordered results; the input is pulled at most ``window`` items ahead."""
    backend, workers, rest = _split(options)
    return _default_pool(backend, workers).imap(fn, *iterables, **rest)


def imap_unordered(fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
    """Lazy results in the order they finish."""
    backend, workers, rest = _split(options)
    return _default_pool(backend, workers).imap_unordered(fn, *iterables, **rest)


def starmap(fn: Callable[..., R], iterable: Iterable[Iterable[Any]], **options: Any) -> list[R]:
    """``[fn(*args) for args in iterable]`` on workers."""
    backend, workers, rest = _split(options)
    return _default_pool(backend, workers).starmap(fn, iterable, **rest)


def last_insights() -> Insights | None:
    """The records of this thread's latest module-level call made with ``insights=True``.

    ``fenfa.map(fn, xs, insights=True)`` returns the results as always; this
    returns how they were made (``summary()``, ``to_html(path)``, ``records()``).
    """
    found: Insights | None = getattr(_last, "insights", None)
    return found


class _Runner:
    """``fenfa.run``: one call in a worker of a default pool.

    ``fenfa.run(fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)``. The
    keywords ``backend`` (default ``"auto"``) and ``timeout`` (seconds) are
    fenfa's *unless* ``fn`` takes a parameter of that name (or ``**kwargs``):
    then they are ``fn``'s, as ``fenfa.run(fetch, url, timeout=5)`` means. To
    set fenfa's options whatever ``fn`` takes: ``fenfa.run.options(backend=
    "thread", timeout=5)(fetch, url, timeout=2)``.
    """

    def __init__(self, backend: str | None = None, timeout: float | None = None) -> None:
        self._backend = backend
        self._timeout = timeout

    def options(self, *, backend: str = "auto", timeout: float | None = None) -> _Runner:
        """A ``run`` with fenfa's options fixed: every keyword of the call goes to ``fn``."""
        return _Runner(backend, timeout)

    def __call__(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        backend, timeout = self._backend, self._timeout
        if backend is None:  # plain fenfa.run: backend= and timeout= may be ours
            backend = "auto"
            theirs = _parameters(fn)
            if "backend" in kwargs and "backend" not in theirs:
                backend = str(kwargs.pop("backend"))
            if "timeout" in kwargs and "timeout" not in theirs:
                timeout = kwargs.pop("timeout")  # type: ignore[assignment]
        pool = _default_pool(backend, None)
        return pool._submit_call(fn, args, kwargs, timeout).result()

    def __repr__(self) -> str:
        return "<fenfa.run>" if self._backend is None else f"<fenfa.run.options({self._backend!r})>"


def _parameters(fn: Callable[..., Any]) -> set[str]:
    """The keyword names ``fn`` takes ("backend", "timeout" when it has ``**kwargs``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()  # (a builtin without a signature: the keywords are fenfa's)
    names = set()
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_KEYWORD:
            return {"backend", "timeout"}
        if parameter.kind is not parameter.POSITIONAL_ONLY:
            names.add(parameter.name)
    return names


run = _Runner()


__all__ = ["imap", "imap_unordered", "last_insights", "map", "run", "starmap"]
