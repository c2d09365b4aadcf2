"""What a caller hands fenfa is freed as soon as the task or call ends (issue 15, item 2).

``concurrent.futures`` frees a submitted callable, its arguments and its
result once the task is done (CPython bpo-16284, ``test_no_stale_references``).
fenfa must do the same without the cycle collector: every test here runs
with ``gc.disable()`` and waits for a weakref to the object to die.
"""

from __future__ import annotations

import functools
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import fenfa


class Big:
    """Stands for the 100 MB object a user captures in a closure or a partial."""

    def method(self, x: int = 1) -> int:
        return x


def keep(big: Big, x: int) -> int:
    return x


def boom(big: Big, x: int) -> int:
    raise ValueError(x)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def freed_soon(ref: weakref.ref[Big], what: str) -> None:
    """The object is gone within a moment (a worker thread may still be returning)."""
    deadline = time.monotonic() + 2.0
    while ref() is not None:
        assert time.monotonic() < deadline, f"{what}: still alive without the cycle collector"
        time.sleep(0.005)


def submit(pool: fenfa.Pool, big: Big) -> None:
    assert pool.submit(big.method, 3).result(timeout=30) == 3


def mapped(pool: fenfa.Pool, big: Big) -> None:
    assert pool.map(functools.partial(keep, big), range(20)) == list(range(20))


def raising(pool: fenfa.Pool, big: Big) -> None:
    with pytest.raises(ValueError, match="0"):
        pool.map(functools.partial(boom, big), range(20))


def early_break(pool: fenfa.Pool, big: Big) -> None:
    for value in pool.imap(functools.partial(keep, big), range(1000)):
        assert value == 0
        break


def closure(pool: fenfa.Pool, big: Big) -> None:
    assert pool.map(lambda x: (big, x)[1], range(20)) == list(range(20))


CALLS: dict[str, Callable[[fenfa.Pool, Big], None]] = {
    "submit": submit,
    "map": mapped,
    "raising": raising,
    "break": early_break,
    "closure": closure,
}


async def _async_keep(big: Big, x: int) -> int:
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("backend", ["serial", "thread", "process", "async", "dask"])
def test_arguments_are_freed_without_the_cycle_collector(
    backend: str, call: str, request: pytest.FixtureRequest
) -> None:
    options: dict[str, Any] = {}
    if backend == "dask":
        options["address"] = request.getfixturevalue("dask_cluster")
    with fenfa.Pool(backend, workers=2, **options) as pool:
        CALLS[call](pool, Big())  # warm up: start the workers, fill caches
        request.getfixturevalue("no_collector")
        big = Big()
        ref = weakref.ref(big)
        CALLS[call](pool, big)
        del big
        freed_soon(ref, f"{call} on {backend}")


@pytest.mark.timeout(30)
def test_an_executor_frees_a_bound_method_and_its_result(no_collector: None) -> None:
    """CPython's test_no_stale_references, on fenfa.Executor."""
    with fenfa.Executor(max_workers=2, backend="thread") as executor:
        big = Big()
        ref = weakref.ref(big)
        assert executor.submit(big.method).result(timeout=10) == 1
        del big
        freed_soon(ref, "Executor.submit(obj.method)")
