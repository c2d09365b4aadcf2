"""Shared fixtures: the backend matrix and the leak check every test runs under.

The leak check is the test-side half of "nothing ever hangs, every child is
reaped" (DESIGN.md §3): a test that leaves a thread or a child process behind
fails, even when everything it asserted was right.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import fenfa.api
from fenfa import segments
from helpers import WATCHDOG_SECONDS

# A suite started in the background by a non-interactive shell (``make test
# &``, a CI runner's ``nohup``) inherits SIGINT ignored, and an ignored signal
# stays ignored across exec: every script the Ctrl-C tests start would shrug
# off their SIGINT, as no user's terminal does. Python's own handler is reset
# to the default at exec, so putting it back here gives each child the
# disposition a user's program has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Every backend the contract suite runs on. The serial backend is the oracle:
#: each test compares the other backends' output with serial's for the same call.
BACKENDS = ["serial", "thread", "process"]

#: How long teardown waits for threads and children to go away. A deadline
#: for cleanup that is already under way, not a synchronisation: a correct
#: shutdown(wait=True) leaves nothing to wait for, and a zombie that a
#: forkserver has not reaped yet takes milliseconds.
LEAK_DEADLINE = 5.0

#: Threads a library starts once and keeps for the life of the process, by
#: design: tqdm's monitor (started with the first progress bar); dask's
#: process-wide executors, module or class attributes never shut down: the one
#: that runs every Future's done-callbacks (the dask backend reports through
#: it) and the one that (de)serializes large messages off the event loop.
LONG_LIVED_THREADS = {"tqdm_monitor", "Dask-Callback-Thread_0", "Dask-Offload_0"}


#: Tests that take a second or more on the 2-core machine (``--durations``
#: of a quiet run). ``make test`` leaves them out so that it stays under six
#: minutes; ``make test-slow`` runs only them, and ``.ci/run`` runs both, so
#: CI covers everything. A name alone covers every parametrization of the
#: test; ``name[id]`` only that one. Tests whose length is their point (the
#: soak, the resume-after-SIGKILL runs) carry ``@pytest.mark.slow`` themselves.
SLOW_TESTS = {
    "test_contract.py": {
        "test_chunksize_and_window_do_not_change_results[dask]",
        "test_ordered_imap_counts_buffered_results_in_the_window[dask]",
    },
    "test_correctness.py": {
        "test_every_backend_gives_what_builtins_map_gives",
        "test_auto_keeps_every_result_of_a_slow_generator",
    },
    "test_dask.py": {
        "test_killed_worker_in_a_real_deployment",
        "test_a_script_exits_quietly_and_leaves_no_cluster",
    },
    "test_cli.py": {"test_bench_quick_reports_every_backend_on_both_workloads"},
    "test_beyond.py": {
        "test_speculation_delivers_every_result_once",
        "test_without_speculation_the_straggler_holds_the_call",
        "test_a_worker_past_max_worker_memory_is_recycled",
    },
    "test_trust.py": {
        "test_a_timeout_counts_from_when_the_task_starts_not_while_its_function_loads",
        "test_a_huge_timeout_keeps_the_watchdog_alive[thread]",
        "test_the_thread_backend_keeps_only_live_threads",
    },
    "test_relay.py": {"test_a_worker_printing_100_mb_does_not_fill_the_callers_memory"},
    "test_run_gnu.py": {"test_joblog_columns_as_gnu_parallel"},
    "test_mapcmd.py": {
        "test_a_hung_record_times_out_and_the_run_ends[thread]",
        "test_each_backend_runs_the_records_where_it_should[dask]",
    },
    "test_joblib.py": {
        "test_grid_search_and_cross_val_score_match_loky",
        "test_a_timeout_kills_the_task_and_frees_its_worker",
    },
    "test_faults.py": {
        "test_max_tasks_per_worker_recycles_workers[process]",
        "test_timeout_as_a_pool_default[thread]",
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests named in SLOW_TESTS ``slow``."""
    for item in items:
        names = SLOW_TESTS.get(item.path.name, set())
        if item.name in names or item.name.split("[", 1)[0] in names:
            item.add_marker(pytest.mark.slow)


