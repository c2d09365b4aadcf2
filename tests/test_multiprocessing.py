"""``fenfa.multiprocessing``: the standard library's pool API, and where fenfa differs.

The first part is the standard library's documented semantics, method by
method; every test there runs on fenfa's ``Pool``/``ThreadPool`` *and* on
``multiprocessing.pool.Pool``/``ThreadPool``, so that each difference is a
deliberate one. The second part is those differences (fenfa only): the cases
where the standard library hangs, or misbehaves, are not run on it.
"""

from __future__ import annotations

import functools
import gc
import inspect
import itertools
import logging
import multiprocessing
import multiprocessing.pool
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fenfa
import fenfa.multiprocessing as fmp
from helpers import endless, hang

Factory = Callable[..., Any]

POOLS: dict[str, Factory] = {
    "fenfa-process": fmp.Pool,
    "stdlib-process": multiprocessing.pool.Pool,
    "fenfa-thread": fmp.ThreadPool,
    "stdlib-thread": multiprocessing.pool.ThreadPool,
}


@pytest.fixture(params=list(POOLS))
def make(request: pytest.FixtureRequest) -> Factory:
    """A pool class: fenfa's or the standard library's, on processes or threads."""
    return POOLS[request.param]


@pytest.fixture(params=["fenfa-process", "stdlib-process"])
def make_process(request: pytest.FixtureRequest) -> Factory:
    return POOLS[request.param]


@pytest.fixture(params=["fenfa-process", "fenfa-thread"])
def make_fenfa(request: pytest.FixtureRequest) -> Factory:
    return POOLS[request.param]


def is_fenfa(factory: Factory) -> bool:
    return factory in (fmp.Pool, fmp.ThreadPool)


def on_threads(factory: Factory) -> bool:
    return factory in (fmp.ThreadPool, multiprocessing.pool.ThreadPool)


# -- task functions (module level: process workers import them) ------------


def square(x: int) -> int:
    return x * x


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def boom(x: object) -> None:
    raise ValueError(f"boom {x}")


def fails_at_two(x: int) -> int:
    if x == 2:
        raise ValueError("two")
    return x


def big(_: object = None) -> str:
    return "X" * 1_000_000


def pid(_: object = None) -> int:
    return os.getpid()


_INITIALISED: list[str] = []


def initialise(value: str) -> None:
    _INITIALISED.append(value)


def initialised(_: object) -> list[str]:
    return list(_INITIALISED)


def until_released(directory: str, value: int) -> int:
    hang(directory)
    return value


