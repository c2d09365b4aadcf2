"""A fault soak: randomized fenfa calls under a fault mix, checked against an oracle.

Run from the repository root::

    python benchmarks/soak.py --minutes N --seed S [--tasks-per-call K]
                              [--backends process,thread] [--json PATH]
                              [--replay CALL[,CALL]]

Why: issue 4's torture table (``tests/test_faults.py``) checks each fault
alone, once, on a fresh pool. Real work meets them mixed, many times, on pools
that have already been through other faults: a crash in a batch next to a
timeout, a retry of a task whose neighbour returned 10 MB, an early ``break``
out of ``imap`` while shared arrays are live. fenfa promises that nothing
hangs and nothing is lost; this tool keeps asking, for as long as it is told.

What one call is (all drawn from ``Random(f"{seed}-{call}")``, so a seed and
a call number name the same call on every run; ``--replay`` runs only those):
a backend (process or thread), an API (``Pool.map``, ``imap``,
``imap_unordered``, ``submit`` on a fresh pool, module-level ``fenfa.map``),
``on_error``, ``retries``, ``chunksize``, sometimes ``window``, a cached pool
(or a new one) with a worker count and ``max_tasks_per_worker``, and 1 to
``--tasks-per-call`` tasks. Each task may carry one fault: raise, SIGKILL its
own worker, ``os._exit``, segfault (those three on process only), sleep past
``timeout``, return something that will not pickle (a lock, a lambda holding
a lock), take an unpicklable argument (a lock), return 10 MB; a call may pass
every task a 1.6 MB NumPy array (shared automatically on process) or a
``fenfa.share`` handle of it, and ``imap`` calls may stop early.

The oracle: for each task, what must come back - its value, or the type of
the exception (and the task's index). With ``retries``, a fault may fire on the
first attempt only: the task then must succeed. A task knows its attempt from
marker files (``<run>/c<call>/<index>.<n>``, created with ``O_EXCL``), and
appends ``call index attempt`` to a log file of its worker (``<run>/logs``) on
every execution, so the executions of every task can be counted afterwards.

Counted, per task: *wrong* (a result or exception other than the oracle's, a
duplicate, an unexpected raise), *lost* (a result that should have arrived
and did not; under ``on_error="skip"`` that includes a task that failed when it
should not have, which skip hides), *ran twice* (more executions than retries allow, in a call
without crashes: the task should have run exactly once per attempt), *re-runs
after crashes* (the same, in calls where a worker died - SIGKILL, exit,
segfault, or a process timeout, which kills the worker: fenfa re-runs
finished tasks whose results died with the worker, by design), and per call
*hangs*: a watchdog thread dumps every thread's stack if a call runs past
``CALL_LIMIT`` seconds (and, should the call never return, writes the report
and exits 1; ``faulthandler.dump_traceback_later`` backs it up should the
GIL never be released). At the end every pool is shut down (and the
module-level ones), and what is left is compared with a baseline taken after
a warm-up: child processes (psutil), threads, file descriptors, and fenfa's
shared segments (``fenfa.segments.PREFIX`` files of this process and its workers).

Output: a markdown table (and ``--json PATH``); exit status 1 if any of
wrong, lost, ran twice, hangs or leaks is nonzero. Up to ``MAX_INCIDENTS``
incidents are listed with their call number, so ``--seed S --replay CALL``
repeats the call alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import functools
import gc
import json
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import fenfa
import fenfa.api
import fenfa.segments

#: A call that runs longer than this is a hang. Calls take milliseconds to a
#: few seconds (timeouts, crashes); 120 s leaves room for a loaded 2-core machine.
CALL_LIMIT = 120.0
#: The per-task timeout of calls with a sleeping task, and how long that task
#: sleeps: long enough to be past it on a loaded machine, short enough that an
#: abandoned thread ends soon after.
TIMEOUT = 1.5
SLEEP = 4.0
#: The timeout given to some calls without a sleeping task: it must never fire.
LOOSE_TIMEOUT = 60.0
BIG = 10 * 1024 * 1024  # bytes in a "10 MB result"
ARRAY_ITEMS = 200_000  # float64: 1.6 MB, past sharing.AUTO_SHARE_BYTES
#: After shutting everything down, how long leftovers may take to go (an
#: abandoned thread finishes its SLEEP; a killed worker is reaped).
LEAK_DEADLINE = 15.0
MAX_INCIDENTS = 40
#: Threads that libraries start once and keep by design (see tests/conftest.py).
LONG_LIVED_THREADS = {"tqdm_monitor", "Dask-Callback-Thread_0", "Dask-Offload_0"}

CRASHES = ("kill", "exit", "segv")
#: fault -> backends it applies to. Killing, exiting and segfaulting on the
#: thread backend would kill the soak itself.
FAULTS: dict[str, tuple[str, ...]] = {
    "raise": ("process", "thread"),
    "kill": ("process",),
    "exit": ("process",),
    "segv": ("process",),
    "sleep": ("process", "thread"),
    "lock_result": ("process", "thread"),
    "lambda_result": ("process", "thread"),
    "lock_arg": ("process", "thread"),
    "big": ("process", "thread"),
}
#: Faults that cost seconds or memory: at most this many in one call.
PER_CALL_CAP = {"kill": 2, "exit": 2, "segv": 2, "sleep": 2, "big": 3}
#: Faults that fail an attempt, so that a retry may follow.
RETRIED = {"raise", "sleep", *CRASHES}
RETRIED_ON_PROCESS = {"lock_result", "lambda_result"}
APIS = ("map", "imap", "imap_unordered", "submit", "fenfa.map")


class SoakError(Exception):
    """What a "raise" task raises; ``args`` = (call, index) name the task."""


# -- the task (module level: process workers import it from __mp_main__) -------


def value_of(seed: int, call: int, index: int) -> int:
    return (seed * 1_000_003 + call * 10_007 + index * 7_919) % (1 << 31)


def _attempt(run: str, call: int, index: int) -> int:
    """This execution's attempt number, 0 for the first: one marker file per execution."""
    directory = os.path.join(run, f"c{call}")
    n = 0
    while True:
        try:
            os.close(os.open(f"{directory}/{index}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            n += 1
        else:
            return n


def _log(run: str, call: int, index: int, attempt: int) -> None:
    # One write(2) on an O_APPEND descriptor: a whole line even if the worker
    # is killed right after, and lines of concurrent threads never interleave.
    path = f"{run}/logs/{os.getpid()}-{threading.get_ident()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{call} {index} {attempt}\n".encode())
    finally:
        os.close(fd)


def task(spec: tuple[str, int, int, int, str | None, bool], extra: Any) -> Any:
    run, seed, call, index, fault, first_only = spec
    attempt = _attempt(run, call, index)
    _log(run, call, index, attempt)
    if fault is not None and (not first_only or attempt == 0):
        if fault == "raise":
            raise SoakError(call, index)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "exit":
            os._exit(7)
        elif fault == "segv":
            ctypes.string_at(0)
        elif fault == "sleep":
            time.sleep(SLEEP)
        elif fault == "lock_result":
            return call, index, threading.Lock()
        elif fault == "lambda_result":
            lock = threading.Lock()
            return call, index, lambda: lock
    value = value_of(seed, call, index)
    if fault == "big":
        return call, index, bytes([value % 251]) * BIG
    return call, index, value, _extra_info(index, extra)


def _extra_info(index: int, extra: Any) -> Any:
    if isinstance(extra, np.ndarray):
        return float(extra[index * 7 % len(extra)])
    if extra is None:
        return None
    return type(extra).__name__


# -- the plan of one call, and the oracle ------------------------------------


@dataclass
class Plan:
    call: int
    backend: str
    api: str
    n: int
    on_error: str
    retries: int
    chunksize: int | None
    window: int | None
    timeout: float | None
    workers: int
    max_tasks: int | None
    fresh_pool: bool
    array: str | None  # None, "auto" (a plain array argument), "handle" (fenfa.share)
    stop_after: int | None  # imap: break after this many results
    faults: list[str | None]
    first_only: list[bool]

    @property
    def crashes(self) -> bool:
        """A worker dies in this call (a process timeout kills its worker)."""
        kinds = set(self.faults)
        return bool(kinds & set(CRASHES)) or (self.backend == "process" and "sleep" in kinds)

    def describe(self) -> str:
        kinds = Counter(f for f in self.faults if f)
        once = sum(self.first_only)
        return (
            f"call {self.call}: {self.backend} {self.api} n={self.n} on_error={self.on_error} "
            f"retries={self.retries} chunksize={self.chunksize} window={self.window} "
            f"timeout={self.timeout} workers={self.workers} max_tasks={self.max_tasks} "
            f"fresh={self.fresh_pool} array={self.array} stop_after={self.stop_after} "
            f"faults={dict(kinds)} first_only={once}"
        )


def make_plan(seed: int, call: int, backends: list[str], tasks_per_call: int) -> Plan:
    rng = random.Random(f"{seed}-{call}")
    backend = rng.choice(backends)
    api = rng.choice(APIS)
    n = rng.randint(1, tasks_per_call)
    retries = rng.choice([0, 0, 1, 2])
    kinds = [k for k, where in FAULTS.items() if backend in where]
    rate = rng.choice([0.0, 0.0, 0.03, 0.1, 0.3])
    faults: list[str | None] = []
    first_only: list[bool] = []
    used: Counter[str] = Counter()
    for _ in range(n):
        fault = rng.choice(kinds) if rng.random() < rate else None
        if fault is not None and used[fault] >= PER_CALL_CAP.get(fault, n):
            fault = None
        if fault is not None:
            used[fault] += 1
        faults.append(fault)
        # A fault that fires on the first attempt only: the retry must succeed.
        # (Only faults that fail the attempt: a lock returned on threads is
        # a result, not a failure, and an argument fails before any attempt.)
        retried = fault in RETRIED or (fault in RETRIED_ON_PROCESS and backend == "process")
        first_only.append(retried and retries > 0 and rng.random() < 0.5)
    if "sleep" in used:
        timeout: float | None = TIMEOUT
    else:
        timeout = rng.choice([None, None, LOOSE_TIMEOUT])
    stop_after = None
    if api in ("imap", "imap_unordered") and rng.random() < 0.3:
        stop_after = rng.randint(0, n)
    return Plan(
        call=call,
        backend=backend,
        api=api,
        n=n,
        on_error=rng.choice(["raise", "return", "skip"]),
        retries=retries,
        chunksize=rng.choice([None, None, 1, 2, 3, 8, 25]),
        window=rng.choice([None, None, None, 1, 3, 8]),
        timeout=timeout,
        workers=rng.randint(1, 3) if backend == "process" else rng.randint(1, 4),
        max_tasks=rng.choice([None, None, None, 1, 3, 7]),
        fresh_pool=rng.random() < 0.08,
        array=rng.choice([None, None, None, "auto", "handle"]),
        stop_after=stop_after,
        faults=faults,
        first_only=first_only,
    )


def expected_error(plan: Plan, i: int) -> type[BaseException] | None:
    """The exception task ``i`` must end with, or None if it must return its value."""
    fault = plan.faults[i]
    if fault is None or fault == "big" or plan.first_only[i]:
        return None
    process = plan.backend == "process"
    if fault == "raise":
        return SoakError
    if fault in CRASHES:
        return fenfa.WorkerCrashed
    if fault == "sleep":
        return fenfa.TaskTimeout
    if fault in ("lock_result", "lambda_result", "lock_arg") and process:
        return fenfa.SerializationError
    return None


def most_runs(plan: Plan, i: int) -> int:
    """Executions task ``i`` may have without a crash: one per attempt."""
    fault = plan.faults[i]
    if fault == "lock_arg" and plan.backend == "process":
        return 0  # its argument never reaches a worker
    if fault is None or fault == "big" or (fault == "lock_arg"):
        return 1
    if plan.first_only[i]:
        return 2
    if expected_error(plan, i) is None:
        return 1
    return plan.retries + 1


def exc_index(exc: BaseException) -> int | None:
    if isinstance(exc, SoakError):
        return int(exc.args[1])
    index = getattr(exc, "index", None)
    return index if isinstance(index, int) else None


class Judge:
    """Compares what one call delivered with the oracle; counts and explains."""

    def __init__(self, plan: Plan, seed: int, arr: np.ndarray | None, report: Report) -> None:
        self.plan, self.seed, self.arr, self.report = plan, seed, arr, report
        self.errors = [expected_error(plan, i) for i in range(plan.n)]

    def wrong(self, why: str) -> None:
        self.report.wrong += 1
        self.report.incident(f"wrong: {why} [{self.plan.describe()}]")

    def lost(self, indexes: list[int]) -> None:
        if indexes:
            self.report.lost += len(indexes)
            self.report.incident(f"lost tasks {indexes[:20]} [{self.plan.describe()}]")

    def check(self, i: int, got: Any, *, submit: bool = False) -> None:
        """``got`` is task ``i``'s result or exception."""
        plan, want = self.plan, self.errors[i]
        if want is not None:
            if not isinstance(got, want):
                self.wrong(f"task {i} ({plan.faults[i]}): want {want.__name__}, got {_show(got)}")
            elif not submit and exc_index(got) != i:
                self.wrong(f"task {i}: {want.__name__} names task {exc_index(got)}")
            return
        if isinstance(got, BaseException):
            self.wrong(f"task {i} ({plan.faults[i]}): want a value, got {_show(got)}")
            return
        if not self.value_ok(i, got):
            self.wrong(f"task {i} ({plan.faults[i]}): wrong value {_show(got)}")

    def value_ok(self, i: int, got: Any) -> bool:
        plan = self.plan
        if not isinstance(got, tuple) or got[:2] != (plan.call, i):
            return False
        fault = None if plan.first_only[i] else plan.faults[i]
        value = value_of(self.seed, plan.call, i)
        if fault == "big":
            return len(got) == 3 and got[2] == bytes([value % 251]) * BIG
        if fault == "lock_result":  # thread: the lock itself comes back
            return len(got) == 3 and isinstance(got[2], type(threading.Lock()))
        if fault == "lambda_result":
            return len(got) == 3 and isinstance(got[2](), type(threading.Lock()))
        if plan.faults[i] == "lock_arg":
            info: Any = "lock"
        elif self.arr is not None:
            info = float(self.arr[i * 7 % len(self.arr)])
        else:
            info = None
        return got == (plan.call, i, value, info)

    def index_of(self, got: Any) -> int | None:
        if isinstance(got, BaseException):
            return exc_index(got)
        if isinstance(got, tuple) and len(got) >= 2 and got[0] == self.plan.call:
            return int(got[1])
        return None

    # -- by API and on_error ------------------------------------------------

    def ordered(self, got: list[Any], raised: BaseException | None, stopped: bool) -> None:
        """map / imap / fenfa.map: ``got`` in delivery order; ``raised`` ended the call."""
        plan = self.plan
        failing = [i for i in range(plan.n) if self.errors[i] is not None]
        if plan.on_error == "skip":
            expect = [i for i in range(plan.n) if self.errors[i] is None]
        elif plan.on_error == "return":
            expect = list(range(plan.n))
        else:
            expect = list(range(failing[0] if failing else plan.n))
        if plan.on_error == "skip":
            self.skipped(got, expect, stopped)
            return
        for position, result in enumerate(got):
            if position >= len(expect):
                self.wrong(f"result {position} is one too many: {_show(result)}")
                return
            self.check(expect[position], result)
        if raised is not None:
            if plan.on_error != "raise" or not failing:
                self.wrong(f"the call raised {_show(raised)}")
                return
            self.check(failing[0], raised)
        elif plan.on_error == "raise" and failing and not stopped:
            self.wrong(f"the call did not raise task {failing[0]}'s {plan.faults[failing[0]]}")
        # map raises without the results before the failure: none to lose.
        if not stopped and not (raised is not None and plan.api in ("map", "fenfa.map")):
            self.lost(expect[len(got) :])

    def skipped(self, got: list[Any], expect: list[int], stopped: bool) -> None:
        """Ordered under "skip": matched by the index each result names, so that one
        missing result counts once (as lost: skipped after an unexpected failure, or
        never delivered), not as a shift of every result after it."""
        wanted, last = set(expect), -1
        for result in got:
            i = self.index_of(result)
            if i is None or i not in wanted or i <= last:
                self.wrong(f"result {_show(result)} out of place after task {last}")
                continue
            last = i
            self.check(i, result)
        if not stopped:
            delivered = {self.index_of(result) for result in got}
            self.lost([i for i in expect if i not in delivered])

    def unordered(self, got: list[Any], raised: BaseException | None, stopped: bool) -> None:
        plan = self.plan
        seen: Counter[int] = Counter()
        for result in got:
            i = self.index_of(result)
            if i is None or not 0 <= i < plan.n:
                self.wrong(f"a result that names no task: {_show(result)}")
                continue
            seen[i] += 1
            if seen[i] > 1:
                self.wrong(f"task {i} delivered twice")
            elif self.errors[i] is not None and plan.on_error != "return":
                self.wrong(f"task {i} ({plan.faults[i]}) delivered under {plan.on_error}")
            else:
                self.check(i, result)
        failing = {i for i in range(plan.n) if self.errors[i] is not None}
        if raised is not None:
            i = exc_index(raised)
            if plan.on_error != "raise" or i not in failing:
                self.wrong(f"the call raised {_show(raised)}")
            else:
                self.check(i, raised)
            return
        if stopped:
            return
        if plan.on_error == "raise" and failing:
            self.wrong(f"the call raised none of tasks {sorted(failing)}")
            return
        want = range(plan.n) if plan.on_error == "return" else set(range(plan.n)) - failing
        self.lost([i for i in want if i not in seen])


def _show(obj: Any) -> str:
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}({str(obj)[:160]!r})"
    text = repr(obj)
    return text[:160] + ("..." if len(text) > 160 else "")