# Leftover threads or children still there after this long: collect cycles, look again.
COLLECT_AFTER = 0.1


def _helper_pids() -> set[int]:
    """multiprocessing's own long-lived helpers: started once, live until exit.

    Their children are *not* excluded: the forkserver's children are the
    pool's worker processes, exactly what the check is for.
    """
    pids: set[int] = set()
    forkserver = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(forkserver, "_forkserver_pid", None)
    if pid is not None:
        pids.add(pid)
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    pid = getattr(tracker, "_pid", None)
    if pid is not None:
        pids.add(pid)
    return pids


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({proc.status()}): {' '.join(proc.cmdline())[:120]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _segments() -> list[str]:
    """Shared-memory segments this test process made and has not removed."""
    prefix = f"{segments.PREFIX}{os.getpid()}-"
    return [
        os.path.join(directory, name)
        for directory in segments._directories()
        for name in os.listdir(directory)
        if name.startswith(prefix)
    ]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves new threads, child processes or shared segments behind.

    Module-level calls (``fenfa.map`` ...) keep a default pool alive on
    purpose, so those are shut down first; whatever is left after that is a leak.
    The session's dask cluster is not the test's: it is started before the count.
    """
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "dask":
        request.getfixturevalue("dask_cluster")
    me = psutil.Process()
    threads_before = set(threading.enumerate())
    children_before = {p.pid for p in me.children(recursive=True)}
    yield
    fenfa.api._shutdown_default_pools()
    # The cycle collector runs only when something is left: with dask, scikit-learn
    # and Jupyter imported a full collection takes ~90 ms, a third of the suite's
    # time when it ran after every test. (Whatever a test dropped in a reference
    # cycle, a handle's segment or a pool's workers, goes with it.)
    segments = _segments()
    if segments:
        gc.collect()
        segments = _segments()
    if segments:
        for path in segments:
            os.unlink(path)
        pytest.fail(f"test left shared segments behind: {segments}", pytrace=False)
    start = time.monotonic()
    deadline, collected = start + LEAK_DEADLINE, False
    while True:
        threads = [
            t
            for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and t.name not in LONG_LIVED_THREADS
        ]
        helpers = _helper_pids()
        children = [
            p
            for p in me.children(recursive=True)
            if p.pid not in children_before and p.pid not in helpers
        ]
        if not threads and not children:
            return
        now = time.monotonic()
        if now > deadline:
            break
        if not collected and now - start > COLLECT_AFTER:
            gc.collect()  # (a pool dropped in a cycle lets its workers go when collected)
            collected = True
            continue
        time.sleep(0.02)
    lines = [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    lines += [f"child {_describe(p)}" for p in children]
    pytest.fail(
        f"test leaked {len(threads)} thread(s) and {len(children)} child process(es) "
        f"still alive {LEAK_DEADLINE:g} s after teardown:\n  " + "\n  ".join(lines),
        pytrace=False,
    )


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Path]:
    """The file that ends every ``hang``: the test creates it when it is done.

    A watchdog creates it after WATCHDOG_SECONDS, so a pool that never
    interrupts a hung task leaves a failing test, not a hung session.
    """
    path = tmp_path / "release"
    watchdog = threading.Timer(WATCHDOG_SECONDS, path.touch)
    watchdog.start()
    try:
        yield path
    finally:
        watchdog.cancel()
        path.touch()
        watchdog.join()


@pytest.fixture(params=[*BACKENDS, "dask"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the backend under test; serial is the oracle.

    On ``dask`` the pools the test makes connect to one ``LocalCluster`` for
    the session (through Dask's own ``scheduler-address`` setting), so that a
    cluster is not started per test; without ``distributed``, dask is skipped.
    """
    name: str = request.param
    if name != "dask":
        yield name
        return
    address = request.getfixturevalue("dask_cluster")
    dask_config = importlib.import_module("dask.config")
    with dask_config.set({"scheduler-address": address}):
        yield name


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[str]:
    """The address of a 2-worker dask ``LocalCluster`` (processes, one thread each)."""
    pytest.importorskip("distributed")
    from fenfa.backends.dask.cluster import local_cluster

    with local_cluster(2) as cluster:
        yield cluster.scheduler_address
