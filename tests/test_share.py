"""Issue 6: large data without copies, and native thread pools sized to the workers.

Zero-copy is proven, not assumed: a worker writes into a writable shared
array and the caller sees it; the caller writes after sharing and the worker
sees it; in-process backends hand tasks the very same memory
(``np.shares_memory``). Segment lifetimes are checked by listing the
directories segments live in (``/dev/shm``, the temporary directory) for
files of the process that made them, after a normal call, a raised
exception, a crashed worker, Ctrl-C and a SIGKILLed parent (the last two in
real subprocesses with real signals).
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import fenfa
import fenfa.segments
from helpers import gone, script, script_output, wait_for, worker_pids

pytestmark = pytest.mark.filterwarnings("error")


def segments(pid: int | None = None) -> list[str]:
    """Segment files of process ``pid`` (default: this one), wherever fenfa puts them."""
    prefix = f"{fenfa.segments.PREFIX}{pid or os.getpid()}-"
    found = []
    for directory in fenfa.segments._directories():
        found += [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)]
    return sorted(found)


# -- task functions (module level: process workers import them) ------------------


def slice_sum(array: Any, i: int, parts: int = 40) -> float:
    step = len(array) // parts
    return float(array[i * step : (i + 1) * step].sum())


def describe(array: Any) -> tuple[str, bool, int]:
    """What a task received: its type, whether writable, and where its data lives."""
    return type(array).__name__, bool(array.flags.writeable), array.__array_interface__["data"][0]


def identity(value: Any) -> Any:
    return value


def write_index(array: Any, i: int) -> int:
    array[i] = i * 10
    return i


def read_at(array: Any, i: int) -> float:
    return float(array[i])


def kinds(*args: Any, **kwargs: Any) -> list[str]:
    """The types a task received, looking inside tuples, lists and dicts."""

    def kind(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [kind(v) for v in value]
        if isinstance(value, dict):
            return {k: kind(v) for k, v in value.items()}
        return type(value).__name__

    return [kind(a) for a in args] + [kind(kwargs)]


def mappings(_: object) -> int:
    return len(fenfa.segments._maps)


def fail_at(array: Any, bad: int, i: int) -> float:
    if i == bad:
        raise ValueError(f"task {i} fails")
    return float(array[i])


def kill_at(array: Any, bad: int, i: int) -> float:
    if i == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(array[i])


def small_value(array: Any, i: int) -> float:
    return float(array[i])


def make_array(kind: str) -> Any:
    if kind == "transposed":
        return np.arange(200_000.0).reshape(400, 500).T
    if kind == "scalar":
        return np.array(3.5)
    if kind == "structured":
        out = np.zeros(50_000, dtype=[("a", "i4"), ("b", "f8")])
        out["a"] = np.arange(50_000)
        return out
    if kind == "big":
        return np.arange(4_000_000, dtype=np.float32)
    return np.arange(10.0)


def blas_threads(_: object) -> tuple[str | None, list[int]]:
    from threadpoolctl import threadpool_info

    np.ones((4, 4)) @ np.ones((4, 4))  # make sure the BLAS is loaded
    counts = [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]
    return os.environ.get("OPENBLAS_NUM_THREADS"), counts


# -- zero-copy, proven ---------------------------------------------------------------


def test_a_worker_writes_into_a_writable_shared_array_and_the_caller_sees_it(
    backend: str,
) -> None:
    handle = fenfa.share(np.zeros(16), writable=True)
    if backend == "dask":
        # A cluster's workers may be on other machines: refused, never lost writes.
        with pytest.raises(fenfa.SerializationError, match="writable"):
            fenfa.map(functools.partial(write_index, handle), range(16), backend=backend)
        handle.close()
        return
    try:
        fenfa.map(functools.partial(write_index, handle), range(16), backend=backend)
        assert handle.value.tolist() == [i * 10.0 for i in range(16)]
    finally:
        handle.close()


def test_a_process_worker_sees_what_the_caller_writes_after_sharing() -> None:
    # Nothing is sent after the write: the worker can only see it through the
    # memory both processes map.
    with fenfa.Pool("process", 1) as pool, fenfa.share(np.zeros(8), writable=True) as handle:
        assert pool.map(read_at, [handle], [3]) == [0.0]
        handle.value[3] = 42.0
        assert pool.map(read_at, [handle], [3]) == [42.0]


def test_process_workers_map_one_copy_and_reuse_it() -> None:
    big = np.arange(2_000_000.0)  # 16 MB: shared on its own, above AUTO_SHARE_BYTES
    with fenfa.Pool("process", 1) as pool:
        seen = pool.map(lambda _: describe(big), range(1)) + pool.map(describe, [big] * 3)
    kinds_seen = {(name, writable) for name, writable, _ in seen}
    assert kinds_seen == {("ndarray", False)}, "auto-shared arrays arrive as read-only views"
    # One call's tasks in one worker all see the same mapping (the same address).
    assert len({address for _, _, address in seen[1:]}) == 1


@pytest.mark.parametrize("backend", ["serial", "thread"])
def test_in_process_backends_pass_the_same_memory(backend: str) -> None:
    big = np.arange(100_000.0)
    (plain,) = fenfa.map(identity, [big], backend=backend)
    assert plain is big  # no copy at all
    with fenfa.share(big) as handle:
        (shared,) = fenfa.map(identity, [handle], backend=backend)
        assert np.shares_memory(shared, big)
        assert not shared.flags.writeable


def test_results_match_on_every_backend(backend: str) -> None:
    big = np.random.default_rng(6).random(1_000_000)
    want: Any = [slice_sum(big, i) for i in range(40)]
    if backend == "dask":
        # The array reaches a dask worker as a copy that may be aligned otherwise,
        # and NumPy's SIMD sums depend on alignment in the last bit.
        want = pytest.approx(want, rel=1e-12)
    assert fenfa.map(functools.partial(slice_sum, big), range(40), backend=backend) == want
    with fenfa.share(big) as handle:
        assert fenfa.map(slice_sum, [handle] * 40, range(40), backend=backend) == want
        assert fenfa.map(functools.partial(slice_sum, handle), range(40), backend=backend) == want


def test_handles_resolve_inside_tuples_dicts_partials_and_closures(backend: str) -> None:
    with fenfa.share(np.arange(5.0)) as array, fenfa.share(b"payload") as data:
        got = fenfa.starmap(
            functools.partial(kinds, array),
            [((array, [data]), {"k": array})],
            backend=backend,
        )
        assert got == [["ndarray", ["ndarray", ["memoryview"]], {"k": "ndarray"}, {}]]
        # Captured by the function (a closure cell):
        assert fenfa.map(lambda _: kinds(array), [0], backend=backend) == [["ndarray", {}]]


def test_other_objects_are_pickled_once_and_cached_per_worker(backend: str) -> None:
    table = {f"key{i}": i for i in range(1000)}
    with fenfa.share(table) as handle:
        got = fenfa.map(
            lambda h, k: h[k], [handle] * 3, ["key1", "key500", "key999"], backend=backend
        )
        assert got == [1, 500, 999]
        if backend == "process":
            with fenfa.Pool("process", 1) as pool:
                ids = pool.map(id, [handle] * 4, chunksize=1)
            assert len(set(ids)) == 1, "one unpickled object per worker, reused"


def test_a_200_mb_array_through_100_tasks_keeps_the_callers_memory_flat() -> None:
    big = np.ones(25_000_000)  # 200 MB
    me = psutil.Process()
    with fenfa.Pool("process", 2) as pool:
        pool.map(small_value, [np.zeros(2)], [0])  # workers started before measuring
        gc.collect()
        before = me.memory_info().rss
        peak = before
        for value in pool.imap(functools.partial(small_value, big), range(100)):
            assert value == 1.0
            peak = max(peak, me.memory_info().rss)
    growth = (peak - before) / 2**20
    assert growth < 50, f"the caller's RSS grew by {growth:.0f} MB"


def test_large_array_results_come_back_whole_and_writable() -> None:
    with fenfa.Pool("process", 2) as pool:
        for kind in ("transposed", "scalar", "structured", "big", "small"):
            (got,) = pool.map(make_array, [kind])
            want = make_array(kind)
            assert got.dtype == want.dtype
            assert got.shape == want.shape
            assert np.array_equal(got, want), kind
            assert got.flags.writeable, kind
            got[...] = got  # really writable


# -- lifetimes: no leftovers -------------------------------------------------------


def test_no_segment_outlives_a_call_or_a_handle() -> None:
    big = np.arange(1_000_000.0)
    with fenfa.Pool("process", 2) as pool:
        assert pool.map(functools.partial(small_value, big), range(5)) == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert segments() == []  # the call's own segment went when it ended
        handle = fenfa.share(big)
        assert pool.map(small_value, [handle], [7]) == [7.0]
        assert len(segments()) == 1
        del handle
        gc.collect()
        assert segments() == []
        # ... and the workers were told to drop their mappings.
        assert pool.map(mappings, range(4), chunksize=1) == [0, 0, 0, 0]


def test_no_segment_is_left_after_an_exception_or_a_crashed_worker() -> None:
    big = np.arange(1_000_000.0)
    with fenfa.Pool("process", 2) as pool:
        with pytest.raises(ValueError, match="task 3 fails"):
            pool.map(functools.partial(fail_at, big, 3), range(8), chunksize=1)
        assert segments() == []
        results = pool.map(functools.partial(kill_at, big, 2), range(6), on_error="return")
        assert isinstance(results[2], fenfa.WorkerCrashed)
        assert [r for i, r in enumerate(results) if i != 2] == [0.0, 1.0, 3.0, 4.0, 5.0]
        assert segments() == []


def test_a_closed_handle_can_be_shared_again_with_the_same_function() -> None:
    # The worker's function cache must drop a function whose segment is gone,
    # in step with the caller's mirror of that cache, or the next call hangs
    # on a function the worker no longer has.
    with fenfa.Pool("process", 1) as pool:
        for round_ in range(3):
            with fenfa.share(np.full(10, float(round_))) as handle:
                fn = functools.partial(read_at, handle)
                assert pool.map(fn, range(3)) == [float(round_)] * 3


SHARE_SCRIPT = """
import functools, os, pathlib, sys, threading
import numpy as np
import fenfa

