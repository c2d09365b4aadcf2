"""The process backend's own promises: function shipping, crashes, broken pools.

The full torture table of faults is issue 4's (tests/test_faults.py); these
are the cases the core already has to get right to never hang.
"""

from __future__ import annotations

import functools
import gc
import operator
import os
import signal
import threading
from typing import Any

import pytest

import fenfa
from fenfa.backends import _handle, _protocol


def square(x: int) -> int:
    return x * x


def make_adder(n: int) -> Any:
    return lambda x: x + n


def test_the_function_is_sent_once_per_worker_not_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kinds: list[bytes] = []
    original = _handle.frame  # (FUNC frames are made there, by the worker's handle)

    def counting_frame(kind: bytes, header: Any, body: bytes = b"") -> bytes:
        kinds.append(kind)
        return original(kind, header, body)

    monkeypatch.setattr(_handle, "frame", counting_frame)
    with fenfa.Pool("process", 2) as pool:
        assert pool.map(square, range(1000), chunksize=10) == [x * x for x in range(1000)]
    assert 1 <= kinds.count(_protocol.FUNC) <= 2


def test_a_worker_keeps_many_functions_and_evicts_in_step_with_the_parent() -> None:
    # One worker, more distinct functions than its cache holds, then the first
    # ones again: the parent must know they were evicted and send them anew.
    count = _protocol.FUNCTION_CACHE_SIZE + 8
    adders = [make_adder(n) for n in range(count)]
    with fenfa.Pool("process", 1) as pool:
        for _ in range(2):
            for n, adder in enumerate(adders):
                assert pool.map(adder, [1, 2]) == [1 + n, 2 + n]


def kill_self_at(x: int, at: int, sig: int) -> int:
    if x == at:
        os.kill(os.getpid(), sig)
    return x


def exit_at(x: int, at: int) -> int:
    if x == at:
        os._exit(3)
    return x


@pytest.mark.parametrize("chunksize", [1, 50, None])
def test_a_killed_worker_fails_only_its_task_and_is_replaced(chunksize: int | None) -> None:
    with fenfa.Pool("process", 2) as pool:
        results = pool.starmap(
            kill_self_at,
            [(x, 77, signal.SIGKILL) for x in range(300)],
            on_error="return",
            chunksize=chunksize,
        )
        crashed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        assert crashed == [77]
        error = results[77]
        assert isinstance(error, fenfa.WorkerCrashed)
        assert error.index == 77
        assert error.exitcode == -signal.SIGKILL
        assert "SIGKILL" in str(error)
        assert [r for i, r in enumerate(results) if i != 77] == [x for x in range(300) if x != 77]
        assert pool.map(square, range(10)) == [x * x for x in range(10)]


def test_the_workers_function_cache_holds_what_its_mirror_says() -> None:
    """The worker evicts only what the parent names: a drifted mirror costs a resend, not a crash.

    The soak once saw a worker die of ``KeyError`` on a function key: its
    cache had evicted by its own count a key the parent's mirror still held
    (a segment released by a finalizer in the middle of a hand-over drops
    keys from the mirror ahead of the FUNC frame). Here the drift is made
    by hand: the mirror forgets its newest key, which the worker still holds.
    """
    size = _protocol.FUNCTION_CACHE_SIZE
    with fenfa.Pool("process", 1) as pool:
        functions = [functools.partial(operator.add, i) for i in range(size)]
        for i, fn in enumerate(functions):
            assert pool.map(fn, [1], chunksize=1) == [i + 1]
        backend = pool._backend
        assert backend is not None
        (worker,) = backend._workers.values()  # type: ignore[attr-defined]
        pid = worker.process.pid
        worker.functions.popitem(last=True)
        assert pool.map(functools.partial(operator.add, 1000), [1]) == [1001]
        # The oldest function: the mirror still holds it, so it is not resent.
        assert pool.map(functions[0], [1]) == [1]
        assert [w.process.pid for w in backend._workers.values()] == [pid]  # type: ignore[attr-defined]


def test_an_exit_code_is_reported() -> None:
    with fenfa.Pool("process", 2) as pool, pytest.raises(fenfa.WorkerCrashed) as info:
        pool.map(exit_at, range(5), [2] * 5)
    assert info.value.exitcode == 3
    assert info.value.index == 2
    assert "exited with code 3" in str(info.value)


def test_a_crashed_task_is_retried() -> None:
    with fenfa.Pool("process", 2) as pool:
        results = pool.starmap(
            kill_self_at, [(x, 3, signal.SIGKILL) for x in range(6)], retries=1, on_error="return"
        )
    # It crashes on every attempt: the error says so.
    assert isinstance(results[3], fenfa.WorkerCrashed)
    assert any("after 2 attempts" in note for note in results[3].__notes__)


def failing_initializer() -> None:
    raise LookupError("no model file")


def test_a_failing_initializer_fails_every_task_without_hanging() -> None:
    with fenfa.Pool("process", 2, initializer=failing_initializer) as pool:
        results = pool.map(square, range(5), on_error="return")
        assert all(isinstance(r, LookupError) for r in results)
        assert any("initializer" in note for note in results[0].__notes__)
        future = pool.submit(square, 3)
        with pytest.raises(LookupError):
            future.result(timeout=30)


def test_workers_that_die_at_start_do_not_respawn_forever() -> None:
    with fenfa.Pool("process", 2, initializer=os._exit, initargs=(4,)) as pool:
        results = pool.map(square, range(4), on_error="return")
    assert all(isinstance(r, fenfa.WorkerCrashed) for r in results)


class NeedsTwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle rebuilds with one arg: fails
        super().__init__(f"{a}-{b}")


def raise_needs_two_args(x: int) -> int:
    raise NeedsTwoArgs(x, x + 1)


def raise_with_a_lock(x: int) -> int:
    raise ValueError("holds a lock", threading.Lock())


def test_an_exception_whose_init_differs_keeps_its_type() -> None:
    with fenfa.Pool("process", 1) as pool, pytest.raises(NeedsTwoArgs) as info:
        pool.map(raise_needs_two_args, [5])
    assert info.value.args == ("5-6",)


def test_an_exception_that_cannot_be_pickled_still_names_its_type() -> None:
    with fenfa.Pool("process", 1) as pool, pytest.raises(Exception) as info:
        pool.map(raise_with_a_lock, [5])
    assert "ValueError" in str(info.value)
    assert "holds a lock" in str(info.value)
    assert "raise_with_a_lock" in str(info.value.__cause__)


def test_shutdown_waits_for_submitted_work() -> None:
    pool = fenfa.Pool("process", 2)
    futures = [pool.submit(square, x) for x in range(20)]
    pool.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [x * x for x in range(20)]
    with pytest.raises(fenfa.PoolClosed):
        pool.submit(square, 1)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_dropped_pool_lets_its_workers_go(backend: str) -> None:
    # No shutdown(): garbage collection of the pool stops its workers, as
    # concurrent.futures' executors do. The leak fixture fails this test if
    # any thread or process of the pool is still alive after it.
    pool = fenfa.Pool(backend, 2)
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    del pool
    gc.collect()