# -- the report ----------------------------------------------------------------


@dataclass
class Report:
    calls: int = 0
    tasks: int = 0
    wrong: int = 0
    lost: int = 0
    ran_twice: int = 0
    reruns_after_crashes: int = 0
    hangs: int = 0
    leaked_processes: int = 0
    leaked_threads: int = 0
    leaked_fds: int = 0
    leaked_segments: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    # After malloc_trim(0): what glibc keeps in freed arenas (10 MB results) is
    # returned, so what stays is live memory, not fragmentation.
    rss_trimmed_mb: float = 0.0
    seconds: float = 0.0
    executions: int = 0  # lines in the workers' logs: every run of every task
    faults: Counter[str] = field(default_factory=Counter)
    apis: Counter[str] = field(default_factory=Counter)
    incidents: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    COLUMNS = (
        ("calls", "calls"),
        ("tasks", "tasks"),
        ("wrong", "wrong"),
        ("lost", "lost"),
        ("ran_twice", "ran twice"),
        ("reruns_after_crashes", "re-runs after crashes"),
        ("hangs", "hangs"),
        ("leaked_processes", "leaked processes"),
        ("leaked_threads", "leaked threads"),
        ("leaked_fds", "leaked fds"),
        ("leaked_segments", "leaked shared segments"),
        ("rss_start_mb", "RSS start (MB)"),
        ("rss_end_mb", "RSS end (MB)"),
        ("rss_trimmed_mb", "RSS end, trimmed (MB)"),
    )
    FAILING = (
        "wrong",
        "lost",
        "ran_twice",
        "hangs",
        "leaked_processes",
        "leaked_threads",
        "leaked_fds",
        "leaked_segments",
    )

    def incident(self, text: str) -> None:
        if len(self.incidents) < MAX_INCIDENTS:
            self.incidents.append(text)
            print(f"soak: {text}", file=sys.stderr, flush=True)

    @property
    def failed(self) -> bool:
        return any(getattr(self, name) for name in self.FAILING)

    def markdown(self) -> str:
        head = "| " + " | ".join(title for _, title in self.COLUMNS) + " |"
        rule = "|" + "---:|" * len(self.COLUMNS)
        cells = []
        for name, _ in self.COLUMNS:
            value = getattr(self, name)
            cells.append(f"{value:.0f}" if isinstance(value, float) else str(value))
        lines = [head, rule, "| " + " | ".join(cells) + " |", ""]
        lines.append("Faults injected: " + _counts(self.faults))
        lines.append("Calls by backend and API: " + _counts(self.apis))
        lines.append(f"Executions logged: {self.executions} ({self.seconds / 60:.1f} min)")
        if self.leftovers:
            lines += ["", "Left behind:", *(f"- {x}" for x in self.leftovers)]
        if self.incidents:
            lines += ["", f"Incidents (first {MAX_INCIDENTS}):"]
            lines += [f"- {x}" for x in self.incidents]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name, _ in self.COLUMNS}
        out.update(
            seconds=round(self.seconds, 1),
            executions=self.executions,
            faults=dict(self.faults),
            apis=dict(self.apis),
            incidents=self.incidents,
            leftovers=self.leftovers,
            must_be_zero={name: getattr(self, name) for name in self.FAILING},
            failed=self.failed,
        )
        return out


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"


