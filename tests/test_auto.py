"""``backend="auto"``: it measures the call's own first tasks and picks the executor.

Each kind of task the field guide names is given to auto and the decision is
checked against what the task is: waiting, pure-Python computing (holds the
GIL), computing with the GIL released, tiny. The decision rests on CPU clocks,
not on speed, so it holds on a loaded machine too. Every test also checks that
the measured tasks' results are used and nothing ran twice.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

import fenfa
from fenfa.auto import Decision, is_coroutine_function, unmeasured


def wait_a_little(x: int) -> int:
    time.sleep(0.02)
    return x


def count(x: int) -> int:
    n = 0
    while n < 300_000:  # ~10 ms of pure Python, holding the GIL
        n += 1
    return x


BLOCK = bytes(range(256)) * 4096  # the same in every worker process


def digest(x: int) -> str:
    # hashlib releases the GIL while it hashes a large buffer.
    h = hashlib.sha256(BLOCK)
    for _ in range(3):
        h.update(BLOCK)
    return h.hexdigest()[:8] + str(x)


def identity(x: int) -> int:
    return x


def logged(directory: str, x: int) -> int:
    with open(Path(directory) / "runs.log", "a") as log:
        log.write(f"{x}\n")
    return x * 2


def decide(fn: object, xs: list[int]) -> tuple[list[object], Decision, str]:
    with fenfa.Pool("auto", 2) as pool:
        results = pool.map(fn, xs)  # type: ignore[arg-type]
        assert pool.insights.decision is not None
        return results, pool.insights.decision, pool.backend


def test_a_task_that_waits_goes_to_threads() -> None:
    results, decision, backend = decide(wait_a_little, list(range(12)))
    assert results == list(range(12))
    assert backend == decision.backend == "thread"
    assert decision.cpu_ratio is not None
    assert decision.cpu_ratio < 0.5
    assert "wait" in decision.reason


@pytest.mark.timeout(120)
def test_pure_python_computing_goes_to_processes() -> None:
    results, decision, backend = decide(count, list(range(40)))
    assert results == list(range(40))
    assert backend == decision.backend == "process"
    assert decision.parallel_slowdown is not None
    assert decision.parallel_slowdown > 1.3  # two copies took turns on the GIL
    assert "GIL" in decision.reason


class BusyPythonThreads:
    """Other Python threads of the program, holding the GIL two thirds of the time."""

    def __init__(self, count: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._work) for _ in range(count)]

    def _work(self) -> None:
        while not self.stop.wait(0.0005):  # the shape of the load, not a wait for anything
            n = 0
            while n < 30_000:  # ~1 ms holding the GIL
                n += 1

    def __enter__(self) -> BusyPythonThreads:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


@pytest.mark.timeout(120)
def test_the_gil_other_threads_hold_is_not_taken_for_waiting() -> None:
    # While the program's own threads hold the GIL, a probe thread running a
    # pure-Python task spends most of its time waiting for the GIL: that is
    # not the task waiting on IO, and threads would only take turns with them.
    with BusyPythonThreads(3):
        for _ in range(5):
            results, decision, backend = decide(count, list(range(40)))
            assert results == list(range(40))
            assert backend == decision.backend == "process", decision.reason


@pytest.mark.timeout(120)
def test_a_task_that_waits_still_goes_to_threads_beside_a_busy_thread() -> None:
    with BusyPythonThreads(1):
        results, decision, backend = decide(wait_a_little, list(range(12)))
    assert results == list(range(12))
    assert backend == decision.backend == "thread", decision.reason


@pytest.mark.timeout(120)
def test_computing_with_the_gil_released_goes_to_threads() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two cores are needed to see two threads compute at once")
    results, decision, backend = decide(digest, list(range(24)))
    assert results == [digest(x) for x in range(24)]
    if decision.contention is not None and decision.contention > 0.25:
        # Other programs held the cores: two threads got one core's worth, GIL
        # or not, and auto errs towards processes (documented in fenfa.auto).
        assert backend == decision.backend == "process"
        pytest.skip(f"the machine was busy while measuring ({decision.contention:.0%} queued)")
    assert backend == decision.backend == "thread"
    assert decision.parallel_slowdown is not None
    assert decision.parallel_slowdown < 1.4


def test_tiny_tasks_run_serially() -> None:
    xs = list(range(50_000))
    results, decision, backend = decide(identity, xs)
    assert results == xs
    assert backend == decision.backend == "serial"
    assert decision.task_seconds is not None
    assert decision.task_seconds < 1e-5


def test_coroutine_functions_go_to_the_async_backend() -> None:
    async def fetch(x: int) -> int:
        return x

    assert is_coroutine_function(fetch)
    assert not is_coroutine_function(identity)
    assert unmeasured(fetch, "why").backend == "async"
    assert unmeasured(identity, "why").backend == "process"


def test_measured_tasks_are_used_and_nothing_runs_twice(tmp_path: Path) -> None:
    xs = list(range(300))
    with fenfa.Pool("auto", 2) as pool:
        assert pool.map(logged, [str(tmp_path)] * len(xs), xs) == [x * 2 for x in xs]
    runs = sorted(int(line) for line in (tmp_path / "runs.log").read_text().split())
    assert runs == xs


def test_the_decision_is_kept_for_later_calls_of_the_pool() -> None:
    with fenfa.Pool("auto", 2) as pool:
        pool.map(wait_a_little, range(6))
        first = pool.insights.decision
        assert pool.map(identity, range(1000)) == list(range(1000))
        assert pool.insights.decision is first
        assert pool.backend == "thread"


def test_module_level_auto_decides_per_call() -> None:
    assert fenfa.map(wait_a_little, range(6)) == list(range(6))
    router = fenfa.api._default_pool("auto", None)
    assert router.insights.decision is not None
    assert router.insights.decision.backend == "thread"
    assert fenfa.map(identity, range(20_000)) == list(range(20_000))
    assert router.insights.decision.backend == "serial"


def test_an_error_in_a_measured_task_is_reported_as_usual() -> None:
    def boom(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with fenfa.Pool("auto", 2) as pool:
        results = pool.map(boom, range(10), on_error="return")
    assert isinstance(results[3], ValueError)
    assert any("task 3" in note for note in results[3].__notes__)
    assert [r for i, r in enumerate(results) if i != 3] == [x for x in range(10) if x != 3]


def test_a_timeout_skips_measuring() -> None:
    with fenfa.Pool("auto", 2) as pool:
        assert pool.map(identity, range(5), timeout=10) == list(range(5))
        decision = pool.insights.decision
    assert decision is not None
    assert decision.backend == "process"
    assert "timeout" in decision.reason
