"""The contract suite: every backend gives serial's results, order and errors.

Each test runs once per backend (the ``backend`` fixture in conftest.py) and
compares with the serial backend, the oracle, for the same call; serial is in
turn checked against the builtins. A section on promises of DESIGN.md that
the issue does not list one by one (exceptions pickle cannot rebuild, calls
from several threads, Ctrl-C, big frames, callbacks, failing initializers)
comes next, and process-only promises (lambdas and ``__main__`` functions,
start methods, worker recycling) close the file.

Task functions live at module level so that they pickle by reference; the
tests that are about pickling by value (lambdas, closures, ``__main__``) say so.
Cross-process gates are marker files in ``tmp_path``, polled with a deadline:
waiting for a condition, never sleeping for an amount of time and hoping.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import fenfa
from fenfa.errors import RemoteTraceback
from helpers import endless, wait_for

# --------------------------------------------------------------------------- tasks


class Boom(Exception):
    """A user exception: fenfa must hand it back with this very type."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def shout(s: str) -> str:
    """Upper-cases its input; refuses inputs that start with "bad"."""
    if s.startswith("bad"):
        raise Boom(f"refused {s}")
    return s.upper()


def fail_at_five(x: int) -> int:
    if x == 5:
        raise Boom("five")
    return x


def always_fail(x: object) -> None:
    raise Boom("always")


def mark_done(directory: str, x: int) -> int:
    """Leaves a marker when the task has run, so the test can see what finished."""
    (Path(directory) / f"done-{x}").touch()
    return x * x


def first_waits_for_others(directory: str, others: int, x: int) -> int:
    """Item 0 finishes only after items 1..others have (or after a deadline).

    Gives an ordered ``imap`` the situation it must not buffer its way out of:
    the head of the line is slow while the tasks behind it complete.
    """
    d = Path(directory)
    if x == 0 and fenfa.current_worker().backend != "serial":
        # The deadline only matters for a pool that queued item 0 and one of
        # the others on the same worker; a correct pool never waits it out.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not all(
            (d / f"done-{i}").exists() for i in range(1, others + 1)
        ):
            time.sleep(0.002)
    (d / f"done-{x}").touch()
    return x * x


def fail_zero_others_wait(directory: str, x: int) -> int:
    """Task 0 fails at once; every other task waits for a gate the test opens later."""
    d = Path(directory)
    (d / f"started-{x}").touch()
    if x == 0:
        raise Boom("zero")
    if fenfa.current_worker().backend == "serial":
        return x  # in the caller's thread: nobody else could open the gate
    deadline = time.monotonic() + 20.0
    while not (d / "gate").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    return x


def flaky(directory: str, failures: int, x: int) -> int:
    """Fails the first ``failures`` attempts for ``x``; every attempt is logged in a file."""
    log = Path(directory) / f"attempts-{x}"
    with log.open("a") as f:
        f.write(".")
    attempt = len(log.read_text())
    if attempt <= failures:
        raise Boom(f"attempt {attempt} for {x}")
    return x * 10


def who(_: object = None) -> tuple[Any, ...]:
    info = fenfa.current_worker()
    return (info.id, info.pid, info.process_name, info.thread_name, info.backend)


def who_after_rendezvous(directory: str, parties: int, x: int) -> tuple[Any, ...]:
    """Arrives, then waits for ``parties`` arrivals: they must be on different workers."""
    d = Path(directory)
    (d / f"arrived-{x}").touch()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and len(list(d.glob("arrived-*"))) < parties:
        time.sleep(0.002)
    return who()


def bump_state(_: object) -> tuple[int | None, int]:
    state = fenfa.current_worker().state
    state["n"] = state.get("n", 0) + 1
    return fenfa.current_worker().id, state["n"]


def init_state(tag: str) -> None:
    state = fenfa.current_worker().state
    state["tag"] = tag
    state["inits"] = state.get("inits", 0) + 1


def read_init_state(x: int) -> tuple[int, Any, Any, int]:
    state = fenfa.current_worker().state
    return x * x, state.get("tag"), state.get("inits"), os.getpid()


def make_lock(_: object) -> Any:
    return threading.Lock()


def identity(x: Any) -> Any:
    return x


def getpid(_: object = None) -> int:
    return os.getpid()


#: Set to another value by a test *after* import: a forked worker sees the new
#: value, a spawned or forkserver worker re-imports this module and sees this one.
PARENT_MARK = "import-time"


def read_parent_mark(_: object) -> str:
    return PARENT_MARK


def numbers_then_error(n: int) -> Iterator[int]:
    yield from range(n)
    raise LookupError("input broke")


#: How far an "endless" input may be pulled before the test calls it drained.


# --------------------------------------------------------------------------- helpers

ITEMS = [f"ok-{i}" for i in range(10)]
ITEMS[3] = "bad-3"
GOOD = [s.upper() for s in ITEMS if not s.startswith("bad")]
# The backends whose tasks run in other processes.
REMOTE = ("process", "dask")


def worker_opts(backend: str) -> dict[str, Any]:
    """Two workers where workers mean something: enough for concurrency, cheap on 2 cores."""
    return {} if backend == "serial" else {"workers": 2}


def make_pool(backend: str, **opts: Any) -> fenfa.Pool:
    return fenfa.Pool(backend=backend, **{**worker_opts(backend), **opts})


