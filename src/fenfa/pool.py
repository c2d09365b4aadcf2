"""The Pool: calls over many inputs (``map``, ``imap``, ``starmap``...), and ``journal=``.

Each call becomes a :class:`fenfa.window.Run` (window, batches, retries,
errors, order), or, given a ``journal`` option, goes through
:mod:`fenfa.journaled`, which resumes it from a journal file. Everything
else a pool is (options, lifecycle, backend selection, single calls) is
:class:`~fenfa.pool_base.PoolBase`'s, below the window.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from operator import length_hint
from typing import TYPE_CHECKING, Any, TypeVar

from .options import CallOptions, check_callable
from .pool_base import PoolBase
from .tasks import Style
from .window import Run

if TYPE_CHECKING:
    from concurrent.futures import Future

# The per-call options that hand a call to fenfa.journaled (see Pool._journaled).
_JOURNAL_OPTIONS = frozenset({"journal", "journal_fsync", "journal_retry_failed"})

R = TypeVar("R")


class Pool(PoolBase):
    """A set of workers of one backend, and the calls that run on them.

    ``Pool(backend="auto", workers=None, **options)``; the per-call options
    given here (``chunksize``, ``window``, ``retries``, ``on_error``) are the
    defaults of every call, which may override them.
    """

    def _run(
        self,
        fn: Callable[..., Any],
        style: Style,
        inputs: Iterable[Any],
        *,
        total: int | None,
        ordered: bool,
        options: dict[str, Any],
        deadline: float | None = None,
    ) -> Run:
        check_callable(fn)
        self._check_fits(fn)
        call_options = self._options.update(options)
        self._check_open()
        undecided = self._router is not None or self._backend is None
        chooser = self._settle if undecided else None
        recorder = call_options.insights
        if recorder is True:
            recorder = self.insights
        elif recorder is False:
            recorder = None
        return Run(
            self,
            fn,
            style,
            iter(inputs),
            total=total,
            ordered=ordered,
            options=call_options,
            deadline=deadline,
            chooser=chooser,
            recorder=recorder,
        )

    def _spread(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        ordered: bool,
        options: dict[str, Any],
    ) -> Run:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        given: tuple[Any, ...] = iterables  # (typed as iterables; checked as anything)
        for position, iterable in enumerate(given[1:], 2):
            if not isinstance(iterable, Iterable):
                hint = (
                    f" (multiprocessing's positional chunksize? here it is a keyword: "
                    f"chunksize={iterable!r})"
                    if isinstance(iterable, int) and position == 2
                    else ""
                )
                raise TypeError(
                    f"argument {position} after the function must be an iterable of inputs, "
                    f"got {iterable!r}{hint}"
                )
        # Like builtins.map: several iterables stop at the shortest.
        lengths = [_length(it) for it in iterables]
        total = None if None in lengths else min(lengths)  # type: ignore[type-var]
        if len(iterables) == 1:
            return self._run(
                fn,
                Style.ONE,
                iterables[0],
                total=total,
                ordered=ordered,
                options=options,
            )
        return self._run(
            fn,
            Style.STAR,
            zip(*iterables, strict=False),
            total=total,
            ordered=ordered,
            options=options,
        )

    def _journaled(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        options: dict[str, Any],
        ordered: bool = True,
        star: bool = False,
        collect: bool = False,
    ) -> Any:
        """A call with ``journal=`` options, through :mod:`fenfa.journaled`; else None.

        Its results' iterator, or with ``collect`` their list."""
        if not _JOURNAL_OPTIONS & options.keys():
            return None
        from .journaled import journaled  # (imported only by calls that use it)

        return journaled(self, fn, iterables, options, ordered=ordered, star=star, collect=collect)

    def map(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> list[R]:
        """``list(map(fn, *iterables))`` on the workers; raises the first failure seen."""
        if (journaled := self._journaled(fn, iterables, options, collect=True)) is not None:
            return journaled  # type: ignore[no-any-return]
        return self._spread(fn, iterables, True, options).collect()

    def imap(self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any) -> Iterator[R]:
        """Lazy and ordered; at most ``window`` inputs pulled ahead of the consumer."""
        if (journaled := self._journaled(fn, iterables, options)) is not None:
            return journaled  # type: ignore[no-any-return]
        return self._spread(fn, iterables, True, options).results()

    def imap_unordered(
        self, fn: Callable[..., R], *iterables: Iterable[Any], **options: Any
    ) -> Iterator[R]:
        """Lazy; results in the order they finish."""
        if (journaled := self._journaled(fn, iterables, options, ordered=False)) is not None:
            return journaled  # type: ignore[no-any-return]
        return self._spread(fn, iterables, False, options).results()

    def starmap(
        self, fn: Callable[..., R], iterable: Iterable[Iterable[Any]], **options: Any
    ) -> list[R]:
        """``[fn(*args) for args in iterable]`` on the workers."""
        journaled = self._journaled(fn, (iterable,), options, star=True, collect=True)
        if journaled is not None:  # (a list, perhaps empty)
            return journaled  # type: ignore[no-any-return]
        run = self._run(
            fn,
            Style.STAR,
            iterable,
            total=_length(iterable),
            ordered=True,
            options=options,
        )
        return run.collect()

    def map_async(
        self, fn: Callable[..., R], iterable: Iterable[Any], **options: Any
    ) -> Future[list[R]]:
        """``map`` in the background; a Future of the list."""
        from concurrent.futures import Future

        run = self._spread(fn, (iterable,), True, options)
        run.background = True
        future: Future[list[R]] = Future()
        future.set_running_or_notify_cancel()

        def drive() -> None:
            try:
                result = run.collect()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._drivers.discard(thread)
                    stop = self._stop_after_drivers and not self._drivers
                if stop and self._backend is not None:
                    self._backend.shutdown(wait=False)

        thread = threading.Thread(target=drive, name="fenfa-map-async", daemon=True)
        with self._lock:
            self._check_open()
            self._drivers.add(thread)
        thread.start()
        return future


def _length(iterable: Iterable[Any]) -> int | None:
    hint = length_hint(iterable, -1)
    return None if hint < 0 or not hasattr(iterable, "__len__") else hint


__all__ = ["CallOptions", "Pool"]
