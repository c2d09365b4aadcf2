"""Issue 16: ``import fenfa.joblib``, the joblib backend "fenfa" (and scikit-learn on it)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

joblib = pytest.importorskip("joblib")

from joblib import Parallel, delayed, parallel_config  # noqa: E402
from joblib.externals.loky import get_reusable_executor  # noqa: E402

import fenfa  # noqa: E402
import fenfa.joblib  # noqa: E402
from fenfa import segments  # noqa: E402
from helpers import hang, wait_for  # noqa: E402

GRID = {"max_depth": [2, 4], "min_samples_leaf": [1, 5]}

# scikit-learn is imported where it is used, not here: every process worker
# imports this module (its task functions live here), and a fresh worker
# importing scikit-learn took 1-10 s on the loaded 2-core machine.
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


def _search(X: Any, y: Any) -> tuple[Any, Any, Any]:
    """A small grid search and a cross-validation: the results to compare."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV, cross_val_score

    forest = RandomForestClassifier(n_estimators=5, random_state=0)
    search = GridSearchCV(forest, GRID, cv=3, n_jobs=2).fit(X, y)
    scores = cross_val_score(forest, X, y, cv=3, n_jobs=2)
    return search.best_params_, search.cv_results_["mean_test_score"], scores


@pytest.fixture(scope="module")
def data() -> tuple[Any, Any]:
    from sklearn.datasets import make_classification

    return make_classification(n_samples=150, n_features=6, random_state=0)


@pytest.fixture(scope="module")
def on_loky(data: tuple[Any, Any]) -> tuple[Any, Any, Any]:
    """The reference results, computed on loky before any test counts child processes."""
    with parallel_config(backend="loky"):
        results = _search(*data)
    get_reusable_executor().shutdown(wait=True)
    return results


@pytest.fixture(autouse=True)
def close_pools() -> Iterator[None]:
    """The pools the backend keeps between calls go before the leak check looks."""
    yield
    fenfa.joblib.shutdown()


def square(x: int) -> int:
    return x * x