def oracle(method: str, fn: Callable[..., Any], *iterables: Any, **opts: Any) -> list[Any]:
    """The serial backend's answer to the same module-level call."""
    return list(getattr(fenfa, method)(fn, *iterables, backend="serial", **opts))


def assert_task_error(exc: BaseException, index: int, item: object, fn_name: str) -> None:
    """A user exception as DESIGN.md §3 promises it: own type, remote traceback, note."""
    assert type(exc) is Boom, f"expected the user's own type, got {type(exc)!r}"
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback), f"__cause__ is {cause!r}"
    assert fn_name in str(cause), f"worker traceback does not name {fn_name}: {cause}"
    notes = getattr(exc, "__notes__", [])
    pattern = re.compile(rf"\btask {index}\b")
    assert any(pattern.search(n) and repr(item) in n for n in notes), (
        f"no note with 'task {index}' and {item!r}: {notes!r}"
    )


class PullCounter:
    """Generator input that records how far the pool pulls ahead of the consumer.

    The pool may refill the slot a result frees before the consumer's
    ``received += 1`` runs, so a correct pool can be seen one item ahead of
    ``window``: the tests allow exactly that one item of slack.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0
        self.received = 0
        self.max_ahead = 0

    def items(self) -> Iterator[int]:
        for i in range(self.n):
            self.pulled += 1
            self.max_ahead = max(self.max_ahead, self.pulled - self.received)
            yield i


# --------------------------------------------------------------------------- results


def test_serial_oracle_agrees_with_builtins() -> None:
    data = list(range(50))
    assert oracle("map", square, data) == list(map(square, data))
    assert oracle("imap", square, data) == list(map(square, data))
    assert sorted(oracle("imap_unordered", square, data)) == sorted(map(square, data))
    pairs = [(i, 2 * i) for i in range(20)]
    assert oracle("starmap", add, pairs) == list(itertools.starmap(add, pairs))


def test_map_matches_serial(backend: str) -> None:
    data = list(range(200))
    got = fenfa.map(square, data, backend=backend, **worker_opts(backend))
    assert isinstance(got, list)
    assert got == oracle("map", square, data)


def test_imap_matches_serial(backend: str) -> None:
    data = list(range(200))
    it = fenfa.imap(square, data, backend=backend, **worker_opts(backend))
    assert not isinstance(it, list)
    assert iter(it) is it, "imap returns an iterator"
    assert list(it) == oracle("imap", square, data)


def test_imap_unordered_gives_the_same_multiset(backend: str) -> None:
    data = [i % 17 for i in range(200)]  # duplicates: compare as a multiset, not a set
    got = fenfa.imap_unordered(square, data, backend=backend, **worker_opts(backend))
    assert collections.Counter(got) == collections.Counter(oracle("imap_unordered", square, data))


def test_starmap_matches_serial(backend: str) -> None:
    pairs = [(i, 3 * i) for i in range(100)]
    got = fenfa.starmap(add, pairs, backend=backend, **worker_opts(backend))
    assert got == oracle("starmap", add, pairs)


def test_pool_methods_match_serial(backend: str) -> None:
    data = list(range(120))
    pairs = [(i, i + 1) for i in range(60)]
    with make_pool(backend) as pool:
        assert pool.map(square, data) == oracle("map", square, data)
        assert list(pool.imap(square, data)) == oracle("imap", square, data)
        assert sorted(pool.imap_unordered(square, data)) == sorted(oracle("map", square, data))
        assert pool.starmap(add, pairs) == oracle("starmap", add, pairs)


def test_several_iterables_stop_at_the_shortest(backend: str) -> None:
    opts = worker_opts(backend)
    expected = list(map(add, range(10), [10, 20, 30]))
    assert oracle("map", add, range(10), [10, 20, 30]) == expected
    assert fenfa.map(add, range(10), [10, 20, 30], backend=backend, **opts) == expected
    assert list(fenfa.imap(add, [10, 20, 30], range(10), backend=backend, **opts)) == expected
    # An endless partner must not be drained: the shortest one ends the call.
    got = fenfa.map(add, range(5), endless(100), backend=backend, **opts)
    assert got == [100 + 2 * i for i in range(5)]
    with make_pool(backend) as pool:
        assert pool.map(add, range(10), [10, 20, 30]) == expected
        unordered = pool.imap_unordered(add, range(10), [10, 20, 30])
        assert sorted(unordered) == sorted(expected)


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered", "starmap"])
def test_empty_input(backend: str, method: str) -> None:
    got = getattr(fenfa, method)(square, [], backend=backend, **worker_opts(backend))
    assert list(got) == []
    with make_pool(backend) as pool:
        assert list(getattr(pool, method)(square, iter([]))) == []


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_one_item(backend: str, method: str) -> None:
    got = getattr(fenfa, method)(square, [7], backend=backend, **worker_opts(backend))
    assert list(got) == [49]
    assert fenfa.starmap(add, [(2, 5)], backend=backend, **worker_opts(backend)) == [7]


def test_ten_thousand_items(backend: str) -> None:
    data = range(10_000)
    expected = oracle("map", square, data)
    assert expected == [x * x for x in data]
    opts = worker_opts(backend)
    assert fenfa.map(square, data, backend=backend, **opts) == expected
    assert list(fenfa.imap(square, iter(data), backend=backend, **opts)) == expected
    assert sorted(fenfa.imap_unordered(square, data, backend=backend, **opts)) == expected


def test_chunksize_and_window_do_not_change_results(backend: str) -> None:
    data = list(range(57))
    expected = oracle("map", square, data)
    with make_pool(backend) as pool:
        for chunksize, window in itertools.product([1, 2, 7, 1000, None], [1, 3, 64, None]):
            opts = {"chunksize": chunksize, "window": window}
            assert pool.map(square, data, **opts) == expected, opts
            assert list(pool.imap(square, iter(data), **opts)) == expected, opts
            assert sorted(pool.imap_unordered(square, data, **opts)) == expected, opts
    # The same options as Pool defaults and on module-level calls.
    with make_pool(backend, chunksize=3, window=2) as pool:
        assert pool.map(square, data) == expected
    got = fenfa.map(square, data, backend=backend, chunksize=5, window=4, **worker_opts(backend))
    assert got == expected


def test_serial_accepts_the_workers_option() -> None:
    assert fenfa.map(square, range(5), backend="serial", workers=3) == [0, 1, 4, 9, 16]


# --------------------------------------------------------------------------- laziness


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_window_bounds_items_pulled_while_consumer_holds_off(
    backend: str, method: str, tmp_path: Path
) -> None:
    window = 4
    src = PullCounter(40)
    fn = functools.partial(mark_done, str(tmp_path))
    results = []
    with make_pool(backend) as pool:
        it = getattr(pool, method)(fn, src.items(), window=window, chunksize=1)
        results.append(next(it))
        src.received += 1
        assert src.pulled <= window + 1, f"pulled {src.pulled} items for one result"
        if backend != "serial":
            # Hold off: do not touch `it` until everything the pool dispatched
            # has run. (The item pulled last may still wait for a free slot.)
            # A pool that keeps pulling while results pile up pulls on until
            # the input runs out, and the assertion below sees it.
            def dispatched_all_ran() -> bool:
                return all((tmp_path / f"done-{i}").exists() for i in range(src.pulled - 1))

            wait_for(dispatched_all_ran, "the dispatched tasks to finish")
        assert src.pulled <= window + 1, (
            f"pulled {src.pulled} items while the consumer held 1 result (window={window})"
        )
        for r in it:
            src.received += 1
            results.append(r)
    assert src.max_ahead <= window + 1, f"pulled {src.max_ahead} ahead of the consumer"
    expected = oracle("map", square, range(40))
    assert (results if method == "imap" else sorted(results)) == expected


def test_ordered_imap_counts_buffered_results_in_the_window(backend: str, tmp_path: Path) -> None:
    """A slow head-of-line task must not let finished results pile up past the window."""
    window = 4
    src = PullCounter(30)
    fn = functools.partial(first_waits_for_others, str(tmp_path), window - 1)
    results = []
    with make_pool(backend) as pool:
        for r in pool.imap(fn, src.items(), window=window, chunksize=1):
            src.received += 1
            results.append(r)
    assert src.max_ahead <= window + 1, f"pulled {src.max_ahead} ahead of the consumer"
    assert results == oracle("map", square, range(30))


def test_map_pulls_input_lazily_and_stops_at_the_first_error(backend: str) -> None:
    # An infinite input: a map that drained its input first would never return.
    with pytest.raises(Boom) as info:
        fenfa.map(fail_at_five, endless(), backend=backend, **worker_opts(backend))
    assert_task_error(info.value, 5, 5, "fail_at_five")


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_infinite_generator(backend: str, method: str) -> None:
    it = getattr(fenfa, method)(square, endless(), backend=backend, **worker_opts(backend))
    got = [r for _, r in zip(range(50), it, strict=False)]
    assert len(got) == 50
    if method == "imap":
        assert got == [x * x for x in range(50)]
    else:
        assert len(set(got)) == 50
        assert all(r == round(r**0.5) ** 2 for r in got)
    with make_pool(backend) as pool:
        got = list(itertools.islice(getattr(pool, method)(square, endless()), 50))
        assert len(got) == 50
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_breaking_out_early_does_not_hang_and_leaves_the_pool_usable(
    backend: str, method: str
) -> None:
    with make_pool(backend) as pool:
        for i, _ in enumerate(getattr(pool, method)(square, endless(), window=8)):
            if i == 10:
                break
        assert pool.map(square, range(30)) == [x * x for x in range(30)]
        assert pool.submit(add, 1, 2).result(timeout=30) == 3
        # Still referenced, never finished: the pool must shut down around it.
        abandoned = getattr(pool, method)(square, range(10_000), chunksize=1)
        next(abandoned)
        assert list(pool.imap(square, range(5))) == [0, 1, 4, 9, 16]
    # The same with a module-level call; the default pool is shut down by the leak check.
    for i, _ in enumerate(getattr(fenfa, method)(square, endless(), backend=backend)):
        if i == 10:
            break
    assert fenfa.map(square, range(5), backend=backend) == [0, 1, 4, 9, 16]
    del abandoned


@pytest.mark.timeout(30)
def test_an_error_in_the_input_iterator_propagates(backend: str) -> None:
    opts = worker_opts(backend)
    with pytest.raises(LookupError, match="input broke"):
        oracle("map", square, numbers_then_error(5))
    with pytest.raises(LookupError, match="input broke"):
        fenfa.map(square, numbers_then_error(5), backend=backend, **opts)
    got: list[int] = []
    with pytest.raises(LookupError, match="input broke"):
        got.extend(fenfa.imap(square, numbers_then_error(5), backend=backend, **opts))
    assert got == [x * x for x in range(len(got))], "results before the error keep their order"
    with make_pool(backend) as pool:
        with pytest.raises(LookupError, match="input broke"):
            list(pool.imap_unordered(square, numbers_then_error(50), chunksize=1))
        assert pool.map(square, range(3)) == [0, 1, 4]


# --------------------------------------------------------------------------- errors


def test_oracle_error_has_type_cause_and_note() -> None:
    with pytest.raises(Boom) as info:
        oracle("map", shout, ITEMS)
    assert_task_error(info.value, 3, "bad-3", "shout")


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_map_raises_the_user_exception_with_cause_and_note(
    backend: str, chunksize: int | None
) -> None:
    with pytest.raises(Boom) as expected:
        oracle("map", shout, ITEMS, chunksize=chunksize)
    with pytest.raises(Boom) as info:
        fenfa.map(shout, ITEMS, backend=backend, chunksize=chunksize, **worker_opts(backend))
    assert_task_error(info.value, 3, "bad-3", "shout")
    assert info.value.args == expected.value.args


def test_map_raises_the_first_failure(backend: str) -> None:
    items = list(ITEMS)
    items[7] = "bad-7"
    with pytest.raises(Boom) as expected:
        oracle("map", shout, items)
    assert_task_error(expected.value, 3, "bad-3", "shout")  # serial meets index 3 first
    with make_pool(backend) as pool, pytest.raises(Boom) as info:
        pool.map(shout, items, chunksize=1)
    index = 3 if "task 3" in "".join(getattr(info.value, "__notes__", [])) else 7
    assert_task_error(info.value, index, items[index], "shout")


def test_map_raises_at_once_and_cancels_the_rest(backend: str, tmp_path: Path) -> None:
    """on_error="raise": the first failure ends the call without waiting for running tasks."""
    fn = functools.partial(fail_zero_others_wait, str(tmp_path))
    with make_pool(backend) as pool:
        start = time.monotonic()
        try:
            with pytest.raises(Boom):
                pool.map(fn, range(20), chunksize=1, window=20)
            elapsed = time.monotonic() - start
        finally:
            (tmp_path / "gate").touch()  # let the running tasks end
    # Tasks 1.. wait up to 20 s for the gate: raising must not wait for them.
    assert elapsed < 10.0, f"map took {elapsed:.1f} s to raise"
    started = len(list(tmp_path.glob("started-*")))
    # Task 0, the two or so already running or handed to a worker; not all twenty.
    assert started <= 5, f"{started} of 20 tasks ran after the call had failed"


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_imap_yields_the_results_before_the_failing_index(
    backend: str, chunksize: int | None
) -> None:
    for backend_name in ("serial", backend):
        got: list[str] = []
        it = fenfa.imap(
            shout, ITEMS, backend=backend_name, chunksize=chunksize, **worker_opts(backend_name)
        )
        with pytest.raises(Boom) as info:
            got.extend(it)
        assert got == GOOD[:3], backend_name
        assert_task_error(info.value, 3, "bad-3", "shout")


def test_imap_unordered_raises_the_user_exception(backend: str) -> None:
    got: list[str] = []
    with make_pool(backend) as pool, pytest.raises(Boom) as info:
        got.extend(pool.imap_unordered(shout, ITEMS, chunksize=1))
    assert_task_error(info.value, 3, "bad-3", "shout")
    assert set(got) <= set(GOOD)


def test_starmap_error_names_the_task(backend: str) -> None:
    pairs = [(i, i) for i in range(6)]
    pairs[4] = (4, "x")  # int + str raises TypeError in the worker
    with pytest.raises(TypeError) as info:
        fenfa.starmap(add, pairs, backend=backend, **worker_opts(backend))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "add" in str(info.value.__cause__)
    assert any(re.search(r"\btask 4\b", n) for n in getattr(info.value, "__notes__", []))


def test_error_note_shortens_a_big_input(backend: str) -> None:
    big = list(range(100_000))
    with pytest.raises(Boom) as info:
        fenfa.map(always_fail, [big], backend=backend, **worker_opts(backend))
    notes = getattr(info.value, "__notes__", [])
    assert any(re.search(r"\btask 0\b", n) for n in notes), notes
    assert sum(len(n) for n in notes) < 500, "the note must carry a short repr, not the input"


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_on_error_return_puts_the_exception_in_place(backend: str, method: str) -> None:
    got = list(
        getattr(fenfa, method)(
            shout, ITEMS, backend=backend, on_error="return", **worker_opts(backend)
        )
    )
    assert len(got) == len(ITEMS)
    if method == "imap_unordered":
        errors = [r for r in got if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert_task_error(errors[0], 3, "bad-3", "shout")
        assert sorted(r for r in got if not isinstance(r, BaseException)) == sorted(GOOD)
        return
    expected = oracle(method, shout, ITEMS, on_error="return")
    for i, (mine, ref) in enumerate(zip(got, expected, strict=True)):
        if i == 3:
            assert_task_error(mine, 3, "bad-3", "shout")
            assert_task_error(ref, 3, "bad-3", "shout")
            assert mine.args == ref.args
        else:
            assert mine == ref == ITEMS[i].upper()


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_on_error_skip_leaves_the_failed_item_out(backend: str, method: str) -> None:
    items = list(ITEMS)
    items[8] = "bad-8"
    expected = [s.upper() for s in items if not s.startswith("bad")]
    assert oracle(method, shout, items, on_error="skip") == expected
    got = list(
        getattr(fenfa, method)(
            shout, items, backend=backend, on_error="skip", **worker_opts(backend)
        )
    )
    if method == "imap_unordered":
        assert sorted(got) == sorted(expected)
    else:
        assert got == expected


def test_on_error_as_pool_default_and_per_call(backend: str) -> None:
    with make_pool(backend, on_error="skip") as pool:
        assert pool.map(shout, ITEMS) == GOOD
        returned = pool.map(shout, ITEMS, on_error="return")
        assert isinstance(returned[3], Boom)
        with pytest.raises(Boom):
            pool.map(shout, ITEMS, on_error="raise")
        assert pool.starmap(shout, [(s,) for s in ITEMS]) == GOOD


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_retries_rerun_a_failed_task(backend: str, method: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path), 2)  # each input fails twice, then succeeds
    with make_pool(backend) as pool:
        got = list(getattr(pool, method)(fn, range(8), retries=2))
    expected = [x * 10 for x in range(8)]
    assert (sorted(got) if method == "imap_unordered" else got) == expected
    attempts = {x: len((tmp_path / f"attempts-{x}").read_text()) for x in range(8)}
    assert attempts == dict.fromkeys(range(8), 3)


def test_retries_run_a_task_at_most_n_more_times(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path), 100)  # never succeeds
    got = fenfa.map(fn, range(5), backend=backend, retries=2, on_error="return")
    for i, exc in enumerate(got):
        assert isinstance(exc, Boom)
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert any(re.search(rf"\btask {i}\b", n) for n in exc.__notes__)
    attempts = {x: len((tmp_path / f"attempts-{x}").read_text()) for x in range(5)}
    assert attempts == dict.fromkeys(range(5), 3)


def test_no_retries_by_default_and_successes_are_not_rerun(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path), 1)  # fails once per input
    with make_pool(backend) as pool:
        got = pool.map(fn, range(4), on_error="return")
        assert all(isinstance(r, Boom) for r in got)
        # Second attempt of each input, as a fresh call: now they succeed, once each.
        assert pool.map(fn, range(4), retries=3) == [0, 10, 20, 30]
    attempts = {x: len((tmp_path / f"attempts-{x}").read_text()) for x in range(4)}
    assert attempts == dict.fromkeys(range(4), 2)


def test_retries_as_a_pool_default(backend: str, tmp_path: Path) -> None:
    fn = functools.partial(flaky, str(tmp_path), 1)
    with make_pool(backend, retries=1) as pool:
        assert pool.map(fn, range(4)) == [0, 10, 20, 30]


# --------------------------------------------------------------------------- futures


def test_submit_returns_a_real_future(backend: str) -> None:
    with make_pool(backend) as pool:
        fut = pool.submit(add, 1, y=2)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(timeout=30) == 3
        futs = [pool.submit(square, i) for i in range(20)]
        _, not_done = concurrent.futures.wait(futs, timeout=30)
        assert not not_done
        assert [f.result() for f in futs] == [i * i for i in range(20)]
        bad = pool.submit(shout, "bad-x")
        exc = bad.exception(timeout=30)
        assert type(exc) is Boom
        assert isinstance(exc.__cause__, RemoteTraceback)
        assert "shout" in str(exc.__cause__)
        with pytest.raises(Boom):
            bad.result()


def test_map_async_returns_a_future_of_a_list(backend: str) -> None:
    with make_pool(backend) as pool:
        fut = pool.map_async(square, range(30))
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(timeout=30) == oracle("map", square, range(30))
        bad = pool.map_async(shout, ITEMS)
        with pytest.raises(Boom) as info:
            bad.result(timeout=30)
        assert_task_error(info.value, 3, "bad-3", "shout")


def test_apply_and_apply_async(backend: str) -> None:
    with make_pool(backend) as pool:
        assert pool.apply(add, (2,), {"y": 40}) == 42
        assert pool.apply(add, args=(5,)) == 5
        assert pool.apply(who)[4] == backend
        fut = pool.apply_async(add, args=(1, 2))
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(timeout=30) == 3
        assert pool.apply_async(add, kwargs={"x": 3, "y": 4}).result(timeout=30) == 7
        with pytest.raises(Boom):
            pool.apply(shout, ("bad",))


def test_run_executes_one_call(backend: str) -> None:
    assert fenfa.run(add, 2, 3, backend=backend) == 5
    assert fenfa.run(add, 2, y=5, backend=backend) == 7
    info = fenfa.run(who, backend=backend)
    assert info[4] == backend
    assert (info[1] == os.getpid()) == (backend not in REMOTE)
    with pytest.raises(Boom) as exc:
        fenfa.run(shout, "bad-run", backend=backend)
    assert isinstance(exc.value.__cause__, RemoteTraceback)


# --------------------------------------------------------------------------- lifecycle


def test_shutdown_is_idempotent_and_the_pool_is_closed_after_it(backend: str) -> None:
    pool = make_pool(backend)
    assert pool.map(square, range(3)) == [0, 1, 4]
    pool.shutdown()
    pool.shutdown()
    pool.shutdown(wait=True)
    calls: list[Callable[[], object]] = [
        lambda: pool.submit(square, 1),
        lambda: pool.map(square, [1]),
        lambda: list(pool.imap(square, [1])),
        lambda: list(pool.imap_unordered(square, [1])),
        lambda: pool.starmap(add, [(1, 2)]),
        lambda: pool.map_async(square, [1]),
        lambda: pool.apply(square, (1,)),
        lambda: pool.apply_async(square, (1,)),
    ]
    for call in calls:
        with pytest.raises(fenfa.PoolClosed):
            call()
    assert issubclass(fenfa.PoolClosed, RuntimeError)


def test_context_manager_returns_the_pool_and_closes_it(backend: str) -> None:
    with make_pool(backend) as pool:
        assert isinstance(pool, fenfa.Pool)
        assert pool.backend == backend
        assert pool.map(square, [3]) == [9]
    with pytest.raises(fenfa.PoolClosed):
        pool.submit(square, 1)
    pool.shutdown()  # still idempotent after the with-block


# --------------------------------------------------------------------------- workers


def test_current_worker_outside_tasks() -> None:
    info = fenfa.current_worker()
    assert isinstance(info, fenfa.WorkerInfo)
    assert info.id is None
    assert info.backend is None
    assert info.pid == os.getpid()
    assert info.thread_name == threading.current_thread().name
    assert info.process_name == multiprocessing.current_process().name
    assert isinstance(info.state, dict)
    with pytest.raises(AttributeError):
        info.id = 3  # type: ignore[misc]


def test_current_worker_inside_tasks(backend: str, tmp_path: Path) -> None:
    parties = 1 if backend == "serial" else 2
    fn = functools.partial(who_after_rendezvous, str(tmp_path), parties)
    with make_pool(backend, chunksize=1) as pool:
        records = pool.map(fn, range(parties)) + pool.map(who, range(20))
    ids = {r[0] for r in records}
    # (A dask worker is known by its address.)
    assert all(isinstance(i, str if backend == "dask" else int) for i in ids), ids
    assert all(r[4] == backend for r in records)
    # One worker, one id: the id and the worker (pid, thread) determine each other.
    by_id = collections.defaultdict(set)
    by_worker = collections.defaultdict(set)
    for wid, pid, _, thread_name, _ in records:
        by_id[wid].add((pid, thread_name))
        by_worker[(pid, thread_name)].add(wid)
    assert all(len(v) == 1 for v in by_id.values()), by_id
    assert all(len(v) == 1 for v in by_worker.values()), by_worker
    # The rendezvous needed two workers at once: two distinct ids.
    assert len({r[0] for r in records[:parties]}) == parties
    me = os.getpid()
    caller_thread = threading.current_thread().name
    for _, pid, process_name, thread_name, _ in records:
        assert isinstance(process_name, str)
        assert process_name
        if backend in REMOTE:
            assert pid != me
        else:
            assert pid == me
            assert process_name == multiprocessing.current_process().name
        if backend == "serial":
            assert thread_name == caller_thread
        if backend == "thread":
            assert thread_name != caller_thread
    assert fenfa.current_worker().id is None, "the caller is not a worker after the call"


def test_worker_state_persists_across_the_tasks_of_one_worker(backend: str) -> None:
    with make_pool(backend) as pool:
        records = pool.map(bump_state, range(20)) + pool.map(bump_state, range(20))
    per_worker = collections.defaultdict(list)
    for wid, n in records:
        per_worker[wid].append(n)
    for wid, ns in per_worker.items():
        # Each worker counted its own tasks 1, 2, 3, ...: nothing lost, nothing shared.
        assert sorted(ns) == list(range(1, len(ns) + 1)), (wid, ns)
    assert sum(len(ns) for ns in per_worker.values()) == 40


def test_initializer_runs_once_per_worker_before_its_first_task(backend: str) -> None:
    with make_pool(backend, initializer=init_state, initargs=("hello",)) as pool:
        records = pool.map(read_init_state, range(20), chunksize=1)
    assert [r[0] for r in records] == [x * x for x in range(20)]
    assert all(r[1] == "hello" for r in records), records
    assert all(r[2] == 1 for r in records), "the initializer ran more than once in a worker"


# --------------------------------------------------------------------------- more of DESIGN.md
# Promises of DESIGN.md §1-§3 that the list does not spell out.


class CodedError(Exception):
    """An exception whose ``__init__`` does not take its own ``args`` back.

    The plain pickle protocol rebuilds an exception as ``cls(*args)``, which
    fails here; such classes are common (``requests``' and many ORMs' errors).
    """

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"error {code}: {detail}")
        self.code = code


def raise_coded(x: int) -> int:
    if x == 2:
        raise CodedError(404, "not found")
    return x


def test_a_user_exception_keeps_its_type_even_if_pickle_cannot_rebuild_it(backend: str) -> None:
    with pytest.raises(CodedError) as expected:
        oracle("map", raise_coded, range(4))
    with make_pool(backend) as pool, pytest.raises(Exception) as info:
        pool.map(raise_coded, range(4))
    assert type(info.value) is CodedError, f"got {type(info.value)!r}: {info.value}"
    assert info.value.args == expected.value.args
    assert getattr(info.value, "code", None) == 404
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_concurrent_calls_from_several_threads_share_one_pool(backend: str) -> None:
    """Default pools are shared, so calls from several threads at once must not mix up."""
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        data = range(i * 1000, i * 1000 + 300)
        try:
            if i % 2:
                outcomes[i] = fenfa.map(square, data, backend=backend, **worker_opts(backend))
            else:
                got = fenfa.imap(square, data, backend=backend, **worker_opts(backend))
                outcomes[i] = list(got)
        except BaseException as exc:  # reported below, in the test's own thread
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a concurrent call hung"
    for i in range(6):
        assert outcomes[i] == [x * x for x in range(i * 1000, i * 1000 + 300)], i


def test_shutdown_lets_a_pending_map_async_finish(backend: str) -> None:
    """As in concurrent.futures: work accepted before shutdown(wait=True) is done, not dropped."""
    pool = make_pool(backend)
    future = pool.map_async(square, range(200), chunksize=1, window=2)
    pool.shutdown(wait=True)
    assert future.result(timeout=30) == [x * x for x in range(200)]


def make_bytes(n: int) -> bytes:
    return bytes([n % 251]) * (n * 1_000_000)


def test_large_arguments_and_results_cross_without_deadlock(backend: str) -> None:
    """Big frames both ways at once: the classic full-pipe deadlock of hand-made pools."""
    blobs = [bytes([i]) * 3_000_000 for i in range(6)]
    with make_pool(backend, chunksize=1) as pool:
        assert pool.map(len, blobs) == [3_000_000] * 6
        sizes = [1, 5, 2, 8, 3, 1]
        assert pool.map(make_bytes, sizes) == oracle("map", make_bytes, sizes)
        echoed = list(pool.imap_unordered(identity, blobs))
        assert sorted(echoed) == sorted(blobs)


def chain_submit(pool: fenfa.Pool, n: int, done: concurrent.futures.Future[int]) -> None:
    """Submits square(n), and from its done-callback the next one, down to 0."""
    future = pool.submit(square, n)

    def next_one(f: concurrent.futures.Future[int]) -> None:
        if f.exception() is not None:
            done.set_exception(f.exception())
        elif n == 0:
            done.set_result(f.result())
        else:
            chain_submit(pool, n - 1, done)

    future.add_done_callback(next_one)


def test_a_done_callback_may_submit_more_work(backend: str) -> None:
    """Callbacks run in a fenfa thread (or the caller): submitting from one must not deadlock."""
    with make_pool(backend) as pool:
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        chain_submit(pool, 10, done)
        assert done.result(timeout=30) == 0


def failing_initializer() -> None:
    raise Boom("cannot initialise")


@pytest.mark.timeout(30)
def test_a_failing_initializer_fails_the_tasks_and_does_not_hang(backend: str) -> None:
    with make_pool(backend, initializer=failing_initializer) as pool:
        with pytest.raises(Boom):
            pool.map(square, range(5))
        with pytest.raises(Boom):
            pool.submit(square, 2).result(timeout=20)


def test_more_functions_than_a_worker_caches() -> None:
    """The parent's mirror of a worker's function cache must stay exact past eviction."""
    adders = [make_adder(k) for k in range(45)]
    with make_pool("process", workers=1) as pool:
        for order in (range(45), reversed(range(45)), range(0, 45, 7), range(44, 0, -5)):
            for k in order:
                assert pool.submit(adders[k], 1000).result(timeout=30) == 1000 + k


INTERRUPT_SCRIPT = """
import os, pathlib, subprocess, sys, time
import fenfa

