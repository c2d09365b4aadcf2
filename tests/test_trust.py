"""A pool that never dies (issue 15): leftovers of ended calls, internal faults, bounded state.

Each test here is a defect found by a randomized fault soak, kept as a
regression: it fails on the code before the fix.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import fenfa
from fenfa.backends.process import ProcessBackend
from fenfa.errors import FenfaError


def ends_then_dies(x: tuple[Any, int]) -> int:
    """Task 0 raises (the call ends); task 2 then kills its worker, a leftover of that call."""
    _array, i = x
    if i == 0:
        raise ValueError("map raises, the call ends")
    if i == 2:
        threading.Event().wait(0.3)  # (the call has ended by then)
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@pytest.mark.timeout(60)
def test_a_crash_among_an_ended_calls_leftovers_leaves_the_pool_serving() -> None:
    big = np.zeros(1 << 18)  # 2 MiB: shared automatically, released when the call ends
    with fenfa.Pool("process", workers=1) as pool:
        with pytest.raises(ValueError, match="the call ends"):
            pool.map(ends_then_dies, [(big, i) for i in range(5)], chunksize=5)
        for _ in range(3):  # whenever the crash lands, later calls are served
            assert pool.map(abs, [-1, -2]) == [1, 2]


def slow_then_dies(x: tuple[Any, int]) -> int:
    _array, i = x
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@pytest.mark.timeout(60)
def test_an_early_break_then_a_crash_leaves_the_default_pool_serving() -> None:
    big = np.zeros(1 << 18)
    for value in fenfa.imap(slow_then_dies, [(big, i) for i in range(8)], backend="process"):
        assert value == 0
        break
    assert fenfa.map(abs, [-3, -4], backend="process") == [3, 4]


def ident(x: tuple[Any, int]) -> int:
    return x[1]


@pytest.mark.timeout(60)
def test_a_retiring_worker_after_an_ended_call_leaves_the_pool_serving() -> None:
    big = np.zeros(1 << 18)
    with fenfa.Pool("process", workers=1, max_tasks_per_worker=2) as pool:
        for value in pool.imap(ident, [(big, i) for i in range(50)], chunksize=1):
            assert value == 0
            break
        assert pool.map(abs, range(-5, 0)) == [5, 4, 3, 2, 1]


@pytest.mark.timeout(60)
def test_a_fault_in_the_manager_fails_the_calls_in_flight_and_the_pool_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = ProcessBackend._results
    faults = iter([True])

    def faulty(self: ProcessBackend, *args: Any) -> None:
        if next(faults, False):
            raise RuntimeError("injected: a bug in the delivery loop")
        real(self, *args)

    with fenfa.Pool("process", workers=2) as pool:
        assert pool.map(abs, [-1]) == [1]  # workers up
        monkeypatch.setattr(ProcessBackend, "_results", faulty)
        with pytest.raises(FenfaError, match="process manager failed") as raised:
            pool.map(abs, range(-10, 0), chunksize=1)
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert pool.map(abs, range(-10, 0)) == list(range(10, 0, -1))
        assert pool.submit(abs, -7).result(timeout=30) == 7


@pytest.mark.timeout(60)
def test_the_thread_backend_keeps_only_live_threads() -> None:
    with fenfa.Pool("thread", workers=2, max_tasks_per_worker=1) as pool:
        for _ in range(3):
            assert pool.map(abs, range(2000), chunksize=1) == list(range(2000))
        backend: Any = pool._backend
        assert len(backend._threads) <= 4  # 2 alive, and at most 2 on their way out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["thread", "process"])
@pytest.mark.parametrize("timeout", [math.inf, -math.inf, math.nan, 0, -1])
def test_a_timeout_that_is_not_a_finite_positive_number_is_refused(
    backend: str, timeout: float
) -> None:
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        fenfa.map(abs, [1], timeout=timeout, backend=backend)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_huge_timeout_keeps_the_watchdog_alive(backend: str) -> None:
    with fenfa.Pool(backend, workers=1) as pool:
        assert pool.map(abs, [-1, -2], timeout=1e10) == [1, 2]
        with pytest.raises(fenfa.TaskTimeout):
            pool.map(time.sleep, [1.5], timeout=0.2)


def busy_then_crash_at_150(arguments: tuple[str, int]) -> int:
    """~20 us of work (batched, reported at the end of each batch); task 150 kills its worker."""
    marker, x = arguments
    started = time.perf_counter()
    while time.perf_counter() - started < 20e-6:
        pass
    if x == 150:
        with open(marker, "a") as runs:
            runs.write("ran\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.timeout(60)
def test_a_crash_fails_its_task_once_without_running_it_again(tmp_path: Any) -> None:
    """The worker's shared marks say which task ran: it is not re-run to find out."""
    marker = str(tmp_path / "runs")
    with fenfa.Pool("process", workers=2, on_error="return") as pool:
        out = pool.map(busy_then_crash_at_150, [(marker, x) for x in range(600)])
        reruns = pool.insights.reruns
    with open(marker) as runs:
        assert runs.read().count("ran") == 1, "the crashing task ran twice"
    assert isinstance(out[150], fenfa.WorkerCrashed)
    assert out[150].index == 150
    assert [v for i, v in enumerate(out) if i != 150] == [x for x in range(600) if x != 150]
    assert reruns >= 0  # (finished tasks whose results died with the worker ran again)


