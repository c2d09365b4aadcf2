"""The dask backend, against real clusters.

One ``LocalCluster`` (two worker processes, one thread each) serves the
module: a pool owns it, and the tests that need a second pool connect to it
by address. One test starts a real deployment instead: ``dask scheduler`` and
two ``dask worker`` processes as subprocesses on 127.0.0.1, connected by
address, and kills a worker while a call runs.

Task functions live at module level so that they pickle by reference.
Cross-process gates are marker files in ``tmp_path`` or results that have
arrived: never a sleep taken as synchronisation.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fenfa
from fenfa.errors import RemoteTraceback
from helpers import endless, hang, script, session_processes, wait_for

distributed = pytest.importorskip("distributed")

from fenfa.backends.dask import DaskBackend  # noqa: E402 - needs distributed


class Boom(Exception):
    """A user exception: it must come back with this very type."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def fail_at_five(x: int) -> int:
    if x == 5:
        raise Boom("five")
    return x


def fail_first_time(directory: str, x: int) -> int:
    """Fails the first attempt of each input (a marker file remembers it)."""
    marker = Path(directory) / f"tried-{x}"
    if not marker.exists():
        marker.touch()
        raise Boom(f"first attempt at {x}")
    return x


def mark_done(directory: str, x: int) -> int:
    (Path(directory) / f"done-{x}").touch()
    return x


def hang_at(directory: str, which: int, x: int) -> int:
    if x == which:
        hang(directory)
    return x


def who(x: int) -> tuple[Any, str | None, int, int]:
    me = fenfa.current_worker()
    me.state["count"] = me.state.get("count", 0) + 1
    return me.id, me.backend, me.pid, me.state["count"]


def initialize(value: str) -> None:
    fenfa.current_worker().state["init"] = value


def read_init(x: int) -> Any:
    return fenfa.current_worker().state.get("init")


def total(data: Any, x: int) -> int:
    return int(sum(bytes(data[:4]))) + x


def pick(array: Any, x: int) -> float:
    return float(array[x]) + x


def unpicklable_at_two(x: int) -> Any:
    return threading.Lock() if x == 2 else x  # a lock pickles with nothing


def slow_pid(x: int) -> tuple[int, int]:
    time.sleep(0.01)  # work to be interrupted, not a synchronisation
    return x, os.getpid()


def stalls_at_40(directory: str, x: int) -> tuple[int, int]:
    """Task 40 says which worker runs it, then stalls there until that worker is killed."""
    if x == 40:
        marker = Path(directory) / "running-40"
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        marker.with_suffix(".tmp").rename(marker)
        time.sleep(60)  # (killed long before: the test fails on its timeout otherwise)
    return slow_pid(x)


@pytest.fixture(scope="module")
def pool() -> Iterator[fenfa.Pool]:
    with fenfa.Pool("dask", 2) as pool:
        yield pool


def test_map_matches_serial(pool: fenfa.Pool) -> None:
    data = list(range(1000))
    assert pool.backend == "dask"
    assert pool.workers == 2
    assert pool.map(square, data) == [x * x for x in data]
    assert pool.map(add, data, data) == [2 * x for x in data]
    assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
    assert list(pool.imap(square, iter(data))) == [x * x for x in data]
    assert pool.map(square, []) == []
    assert pool.submit(add, 2, 3).result(timeout=30) == 5
    assert pool.apply(add, (4, 5)) == 9


def test_imap_unordered(pool: fenfa.Pool) -> None:
    got = list(pool.imap_unordered(square, range(300)))
    assert sorted(got) == [x * x for x in range(300)]


def test_errors_keep_type_and_remote_traceback(pool: fenfa.Pool) -> None:
    with pytest.raises(Boom, match="five") as info:
        pool.map(fail_at_five, range(10))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_at_five" in cause.tb
    assert any("task 5" in note for note in info.value.__notes__)


def test_on_error_return_and_skip(pool: fenfa.Pool) -> None:
    got = pool.map(fail_at_five, range(8), on_error="return")
    assert got[:5] == [0, 1, 2, 3, 4]
    assert isinstance(got[5], Boom)
    assert got[6:] == [6, 7]
    assert pool.map(fail_at_five, range(8), on_error="skip") == [0, 1, 2, 3, 4, 6, 7]


def test_retries(pool: fenfa.Pool, tmp_path: Path) -> None:
    fn = functools.partial(fail_first_time, str(tmp_path))
    assert pool.map(fn, range(6), retries=1) == list(range(6))


def test_unpicklable_result_fails_its_own_task(pool: fenfa.Pool) -> None:
    got = pool.map(unpicklable_at_two, range(5), on_error="return", chunksize=5)
    assert got[:2] == [0, 1]
    assert got[3:] == [3, 4]
    assert isinstance(got[2], fenfa.SerializationError)