def task(args):
    parent, gate = args
    flag = pathlib.Path(gate + ".sent")
    try:
        flag.touch(exist_ok=False)
    except FileExistsError:
        pass
    else:
        # The user presses Ctrl-C while tasks run. Sent from another process, as
        # a terminal does: os.kill() from a thread of the caller's own process
        # would be delivered to that thread, and the blocked main thread never sees it.
        kill = f"import os, signal; os.kill({parent}, signal.SIGINT)"
        subprocess.run([sys.executable, "-c", kill], check=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return 1

if __name__ == "__main__":
    backend, gate = sys.argv[1], sys.argv[2]
    workers = 1 if backend == "serial" else 2
    pool = fenfa.Pool(backend=backend, workers=workers)
    start = time.monotonic()
    try:
        pool.map(task, [(os.getpid(), gate)] * 4, chunksize=1)
    except KeyboardInterrupt:
        print("interrupted after", round(time.monotonic() - start, 2), flush=True)
    pathlib.Path(gate).touch()  # let running tasks end, so shutdown can finish
    pool.shutdown()
    print("shut down", flush=True)
"""


@pytest.mark.timeout(60)
def test_ctrl_c_interrupts_a_blocking_call(backend: str, tmp_path: Path) -> None:
    """Run in a subprocess: a KeyboardInterrupt in pytest's own process ends the session."""
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(INTERRUPT_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), backend, str(tmp_path / "gate")],
        capture_output=True,
        text=True,
        timeout=45,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    assert lines[0].startswith("interrupted after"), (proc.stdout, proc.stderr)
    # The tasks would run for 20 s: the call must give up at once, not wait for them.
    assert float(lines[0].split()[-1]) < 5.0, lines[0]
    assert lines[-1] == "shut down", proc.stdout