# -- 5b: smaller defects -------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_worker_traceback_of_a_main_function_names_its_file_and_line(tmp_path: Any) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        "import fenfa\n"
        "def bad(x):\n"
        "    y = x + 1\n"
        "    raise ValueError(y)\n"
        "if __name__ == '__main__':\n"
        "    fenfa.map(bad, [1], backend='process')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 1
    assert f'File "{script}", line 4, in bad' in done.stderr
    assert "raise ValueError(y)" in done.stderr  # the source line, read from the file
    assert "<dynamic-code>" not in done.stderr


@pytest.mark.timeout(60)
def test_a_script_from_stdin_runs_on_processes(tmp_path: Any) -> None:
    code = (
        "import fenfa\n"
        "def sq(x):\n"
        "    return x * x\n"
        "if __name__ == '__main__':\n"
        "    print(fenfa.map(sq, range(5), backend='process'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-"],
        input=code,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 4, 9, 16]"


def fetch(url: str, timeout: float = 1.0) -> tuple[str, float]:
    return url, timeout


def add(x: int, y: int = 0) -> int:
    return x + y


def test_run_gives_fn_the_keywords_it_takes() -> None:
    assert fenfa.run(fetch, "u", timeout=5) == ("u", 5)  # fetch's own timeout
    assert fenfa.run(add, 1, y=2, backend="thread") == 3  # fenfa's backend
    runner = fenfa.run.options(backend="thread", timeout=3)
    assert runner(fetch, "u", timeout=7) == ("u", 7)


def test_errors_name_the_argument_that_was_wrong() -> None:
    with pytest.raises(TypeError, match=r"initargs must be a tuple .* initargs=\(5,\)"):
        fenfa.Pool("thread", initializer=print, initargs=5)  # type: ignore[arg-type]
    with (
        fenfa.Pool("thread", workers=1) as pool,
        pytest.raises(TypeError, match=r"positional chunksize\? here it is a keyword"),
    ):
        pool.imap(abs, [1, 2], 2)


def test_negative_workers_count_as_joblib_does() -> None:
    cores = len(os.sched_getaffinity(0))
    with fenfa.Pool("thread", workers=-1) as pool:
        assert pool.workers == cores
    with fenfa.Pool("thread", workers=-2) as pool:
        assert pool.workers == max(1, cores - 1)
    with pytest.raises(ValueError, match="workers must be"):
        fenfa.Pool("thread", workers=0)
    assert fenfa.map(abs, [-1], workers=-1, backend="thread") == [1]


@pytest.mark.timeout(60)
def test_an_unreachable_dask_scheduler_is_backend_unavailable_naming_it() -> None:
    pytest.importorskip("distributed")  # (its defaults loaded before the setting below:
    # leaving a dask.config.set removes keys that were not there when it began)
    dask_config = pytest.importorskip("dask.config")
    with (
        dask_config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(fenfa.BackendUnavailable, match=r"tcp://127\.0\.0\.1:1"),
    ):
        fenfa.Pool("dask", address="tcp://127.0.0.1:1")


def test_a_windows_module_name_beside_the_script_is_not_blamed(tmp_path: Any) -> None:
    from fenfa import _shadow

    (tmp_path / "nt.py").write_text("")
    (tmp_path / "queue.py").write_text("")
    names = {name for name, _path in _shadow._shadowing_in(str(tmp_path))}
    assert names == {"queue"}


class SlowToLoad:
    """A callable whose unpickling takes a while (a model it captures, say)."""

    def __call__(self, x: int) -> int:
        return x

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_slowly, ())


def _load_slowly() -> SlowToLoad:
    time.sleep(1.5)  # (the workload: slow to load, not a synchronisation)
    return SlowToLoad()


@pytest.mark.timeout(60)
def test_a_timeout_counts_from_when_the_task_starts_not_while_its_function_loads() -> None:
    """Found by the fault soak: every task failed with TaskTimeout without running."""
    with fenfa.Pool("process", workers=1, timeout=1.0) as pool:
        assert pool.map(SlowToLoad(), range(3)) == [0, 1, 2]
        with pytest.raises(fenfa.TaskTimeout, match="ran longer than its timeout"):
            pool.map(time.sleep, [3])