def test_window_bounds_the_input_pulled(pool: fenfa.Pool, tmp_path: Path) -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for x in endless():
            pulled += 1
            yield x

    window = 6
    fn = functools.partial(mark_done, str(tmp_path))
    it = pool.imap(fn, source(), window=window, chunksize=1)
    try:
        assert next(it) == 0
        # Hold off until everything dispatched has run: a pool that keeps
        # pulling while results pile up would pull on (endless() fails loudly).
        wait_for(
            lambda: all((tmp_path / f"done-{i}").exists() for i in range(pulled - 1)),
            "the dispatched tasks to finish",
        )
        assert pulled <= window + 1
        assert [next(it) for _ in range(50)] == list(range(1, 51))
        assert pulled <= 51 + window
    finally:
        it.close()  # type: ignore[attr-defined]


def test_timeout(pool: fenfa.Pool, release: Path) -> None:
    fn = functools.partial(hang_at, str(release.parent), 3)
    begin = time.monotonic()
    got = pool.map(fn, range(6), timeout=1.0, on_error="return", chunksize=6)
    assert time.monotonic() - begin < 10
    assert got[:3] == [0, 1, 2]
    assert got[4:] == [4, 5]
    assert isinstance(got[3], fenfa.TaskTimeout)
    assert got[3].index == 3
    assert "cannot stop a running thread" in str(got[3])


def test_current_worker_and_state(pool: fenfa.Pool) -> None:
    got = pool.map(who, range(40), chunksize=1)
    ids = {worker_id for worker_id, _, _, _ in got}
    assert all(isinstance(i, str) and i.startswith("tcp://127.0.0.1:") for i in ids)
    assert {backend for _, backend, _, _ in got} == {"dask"}
    assert os.getpid() not in {pid for _, _, pid, _ in got}
    # state lives as long as the worker: its count goes on across tasks and calls.
    for worker_id in ids:
        counts = [count for i, _, _, count in got if i == worker_id]
        assert len(set(counts)) == len(counts)
    again = pool.map(who, range(4), chunksize=1)
    first = {i: max(c for j, _, _, c in got if j == i) for i in ids}
    assert all(count > first[i] for i, _, _, count in again)


def test_initializer_runs_once_per_worker(pool: fenfa.Pool) -> None:
    assert isinstance(pool._backend, DaskBackend)
    address = pool._backend.address
    with fenfa.Pool("dask", address=address, initializer=initialize, initargs=("ready",)) as other:
        assert other.workers == 2  # the cluster's threads
        assert other.map(read_init, range(10)) == ["ready"] * 10