# --------------------------------------------------------------------------- process only


def make_adder(k: int) -> Callable[[int], int]:
    return lambda x: x + k


MAIN_SOURCE = """
FACTOR = 3

def triple(x):
    return FACTOR * x
"""


def test_process_runs_lambdas_closures_and_main_functions() -> None:
    offset = 7

    def closure(x: int) -> int:
        return x + offset

    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(MAIN_SOURCE, namespace)
    triple = namespace["triple"]
    assert triple.__module__ == "__main__"
    with make_pool("process") as pool:
        assert pool.map(lambda x: x * 2, range(5)) == oracle("map", lambda x: x * 2, range(5))
        assert pool.map(closure, range(5)) == oracle("map", closure, range(5))
        assert pool.map(triple, range(5)) == oracle("map", triple, range(5)) == [0, 3, 6, 9, 12]
        assert pool.submit(lambda: offset).result(timeout=30) == 7
        assert os.getpid() not in pool.map(lambda _: os.getpid(), range(4))
    assert fenfa.map(closure, range(3), backend="process", workers=2) == [7, 8, 9]


def test_process_never_serves_a_stale_function() -> None:
    """Functions are cached per worker by the hash of their bytes, not by name or id."""
    with make_pool("process", workers=1) as pool:
        # Same code, same qualified name, different captured value.
        assert pool.map(make_adder(1), range(3)) == [1, 2, 3]
        assert pool.map(make_adder(100), range(3)) == [100, 101, 102]
        assert pool.submit(make_adder(5), 1).result(timeout=30) == 6
        # A __main__ function redefined under the same name, as in a notebook.
        namespace: dict[str, Any] = {"__name__": "__main__"}
        exec("def f(x):\n    return x + 1\n", namespace)
        assert pool.map(namespace["f"], [0]) == [1]
        exec("def f(x):\n    return x + 2\n", namespace)
        assert pool.map(namespace["f"], [0]) == [2]
        # The same function object after a global it reads has changed.
        exec(MAIN_SOURCE, namespace)
        assert pool.map(namespace["triple"], [5]) == [15]
        namespace["FACTOR"] = 4
        assert pool.map(namespace["triple"], [5]) == [20]