def task(array, shared, directory, i):
    assert array[0] == 1.0 and shared[0] == 2.0
    d = pathlib.Path(directory)
    (d / f"tmp-{os.getpid()}").write_text(str(os.getpid()))
    os.replace(d / f"tmp-{os.getpid()}", d / f"pid-{os.getpid()}")
    threading.Event().wait(60)  # stuck until killed

if __name__ == "__main__":
    d = pathlib.Path(sys.argv[1])
    handle = fenfa.share(np.full(1_000_000, 2.0))
    fn = functools.partial(task, np.ones(1_000_000), handle, str(d))
    try:
        fenfa.map(fn, range(4), backend="process", workers=2, chunksize=1)
    except KeyboardInterrupt:
        (d / "caught").touch()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_no_segment_is_left_after_ctrl_c_or_a_killed_parent(
    tmp_path: Path, signum: signal.Signals
) -> None:
    with script(tmp_path, SHARE_SCRIPT, str(tmp_path)) as proc:
        wait_for(lambda: len(worker_pids(tmp_path)) >= 2, "both stuck tasks to start", 30)
        pids = worker_pids(tmp_path)
        # One segment for the handle, one for the array the call shared on its own.
        assert len(segments(proc.pid)) == 2, segments(proc.pid)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal does
            assert proc.wait(timeout=20) == 0, script_output(tmp_path)
            assert (tmp_path / "caught").exists()
        else:
            proc.kill()
            assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: all(gone(p) for p in pids), "the workers to exit", 10)
        wait_for(lambda: not segments(proc.pid), "the segments to be removed", 5)
        stderr = (tmp_path / "stderr").read_text()
        assert "resource_tracker" not in stderr
        assert "leaked" not in stderr


