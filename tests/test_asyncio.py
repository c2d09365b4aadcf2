"""The async backend, and ``amap``/``aimap`` for callers inside an event loop.

The first part is a contract-style subset: each task function of the
contract suite has an ``async def`` twin here, and the async backend's
answer for the twin must equal the serial backend's (the oracle) for the
original. The rest covers what only asyncio has: the concurrency bound,
cancellation, plain functions on the loop's side, and the async entry points.

Concurrency tests synchronise with asyncio events and counters, never with
sleeps; every wait has a deadline so a broken pool fails, it does not hang.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import fenfa
from fenfa.backends.asyncio import AsyncBackend
from fenfa.errors import PoolClosed, RemoteTraceback, TaskTimeout
from fenfa.tasks import Batch, Job, Piece, Style
from helpers import endless

#: Upper bound for any single gate wait: far above what a correct run needs.
DEADLINE = 10.0

# --------------------------------------------------------------------------- tasks and twins


class Boom(Exception):
    """A user exception: fenfa must hand it back with this very type."""


def square(x: int) -> int:
    return x * x


async def asquare(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


async def aadd(x: int, y: int = 0) -> int:
    await asyncio.sleep(0)
    return x + y


def shout(s: str) -> str:
    if s.startswith("bad"):
        raise Boom(f"refused {s}")
    return s.upper()


async def ashout(s: str) -> str:
    await asyncio.sleep(0)
    if s.startswith("bad"):
        raise Boom(f"refused {s}")
    return s.upper()


#: attempts per key, for the flaky twins (tasks of the async backend run in this process)
ATTEMPTS: collections.Counter[Any] = collections.Counter()


def flaky(failures: int, x: int) -> int:
    ATTEMPTS["sync", x] += 1
    if ATTEMPTS["sync", x] <= failures:
        raise Boom(f"attempt {ATTEMPTS['sync', x]} for {x}")
    return x * 10


async def aflaky(failures: int, x: int) -> int:
    await asyncio.sleep(0)
    ATTEMPTS["async", x] += 1
    if ATTEMPTS["async", x] <= failures:
        raise Boom(f"attempt {ATTEMPTS['async', x]} for {x}")
    return x * 10


async def hang(_: object = None) -> None:
    await asyncio.Event().wait()  # nobody sets it: only cancellation ends it


async def a_who(_: object = None) -> tuple[Any, ...]:
    info = fenfa.current_worker()
    return info.id, info.backend, info.thread_name


def who(_: object = None) -> tuple[Any, ...]:
    info = fenfa.current_worker()
    return info.id, info.backend, info.thread_name


async def bump_state(_: object) -> int:
    state = fenfa.current_worker().state
    state["n"] = state.get("n", 0) + 1
    return int(state["n"])


async def read_state(_: object) -> Any:
    return fenfa.current_worker().state.get("tag")


def init_tag(tag: str) -> None:
    fenfa.current_worker().state["tag"] = tag


async def ainit_tag(tag: str) -> None:
    await asyncio.sleep(0)
    fenfa.current_worker().state["tag"] = tag


def init_fails() -> None:
    raise Boom("init")


async def raise_keyboard_interrupt(_: object) -> None:
    raise KeyboardInterrupt


ITEMS = [f"ok-{i}" for i in range(10)]
ITEMS[3] = "bad-3"


def oracle(method: str, fn: Callable[..., Any], *iterables: Any, **opts: Any) -> list[Any]:
    return list(getattr(fenfa, method)(fn, *iterables, backend="serial", **opts))


def assert_task_error(exc: BaseException, index: int, item: object, fn_name: str) -> None:
    assert type(exc) is Boom, f"expected the user's own type, got {type(exc)!r}"
    assert isinstance(exc.__cause__, RemoteTraceback), exc.__cause__
    assert fn_name in str(exc.__cause__)
    notes = getattr(exc, "__notes__", [])
    pattern = re.compile(rf"^fenfa: task {index} failed")
    assert any(pattern.search(n) and repr(item) in n for n in notes), notes


def error_summary(exc: BaseException) -> tuple[type[BaseException], str, list[str]]:
    return type(exc), str(exc), list(getattr(exc, "__notes__", []))


def async_pool(**opts: Any) -> fenfa.Pool:
    return fenfa.Pool("async", **{"workers": 4, **opts})


# --------------------------------------------------------------------------- the contract subset

TWINS: list[tuple[str, Callable[..., Any], Callable[..., Any], list[Any]]] = [
    ("map", square, asquare, [list(range(200))]),
    ("imap", square, asquare, [list(range(200))]),
    ("starmap", add, aadd, [[(i, 3 * i) for i in range(100)]]),
    ("map", add, aadd, [list(range(10)), [10, 20, 30]]),
    ("map", square, asquare, [[]]),
    ("map", square, asquare, [[7]]),
]


@pytest.mark.parametrize("chunksize", [None, 1, 7])
@pytest.mark.parametrize(
    ("method", "fn", "twin", "iterables"), TWINS, ids=[f"{t[0]}-{t[1].__name__}" for t in TWINS]
)
def test_results_and_order_match_the_serial_oracle(
    method: str,
    fn: Callable[..., Any],
    twin: Callable[..., Any],
    iterables: list[Any],
    chunksize: int | None,
) -> None:
    expected = oracle(method, fn, *iterables)
    got = getattr(fenfa, method)(twin, *iterables, backend="async", chunksize=chunksize)
    assert list(got) == expected
    with async_pool() as pool:
        assert list(getattr(pool, method)(twin, *iterables, chunksize=chunksize)) == expected


def test_imap_unordered_gives_the_same_multiset() -> None:
    data = [i % 17 for i in range(200)]
    got = fenfa.imap_unordered(asquare, data, backend="async", workers=8)
    assert collections.Counter(got) == collections.Counter(oracle("imap", square, data))


def test_ten_thousand_items_and_the_single_call_methods() -> None:
    data = range(10_000)
    assert fenfa.map(asquare, data, backend="async") == oracle("map", square, data)
    with async_pool() as pool:
        assert pool.submit(aadd, 2, y=5).result(DEADLINE) == 7
        assert pool.apply(aadd, (2,), {"y": 5}) == 7
        assert pool.map_async(asquare, range(20)).result(DEADLINE) == [x * x for x in range(20)]
    assert fenfa.run(aadd, 2, 5, backend="async") == 7


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_errors_keep_type_cause_and_note_as_serial(method: str) -> None:
    with pytest.raises(Boom) as serial:
        oracle(method, shout, ITEMS)
    with pytest.raises(Boom) as info:
        list(getattr(fenfa, method)(ashout, ITEMS, backend="async", workers=2))
    assert_task_error(info.value, 3, "bad-3", "ashout")
    assert error_summary(info.value) == error_summary(serial.value)


def test_imap_yields_the_results_before_the_failing_index() -> None:
    got: list[str] = []
    with pytest.raises(Boom):
        got.extend(fenfa.imap(ashout, ITEMS, backend="async", workers=3))
    assert got == ["OK-0", "OK-1", "OK-2"]


@pytest.mark.parametrize("on_error", ["return", "skip"])
@pytest.mark.parametrize("method", ["map", "imap"])
def test_on_error_modes_match_serial(method: str, on_error: str) -> None:
    expected = oracle(method, shout, ITEMS, on_error=on_error)
    got = list(getattr(fenfa, method)(ashout, ITEMS, backend="async", on_error=on_error))

    def comparable(values: list[Any]) -> list[Any]:
        return [error_summary(v) if isinstance(v, BaseException) else v for v in values]

    assert comparable(got) == comparable(expected)
    if on_error == "return":
        assert_task_error(got[3], 3, "bad-3", "ashout")


def test_retries_rerun_a_failed_task_as_serial_does() -> None:
    ATTEMPTS.clear()
    expected = oracle("starmap", flaky, [(2, x) for x in range(5)], retries=2)
    got = fenfa.starmap(aflaky, [(2, x) for x in range(5)], backend="async", retries=2)
    assert got == expected == [x * 10 for x in range(5)]
    assert [ATTEMPTS["async", x] for x in range(5)] == [3] * 5
    ATTEMPTS.clear()
    with pytest.raises(Boom) as info:
        fenfa.starmap(aflaky, [(5, 1)], backend="async", retries=1)
    assert ATTEMPTS["async", 1] == 2
    assert any("after 2 attempts" in n for n in info.value.__notes__)


def test_timeout_cancels_the_task_promptly() -> None:
    begin = time.monotonic()
    with async_pool(timeout=0.2) as pool:
        got = pool.map(hang, [0, 1], on_error="return")
        assert pool.map(asquare, [3]) == [9]  # the pool is still fine
    assert time.monotonic() - begin < 3.0
    for index, error in enumerate(got):
        assert isinstance(error, TaskTimeout)
        assert (error.index, error.limit) == (index, 0.2)


def test_a_task_that_raises_timeout_error_itself_is_not_a_task_timeout() -> None:
    async def own_timeout(_: object) -> None:
        raise TimeoutError("mine")

    with async_pool(timeout=5) as pool, pytest.raises(TimeoutError, match="mine") as info:
        pool.map(own_timeout, [0])
    assert not isinstance(info.value, TaskTimeout)


def test_at_most_workers_coroutines_in_flight() -> None:
    workers = 3
    seen = {"now": 0, "max": 0}
    gate: dict[str, asyncio.Event] = {}

    async def counted(x: int) -> int:
        event = gate.setdefault("all-in", asyncio.Event())  # on the backend's loop
        seen["now"] += 1
        seen["max"] = max(seen["max"], seen["now"])
        if seen["now"] == workers:
            event.set()  # the bound is reached: everyone may go on
        try:
            await asyncio.wait_for(event.wait(), DEADLINE)
        finally:
            seen["now"] -= 1
        return x

    with fenfa.Pool("async", workers=workers) as pool:
        assert pool.map(counted, range(30), chunksize=5) == list(range(30))
    assert seen["max"] == workers


def test_keyboard_interrupt_in_a_coroutine_is_that_tasks_failure() -> None:
    with async_pool() as pool:
        with pytest.raises(KeyboardInterrupt):
            pool.map(raise_keyboard_interrupt, [0])
        assert pool.map(asquare, [2]) == [4]  # the loop survived


def test_plain_functions_run_in_threads_without_blocking_the_loop() -> None:
    release = threading.Event()

    def blocks(x: int) -> int:
        if x == 0:
            assert release.wait(DEADLINE)
        return x

    async def releases(_: object) -> None:
        release.set()

    with async_pool() as pool:
        first = pool.submit(blocks, 0)
        pool.submit(releases, None).result(DEADLINE)  # the loop is free meanwhile
        assert first.result(DEADLINE) == 0
        assert pool.map(square, range(20)) == oracle("map", square, range(20))
        assert pool.map(lambda x: asquare(x), range(5)) == [0, 1, 4, 9, 16]
        worker_id, backend, _thread = pool.apply(who)
        assert (worker_id, backend) == (0, "async")


def test_current_worker_and_state_inside_coroutines() -> None:
    with async_pool(workers=3) as pool:
        infos = set(pool.map(a_who, range(10)))
        assert infos == {(0, "async", "fenfa-async-loop")}
        assert sorted(pool.map(bump_state, range(5))) == [1, 2, 3, 4, 5]
    assert fenfa.current_worker().backend is None


@pytest.mark.parametrize("initializer", [init_tag, ainit_tag])
def test_initializer_runs_before_the_first_task(initializer: Callable[..., Any]) -> None:
    with fenfa.Pool("async", workers=2, initializer=initializer, initargs=("hello",)) as pool:
        assert pool.map(read_state, range(4)) == ["hello"] * 4


def test_a_failing_initializer_fails_every_task() -> None:
    with fenfa.Pool("async", workers=2, initializer=init_fails) as pool:
        with pytest.raises(Boom) as info:
            pool.map(asquare, range(3))
        assert any("initializer init_fails" in n for n in info.value.__notes__)
        with pytest.raises(Boom):
            pool.submit(asquare, 1).result(DEADLINE)


def test_max_tasks_per_worker_renews_the_state() -> None:
    with fenfa.Pool("async", workers=1, max_tasks_per_worker=2) as pool:
        assert pool.map(bump_state, range(5), chunksize=1) == [1, 2, 1, 2, 1]


def test_shutdown_waits_for_running_tasks() -> None:
    pool = async_pool()
    future = pool.submit(aadd, 1, 2)
    pool.shutdown(wait=True)
    assert future.result(0) == 3
    with pytest.raises(PoolClosed):
        pool.submit(asquare, 1)
    pool.shutdown()  # idempotent


def test_shutdown_with_cancel_stops_hung_tasks_after_the_grace() -> None:
    started = threading.Event()

    async def hangs(_: object) -> None:
        started.set()
        await hang()

    pool = async_pool(workers=1)
    running = pool.submit(hangs, None)
    queued = pool.submit(hang)
    assert started.wait(DEADLINE)
    begin = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begin < 3.0
    assert queued.cancelled()
    with pytest.raises(PoolClosed):
        running.result(0)


# --------------------------------------------------------------------------- the backend itself


class Recorder:
    """A job's deliver: collects the pieces, and wakes a waiter per report."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.reported = threading.Semaphore(0)

    def __call__(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        self.pieces.extend(pieces)
        self.reported.release()


def test_abandon_cancels_the_jobs_running_tasks_without_reporting_them() -> None:
    cancelled = threading.Event()
    started = threading.Event()

    async def hangs(_: object) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    backend = AsyncBackend(2)
    try:
        recorder = Recorder()
        job = Job(hangs, Style.ONE, recorder)
        backend.submit(Batch(job, 0, [0, 1, 2, 3]))
        assert started.wait(DEADLINE)
        backend.abandon(job)
        assert cancelled.wait(DEADLINE)
        other = Recorder()
        backend.submit(Batch(Job(asquare, Style.ONE, other), 0, [3]))
        assert other.reported.acquire(timeout=DEADLINE)
    finally:
        backend.shutdown(wait=True)
    assert recorder.pieces == []
    assert backend.idle()


def test_submit_after_the_loop_stopped_fails_the_batch() -> None:
    backend = AsyncBackend(1)
    backend.shutdown(wait=True)
    recorder = Recorder()
    backend.submit(Batch(Job(asquare, Style.ONE, recorder), 0, [1, 2]))
    assert [type(p.error) for p in recorder.pieces] == [PoolClosed, PoolClosed]  # type: ignore[union-attr]


def test_default_workers_is_io_sized() -> None:
    with fenfa.Pool("async") as pool:
        assert pool.workers == 100


# --------------------------------------------------------------------------- amap / aimap


async def agen(n: int, log: list[int] | None = None) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        if log is not None:
            log.append(i)
        yield i


def test_amap_with_coroutines_on_sync_and_async_inputs() -> None:
    async def main() -> None:
        loop_thread = threading.current_thread()
        assert await fenfa.amap(asquare, range(50)) == [x * x for x in range(50)]
        assert await fenfa.amap(asquare, agen(50), workers=3) == [x * x for x in range(50)]
        assert await fenfa.amap(asquare, []) == []
        # on the caller's own loop, not on a backend thread
        assert {t for _, _, t in await fenfa.amap(a_who, range(3))} == {loop_thread.name}

    asyncio.run(main())


def test_amap_with_plain_functions_does_not_block_the_loop() -> None:
    release = threading.Event()

    def blocks(x: int) -> int:
        assert release.wait(DEADLINE)
        return x * x

    async def main() -> None:
        assert await fenfa.amap(square, range(20), backend="process") == oracle(
            "map", square, range(20)
        )
        assert await fenfa.amap(square, agen(20), backend="thread") == oracle(
            "map", square, range(20)
        )
        call = asyncio.ensure_future(fenfa.amap(blocks, range(4), backend="thread", workers=2))
        await asyncio.sleep(0)  # let it start; the loop must stay free
        release.set()
        assert await call == [0, 1, 4, 9]

    asyncio.run(main())


@pytest.mark.parametrize("ordered", [True, False])
def test_aimap_ordered_and_unordered(ordered: bool) -> None:
    """Item 0 finishes only after item 1: unordered yields 1 first."""

    async def main() -> list[int]:
        one_done = asyncio.Event()

        async def fn(x: int) -> int:
            if x == 0:
                await asyncio.wait_for(one_done.wait(), DEADLINE)
            if x == 1 and ordered:
                one_done.set()
            return x

        got = []
        async for r in fenfa.aimap(fn, range(6), ordered=ordered, workers=3):
            got.append(r)
            if r == 1:
                # Unordered: item 0 can only end after 1 has been handed over.
                one_done.set()
        return got

    got = asyncio.run(main())
    assert sorted(got) == list(range(6))
    if ordered:
        assert got == list(range(6))
    else:
        assert got.index(1) < got.index(0)


@pytest.mark.parametrize("plain", [False, True], ids=["coroutine", "plain"])
def test_amap_error_has_type_cause_and_note_as_serial(plain: bool) -> None:
    with pytest.raises(Boom) as serial:
        oracle("map", shout, ITEMS)
    fn, opts = (shout, {"backend": "thread"}) if plain else (ashout, {})
    with pytest.raises(Boom) as info:
        asyncio.run(fenfa.amap(fn, ITEMS, **opts))
    assert_task_error(info.value, 3, "bad-3", fn.__name__)
    assert error_summary(info.value) == error_summary(serial.value)


@pytest.mark.parametrize("plain", [False, True], ids=["coroutine", "plain"])
def test_aimap_on_error_retries_and_ordered_errors(plain: bool) -> None:
    fn: Callable[..., Any] = shout if plain else ashout
    opts: dict[str, Any] = {"backend": "thread"} if plain else {}

    async def collect(**more: Any) -> list[Any]:
        return [r async for r in fenfa.aimap(fn, ITEMS, **opts, **more)]

    returned = asyncio.run(collect(on_error="return"))
    assert isinstance(returned[3], Boom)
    assert_task_error(returned[3], 3, "bad-3", fn.__name__)
    assert asyncio.run(collect(on_error="skip")) == oracle("map", shout, ITEMS, on_error="skip")

    got: list[str] = []

    async def until_error() -> None:
        async for r in fenfa.aimap(fn, ITEMS, **opts):
            got.append(r)

    with pytest.raises(Boom):
        asyncio.run(until_error())
    assert got == ["OK-0", "OK-1", "OK-2"]

    ATTEMPTS.clear()
    with pytest.raises(Boom) as info:
        asyncio.run(fenfa.amap(ashout, ["bad"], retries=2))
    assert any("after 3 attempts" in n for n in info.value.__notes__)


def test_amap_retries_a_coroutine() -> None:
    ATTEMPTS.clear()

    async def twice(x: int) -> int:
        return await aflaky(2, x)

    assert asyncio.run(fenfa.amap(twice, range(4), retries=2)) == [0, 10, 20, 30]
    assert [ATTEMPTS["async", x] for x in range(4)] == [3] * 4


@pytest.mark.parametrize("plain", [False, True], ids=["coroutine", "plain"])
def test_amap_timeout(plain: bool) -> None:
    release = threading.Event()

    def blocks(_: object) -> None:
        release.wait(DEADLINE)

    fn, opts = (blocks, {"backend": "thread"}) if plain else (hang, {})
    begin = time.monotonic()
    try:
        got = asyncio.run(fenfa.amap(fn, [0, 1], timeout=0.2, on_error="return", **opts))
    finally:
        release.set()
    assert time.monotonic() - begin < 3.0
    assert [type(e) for e in got] == [TaskTimeout, TaskTimeout]
    assert [e.index for e in got] == [0, 1]
    assert [str(e).startswith(f"task {i} ") for i, e in enumerate(got)] == [True, True]


@pytest.mark.parametrize("source", ["sync", "async"])
def test_aimap_pulls_input_lazily_within_the_window(source: str) -> None:
    async def main() -> None:
        pulled: list[int] = []
        started = 0
        two_started = asyncio.Event()
        gate = asyncio.Event()

        async def fn(x: int) -> int:
            nonlocal started
            started += 1
            if started == 2:
                two_started.set()
            await asyncio.wait_for(gate.wait(), DEADLINE)
            return x

        def sync_source() -> Iterator[int]:
            for i in endless():
                pulled.append(i)
                yield i

        inputs: Any = sync_source() if source == "sync" else agen(10**6, pulled)
        results = fenfa.aimap(fn, inputs, workers=2, window=4)
        first = asyncio.ensure_future(anext(results))
        await asyncio.wait_for(two_started.wait(), DEADLINE)
        for _ in range(50):  # loop turns, not time: let the run fill its window
            await asyncio.sleep(0)
        assert len(pulled) == 4  # the window, not the input
        assert started == 2  # the workers bound
        gate.set()
        assert await first == 0
        taken = [await anext(results) for _ in range(20)]
        assert taken == list(range(1, 21))
        assert len(pulled) <= 21 + 4
        await results.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_cancelling_the_caller_cancels_pending_coroutines() -> None:
    async def main() -> None:
        pulled: list[int] = []
        started: list[int] = []
        cancelled: list[int] = []
        two_started = asyncio.Event()

        async def fn(x: int) -> None:
            started.append(x)
            if len(started) == 2:
                two_started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise

        call = asyncio.ensure_future(fenfa.amap(fn, agen(100, pulled), workers=2, window=4))
        await asyncio.wait_for(two_started.wait(), DEADLINE)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(3):
            await asyncio.sleep(0)  # let the cancelled tasks run their handlers
        assert sorted(cancelled) == [0, 1]
        assert started == [0, 1]  # what was pulled beyond them never started
        assert 2 <= len(pulled) <= 4  # the window bounds the pulls

    asyncio.run(main())


def test_cancelling_the_caller_drops_plain_calls_not_started() -> None:
    ran: list[int] = []
    release = threading.Event()
    first_running = threading.Event()

    def blocks(x: int) -> int:
        ran.append(x)
        first_running.set()
        assert release.wait(DEADLINE)
        return x

    async def main() -> None:
        call = asyncio.ensure_future(fenfa.amap(blocks, range(10), backend="thread", workers=1))
        await asyncio.to_thread(first_running.wait, DEADLINE)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    release.set()
    # One worker, first in first out: once this call has run, anything still
    # queued from the cancelled one would have run before it.
    assert fenfa.map(square, [5], backend="thread", workers=1) == [25]
    assert ran == [0]


def test_options_are_checked_at_the_call() -> None:
    with pytest.raises(TypeError, match="chunk_size"):
        fenfa.aimap(asquare, [1], chunk_size=3)
    with pytest.raises(ValueError, match="window"):
        fenfa.aimap(asquare, [1], window=0)
    with pytest.raises(ValueError, match="on_error"):
        fenfa.aimap(asquare, [1], on_error="ignore")
    with pytest.raises(ValueError, match="coroutine function"):
        fenfa.aimap(asquare, [1], backend="process")
    with pytest.raises(TypeError, match="Pool option"):
        fenfa.aimap(asquare, [1], initializer=init_tag)
    with pytest.raises(TypeError, match="callable"):
        fenfa.aimap(42, [1])  # type: ignore[arg-type]


def test_a_pool_shut_down_before_its_loop_started_does_not_hang() -> None:
    # shutdown() right after the pool is made can reach the loop while it is
    # still running the initializer step; it must stop, not run forever.
    for _ in range(100):
        with async_pool() as pool:
            assert pool.map(asquare, []) == []