MAIN_SCRIPT = """
import os
import fenfa

def cube(x):
    return x ** 3

if __name__ == "__main__":
    out = fenfa.map(cube, range(6), backend="process", workers=2)
    pids = fenfa.map(lambda _: os.getpid(), range(8), backend="process", workers=2)
    assert out == [x ** 3 for x in range(6)], out
    assert os.getpid() not in pids, pids
    print("OK", " ".join(map(str, sorted(set(pids)))))
    # No shutdown here: the default pool must be cleaned up at interpreter exit.
"""


@pytest.mark.timeout(90)
def test_process_runs_a_main_script_and_exits_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK"), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr
    worker_pids = [int(p) for p in proc.stdout.split()[1:]]
    assert worker_pids

    def workers_gone() -> bool:
        alive = [p for p in worker_pids if psutil.pid_exists(p)]
        return all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in alive)

    wait_for(workers_gone, f"the script's workers {worker_pids} to exit", timeout=3.0)


def test_default_start_method_is_not_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MARK", "set-by-test")
    with make_pool("process") as pool:
        assert pool.map(read_parent_mark, range(2)) == ["import-time"] * 2


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
# Python 3.12+ warns when a process with threads forks; the test asks for fork.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_start_methods(start_method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "PARENT_MARK", "set-by-test")
    with make_pool("process", start_method=start_method) as pool:
        assert pool.backend == "process"
        data = list(range(30))
        assert pool.map(square, data) == oracle("map", square, data)
        assert list(pool.imap(lambda x: x + 1, data)) == [x + 1 for x in data]
        records = pool.map(who, range(4))
        assert all(r[1] != os.getpid() and r[4] == "process" for r in records)
        marks = set(pool.map(read_parent_mark, range(4)))
        assert marks == {"set-by-test" if start_method == "fork" else "import-time"}
        with pytest.raises(Boom) as info:
            pool.map(shout, ITEMS)
        assert_task_error(info.value, 3, "bad-3", "shout")