# -- where segments go, and when there is no room ----------------------------------


def test_segments_fall_back_to_the_temporary_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    real = fenfa.segments._write_file
    first = fenfa.segments._directories()[0]

    def full_first_directory(path: str, *args: Any, **kwargs: Any) -> None:
        if os.path.dirname(path) == first:
            raise OSError(28, "No space left on device")
        real(path, *args, **kwargs)

    monkeypatch.setattr(fenfa.segments, "_write_file", full_first_directory)
    if first == fenfa.segments._directories()[-1]:
        pytest.skip("no second directory to fall back to")
    big = np.arange(500_000.0)
    with fenfa.share(big) as handle, fenfa.Pool("process", 1) as pool:
        assert pool.map(small_value, [handle], [123]) == [123.0]
        (path,) = segments()
        assert os.path.dirname(path) != first


NO_ROOM_SCRIPT = """
import resource, signal
import numpy as np
import fenfa
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file above 1 MB
try:
    fenfa.share(np.zeros(1 << 19), writable=True)  # 4 MB
except fenfa.FenfaError as exc:
    print("error:", exc)
"""


@pytest.mark.timeout(60)
def test_no_room_anywhere_is_a_clear_error_naming_the_size(tmp_path: Path) -> None:
    with script(tmp_path, NO_ROOM_SCRIPT) as proc:
        assert proc.wait(timeout=30) == 0, script_output(tmp_path)
    out = (tmp_path / "stdout").read_text()
    assert "error: could not make room for 4.0 MiB (4194304 bytes) of shared data" in out, out
    assert fenfa.segments.DIR_VARIABLE in out