def test_insights_and_progress(pool: fenfa.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(pool._backend, DaskBackend)
    with fenfa.Pool("dask", address=pool._backend.address, insights=True) as other:
        assert other.map(square, range(50), progress=True) == [x * x for x in range(50)]
        records = other.insights.records()
    assert sorted(r.index for r in records) == list(range(50))
    assert {r.backend for r in records} == {"dask"}
    assert all(isinstance(r.worker, str) and r.worker.startswith("tcp://") for r in records)
    now = time.monotonic()
    # Worker times are converted to this process's clock.
    assert all(r.submitted is not None and r.started >= r.submitted - 1.0 for r in records)
    assert all(r.ended <= now for r in records)
    summary = other.insights.summary()
    assert any("dask tcp://" in line.name for line in summary.workers)
    assert "50/50" in capsys.readouterr().err


def test_share_handles_are_scattered_once(pool: fenfa.Pool) -> None:
    data = bytes(range(200)) * 5000  # 1 MB
    with fenfa.share(data) as handle:
        assert pool.map(total, [handle] * 5, range(5)) == [6 + x for x in range(5)]
        bound = functools.partial(total, handle)
        assert pool.map(bound, range(5)) == [6 + x for x in range(5)]
        backend = pool._backend
        assert isinstance(backend, DaskBackend)
        # A task's bytes carry the handle's id, not its megabyte.
        encoded, used = backend._sender.encode([(handle, 1)] * 100, {}, function=False)
        assert len(encoded) < 2_000
        assert len(used) == 1


def test_large_arrays_are_scattered_once_per_call(
    pool: fenfa.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big NumPy argument, passed to every task or bound, crosses once per call."""
    np = pytest.importorskip("numpy")
    big = np.arange(1 << 18, dtype=np.float64)  # 2 MiB, over sharing.AUTO_SHARE_BYTES
    backend = pool._backend
    assert isinstance(backend, DaskBackend)
    scattered: list[int] = []
    sender = backend._sender  # (what a call scatters once: backends/dask/sending.py)
    scatter = sender._scatter

    def counting(value: Any) -> Any:
        scattered.append(int(getattr(value, "nbytes", len(value))))
        return scatter(value)

    monkeypatch.setattr(sender, "_scatter", counting)
    expected = [float(big[x]) + x for x in range(40)]
    assert pool.map(pick, [big] * 40, range(40), chunksize=1) == expected
    assert scattered == [big.nbytes]
    assert pool.map(functools.partial(pick, big), range(40), chunksize=1) == expected
    assert scattered == [big.nbytes, big.nbytes]
    # A small array travels inside its batch, as before.
    small = np.arange(10.0)
    assert pool.map(pick, [small] * 3, range(3)) == [2.0 * x for x in range(3)]
    assert len(scattered) == 2


def test_shutdown_without_wait_lets_submitted_work_finish(pool: fenfa.Pool) -> None:
    assert isinstance(pool._backend, DaskBackend)
    other = fenfa.Pool("dask", address=pool._backend.address)
    future = other.submit(slow_pid, 7)
    other.shutdown(wait=False)  # returns at once; the client closes when the work is done
    assert future.result(timeout=30)[0] == 7
    with pytest.raises(fenfa.PoolClosed):
        other.submit(slow_pid, 8)


def test_shutdown_cancelling_returns_promptly(pool: fenfa.Pool, release: Path) -> None:
    assert isinstance(pool._backend, DaskBackend)
    other = fenfa.Pool("dask", address=pool._backend.address)
    future = other.submit(hang, str(release.parent))
    begin = time.monotonic()
    other.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - begin < 5
    with pytest.raises(fenfa.PoolClosed):
        future.result(timeout=5)


def test_address_option_is_checked() -> None:
    with pytest.raises(ValueError, match="address"):
        fenfa.Pool("thread", address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="address"):
        fenfa.Pool("dask", address=8786)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Pool option"):
        fenfa.map(square, [1], backend="dask", address="tcp://127.0.0.1:8786")


def test_backend_unavailable_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n.startswith("fenfa.backends.dask")]:
        monkeypatch.delitem(sys.modules, name)  # (the package and its modules, imported anew)
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(fenfa.BackendUnavailable, match=r"pip install fenfa\[dask\]"):
        fenfa.Pool("dask", 1)


def test_module_level_map_starts_a_local_cluster() -> None:
    assert fenfa.map(square, range(20), backend="dask") == [x * x for x in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["module-level map", "pool never shut down"])
def test_a_script_exits_quietly_and_leaves_no_cluster(how: str, tmp_path: Path) -> None:
    """At exit, the local cluster is closed after its client, not under it: no
    reconnection errors on stderr, no dask process left."""
    call = (
        'print(fenfa.map(square, range(10), backend="dask"))'
        if how == "module-level map"
        else 'pool = fenfa.Pool("dask", 2)\n    print(pool.map(square, range(10)))'
    )
    source = f"""
import fenfa

def square(x):
    return x * x

if __name__ == "__main__":
    {call}
"""
    with script(tmp_path, source) as proc:
        assert proc.wait(timeout=45) == 0
        assert (tmp_path / "stdout").read_text() == f"{[x * x for x in range(10)]}\n"
        assert (tmp_path / "stderr").read_text() == ""
        wait_for(lambda: not session_processes(proc.pid), "the cluster's processes to exit")


# ------------------------------------------------------------------- a real deployment


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def test_killed_worker_in_a_real_deployment(tmp_path: Path) -> None:
    """A scheduler and two workers as processes; one worker is killed mid-call.

    The scheduler is told not to run a killed worker's task again
    (``allowed-failures`` 0), so the tasks it ran fail with WorkerCrashed;
    every other task completes on the surviving worker. Nothing hangs.
    """
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        _start(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            tmp_path / "scheduler.log",
            DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0",
            # A fetch from the killed worker gives up after this, not dask's 30 s.
            DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="3s",
        )
    ]  # fmt: skip
    try:
        wait_for(lambda: scheduler_file.exists() and scheduler_file.stat().st_size > 0,
                 "the scheduler to start", timeout=30)  # fmt: skip
        for i in range(2):
            procs.append(
                _start(
                    ["worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                     "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"],
                    tmp_path / f"worker-{i}.log",
                    # (The tasks pickle by reference: workers import this module.)
                    PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]),
                )
            )  # fmt: skip
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=30)
        n = 300
        got: dict[int, Any] = {}
        marker = tmp_path / "running-40"
        killed: list[int] = []

        def kill_the_worker_running_40() -> None:
            # (Killing whichever worker sent some result raced with that worker
            # going idle: it then had no task to lose.)
            wait_for(marker.exists, "task 40 to start", 30)
            killed.append(int(marker.read_text()))
            os.kill(killed[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_the_worker_running_40)
        killer.start()
        fn = functools.partial(stalls_at_40, str(tmp_path))
        with fenfa.Pool("dask", address=address) as pool:
            assert pool.workers == 2
            for value in pool.imap_unordered(fn, range(n), on_error="return"):
                if isinstance(value, BaseException):
                    got[value.index] = value  # type: ignore[attr-defined]
                    continue
                x, pid = value
                got[x] = pid
        killer.join()
        assert sorted(got) == list(range(n))
        crashed = [i for i, v in got.items() if isinstance(v, BaseException)]
        assert all(isinstance(got[i], fenfa.WorkerCrashed) for i in crashed)
        assert 40 in crashed, "the task the killed worker was running failed"
        survivors = {v for v in got.values() if isinstance(v, int)} - set(killed)
        assert len(survivors) == 1
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