# -- running calls -------------------------------------------------------------


class Watchdog:
    """Counts a hang when a call passes CALL_LIMIT, with every thread's stack."""

    def __init__(self, report: Report, finish: Callable[[], None]) -> None:
        self.report, self.finish = report, finish
        self.lock = threading.Lock()
        self.current: tuple[Plan, float] | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="soak-watchdog", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def watching(self, plan: Plan) -> Iterator[None]:
        with self.lock:
            self.current = (plan, time.monotonic())
        # Should the GIL never come back, the watchdog thread cannot run: this can.
        faulthandler.dump_traceback_later(3 * CALL_LIMIT, exit=True)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            with self.lock:
                self.current = None

    def _watch(self) -> None:
        counted: int | None = None
        while not self.stop.wait(1.0):
            with self.lock:
                current = self.current
            if current is None:
                continue
            plan, started = current
            late = time.monotonic() - started
            if late > CALL_LIMIT and counted != plan.call:
                counted = plan.call
                self.report.hangs += 1
                self.report.incident(f"hang: past {CALL_LIMIT:g} s [{plan.describe()}]")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            elif late > 2 * CALL_LIMIT:
                self.report.incident(f"hang: still running after {late:.0f} s; giving up")
                self.finish()
                os._exit(1)


class Soak:
    def __init__(self, args: argparse.Namespace, run: Path, report: Report) -> None:
        self.seed: int = args.seed
        self.backends: list[str] = args.backends
        self.tasks_per_call: int = args.tasks_per_call
        self.run, self.report = run, report
        self.pools: dict[tuple[str, int, int | None], fenfa.Pool] = {}

    def pool(self, plan: Plan) -> fenfa.Pool:
        key = (plan.backend, plan.workers, plan.max_tasks)
        pool = self.pools.pop(key, None) if plan.fresh_pool else self.pools.get(key)
        if pool is not None and plan.fresh_pool:
            pool.shutdown(wait=True)  # a pool shut down after faults, replaced
            pool = None
        if pool is None:
            pool = self.pools[key] = fenfa.Pool(
                plan.backend, plan.workers, max_tasks_per_worker=plan.max_tasks
            )
        return pool

    def shutdown(self) -> None:
        pools = list(self.pools.values())
        self.pools.clear()
        for pool in pools:
            pool.shutdown(wait=True)
        fenfa.api._shutdown_default_pools()

    def one(self, plan: Plan) -> None:
        call = plan.call
        (self.run / f"c{call}").mkdir()
        self.report.calls += 1
        self.report.tasks += plan.n
        self.report.apis[f"{plan.backend} {plan.api}"] += 1
        self.report.faults.update(
            f"{f} (first attempt)" if once else f
            for f, once in zip(plan.faults, plan.first_only, strict=True)
            if f
        )
        arr = None
        if plan.array is not None:
            arr = np.random.default_rng([self.seed, call]).random(ARRAY_ITEMS)
        judge = Judge(plan, self.seed, arr, self.report)
        with contextlib.ExitStack() as stack:
            extra: Any = arr
            if plan.array == "handle":
                extra = stack.enter_context(fenfa.share(arr))
            specs = [
                (str(self.run), self.seed, call, i, plan.faults[i], plan.first_only[i])
                for i in range(plan.n)
            ]
            extras = [threading.Lock() if f == "lock_arg" else extra for f in plan.faults]
            try:
                self.dispatch(plan, judge, specs, extras)
            except Exception as exc:  # the harness's own fault, or fenfa's: say which
                self.report.wrong += 1
                self.report.incident(
                    f"wrong: the call failed outside the oracle: {_show(exc)} "
                    f"[{plan.describe()}]\n{traceback.format_exc()}"
                )

    def dispatch(self, plan: Plan, judge: Judge, specs: list[Any], extras: list[Any]) -> None:
        options: dict[str, Any] = {"on_error": plan.on_error, "retries": plan.retries}
        for name in ("chunksize", "window", "timeout"):
            if getattr(plan, name) is not None:
                options[name] = getattr(plan, name)
        if plan.api == "submit":
            self.submit(plan, judge, specs, extras)
            return
        if plan.api in ("map", "fenfa.map"):
            if plan.api == "map":
                call = functools.partial(self.pool(plan).map, task, specs, extras, **options)
            else:
                call = functools.partial(
                    fenfa.map,
                    task,
                    specs,
                    extras,
                    backend=plan.backend,
                    workers=plan.workers,
                    **options,
                )
            try:
                got = call()
            except Exception as exc:
                judge.ordered([], exc, stopped=False)
            else:
                judge.ordered(got, None, stopped=False)
            return
        pool = self.pool(plan)
        method = pool.imap if plan.api == "imap" else pool.imap_unordered
        got, raised, stopped = [], None, False
        results = method(task, specs, extras, **options)
        try:
            for result in results:
                if plan.stop_after is not None and len(got) >= plan.stop_after:
                    stopped = True
                    break
                got.append(result)
        except Exception as exc:
            raised = exc
        finally:
            # Half the early stops close the iterator, half just drop it.
            if plan.call % 2:
                results.close()  # type: ignore[attr-defined]
            del results
        if plan.api == "imap":
            judge.ordered(got, raised, stopped)
        else:
            judge.unordered(got, raised, stopped)

    def submit(self, plan: Plan, judge: Judge, specs: list[Any], extras: list[Any]) -> None:
        with fenfa.Pool(
            plan.backend,
            plan.workers,
            retries=plan.retries,
            timeout=plan.timeout,
            max_tasks_per_worker=plan.max_tasks,
        ) as pool:
            futures: list[Any] = []
            for spec, extra in zip(specs, extras, strict=True):
                try:
                    futures.append(pool.submit(task, spec, extra))
                except Exception as exc:  # an argument that does not pickle may fail here
                    futures.append(exc)
            for i, future in enumerate(futures):
                if isinstance(future, BaseException):
                    judge.check(i, future, submit=True)
                    continue
                try:
                    got = future.result()
                except Exception as exc:
                    got = exc
                judge.check(i, got, submit=True)

    def count_runs(self, plans: dict[int, Plan]) -> None:
        runs: Counter[tuple[int, int]] = Counter()
        for path in (self.run / "logs").iterdir():
            for line in path.read_text().splitlines():
                call, index, _ = line.split()
                runs[int(call), int(index)] += 1
        self.report.executions = sum(runs.values())
        for (call, index), count in sorted(runs.items()):
            plan = plans[call]
            extra = count - most_runs(plan, index)
            if extra <= 0:
                continue
            if plan.crashes:
                self.report.reruns_after_crashes += extra
            else:
                self.report.ran_twice += extra
                self.report.incident(
                    f"ran twice: task {index} ran {count} times, at most "
                    f"{most_runs(plan, index)} expected [{plan.describe()}]"
                )


