"""The public surface: names, option checking, default pools, ``run`` and ``Executor``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import fenfa
import fenfa.api
import fenfa.errors
from helpers import endless

#: DESIGN.md §1 as of issue 3. Later issues extend this list: amap and aimap
#: (asyncio callers), share (shared memory), shell and ShellResult (subprocesses).
PUBLIC_NAMES = [
    "BackendUnavailable",
    "Executor",
    "FenfaError",
    "Insights",
    "Pool",
    "PoolClosed",
    "SerializationError",
    "ShellResult",
    "Shared",
    "Summary",
    "TaskRecord",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerInfo",
    "aimap",
    "amap",
    "current_worker",
    "imap",
    "imap_unordered",
    "last_insights",
    "map",
    "run",
    "share",
    "shell",
    "starmap",
]

#: The exception tree of DESIGN.md §3: name -> the bases it must have.
ERROR_TREE = {
    "FenfaError": (Exception,),
    "BackendUnavailable": (fenfa.FenfaError, ImportError),
    "PoolClosed": (fenfa.FenfaError, RuntimeError),
    "WorkerCrashed": (fenfa.FenfaError, RuntimeError),
    "SerializationError": (fenfa.FenfaError, TypeError),
    "TaskTimeout": (fenfa.FenfaError, TimeoutError),
}

VALID_BACKENDS = ["auto", "serial", "thread", "process"]


# --------------------------------------------------------------------------- tasks


class Boom(Exception):
    pass


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def getpid(_: object = None) -> int:
    return os.getpid()


def thread_name(_: object = None) -> str:
    return fenfa.current_worker().thread_name


def where(_: object = None) -> tuple[int, str | None]:
    return os.getpid(), fenfa.current_worker().backend


def fail(_: object = None) -> None:
    raise Boom("failed in the worker")


def nap(seconds: float) -> float:
    time.sleep(seconds)  # the workload itself, not a synchronisation
    return seconds


def wait_for_file(path: str, started: str | None = None) -> str:
    """Blocks until ``path`` exists (or a deadline passes): a gate across processes.

    Touches ``started`` first, so the test can tell the task is running.
    """
    if started is not None:
        Path(started).touch()
    deadline = time.monotonic() + 10.0
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.002)
    return "released"


def init_tag(tag: str) -> None:
    fenfa.current_worker().state["tag"] = tag


def read_tag(_: object = None) -> Any:
    return fenfa.current_worker().state.get("tag")


#: How far an "endless" input may be pulled before the test calls it drained.


def worker_opts(backend: str) -> dict[str, Any]:
    return {} if backend == "serial" else {"workers": 2}


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie its parent has not reaped yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------------- names


def test_all_is_exactly_the_documented_names() -> None:
    assert sorted(fenfa.__all__) == sorted(PUBLIC_NAMES)
    missing = [name for name in PUBLIC_NAMES if not hasattr(fenfa, name)]
    assert not missing


def test_errors_form_the_documented_tree() -> None:
    for name, bases in ERROR_TREE.items():
        cls = getattr(fenfa, name)
        assert cls is getattr(fenfa.errors, name), f"fenfa.{name} is not fenfa.errors.{name}"
        for base in bases:
            assert issubclass(cls, base), f"{name} is not a {base.__name__}"
    assert issubclass(fenfa.errors.RemoteTraceback, BaseException)


def test_public_callables_and_types() -> None:
    for name in ["map", "imap", "imap_unordered", "starmap", "run", "current_worker"]:
        assert callable(getattr(fenfa, name)), name
    assert issubclass(fenfa.Executor, concurrent.futures.Executor)
    assert isinstance(fenfa.current_worker(), fenfa.WorkerInfo)


# --------------------------------------------------------------------------- option checks


def call_map(**opts: Any) -> object:
    return fenfa.map(square, [1, 2], **opts)


def call_imap(**opts: Any) -> object:
    return list(fenfa.imap(square, [1, 2], **opts))


def call_imap_unordered(**opts: Any) -> object:
    return list(fenfa.imap_unordered(square, [1, 2], **opts))


def call_starmap(**opts: Any) -> object:
    return fenfa.starmap(add, [(1, 2)], **opts)


def call_pool(**opts: Any) -> object:
    with fenfa.Pool(**opts) as pool:
        return pool.map(square, [1, 2])


def call_pool_map(**opts: Any) -> object:
    with fenfa.Pool(backend="thread", workers=2) as pool:
        return pool.map(square, [1, 2], **opts)


def call_pool_imap(**opts: Any) -> object:
    with fenfa.Pool(backend="thread", workers=2) as pool:
        return list(pool.imap(square, [1, 2], **opts))


def call_pool_imap_unordered(**opts: Any) -> object:
    with fenfa.Pool(backend="serial") as pool:
        return list(pool.imap_unordered(square, [1, 2], **opts))


def call_pool_starmap(**opts: Any) -> object:
    with fenfa.Pool(backend="serial") as pool:
        return pool.starmap(add, [(1, 2)], **opts)


MODULE_CALLS = [call_map, call_imap, call_imap_unordered, call_starmap]
#: Calls that take the per-call options (not backend and workers: those are the pool's).
PER_CALL = [*MODULE_CALLS, call_pool, call_pool_map, call_pool_imap]
PER_CALL += [call_pool_imap_unordered, call_pool_starmap]
WITH_BACKEND = [*MODULE_CALLS, call_pool]
#: Pool() has an explicit signature: Python's own TypeError names a bad option there.
NOT_POOL = [c for c in PER_CALL if c is not call_pool]


def ids(calls: list[Callable[..., object]]) -> list[str]:
    return [c.__name__.removeprefix("call_") for c in calls]


@pytest.mark.parametrize("call", WITH_BACKEND, ids=ids(WITH_BACKEND))
def test_unknown_backend_lists_the_valid_ones(call: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="warp-drive") as info:
        call(backend="warp-drive")
    for name in VALID_BACKENDS:
        assert name in str(info.value), f"{name!r} not listed in: {info.value}"


@pytest.mark.parametrize("call", NOT_POOL, ids=ids(NOT_POOL))
def test_unknown_option_names_it_and_lists_the_valid_ones(call: Callable[..., object]) -> None:
    with pytest.raises(TypeError, match="chunk_size") as info:
        call(chunk_size=4)
    for name in ["chunksize", "window", "retries", "on_error"]:
        assert name in str(info.value), f"{name!r} not listed in: {info.value}"


def test_unknown_pool_option_names_it() -> None:
    with pytest.raises(TypeError, match=r"^Pool\.__init__\(\) .*chunk_size"):
        fenfa.Pool(backend="serial", chunk_size=4)


@pytest.mark.parametrize(
    ("option", "value"),
    [("workers", 0), ("workers", 1.5), ("chunksize", 0), ("chunksize", -3), ("window", 0)],
)
@pytest.mark.parametrize("call", WITH_BACKEND, ids=ids(WITH_BACKEND))
def test_out_of_range_numbers_are_value_errors(
    call: Callable[..., object], option: str, value: int
) -> None:
    with pytest.raises(ValueError, match=option):
        call(backend="thread", **{option: value})


@pytest.mark.parametrize(("option", "value"), [("chunksize", 0), ("window", 0), ("window", -1)])
@pytest.mark.parametrize("call", PER_CALL, ids=ids(PER_CALL))
def test_out_of_range_per_call_options_are_value_errors(
    call: Callable[..., object], option: str, value: int
) -> None:
    with pytest.raises(ValueError, match=option):
        call(**{option: value})


@pytest.mark.parametrize("call", PER_CALL, ids=ids(PER_CALL))
def test_bad_on_error_is_a_value_error(call: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="ignore"):
        call(on_error="ignore")


def test_options_are_checked_at_call_time_even_for_lazy_calls() -> None:
    """A lazy iterator must not postpone a usage error to its first ``next()``."""
    with pytest.raises(ValueError):
        fenfa.imap(square, [1], workers=0)
    with pytest.raises(ValueError):
        fenfa.imap_unordered(square, [1], backend="warp-drive")
    with pytest.raises(TypeError):
        fenfa.imap(square, [1], chunk_size=2)
    with pytest.raises(TypeError):
        fenfa.imap(42, [1])
    with fenfa.Pool(backend="serial") as pool, pytest.raises(ValueError):
        pool.imap(square, [1], window=0)


@pytest.mark.parametrize("not_callable", [42, None, "square"])
def test_a_non_callable_is_a_type_error(not_callable: object) -> None:
    with pytest.raises(TypeError):
        fenfa.map(not_callable, [1, 2], backend="serial")
    with pytest.raises(TypeError):
        fenfa.starmap(not_callable, [(1,)], backend="thread", workers=2)
    with pytest.raises(TypeError):
        fenfa.run(not_callable, 1, backend="serial")
    with fenfa.Pool(backend="thread", workers=2) as pool:
        with pytest.raises(TypeError):
            pool.submit(not_callable, 1)
        with pytest.raises(TypeError):
            pool.map(not_callable, [1])
        with pytest.raises(TypeError):
            pool.apply(not_callable, (1,))
        assert pool.map(square, [3]) == [9], "the pool is still fine"


@pytest.mark.parametrize(
    ("option", "value"),
    [("initializer", init_tag), ("start_method", "spawn"), ("max_tasks_per_worker", 2)],
)
@pytest.mark.parametrize("call", MODULE_CALLS, ids=ids(MODULE_CALLS))
def test_pool_only_options_point_to_pool(
    call: Callable[..., object], option: str, value: object
) -> None:
    with pytest.raises(TypeError, match=option) as info:
        call(backend="thread", **{option: value})
    assert "fenfa.Pool" in str(info.value)


# --------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize("name", ["serial", "thread", "process"])
def test_pool_backend_is_the_name_asked_for(name: str) -> None:
    with fenfa.Pool(backend=name, **worker_opts(name)) as pool:
        assert pool.backend == name
        assert pool.apply(where)[1] == name


def test_auto_is_serial_for_one_worker_and_undecided_until_the_first_call() -> None:
    with fenfa.Pool(workers=1) as pool:
        assert pool.backend == "serial"
        assert pool.apply(where) == (os.getpid(), "serial")
    with fenfa.Pool(backend="auto", workers=2) as pool:
        assert pool.backend == "auto"
        assert pool.insights.decision is None
        # A single call cannot be measured: plain functions go to processes.
        pid, backend = pool.apply(where)
        assert pid != os.getpid()
        assert backend == "process"
        assert pool.backend == "process"
        assert pool.insights.decision is not None
        assert pool.insights.decision.backend == "process"
    assert fenfa.map(where, [0], backend="auto", workers=1) == [(os.getpid(), "serial")]


# --------------------------------------------------------------------------- default pools


def test_module_level_calls_reuse_one_default_pool() -> None:
    common = {"backend": "process", "workers": 2}
    pids: set[int] = set()
    for opts in [{}, {"chunksize": 1}, {"window": 3}, {"on_error": "return"}, {"retries": 1}]:
        pids |= set(fenfa.map(getpid, range(20), **common, **opts))
    pids |= set(fenfa.imap(getpid, range(20), **common))
    pids |= set(fenfa.imap_unordered(getpid, range(20), **common))
    pids |= set(fenfa.starmap(getpid, [(i,) for i in range(20)], **common))
    pids.add(fenfa.run(getpid, backend="process"))
    assert os.getpid() not in pids
    # Two workers, started once: a pool per call would show a new pid every call.
    assert len(pids - {fenfa.run(getpid, backend="process")}) <= 2, pids

    fenfa.api._shutdown_default_pools()
    assert all(gone(pid) for pid in pids), "shutdown returned before the workers exited"
    fenfa.api._shutdown_default_pools()  # idempotent
    fresh = set(fenfa.map(getpid, range(20), **common))
    assert fresh.isdisjoint(pids), "after shutdown the next call starts a new pool"


def test_module_level_thread_calls_reuse_their_threads() -> None:
    names: set[str] = set()
    for chunksize in [1, 2, None]:
        names |= set(
            fenfa.map(thread_name, range(30), backend="thread", workers=2, chunksize=chunksize)
        )
    assert len(names) <= 2, names


def test_many_small_module_level_calls_are_cheap() -> None:
    """The reason for default pools: a loop of small calls does not start workers each time."""
    fenfa.map(square, range(10), backend="process", workers=2)  # start-up paid here, once
    start = time.perf_counter()
    for i in range(50):
        assert fenfa.map(square, range(10), backend="process", workers=2)[3] == 9, i
    per_call = (time.perf_counter() - start) / 50
    # A forkserver start of two workers costs tens of ms; a reused pool, well under that.
    assert per_call < 0.05, f"{per_call * 1000:.1f} ms per call"


# --------------------------------------------------------------------------- run


def test_run_returns_the_result_of_one_call() -> None:
    assert fenfa.run(add, 1, 2) == 3
    assert fenfa.run(add, 1, y=41, backend="thread") == 42
    pid, backend = fenfa.run(where, backend="process")
    assert (pid != os.getpid(), backend) == (True, "process")
    with pytest.raises(Boom) as info:
        fenfa.run(fail, backend="process")
    assert isinstance(info.value.__cause__, fenfa.errors.RemoteTraceback)
    assert "fail" in str(info.value.__cause__)


# --------------------------------------------------------------------------- Executor


def make_executor(backend: str, **opts: Any) -> fenfa.Executor:
    max_workers = None if backend == "serial" else opts.pop("max_workers", 2)
    return fenfa.Executor(max_workers=max_workers, backend=backend, **opts)


def test_executor_basics(backend: str) -> None:
    with make_executor(backend) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        fut = ex.submit(add, 1, y=2)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(timeout=30) == 3
        futs = [ex.submit(square, i) for i in range(12)]
        done, not_done = concurrent.futures.wait(futs, timeout=30)
        assert not not_done
        assert done == set(futs)
        completed = list(concurrent.futures.as_completed(futs, timeout=30))
        assert sorted(f.result() for f in completed) == [i * i for i in range(12)]
        first = concurrent.futures.wait(
            [ex.submit(square, 2), ex.submit(fail)],
            timeout=30,
            return_when=concurrent.futures.FIRST_EXCEPTION,
        )
        assert first.done
        results = ex.map(square, range(10))
        assert not isinstance(results, list)
        assert list(results) == [i * i for i in range(10)]
        assert list(ex.map(add, range(10), [1, 2, 3])) == [1, 3, 5]
        exc = ex.submit(fail).exception(timeout=30)
        assert type(exc) is Boom
        assert isinstance(exc.__cause__, fenfa.errors.RemoteTraceback)
        with pytest.raises(Boom):
            list(ex.map(fail, range(3)))
    with pytest.raises(fenfa.PoolClosed):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError):  # what concurrent.futures code catches
        ex.submit(square, 1)
    ex.shutdown()  # idempotent


def test_executor_defaults_to_the_process_backend() -> None:
    with fenfa.Executor(max_workers=1) as ex:
        pid, backend = ex.submit(where).result(timeout=30)
    assert pid != os.getpid()
    assert backend == "process"


def test_executor_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        fenfa.Executor(max_workers=0, backend="thread")
    with pytest.raises(ValueError, match="warp-drive"):
        fenfa.Executor(max_workers=1, backend="warp-drive")


def test_executor_passes_pool_options(backend: str) -> None:
    with make_executor(backend, initializer=init_tag, initargs=("from-executor",)) as ex:
        assert ex.submit(read_tag).result(timeout=30) == "from-executor"
        assert set(ex.map(read_tag, range(6))) == {"from-executor"}


def test_executor_map_is_lazy(backend: str) -> None:
    """Unlike the stdlib's, fenfa's Executor.map does not submit the whole input first."""
    with make_executor(backend) as ex:
        got = list(itertools.islice(ex.map(square, endless()), 20))
        assert got == [i * i for i in range(20)]


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_executor_map_timeout_is_the_total(backend: str) -> None:
    with make_executor(backend, max_workers=1) as ex:
        assert list(ex.map(square, range(5), timeout=30)) == [0, 1, 4, 9, 16]
        # Each task takes 0.2 s, well within 0.5 s; all six take 1.2 s, well past it.
        # A per-item timeout would never fire; the stdlib's total one does.
        got: list[float] = []
        with pytest.raises(TimeoutError):
            got.extend(ex.map(nap, [0.2] * 6, timeout=0.5))
        assert len(got) < 6


def cancel_behind_a_blocker(
    backend: str, tmp_path: Path
) -> tuple[concurrent.futures.Future[str], list[concurrent.futures.Future[int]]]:
    """One worker busy, 20 calls queued behind it, then shutdown(cancel_futures=True)."""
    gate = tmp_path / "release"
    started = tmp_path / "started"
    ex = make_executor(backend, max_workers=1)
    try:
        blocker = ex.submit(wait_for_file, str(gate), str(started))
        queued = [ex.submit(square, i) for i in range(20)]
        # Only a task not yet running can be cancelled: make sure the blocker runs.
        deadline = time.monotonic() + 10.0
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert started.exists(), "the first task never started"
        ex.shutdown(wait=False, cancel_futures=True)
    finally:
        gate.touch()
    assert blocker.result(timeout=30) == "released"
    ex.shutdown(wait=True)
    return blocker, queued


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_executor_shutdown_cancel_futures(backend: str, tmp_path: Path) -> None:
    _, queued = cancel_behind_a_blocker(backend, tmp_path)
    assert all(f.done() for f in queued)
    cancelled = sum(f.cancelled() for f in queued)
    # One worker was busy: at most a task or two had gone further than the queue.
    assert cancelled >= 15, f"only {cancelled} of 20 queued futures were cancelled"
    for i, f in enumerate(queued):
        if not f.cancelled():
            assert f.result() == i * i


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_futures_cancelled_by_shutdown_count_as_done_for_wait(backend: str, tmp_path: Path) -> None:
    """Stricter than the stdlib, whose executors leave such futures CANCELLED, not
    CANCELLED_AND_NOTIFIED, so that ``wait()`` and ``as_completed()`` never see them
    finish: "nothing ever hangs" (DESIGN.md §3) includes a waiter on a cancelled future.
    """
    _, queued = cancel_behind_a_blocker(backend, tmp_path)
    _, not_done = concurrent.futures.wait(queued, timeout=5)
    assert not not_done, f"{len(not_done)} futures never count as done for wait()"
    assert len(list(concurrent.futures.as_completed(queued, timeout=5))) == len(queued)


def test_executor_works_with_run_in_executor(backend: str) -> None:
    async def main(ex: concurrent.futures.Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(8))))

    with make_executor(backend) as ex:
        assert asyncio.run(main(ex)) == [i * i for i in range(8)]


def test_a_thread_task_can_see_that_its_call_was_given_up() -> None:
    # Threads cannot be stopped from outside: a long task may look at
    # current_worker().cancelled and return early (issue 8: after an interrupt).
    noticed = threading.Event()

    def patient(x: int) -> int:
        if x == 0:
            return 0
        deadline = time.monotonic() + 10
        while not fenfa.current_worker().cancelled and time.monotonic() < deadline:
            time.sleep(0.002)  # the task's own polling, not the test's synchronisation
        if fenfa.current_worker().cancelled:
            noticed.set()
        return x

    assert fenfa.current_worker().cancelled is False
    results = fenfa.imap(patient, range(3), backend="thread", workers=2, chunksize=1)
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    assert noticed.wait(5), "the running task never saw its call cancelled"