def die_on(x: int, trigger: int) -> int:
    if x == trigger:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def die_once(x: int, marker: str) -> int:
    """Killed the first time it meets 3; the marker file makes the retry survive."""
    if x == 3 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_importing_registers_the_backend() -> None:
    assert joblib.parallel.BACKENDS["fenfa"] is fenfa.joblib.Backend
    with parallel_config(backend="fenfa", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


@needs_sklearn
def test_grid_search_and_cross_val_score_match_loky(
    data: tuple[Any, Any], on_loky: tuple[Any, Any, Any]
) -> None:
    with parallel_config(backend="fenfa"):
        best, means, scores = _search(*data)
    loky_best, loky_means, loky_scores = on_loky
    assert best == loky_best
    np.testing.assert_array_equal(means, loky_means)
    np.testing.assert_array_equal(scores, loky_scores)


@needs_sklearn
def test_grid_search_on_fenfa_threads(data: tuple[Any, Any], on_loky: tuple[Any, Any, Any]) -> None:
    with parallel_config(backend=fenfa.joblib.Backend("thread", retries=1, insights=True)) as cfg:
        best, _means, scores = _search(*data)
    assert best == on_loky[0]
    np.testing.assert_array_equal(scores, on_loky[2])
    backend = cfg["backend"]
    assert backend.insights is not None
    assert backend.insights.records()


def test_a_killed_worker_fails_its_task_and_the_next_call_works_at_once() -> None:
    backend = fenfa.joblib.Backend()
    with parallel_config(backend=backend, n_jobs=2):
        with pytest.raises(fenfa.WorkerCrashed):
            Parallel()(delayed(die_on)(i, 3) for i in range(8))
        pool = backend.pool
        # The same pool, at once: no executor to rebuild, no restart pause.
        assert Parallel()(delayed(die_on)(i, -1) for i in range(8)) == list(range(8))
        assert backend.pool is pool


def test_with_retries_a_killed_worker_costs_nothing(tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed")
    with parallel_config(backend="fenfa", n_jobs=2, retries=1):
        assert Parallel()(delayed(die_once)(i, marker) for i in range(8)) == list(range(8))
    assert os.path.exists(marker)  # it did crash once


def gated(i: int, directory: str) -> int:
    if i == 0:
        hang(directory)
    return i


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_generator_unordered_yields_as_tasks_finish(backend: str, release: Path) -> None:
    with parallel_config(backend=fenfa.joblib.Backend(backend), n_jobs=2):
        results = Parallel(batch_size=1, return_as="generator_unordered")(
            delayed(gated)(i, str(release.parent)) for i in range(2)
        )
        assert next(results) == 1  # while task 0 still waits
        release.touch()
        assert list(results) == [0]


def record_pid(directory: str) -> int:
    Path(directory, "pid").write_text(str(os.getpid()))
    hang(directory)
    return 0


def test_a_timeout_kills_the_task_and_frees_its_worker(release: Path) -> None:
    directory = str(release.parent)
    pid_file = release.parent / "pid"
    backend = fenfa.joblib.Backend()
    with parallel_config(backend=backend, n_jobs=2):
        Parallel()(delayed(square)(i) for i in range(4))  # workers up: the limit is the task's
        with pytest.raises(multiprocessing.TimeoutError):  # joblib raises that one
            Parallel(timeout=1)(delayed(record_pid)(directory) for _ in range(1))
        assert pid_file.exists()
        wait_for(lambda: not psutil.pid_exists(int(pid_file.read_text())), "the hung worker's end")
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def inner(j: int) -> tuple[int, str]:
    return os.getpid(), type(joblib.parallel.get_active_backend()[0]).__name__


def outer(i: int) -> tuple[int, list[tuple[int, str]], list[tuple[int, str]]]:
    nested = Parallel(n_jobs=-1)(delayed(inner)(j) for j in range(4))
    named = Parallel(n_jobs=2, backend="fenfa")(delayed(inner)(j) for j in range(4))
    return os.getpid(), nested, named


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_nested_parallel_runs_in_the_worker(backend: str) -> None:
    """A Parallel inside a task (even one naming "fenfa") starts no processes."""
    cores = fenfa.backends.usable_cores()  # every core busy: nothing left for threads
    with parallel_config(backend=fenfa.joblib.Backend(backend), n_jobs=cores):
        results = Parallel()(delayed(outer)(i) for i in range(4))
    for pid, nested, named in results:
        assert pid == os.getpid() if backend == "thread" else pid != os.getpid()
        assert {p for p, _ in nested + named} == {pid}


def chatty(i: int) -> int:
    print(f"task {i} says hi")
    return i


def test_worker_prints_reach_the_callers_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with parallel_config(backend="fenfa", n_jobs=2):
        assert Parallel()(delayed(chatty)(i) for i in range(4)) == [0, 1, 2, 3]
    out = capsys.readouterr().out
    for i in range(4):
        assert f"task {i} says hi" in out


def describe(array: Any, i: int) -> tuple[str, bool, float]:
    return type(array).__name__, bool(array.flags.writeable), float(array[i])


def test_large_arrays_are_shared_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB
    created = []
    create = segments.Segment.create

    def counting(self: segments.Segment, *args: Any, **kwargs: Any) -> str:
        path = create(self, *args, **kwargs)
        created.append(path)
        return path

    monkeypatch.setattr(segments.Segment, "create", counting)
    with parallel_config(backend="fenfa", n_jobs=2):
        results = Parallel(batch_size=1)(delayed(describe)(big, i) for i in range(6))
    # A read-only view of fenfa's shared memory, not joblib's memmap; one copy for 6 batches.
    assert results == [("ndarray", False, float(i)) for i in range(6)]
    assert len(created) == 1


def test_the_backend_tells_joblib_whether_it_shares_memory() -> None:
    assert not fenfa.joblib.Backend().supports_sharedmem
    assert fenfa.joblib.Backend("thread").supports_sharedmem
    assert fenfa.joblib.Backend("thread").uses_threads
    seen: list[int] = []
    with parallel_config(backend="fenfa", n_jobs=2):
        # Processes cannot append to the caller's list: joblib falls back to threads.
        Parallel(require="sharedmem")(delayed(seen.append)(i) for i in range(4))
    assert sorted(seen) == [0, 1, 2, 3]
    with parallel_config(backend=fenfa.joblib.Backend("thread"), n_jobs=2):
        parallel = Parallel(require="sharedmem")
        parallel(delayed(seen.append)(i) for i in range(4))
        assert isinstance(parallel._backend, fenfa.joblib.Backend)
    assert len(seen) == 8


def native_limit(_: int) -> str | None:
    return os.environ.get("OMP_NUM_THREADS")


@pytest.mark.skipif("OMP_NUM_THREADS" in os.environ, reason="a variable set by the user wins")
def test_inner_max_num_threads_caps_the_workers_native_threads() -> None:
    with parallel_config(backend="fenfa", n_jobs=2, inner_max_num_threads=3):
        assert Parallel()(delayed(native_limit)(i) for i in range(2)) == ["3", "3"]


def test_options_that_do_not_fit_joblib_are_refused() -> None:
    with pytest.raises(TypeError, match="n_jobs"):
        fenfa.joblib.Backend(workers=2)
    with pytest.raises(TypeError, match="batch_size"):
        fenfa.joblib.Backend(chunksize=10)
    with pytest.raises(ValueError, match="runs on one of"):
        fenfa.joblib.Backend("auto")


def test_serial_and_one_job_run_in_the_caller() -> None:
    main = threading.get_ident()
    for config in ({"backend": fenfa.joblib.Backend("serial"), "n_jobs": 4}, {"n_jobs": 1}):
        with parallel_config(**({"backend": "fenfa"} | config)):
            assert (
                Parallel()(delayed(lambda _: threading.get_ident())(i) for i in range(3))
                == [main] * 3
            )
