"""``fenfa.Executor``: a ``concurrent.futures.Executor`` with fenfa underneath.

Its own module, so that a script calling ``fenfa.map`` does not import
``concurrent.futures`` (and, through it, ``logging``) for nothing.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ParamSpec, TypeVar

from .pool import Pool

P = ParamSpec("P")
R = TypeVar("R")


def _handing_over(pieces: Iterator[list[R]]) -> Iterator[R]:
    """Yield each value and keep no reference to it, as the stdlib's ``map`` does."""
    for values in pieces:
        values.reverse()
        while values:
            yield values.pop()


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` with fenfa underneath.

    Drop-in for ``ProcessPoolExecutor``/``ThreadPoolExecutor`` code:
    ``submit``, ``map`` and ``shutdown`` behave as the standard library's, and
    it works with ``wait``, ``as_completed`` and ``loop.run_in_executor``.
    Unlike the standard library's, ``map`` pulls its input lazily (at most a
    window ahead) instead of submitting everything at once.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        backend: str = "process",
        **pool_options: Any,
    ) -> None:
        # The signature of ProcessPoolExecutor, then fenfa's own options.
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if mp_context is not None:
            pool_options["start_method"] = mp_context.get_start_method()
        if max_tasks_per_child is not None:
            pool_options["max_tasks_per_worker"] = max_tasks_per_child
        self._pool = Pool(
            backend, max_workers, initializer=initializer, initargs=initargs, **pool_options
        )

    @property
    def pool(self) -> Pool:
        return self._pool

    def submit(
        self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]:
        return self._pool.submit(fn, *args, **kwargs)

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[R]:
        """Results in order; ``timeout`` bounds the whole iteration, as in the stdlib."""
        deadline = None if timeout is None else time.monotonic() + timeout
        options = {} if chunksize is None else {"chunksize": chunksize}
        run = self._pool._spread(fn, iterables, True, options)
        run._deadline = deadline
        run.fill()  # start work now, as the standard library's map does
        return _handing_over(run.pieces())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)


__all__ = ["Executor"]
