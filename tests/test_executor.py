"""``fenfa.Executor``, tested as a user switching from ``concurrent.futures`` would.

Code written for ``ProcessPoolExecutor`` / ``ThreadPoolExecutor`` changes one
name and keeps working: the constructor's arguments, ``submit``, the lazy
``map`` with its total ``timeout``, ``shutdown``, and the futures' use with
``wait``, ``as_completed`` and ``loop.run_in_executor``. What it gains is
issue 4's crash isolation: a dead worker fails its own future, not the pool.

Each test runs on ``process`` and, where the stdlib has a thread counterpart
that means the same, on ``thread``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import functools
import gc
import inspect
import itertools
import multiprocessing
import os
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import fenfa
from helpers import hang, wait_for

BACKENDS = ["process", "thread"]

#: A gated task is released after this long even if nothing else releases it.


# --------------------------------------------------------------------------- tasks


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def getpid(_: object = None) -> int:
    return os.getpid()


def which_backend(_: object = None) -> str | None:
    return fenfa.current_worker().backend


def init_state(tag: str) -> None:
    state = fenfa.current_worker().state
    state["tag"] = tag
    state["inits"] = state.get("inits", 0) + 1


def read_state(_: object = None) -> tuple[Any, Any]:
    state = fenfa.current_worker().state
    return state.get("tag"), state.get("inits")


#: Set to another value by a test after import: a forked worker sees the new
#: value, a spawned one re-imports this module and sees this one.
PARENT_MARK = "import-time"


def start_facts(_: object = None) -> tuple[int, str]:
    return os.getppid(), PARENT_MARK


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def slow_then_stuck(directory: str, x: int) -> int:
    """Item 0 works 0.5 s (its own cost, not a synchronisation); item 1 is stuck."""
    if x == 0:
        time.sleep(0.5)
    elif x == 1:
        hang(directory)
    return x * x


def gated(directory: str, x: int) -> int:
    (Path(directory) / f"start-{x}").touch()
    hang(directory)
    return x


def flaky(directory: str, x: int) -> int:
    marker = Path(directory) / f"failed-{x}"
    if not marker.exists():
        marker.touch()
        raise LookupError(f"first attempt of {x}")
    return x * 10


class Box:
    """A result that can be weakly referenced: the test watches when it dies."""

    def __init__(self, value: int) -> None:
        self.value = value


def box(x: int) -> Box:
    return Box(x)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


# --------------------------------------------------------------------------- construction


def test_it_is_a_concurrent_futures_executor(backend: str) -> None:
    with fenfa.Executor(2, backend=backend) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        future = ex.submit(square, 7)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30) == 49
        assert ex.submit(which_backend).result(timeout=30) == backend


def test_the_default_backend_is_process() -> None:
    with fenfa.Executor(2) as ex:
        assert ex.submit(which_backend).result(timeout=30) == "process"
        assert ex.submit(getpid).result(timeout=30) != os.getpid()
    with fenfa.Executor() as ex:  # max_workers=None, as the stdlib's
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_below_one_is_the_stdlib_value_error(max_workers: int) -> None:
    with pytest.raises(ValueError) as stdlib:
        concurrent.futures.ThreadPoolExecutor(max_workers)
    assert str(stdlib.value) == "max_workers must be greater than 0"
    for backend in BACKENDS:
        with pytest.raises(ValueError) as info:
            fenfa.Executor(max_workers, backend=backend)
        assert str(info.value) == str(stdlib.value)
        with pytest.raises(ValueError) as info:
            fenfa.Executor(max_workers=max_workers, backend=backend)
        assert str(info.value) == str(stdlib.value)


def test_initializer_and_initargs(backend: str) -> None:
    with fenfa.Executor(2, backend=backend, initializer=init_state, initargs=("ready",)) as ex:
        got = list(ex.map(read_state, range(10)))
    assert got == [("ready", 1)] * 10


@pytest.mark.parametrize("method", ["spawn", "fork"])
# Python 3.12+ warns when a process with threads forks; the test asks for fork.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_mp_context_chooses_the_start_method(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # fork and spawn start workers as our children (a forkserver's are its own);
    # only fork copies the parent's memory, so only it sees the changed mark.
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MARK", "set-by-test")
    context = multiprocessing.get_context(method)
    with fenfa.Executor(2, mp_context=context) as ex:
        facts = set(ex.map(start_facts, range(4)))
    mark = "set-by-test" if method == "fork" else "import-time"
    assert facts == {(os.getpid(), mark)}, facts


def test_max_tasks_per_child_recycles_workers() -> None:
    with fenfa.Executor(2, max_tasks_per_child=2) as ex:
        pids = list(ex.map(getpid, range(12)))
    per_pid = {p: pids.count(p) for p in pids}
    assert max(per_pid.values()) <= 2, per_pid
    assert len(per_pid) >= 6, per_pid


def test_fenfa_pool_options_pass_through(backend: str, tmp_path: Path) -> None:
    with fenfa.Executor(2, backend=backend, retries=1) as ex:
        assert ex.submit(flaky, str(tmp_path), 3).result(timeout=30) == 30


# --------------------------------------------------------------------------- submit


def test_submit_passes_keywords_named_fn_and_self_through(backend: str) -> None:
    signature = inspect.signature(fenfa.Executor.submit)
    kinds = [p.kind for p in signature.parameters.values()]
    assert kinds[:2] == [inspect.Parameter.POSITIONAL_ONLY] * 2, signature
    with fenfa.Executor(2, backend=backend) as ex:
        got = ex.submit(echo, 1, 2, fn="f", self="s", x=3).result(timeout=30)
        assert got == ((1, 2), {"fn": "f", "self": "s", "x": 3})
        assert ex.submit(add, 1, y=2).result(timeout=30) == 3


# --------------------------------------------------------------------------- map


def test_map_matches_the_stdlib(backend: str) -> None:
    data = list(range(100))
    with concurrent.futures.ThreadPoolExecutor(2) as stdlib:
        expected = list(stdlib.map(add, data, range(50)))
    with fenfa.Executor(2, backend=backend) as ex:
        assert list(ex.map(add, data, range(50))) == expected
        assert list(ex.map(square, data, chunksize=7)) == [x * x for x in data]
        assert list(ex.map(square, [])) == []


def test_map_pulls_its_input_lazily(backend: str) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with fenfa.Executor(2, backend=backend) as ex:
        it = ex.map(square, endless(), chunksize=1)
        assert pulled < 100, f"the call itself pulled {pulled} items"
        assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
        assert pulled < 100, f"pulled {pulled} items for 10 results"
        del it
        assert ex.submit(square, 3).result(timeout=30) == 9


def test_map_timeout_is_the_total_from_the_call(
    backend: str, tmp_path: Path, release: Path
) -> None:
    fn = functools.partial(slow_then_stuck, str(tmp_path))
    with fenfa.Executor(2, backend=backend) as ex:
        try:
            ex.submit(square, 1).result(timeout=30)  # workers started: time the map alone
            start = time.monotonic()
            it = ex.map(fn, range(3), timeout=1.0)
            assert next(it) == 0  # after ~0.5 s: within the total
            with pytest.raises(TimeoutError):
                next(it)
            took = time.monotonic() - start
            # A per-next() timeout would raise only ~1.5 s after the call.
            assert 0.9 <= took < 1.35, f"TimeoutError {took:.2f} s after the call"
        finally:
            release.touch()
    assert issubclass(concurrent.futures.TimeoutError, TimeoutError)


def test_map_keeps_no_reference_to_results_it_has_yielded(backend: str) -> None:
    # Batches of 10: a result must not stay alive in the list it arrived in.
    with fenfa.Executor(2, backend=backend) as ex:
        it = ex.map(box, range(40), chunksize=10)
        first = next(it)
        assert first.value == 0
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None, "map still holds the result it has just yielded"
        second = next(it)
        assert second.value == 1
        ref = weakref.ref(second)
        del second
        gc.collect()
        assert ref() is None, "map still holds a result it has yielded"
        rest = [b.value for b in it]
    assert rest == list(range(2, 40))


# --------------------------------------------------------------------------- shutdown


def test_shutdown_signature_and_cancel_futures(backend: str, tmp_path: Path, release: Path) -> None:
    def shape(method: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(method).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(fenfa.Executor.shutdown) == shape(concurrent.futures.Executor.shutdown)
    ex = fenfa.Executor(1, backend=backend)
    try:
        running = ex.submit(gated, str(tmp_path), 0)
        wait_for((tmp_path / "start-0").exists, "the first task to start")
        queued = [ex.submit(square, x) for x in range(5)]
        ex.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        with pytest.raises(RuntimeError):  # as the stdlib's "cannot schedule new futures"
            ex.submit(square, 1)
        release.touch()
        ex.shutdown(wait=True)
        assert running.done()
        error = running.exception(timeout=0)
        assert error is None or isinstance(error, fenfa.PoolClosed), repr(error)
    finally:
        release.touch()
        ex.shutdown()


def test_shutdown_waits_for_submitted_work(backend: str) -> None:
    ex = fenfa.Executor(2, backend=backend)
    futures = [ex.submit(square, x) for x in range(20)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [x * x for x in range(20)]
    ex.shutdown()  # idempotent


# --------------------------------------------------------------------------- futures


def test_futures_work_with_wait_and_as_completed(backend: str) -> None:
    with fenfa.Executor(2, backend=backend) as ex:
        futures = [ex.submit(square, x) for x in range(20)]
        done, not_done = concurrent.futures.wait(futures, timeout=30)
        assert not not_done
        assert done == set(futures)
        futures = [ex.submit(square, x) for x in range(20)]
        got = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30))
        assert got == [x * x for x in range(20)]
        bad = ex.submit(add, 1, "x")
        done, _ = concurrent.futures.wait(
            [bad, ex.submit(square, 2)], timeout=30, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        assert bad in done
        assert isinstance(bad.exception(), TypeError)


def test_futures_work_with_run_in_executor(backend: str) -> None:
    async def main(ex: fenfa.Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        calls = [loop.run_in_executor(ex, square, x) for x in range(10)]
        return list(await asyncio.gather(*calls))

    with fenfa.Executor(2, backend=backend) as ex:
        assert asyncio.run(main(ex)) == [x * x for x in range(10)]


# --------------------------------------------------------------------------- crash isolation


@pytest.mark.timeout(60)
def test_a_crash_fails_only_its_future_unlike_the_stdlib() -> None:
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as stdlib:
        assert stdlib.submit(square, 3).result(timeout=30) == 9
        crashed = stdlib.submit(kill_self)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            crashed.result(timeout=30)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            stdlib.submit(square, 3)  # the whole executor is broken

    with fenfa.Executor(2) as ex:
        others = [ex.submit(square, x) for x in range(10)]
        crashed = ex.submit(kill_self)
        more = [ex.submit(square, x) for x in range(10, 20)]
        error = crashed.exception(timeout=30)
        assert isinstance(error, fenfa.WorkerCrashed), repr(error)
        assert error.exitcode == -signal.SIGKILL
        assert [f.result(timeout=30) for f in others + more] == [x * x for x in range(20)]
        assert ex.submit(square, 3).result(timeout=30) == 9, "the executor stays usable"
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]