def test_max_tasks_per_worker_replaces_workers() -> None:
    k = 3
    with make_pool(
        "process", max_tasks_per_worker=k, initializer=init_state, initargs=("fresh",)
    ) as pool:
        records = pool.map(read_init_state, range(18), chunksize=1)
        more = pool.map(read_init_state, range(10))  # adaptive chunks must respect k too
    assert [r[0] for r in records] == [x * x for x in range(18)]
    assert [r[0] for r in more] == [x * x for x in range(10)]
    per_pid = collections.Counter(r[3] for r in records + more)
    assert max(per_pid.values()) <= k, per_pid
    assert len(per_pid) >= 28 // k
    # Every replacement worker ran the initializer, once, before its first task.
    assert all(r[1] == "fresh" and r[2] == 1 for r in records + more)


@pytest.mark.timeout(30)
def test_unpicklable_result_or_argument_is_a_serialization_error() -> None:
    with make_pool("process") as pool:
        with pytest.raises(fenfa.SerializationError):
            pool.map(make_lock, range(3))
        with pytest.raises(fenfa.SerializationError):
            pool.map(identity, [1, threading.Lock(), 3])
        lock = threading.Lock()
        with pytest.raises(fenfa.SerializationError):
            pool.map(lambda x: (lock, x)[1], range(3))  # the function itself will not pickle
        assert pool.map(square, range(4)) == [0, 1, 4, 9], "the pool survives both"