def killed(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def returns_a_lock(_: object) -> object:
    return threading.Lock()


class NeedsTwo(Exception):
    """Pickles as NeedsTwo(a): its ``__init__`` wants two arguments."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(a)
        self.b = b


def raises_needs_two(_: object) -> None:
    raise NeedsTwo(1, 2)


def counting() -> tuple[list[int], Iterator[int]]:
    pulled: list[int] = []

    def gen() -> Iterator[int]:
        for i in endless():
            pulled.append(i)
            yield i

    return pulled, gen()


# == the standard library's semantics ========================================


def test_signatures_are_the_standard_librarys() -> None:
    pairs = [
        (fmp.Pool, multiprocessing.pool.Pool),
        (fmp.ThreadPool, multiprocessing.pool.ThreadPool),
    ]
    for ours, theirs in pairs:
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(theirs).parameters
        )
    methods = [
        "apply", "apply_async", "map", "map_async", "starmap", "starmap_async",
        "imap", "imap_unordered", "close", "terminate", "join",
    ]  # fmt: skip
    for name in methods:
        ours_sig = inspect.signature(getattr(fmp.Pool, name))
        theirs_sig = inspect.signature(getattr(multiprocessing.pool.Pool, name))
        assert list(ours_sig.parameters) == list(theirs_sig.parameters), name
        defaults = [p.default for p in ours_sig.parameters.values()]
        assert defaults == [p.default for p in theirs_sig.parameters.values()], name


@pytest.mark.parametrize("chunksize", [None, 1, 3])
def test_map_returns_every_result_in_order(make: Factory, chunksize: int | None) -> None:
    with make(2) as pool:
        assert pool.map(square, range(20), chunksize) == [i * i for i in range(20)]
        assert pool.map(square, (i for i in range(7))) == [i * i for i in range(7)]
        assert pool.map(square, []) == []


def test_starmap_unpacks_each_item(make: Factory) -> None:
    with make(2) as pool:
        assert pool.starmap(add, [(1, 2), (3, 4)], chunksize=1) == [3, 7]
        assert pool.starmap_async(add, iter([(5, 5)])).get(timeout=30) == [10]


def test_apply_passes_args_and_kwds(make: Factory) -> None:
    with make(2) as pool:
        assert pool.apply(add, (1, 2), {"scale": 10}) == 30
        assert pool.apply(add, args=(1, 1)) == 2


def test_async_result_before_and_after_it_is_ready(make: Factory, release: Path) -> None:
    with make(2) as pool:
        result = pool.apply_async(until_released, (str(release.parent), 7))
        assert not result.ready()
        with pytest.raises(ValueError, match="not ready"):
            result.successful()
        assert result.wait(0.01) is None
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.01)
        release.touch()
        assert result.get(timeout=30) == 7
        assert result.ready()
        assert result.successful()


def test_callback_has_run_when_get_returns(make: Factory) -> None:
    seen: list[object] = []
    with make(2) as pool:
        assert pool.apply_async(square, (3,), callback=seen.append).get(timeout=30) == 9
        assert seen == [9]
        assert pool.map_async(square, range(4), callback=seen.append).get(timeout=30)
        assert seen == [9, [0, 1, 4, 9]]


def test_error_callback_and_get_receive_the_exception(make: Factory) -> None:
    errors: list[BaseException] = []
    with make(2) as pool:
        result = pool.apply_async(boom, (1,), callback=errors.append, error_callback=errors.append)
        with pytest.raises(ValueError, match="boom 1"):
            result.get(timeout=30)
        assert not result.successful()
        assert len(errors) == 1
        assert isinstance(errors[0], ValueError)
        mapped = pool.map_async(fails_at_two, range(5), error_callback=errors.append)
        with pytest.raises(ValueError, match="two"):
            mapped.get(timeout=30)
        assert len(errors) == 2
        assert str(errors[1]) == "two"


def test_exception_carries_the_workers_traceback(make: Factory) -> None:
    with make(2) as pool:
        for call in (
            lambda: pool.apply(boom, (1,)),
            lambda: pool.map(fails_at_two, range(4)),
            lambda: list(pool.imap(fails_at_two, range(4))),
        ):
            with pytest.raises(ValueError) as info:
                call()
            text = "".join(traceback.format_exception(info.value))
            assert "in boom" in text or "in fails_at_two" in text
            if not on_threads(make):
                cause = info.value.__cause__
                assert isinstance(cause, multiprocessing.pool.RemoteTraceback)  # type: ignore[attr-defined]
                assert "raise ValueError" in str(cause)


def test_map_raises_a_tasks_exception(make: Factory) -> None:
    with make(2) as pool, pytest.raises(ValueError, match="two"):
        pool.map(fails_at_two, range(10), chunksize=1)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_imap_is_ordered_and_imap_unordered_complete(make: Factory, chunksize: int) -> None:
    with make(2) as pool:
        assert list(pool.imap(square, range(10), chunksize)) == [i * i for i in range(10)]
        got = list(pool.imap_unordered(square, iter(range(10)), chunksize=chunksize))
        assert sorted(got) == [i * i for i in range(10)]
        assert list(pool.imap(square, [])) == []


def test_imap_raises_at_the_failed_task_then_goes_on(make: Factory) -> None:
    with make(2) as pool:
        results = pool.imap(fails_at_two, range(5))
        assert [next(results), next(results)] == [0, 1]
        with pytest.raises(ValueError, match="two"):
            next(results)
        assert list(results) == [3, 4]


def test_imap_next_times_out_and_keeps_going(make: Factory, release: Path) -> None:
    with make(2) as pool:
        results = pool.imap(functools.partial(until_released, str(release.parent)), [4, 5])
        with pytest.raises(multiprocessing.TimeoutError):
            results.next(timeout=0.05)
        release.touch()
        assert results.next(timeout=30) == 4
        assert list(results) == [5]


def test_get_times_out_and_keeps_going(make: Factory, release: Path) -> None:
    with make(2) as pool:
        result = pool.starmap_async(until_released, [(str(release.parent), 5)])
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.05)
        release.touch()
        assert result.get(timeout=30) == [5]


def test_initializer_runs_in_every_worker(make: Factory) -> None:
    with make(2, initialise, ("ready",)) as pool:
        seen = pool.map(initialised, range(4), chunksize=1)
    assert all("ready" in s for s in seen)
    _INITIALISED.clear()


def test_maxtasksperchild_replaces_workers(make_process: Factory) -> None:
    with make_process(2, maxtasksperchild=1) as pool:
        pids = pool.map(pid, range(4), chunksize=1)
    assert len(set(pids)) == 4


def test_context_chooses_the_start_method(make_process: Factory) -> None:
    with make_process(1, context=multiprocessing.get_context("spawn")) as pool:
        assert pool.apply(square, (5,)) == 25


def test_bad_arguments_raise_as_the_standard_library(make: Factory) -> None:
    with pytest.raises(ValueError, match="Number of processes must be at least 1"):
        make(0)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        make(1, initializer=3)
    with make(1) as pool:
        with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
            pool.imap(square, range(3), chunksize=0)
        with pytest.raises(NotImplementedError):
            pickle.dumps(pool)
        assert "state=RUN pool_size=1" in repr(pool)


def test_maxtasksperchild_must_be_positive(make_process: Factory) -> None:
    with pytest.raises(ValueError, match="maxtasksperchild must be a positive int or None"):
        make_process(1, maxtasksperchild=0)


def test_a_closed_or_terminated_pool_refuses_work(make: Factory) -> None:
    pool = make(1)
    with pytest.raises(ValueError, match="Pool is still running"):
        pool.join()
    pool.close()
    for call in (
        lambda: pool.apply(square, (1,)),
        lambda: pool.apply_async(square, (1,)),
        lambda: pool.map(square, [1]),
        lambda: pool.map_async(square, [1]),
        lambda: pool.starmap_async(add, [(1, 2)]),
        lambda: pool.imap(square, [1]),
        lambda: pool.imap_unordered(square, [1]),
        lambda: pool.__enter__(),
    ):
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    pool.join()
    with make(1) as other:
        pass
    with pytest.raises(ValueError, match="Pool not running"):
        other.map(square, [1])
    other.join()  # after terminate: allowed, returns


def test_close_then_join_waits_for_every_task_and_callback(make: Factory) -> None:
    seen: list[int] = []
    pool = make(2)
    for i in range(20):
        pool.apply_async(square, (i,), callback=seen.append)
    mapped = pool.map_async(square, range(50), chunksize=5)
    unread = pool.imap(square, range(30))
    pool.close()
    pool.join()
    assert sorted(seen) == sorted(i * i for i in range(20))
    assert mapped.ready()
    assert mapped.get(timeout=0) == [i * i for i in range(50)]
    assert list(unread) == [i * i for i in range(30)]  # ran to the end after close()


def test_the_guides_queue_join_deadlock_has_no_counterpart(make: Factory) -> None:
    """The guide: a child puts 1 MB on a Queue; joining it before get() deadlocks."""
    pool = make(1)
    result = pool.apply_async(big)
    pool.close()
    pool.join()  # joined before the result is read: returns all the same
    assert result.get(timeout=0) == "X" * 1_000_000


def test_unpicklable_result_fails_its_task(make_process: Factory) -> None:
    expected = (
        fenfa.SerializationError
        if is_fenfa(make_process)
        else multiprocessing.pool.MaybeEncodingError
    )
    with make_process(1) as pool:
        with pytest.raises(expected):
            pool.apply(returns_a_lock, (1,))
        assert pool.apply(square, (4,)) == 16  # and the pool goes on


# == where fenfa differs (not run on the standard library) ===================


def test_default_start_method_is_forkserver_unless_context_says() -> None:
    with fmp.Pool(1) as pool:
        assert pool._pool._backend.start_method == "forkserver"  # type: ignore[union-attr]
    with fmp.Pool(1, context="spawn") as pool:
        assert pool._pool._backend.start_method == "spawn"  # type: ignore[union-attr]
        assert pool.apply(square, (3,)) == 9


def test_a_killed_worker_fails_its_task_instead_of_hanging() -> None:
    with fmp.Pool(2) as pool:
        result = pool.apply_async(killed, (1,))
        with pytest.raises(fenfa.WorkerCrashed):
            result.get(timeout=30)
        with pytest.raises(fenfa.WorkerCrashed):
            pool.map(killed, range(2))
        assert pool.map(square, range(4)) == [0, 1, 4, 9]  # workers were replaced


def test_an_exception_that_will_not_unpickle_still_arrives() -> None:
    with fmp.Pool(1) as pool:
        with pytest.raises(NeedsTwo) as info:
            pool.apply(raises_needs_two, (1,))
        assert info.value.args == (1,)
        assert info.value.b == 2
        assert pool.apply(square, (2,)) == 4


def test_imap_over_an_endless_generator_stops_early(make_fenfa: Factory) -> None:
    for method in ("imap", "imap_unordered"):
        pulled, inputs = counting()
        with make_fenfa(2) as pool:
            for count, _ in enumerate(getattr(pool, method)(square, inputs), 1):
                if count == 20:
                    break
        # window (4 batches per worker) + the pump's buffer + one in hand
        assert len(pulled) < 40, (method, len(pulled))


def test_a_dropped_imap_iterator_stops_its_call(make_fenfa: Factory) -> None:
    pulled, inputs = counting()
    pool = make_fenfa(2)
    results = pool.imap(square, inputs)
    assert next(results) == 0
    del results
    gc.collect()
    pool.close()
    pool.join()  # the standard library's would pull the endless input for ever
    assert len(pulled) < 40


def test_slow_callback_delays_no_result_and_may_wait_for_others(make_fenfa: Factory) -> None:
    gate = threading.Event()
    inner: list[int] = []
    with make_fenfa(2) as pool:

        def slow(_: object) -> None:
            # Waits for a result that has a callback of its own: it runs here.
            inner.append(pool.apply_async(square, (5,), callback=inner.append).get(timeout=30))
            gate.wait(timeout=30)

        first = pool.apply_async(square, (2,), callback=slow)
        assert pool.apply_async(square, (3,)).get(timeout=30) == 9  # not behind the callback
        assert list(pool.imap(square, range(3))) == [0, 1, 4]
        assert not first.ready()  # ready once its callback returns
        gate.set()
        assert first.get(timeout=30) == 4
        assert inner == [25, 25]


def test_a_callback_that_raises_is_logged_and_the_pool_goes_on(
    make_fenfa: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: object) -> None:
        raise RuntimeError("callback broke")

    with caplog.at_level(logging.ERROR, logger="fenfa.multiprocessing"), make_fenfa(2) as pool:
        assert pool.apply_async(square, (2,), callback=broken).get(timeout=30) == 4
        assert pool.map(square, range(3)) == [0, 1, 4]
    assert "exception calling callback" in caplog.text
    assert "callback broke" in caplog.text


def test_terminate_fails_unfinished_results(release: Path) -> None:
    pool = fmp.Pool(2)
    single = pool.apply_async(until_released, (str(release.parent), 1))
    many = pool.starmap_async(until_released, [(str(release.parent), 2)] * 4)
    _, inputs = counting()
    results = pool.imap(square, inputs)
    pool.terminate()
    for result in (single, many):
        with pytest.raises(fenfa.PoolClosed):
            result.get(timeout=30)
    with pytest.raises(fenfa.PoolClosed):
        list(itertools.islice(results, 10_000))
    pool.join()


def test_get_from_a_callback_of_its_own_result_returns() -> None:
    got: list[int] = []
    with fmp.ThreadPool(1) as pool:
        holder: list[Any] = []
        ready = threading.Event()

        def again(_: object) -> None:
            ready.wait(timeout=30)
            got.append(holder[0].get(timeout=30))

        holder.append(pool.apply_async(square, (6,), callback=again))
        ready.set()
        assert holder[0].get(timeout=30) == 36
    assert got == [36]
