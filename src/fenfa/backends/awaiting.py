"""How fenfa awaits one task's coroutine: under its ``timeout``, as ``TaskTimeout``.

Two places await task coroutines: the async backend, on an event loop in a
thread of its own (:mod:`fenfa.backends.asyncio`), and ``amap``/``aimap``,
on the caller's own loop (:mod:`fenfa.aio`). Both go through
:func:`run_coroutine`, so that a coroutine past its limit is cancelled at its
next ``await`` and fails the same way in either, while a ``TimeoutError``
the task raised itself stays the task's own. Kept out of the backend so that
``amap`` does not import a backend it does not use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..errors import TaskTimeout


async def run_coroutine(
    call: Callable[[Any], Any], item: Any, index: int, limit: float | None
) -> Any:
    """``await call(item)``, cancelled after ``limit`` seconds with ``TaskTimeout``."""
    if limit is None:
        return await call(item)
    scope = asyncio.timeout(limit)
    try:
        async with scope:
            return await call(item)
    except TimeoutError:
        if not scope.expired():
            raise  # the task's own TimeoutError
        raise TaskTimeout(
            f"task {index} ran longer than its timeout of {limit:g} s; it was cancelled",
            index=index,
            limit=limit,
        ) from None
    finally:
        del scope  # (it holds the Task, whose result leads back here: no cycle)


__all__ = ["run_coroutine"]