# -- leaks -----------------------------------------------------------------------


def _helper_pids() -> set[int]:
    """multiprocessing's forkserver and resource tracker: started once, kept until exit."""
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


@dataclass
class Snapshot:
    children: set[int]
    threads: set[threading.Thread]
    fds: dict[str, str]

    @classmethod
    def take(cls) -> Snapshot:
        me = psutil.Process()
        children = {p.pid for p in me.children(recursive=True)} - _helper_pids()
        threads = {
            t for t in threading.enumerate() if t.is_alive() and t.name not in LONG_LIVED_THREADS
        }
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        return cls(children, threads, fds)


def _segments(pids: set[int]) -> list[str]:
    """fenfa's segments made by this process or its workers (others' are not ours)."""
    found = []
    for directory in fenfa.segments._directories():
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                if not name.startswith(fenfa.segments.PREFIX):
                    continue
                pid = name[len(fenfa.segments.PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and int(pid) in pids:
                    found.append(os.path.join(directory, name))
    return found


def _worker_pids(run: Path) -> set[int]:
    return {int(p.name.split("-", 1)[0]) for p in (run / "logs").iterdir()}


def check_leaks(before: Snapshot, segments_before: set[str], run: Path, report: Report) -> None:
    pids = {os.getpid(), *_worker_pids(run)}
    gc.collect()
    deadline = time.monotonic() + LEAK_DEADLINE
    while True:
        now = Snapshot.take()
        children = now.children - before.children
        threads = now.threads - before.threads
        fds = {fd: target for fd, target in now.fds.items() if before.fds.get(fd) != target}
        segments = set(_segments(pids)) - segments_before
        if not (children or threads or fds or segments) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report.leaked_processes = len(children)
    report.leaked_threads = len(threads)
    report.leaked_fds = len(fds)
    report.leaked_segments = len(segments)
    for pid in sorted(children):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            command = " ".join(proc.cmdline())[:120]
            report.leftovers.append(f"process {pid} ({proc.status()}): {command}")
    report.leftovers += [f"thread {t.name!r} (daemon={t.daemon})" for t in threads]
    report.leftovers += [f"fd {fd} -> {target}" for fd, target in sorted(fds.items())]
    report.leftovers += [f"segment {path}" for path in sorted(segments)]


def rss_mb(*, trim: bool = False) -> float:
    if trim:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return float(psutil.Process().memory_info().rss) / 1e6


# -- main ----------------------------------------------------------------------


def warm_up(run: Path) -> None:
    """Start what lives for the whole process (forkserver, resource tracker, imports)."""
    (run / "c-1").mkdir()
    specs = [(str(run), 0, -1, i, None, False) for i in range(4)]
    arr = np.zeros(ARRAY_ITEMS)
    for backend in ("process", "thread"):
        with fenfa.Pool(backend, 2, timeout=LOOSE_TIMEOUT) as pool:
            pool.map(task, specs, [arr] * 4)
            list(pool.imap_unordered(task, specs, [None] * 4))
            pool.submit(task, specs[0], None).result()
    shutil.rmtree(run / "c-1")
    for path in (run / "logs").iterdir():
        path.unlink()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to keep calling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks-per-call", type=int, default=40, help="most tasks in a call")
    parser.add_argument(
        "--backends",
        default="process,thread",
        type=lambda text: [b for b in text.split(",") if b],
        help="comma-separated, of process and thread",
    )
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument(
        "--replay",
        type=lambda text: [int(c) for c in text.split(",")],
        help="run only these call numbers (from an incident) instead of --minutes",
    )
    args = parser.parse_args(argv)
    bad = [b for b in args.backends if b not in ("process", "thread")]
    if bad or not args.backends:
        parser.error(f"--backends: process and/or thread, got {','.join(args.backends)}")
    if args.tasks_per_call < 1:
        parser.error("--tasks-per-call must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run = Path(tempfile.mkdtemp(prefix="fenfa-soak-"))
    try:
        return soak_in(run, args)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def soak_in(run: Path, args: argparse.Namespace) -> int:
    report = Report()
    (run / "logs").mkdir()
    started = time.monotonic()
    cores = len(os.sched_getaffinity(0))
    machine = f"{cores} cores, Python {platform.python_version()}, fenfa {fenfa.__version__}"
    print(f"soak: fenfa from {Path(fenfa.__file__).parent}")
    print(f"soak: seed {args.seed}, {args.minutes:g} min, {','.join(args.backends)}; {machine}")
    print(f"soak: run directory {run}", flush=True)
    warm_up(run)
    gc.collect()
    before = Snapshot.take()
    segments_before = set(_segments({os.getpid()}))
    report.rss_start_mb = rss_mb(trim=True)
    soak = Soak(args, run, report)
    finished = threading.Lock()

    def finish() -> None:
        if not finished.acquire(blocking=False):
            return
        report.seconds = time.monotonic() - started
        print(f"\n## Fault soak: seed {args.seed}, {report.seconds / 60:.1f} min; {machine}\n")
        print(report.markdown(), flush=True)
        if args.json:
            data = report.as_dict() | {"seed": args.seed, "machine": machine}
            args.json.write_text(json.dumps(data, indent=2) + "\n")

    watchdog = Watchdog(report, finish)
    plans: dict[int, Plan] = {}
    calls = args.replay or range(sys.maxsize)
    end = started + args.minutes * 60
    last_note = started
    for call in calls:
        if not args.replay and time.monotonic() > end:
            break
        plan = plans[call] = make_plan(args.seed, call, args.backends, args.tasks_per_call)
        with watchdog.watching(plan):
            soak.one(plan)
        if time.monotonic() - last_note > 60:
            last_note = time.monotonic()
            print(
                f"soak: {report.calls} calls, {report.tasks} tasks, wrong {report.wrong}, "
                f"lost {report.lost}, hangs {report.hangs}, RSS {rss_mb():.0f} MB",
                flush=True,
            )
    watchdog.stop.set()
    watchdog.thread.join()
    soak.shutdown()
    soak.count_runs(plans)
    check_leaks(before, segments_before, run, report)
    report.rss_end_mb = rss_mb()
    report.rss_trimmed_mb = rss_mb(trim=True)
    finish()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