# -- bad input ----------------------------------------------------------------------


def test_sharing_an_unpicklable_object_names_it() -> None:
    with pytest.raises(fenfa.SerializationError, match="could not pickle lock"):
        fenfa.share(threading.Lock())


def test_writable_needs_an_array_or_a_buffer() -> None:
    with pytest.raises(TypeError, match=r"writable=True\) needs a NumPy array"):
        fenfa.share({"a": 1}, writable=True)


def test_a_closed_handle_says_so() -> None:
    handle = fenfa.share(np.arange(10.0))
    handle.close()
    assert "closed" in repr(handle)
    with pytest.raises(fenfa.SerializationError, match="already closed"):
        fenfa.map(small_value, [handle], [1], backend="process", workers=1)


# -- native thread pools -------------------------------------------------------------


@pytest.mark.parametrize(("option", "want"), [(1, "1"), (False, None)])
def test_native_threads_caps_blas_in_process_workers(
    option: int | bool, want: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("threadpoolctl")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with fenfa.Pool("process", 1, native_threads=option) as pool:
        ((variable, counts),) = pool.map(blas_threads, [0])
    assert variable == want
    if option == 1:
        assert counts, "threadpoolctl sees no BLAS"
        assert set(counts) == {1}, counts


def test_native_threads_auto_divides_the_cores_among_the_workers() -> None:
    from fenfa.backends import usable_cores

    with fenfa.Pool("process", 2) as pool:
        assert pool._backend is not None
        assert pool._backend.native_threads == max(1, usable_cores() // 2)  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [0, -1, "many", None, True, 1.5])
def test_native_threads_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="native_threads must be"):
        fenfa.Pool("process", 1, native_threads=bad)  # type: ignore[arg-type]


PRELOADED_SCRIPT = """
import numpy as np  # loaded before any worker: the forkserver preloads this module
import fenfa
from threadpoolctl import threadpool_info

def blas_threads(_):
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

if __name__ == "__main__":
    np.ones((4, 4)) @ np.ones((4, 4))
    with fenfa.Pool("process", 1, native_threads=1) as pool:
        print("capped", pool.map(blas_threads, [0]))
    with fenfa.Pool("process", 1, native_threads=False) as pool:
        print("free", pool.map(blas_threads, [0]))
"""


@pytest.mark.timeout(60)
def test_the_cap_reaches_a_blas_loaded_before_the_worker_started(tmp_path: Path) -> None:
    pytest.importorskip("threadpoolctl")
    with script(tmp_path, PRELOADED_SCRIPT) as proc:
        assert proc.wait(timeout=50) == 0, script_output(tmp_path)
    out = (tmp_path / "stdout").read_text()
    assert "capped [[1]]" in out, out
