"""What fenfa and its peers do when things go wrong: crashes, hangs, Ctrl-C, a killed parent.

Run from the repository root (the ``bench`` extra brings joblib and mpire; pebble
and loky are installed next to it)::

    python benchmarks/bench_faults.py [--quick] [--only ROW[,ROW]] [--contender NAME[,NAME]]
                                      [--timeout S] [--out FILE.json]

(``--quick``: rows 1, 7 and 12 only, a smoke run; ``--only`` overrides it.)

Why: the classic process pools fail badly on faults that are routine in real
work - a worker killed by the OOM killer, a C extension calling ``exit``, a
task that never returns, an object that cannot be pickled, Ctrl-C, a parent
killed by a job scheduler. They hang forever, break every pending task, or
leave orphaned workers behind. fenfa promises (DESIGN.md section 3, issue 4)
that nothing hangs and no child is orphaned; this benchmark measures that
promise against the peers, row by row of issue 4's torture table:

1. a task SIGKILLs its own worker (task 7 of 20); then a second map on the same pool
2. a task calls ``os._exit(3)`` (task 7 of 20); then a second map
6. a per-task timeout of 0.5 s and a task that sleeps 60 s (20 s for a
   contender with no per-task timeout, to see whether it waits the sleep out)
7. an unpicklable argument (a ``threading.Lock``, task 7 of 10)
8. an unpicklable result (task 7 of 10 returns a ``threading.Lock``)
12. SIGINT sent to the caller (``kill -INT``) while its map runs long tasks:
    time until the script's ``except KeyboardInterrupt`` handler runs, whether
    the workers are gone 2 s after that, and when the script exits;
    12g is the same with the signal sent to the whole process group, which is
    what Ctrl-C in a terminal does (the workers get it too)
13. the caller SIGKILLed while its map runs long tasks: are the workers gone
    within 2 s, or orphaned (watched for 10 s, then killed by this script)?

Method: every (row, contender) cell runs in a fresh interpreter (this script
with the hidden ``--child`` flag) in its own session and process group, with a
hard time limit counted from its launch (``--timeout``, default 20 s; plus the
20-s sleep for row 6 on contenders without a per-task timeout). A cell that
passes the limit is recorded as "hung" and its whole process group is killed;
after every cell each process ever seen below the child, and any process that
carries the cell's marker environment variable, is killed too, so no run
leaves strays behind; a cell whose script exits normally is also checked for
processes it left running (2 s of grace). Pools are warmed with a small map
before the fault, and every cell that gets past the fault runs a second map on
the same pool to see whether the pool survived.
The child reports what happened as JSON lines on stdout; tasks of rows 12 and
13 create marker files named after their pid, which is how the parent knows
when they have started and which processes are workers. Times are wall-clock
seconds; "call" times run from the fault call to its return or raise.

Contenders and their start methods: ``multiprocessing.Pool.map`` and
``ProcessPoolExecutor`` (``submit`` + ``result`` per task, so that each task's
fate is visible) on a ``forkserver`` context; joblib ``Parallel(n_jobs=2)``
(loky workers, started by fork+exec); mpire ``WorkerPool(n_jobs=2,
keep_alive=True).map`` (its default, ``fork``); pebble ``ProcessPool(2).map``
(its default context, ``fork`` on Linux up to Python 3.13); fenfa through a
``fenfa.Pool("process", 2)`` and through the module-level ``fenfa.map(...,
backend="process", workers=2)`` (its default, ``forkserver``), both with
``on_error="return"`` so that each task's outcome is visible.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil

import harness

BAD = 7  # index of the faulty task in every row
N_CRASH = 20  # tasks in the maps of rows 1 and 2
N_SMALL = 10  # tasks in the maps of rows 6, 7 and 8
N_LONG = 4  # long tasks in rows 12 and 13 (two workers: two run, two queue)
LONG_SECONDS = 60.0
TASK_TIMEOUT = 0.5  # the per-task timeout of row 6
NO_TIMEOUT_SLEEP = 20.0  # the sleep of row 6 for contenders without a per-task timeout
AFTER_SIGNAL_CHECK = 2.0  # workers must be gone this long after the handler / the kill
ORPHAN_WATCH = 10.0  # row 13: how long orphans are watched before they are killed
EVENT_PREFIX = "@@fault-event "
DIR_ENV = "FAULTBENCH_DIR"
SLEEP_ENV = "FAULTBENCH_SLEEP"

ROWS: dict[str, str] = {
    "1": "1 - a task SIGKILLs its own worker (task 7 of 20), then a 2nd map",
    "2": "2 - a task calls `os._exit(3)` (task 7 of 20), then a 2nd map",
    "6": "6 - per-task timeout 0.5 s, a task sleeps 60 s",
    "7": "7 - unpicklable argument (a `Lock`, task 7 of 10)",
    "8": "8 - unpicklable result (task 7 of 10 returns a `Lock`)",
    "12": "12 - SIGINT to the caller during a map of long tasks",
    "12g": "12g - Ctrl-C in a terminal: SIGINT to the whole process group",
    "13": "13 - the caller is SIGKILLed during a map of long tasks",
}
SIGNAL_ROWS = ("12", "12g", "13")


# -- tasks (module level: forkserver workers import them from __mp_main__) -----


def square_pid(x: int) -> tuple[int, int]:
    time.sleep(0.01)
    return x * x, os.getpid()


def sigkill_task(x: int) -> int:
    if x == BAD:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return x * x


def exit_task(x: int) -> int:
    if x == BAD:
        os._exit(3)
    time.sleep(0.05)
    return x * x


def sleepy_task(x: int) -> int:
    if x == BAD:
        time.sleep(float(os.environ[SLEEP_ENV]))
    time.sleep(0.05)
    return x * x


def square_or_type(x: Any) -> Any:
    time.sleep(0.02)
    return x * x if isinstance(x, int) else type(x).__name__


def lock_result(x: int) -> Any:
    time.sleep(0.02)
    return threading.Lock() if x == BAD else x * x


def long_task(x: int) -> int:
    Path(os.environ[DIR_ENV], f"started-{x}-{os.getpid()}").touch()
    time.sleep(LONG_SECONDS)
    return x


def _unpicklable_args() -> list[Any]:
    return [threading.Lock() if i == BAD else i for i in range(N_SMALL)]


FAULTS: dict[str, tuple[Callable[..., Any], Callable[[], list[Any]]]] = {
    "1": (sigkill_task, lambda: list(range(N_CRASH))),
    "2": (exit_task, lambda: list(range(N_CRASH))),
    "6": (sleepy_task, lambda: list(range(N_SMALL))),
    "7": (square_or_type, _unpicklable_args),
    "8": (lock_result, lambda: list(range(N_SMALL))),
}


# -- contenders -------------------------------------------------------------
#
# ``open(timeout)`` is a context manager giving a pool; ``run(pool, fn, xs,
# timeout)`` returns one outcome per task, ``("ok", value)`` or ``("err", type,
# message)``, or raises when the contender fails the call as a whole.

Outcome = tuple[Any, ...]


def _ok(value: Any) -> Outcome:
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return ("ok", list(value))
    return ("ok", value if isinstance(value, int | str) else repr(value)[:80])


def _err(exc: BaseException) -> Outcome:
    return ("err", type(exc).__name__, str(exc)[:400])


@dataclass(frozen=True)
class Contender:
    name: str
    start_method: str
    api: str
    has_timeout: bool
    open: Callable[[float | None], contextlib.AbstractContextManager[Any]]
    run: Callable[[Any, Callable[..., Any], list[Any], float | None], list[Outcome]]


def _forkserver() -> Any:
    return multiprocessing.get_context("forkserver")


def _mp_open(timeout: float | None) -> Any:
    return _forkserver().Pool(2)


def _mp_run(pool: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    return [_ok(v) for v in pool.map(fn, xs)]


def _ppe_open(timeout: float | None) -> Any:
    return concurrent.futures.ProcessPoolExecutor(2, mp_context=_forkserver())


def _ppe_run(ex: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    futures = [ex.submit(fn, x) for x in xs]
    out = []
    for future in futures:
        try:
            out.append(_ok(future.result()))
        except Exception as exc:
            out.append(_err(exc))
    return out


def _joblib_open(timeout: float | None) -> Any:
    import joblib

    return joblib.Parallel(n_jobs=2, timeout=timeout)


def _joblib_run(par: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    import joblib

    return [_ok(v) for v in par(joblib.delayed(fn)(x) for x in xs)]


def _mpire_open(timeout: float | None) -> Any:
    import mpire

    return mpire.WorkerPool(n_jobs=2, keep_alive=True)


def _mpire_run(pool: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    return [_ok(v) for v in pool.map(fn, xs, task_timeout=timeout)]


def _pebble_open(timeout: float | None) -> Any:
    import pebble

    return pebble.ProcessPool(max_workers=2)


def _pebble_run(pool: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    results = pool.map(fn, xs, timeout=timeout).result()
    out = []
    while True:  # pebble's documented way: a failed task raises, iteration goes on
        try:
            out.append(_ok(next(results)))
        except StopIteration:
            return out
        except Exception as exc:
            out.append(_err(exc))


def _fenfa_options(timeout: float | None) -> dict[str, Any]:
    return {"on_error": "return"} | ({} if timeout is None else {"timeout": timeout})


def _fenfa_outcomes(results: Iterable[Any]) -> list[Outcome]:
    return [_err(r) if isinstance(r, BaseException) else _ok(r) for r in results]


def _fenfa_pool_open(timeout: float | None) -> Any:
    import fenfa

    return fenfa.Pool("process", 2)


def _fenfa_pool_run(pool: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    return _fenfa_outcomes(pool.map(fn, xs, **_fenfa_options(timeout)))


def _fenfa_map_run(_: Any, fn: Callable[..., Any], xs: list[Any], timeout: float | None) -> Any:
    import fenfa

    options = _fenfa_options(timeout)
    return _fenfa_outcomes(fenfa.map(fn, xs, backend="process", workers=2, **options))


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("mp.Pool", "forkserver", "`ctx.Pool(2).map`", False, _mp_open, _mp_run),
        Contender(
            "PPE",
            "forkserver",
            "`ProcessPoolExecutor(2)`: submit + result",
            False,
            _ppe_open,
            _ppe_run,
        ),
        Contender(
            "joblib",
            "loky",
            "`Parallel(n_jobs=2, timeout=...)`",
            True,
            _joblib_open,
            _joblib_run,
        ),
        Contender(
            "mpire",
            "fork",
            "`WorkerPool(2, keep_alive=True).map(task_timeout=...)`",
            True,
            _mpire_open,
            _mpire_run,
        ),
        Contender(
            "pebble",
            "fork",
            "`ProcessPool(2).map(timeout=...)`",
            True,
            _pebble_open,
            _pebble_run,
        ),
        Contender(
            "fenfa.Pool",
            "forkserver",
            "`fenfa.Pool('process', 2).map(on_error='return')`",
            True,
            _fenfa_pool_open,
            _fenfa_pool_run,
        ),
        Contender(
            "fenfa.map",
            "forkserver",
            "`fenfa.map(..., backend='process', workers=2, on_error='return')`",
            True,
            lambda timeout: contextlib.nullcontext(),
            _fenfa_map_run,
        ),
    ]
}


# -- the child: one cell ----------------------------------------------------


def emit(kind: str, **fields: Any) -> None:
    line = json.dumps({"ev": kind, "t": time.time(), **fields})
    sys.__stdout__.write(f"{EVENT_PREFIX}{line}\n")  # type: ignore[union-attr]
    sys.__stdout__.flush()  # type: ignore[union-attr]


def _timed(kind: str, call: Callable[[], list[Outcome]]) -> None:
    start = time.monotonic()
    try:
        outcomes = call()
    except Exception as exc:
        emit(
            kind,
            status="raised",
            exc=type(exc).__name__,
            msg=str(exc)[:400],
            dt=time.monotonic() - start,
        )
    else:
        emit(kind, status="returned", outcomes=outcomes, dt=time.monotonic() - start)


def child(row: str, name: str) -> None:
    contender = CONTENDERS[name]
    timeout = TASK_TIMEOUT if row == "6" and contender.has_timeout else None
    emit("start", pid=os.getpid())
    try:
        with contender.open(timeout) as pool:
            emit("open")
            _timed("warm", lambda: contender.run(pool, square_pid, list(range(4)), None))
            if row in SIGNAL_ROWS:
                emit("running")
                try:
                    contender.run(pool, long_task, list(range(N_LONG)), None)
                except BaseException as exc:
                    emit("call_raised", exc=type(exc).__name__, msg=str(exc)[:400])
                    raise
                emit("call_returned")
            else:
                fn, make_inputs = FAULTS[row]
                xs = make_inputs()
                _timed("first", lambda: contender.run(pool, fn, xs, timeout))
                _timed("second", lambda: contender.run(pool, square_pid, list(range(20)), None))
            emit("leaving")
        emit("closed")
    except KeyboardInterrupt:
        emit("kbint")
    except Exception as exc:
        emit("crash", exc=type(exc).__name__, msg=str(exc)[:400])
    emit("end")


# -- the parent: run, watch, kill --------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _label(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    for key in ("forkserver", "resource_tracker", "semaphore_tracker", "loky", "mpire"):
        if key in cmd:
            return key
    return proc.name() if _alive(proc) else "?"


class Cell:
    """One (row, contender) child process and everything it starts."""

    def __init__(self, row: str, name: str, limit: float, root: Path) -> None:
        self.row, self.name, self.limit = row, name, limit
        self.dir = Path(tempfile.mkdtemp(prefix=f"r{row}-", dir=root))
        contender = CONTENDERS[name]
        sleep = NO_TIMEOUT_SLEEP if not contender.has_timeout else LONG_SECONDS
        env = os.environ | {DIR_ENV: str(self.dir), SLEEP_ENV: str(sleep)}
        self.stderr = (self.dir / "stderr.txt").open("wb")
        self.launched = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", row, name],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
            env=env,
        )
        self.pgid = self.proc.pid
        self.events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.seen: dict[str, dict[str, Any]] = {}
        self.noise: list[str] = []
        self.tracked: dict[int, psutil.Process] = {}
        self._last_snapshot = 0.0
        self.exit_time: float | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(EVENT_PREFIX):
                self.events.put(json.loads(line[len(EVENT_PREFIX) :]))
            elif len(self.noise) < 50:
                self.noise.append(line[:300])

    def snapshot(self, force: bool = False) -> None:
        """Remember every process below the child (they may be orphaned later)."""
        now = time.monotonic()
        if not force and now - self._last_snapshot < 0.1:
            return
        self._last_snapshot = now
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.tracked.setdefault(p.pid, p)

    def pump(self, until: float, stop: Callable[[], bool]) -> bool:
        """Collect events until ``stop()`` or wall time ``until``; False on the deadline."""
        while True:
            while True:
                try:
                    ev = self.events.get_nowait()
                except queue.Empty:
                    break
                self.seen[ev["ev"]] = ev
            if self.exit_time is None and self.proc.poll() is not None:
                self.exit_time = time.time()
            if stop():
                return True
            if time.time() >= until:
                return False
            self.snapshot()
            time.sleep(0.02)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def markers(self) -> dict[int, psutil.Process | None]:
        pids = {int(p.name.rsplit("-", 1)[1]) for p in self.dir.glob("started-*")}
        out: dict[int, psutil.Process | None] = {}
        for pid in pids:
            proc = self.tracked.get(pid)
            if proc is None:
                with contextlib.suppress(psutil.Error):
                    proc = self.tracked[pid] = psutil.Process(pid)
            out[pid] = proc
        return out

    def cleanup(self) -> list[str]:
        """Kill everything this cell started; return what had left its process group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        victims = [p for p in self.tracked.values() if _alive(p)]
        escaped = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get(DIR_ENV) == str(self.dir) and _alive(proc):
                    if os.getpgid(proc.pid) != self.pgid:
                        escaped.append(f"{proc.pid} {_label(proc)}")
                    victims.append(proc)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        deadline = time.monotonic() + 3
        while any(_alive(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.02)  # not psutil.wait_procs: a zombie counts as gone here
        survivors = [p for p in victims if _alive(p)]
        if survivors:
            print(f"warning: could not kill {survivors}", file=sys.stderr)
        self.stderr.close()
        return escaped

    def stderr_tail(self) -> str:
        text = (self.dir / "stderr.txt").read_text(errors="replace")
        return text[-1500:]


def drive_fault_row(cell: Cell) -> dict[str, Any]:
    finished = cell.pump(cell.launched + cell.limit, lambda: "end" in cell.seen and cell.exited())
    res: dict[str, Any] = {"hung": not finished}
    if finished:  # a clean exit must not leave a process behind
        cell.pump(
            time.time() + AFTER_SIGNAL_CHECK,
            lambda: not any(_alive(p) for p in cell.tracked.values()),
        )
        res["orphans"] = [f"{pid} {_label(p)}" for pid, p in cell.tracked.items() if _alive(p)]
    return res


def drive_signal_row(cell: Cell) -> dict[str, Any]:
    res: dict[str, Any] = {"hung": False}
    started = cell.pump(
        cell.launched + cell.limit, lambda: len(cell.markers()) >= 2 or cell.exited()
    )
    if not started or len(cell.markers()) < 2:
        res.update(hung=not started, never_started=True)
        return res
    cell.snapshot(force=True)
    workers = cell.markers()
    helpers = {pid: p for pid, p in cell.tracked.items() if pid not in workers}
    res["workers"] = sorted(workers)
    res["helpers"] = {pid: _label(p) for pid, p in helpers.items()}
    t_sig = time.time()
    if cell.row == "13":
        cell.proc.kill()
        cell.proc.wait()
        workers_gone: float | None = None
        helpers_gone: float | None = None
        deadline = t_sig + ORPHAN_WATCH
        while time.time() < deadline and (workers_gone is None or helpers_gone is None):
            now = time.time()
            if workers_gone is None and not any(
                p is not None and _alive(p) for p in cell.markers().values()
            ):
                workers_gone = now
            if helpers_gone is None and not any(_alive(p) for p in helpers.values()):
                helpers_gone = now
            time.sleep(0.02)
        res["workers_gone_after"] = None if workers_gone is None else workers_gone - t_sig
        res["helpers_gone_after"] = None if helpers_gone is None else helpers_gone - t_sig
        res["helpers_alive"] = [
            f"{pid} {lbl}" for pid, lbl in res["helpers"].items() if _alive(helpers[pid])
        ]
        res["workers_alive"] = [
            pid for pid, p in cell.markers().items() if p is not None and _alive(p)
        ]
        return res
    if cell.row == "12":
        os.kill(cell.proc.pid, signal.SIGINT)
    else:
        os.killpg(cell.pgid, signal.SIGINT)
    deadline = t_sig + cell.limit
    got = cell.pump(deadline, lambda: "kbint" in cell.seen or cell.exited())
    if "call_raised" in cell.seen:
        res["raised_after"] = cell.seen["call_raised"]["t"] - t_sig
        res["raised"] = cell.seen["call_raised"]["exc"]
    if "kbint" in cell.seen:
        t_kb = cell.seen["kbint"]["t"]
        res["handler_after"] = t_kb - t_sig
        cell.pump(t_kb + AFTER_SIGNAL_CHECK, lambda: False)
    else:
        res["hung"] = not got
    res["workers_alive_2s"] = [
        pid for pid, p in cell.markers().items() if p is not None and _alive(p)
    ]
    exited = cell.pump(deadline, lambda: "end" in cell.seen and cell.exited())
    if exited:
        res["exited_after"] = (cell.exit_time or time.time()) - t_sig
        # Anything still running once the script is gone is an orphan.
        cell.pump(
            time.time() + AFTER_SIGNAL_CHECK,
            lambda: not any(_alive(p) for p in cell.tracked.values()),
        )
        res["orphans"] = [f"{pid} {_label(p)}" for pid, p in cell.tracked.items() if _alive(p)]
    elif not res["hung"]:
        res["exit_hung"] = True
    return res


def run_cell(row: str, name: str, limit: float, root: Path) -> dict[str, Any]:
    if row == "6" and not CONTENDERS[name].has_timeout:
        limit += NO_TIMEOUT_SLEEP + 5
    cell = Cell(row, name, limit, root)
    try:
        res = drive_signal_row(cell) if row in SIGNAL_ROWS else drive_fault_row(cell)
    finally:
        res_escaped = cell.cleanup()
    cell.pump(time.time() + 0.2, lambda: False)  # the last events
    if cell.exit_time is not None and "end" in cell.seen:
        # From the script's last statement to the end of its process: atexit hooks.
        res["exit_after_end"] = cell.exit_time - cell.seen["end"]["t"]
    res.update(
        row=row,
        contender=name,
        limit=limit,
        events=cell.seen,
        escaped=res_escaped,
        returncode=cell.proc.returncode,
        stdout_noise=cell.noise[-10:],
        stderr_tail=cell.stderr_tail(),
        wall=time.time() - cell.launched,
    )
    res["cell"] = describe(res)
    return res


# -- classification ---------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def _expected(row: str, i: int) -> Any:
    return "lock" if row == "7" and i == BAD else i * i


def describe_call(row: str, ev: dict[str, Any]) -> str:
    dt = _s(ev["dt"])
    if ev["status"] == "raised":
        if row == "6" and ev["exc"] == "TypeError" and "timeout" in ev["msg"]:
            return f"`timeout=` not accepted: TypeError ({ev['msg'][:80]})"
        return f"all failed: {ev['exc']} in {dt}"
    outcomes = ev["outcomes"]
    n = N_CRASH if row in ("1", "2") else N_SMALL
    if len(outcomes) != n:
        return f"silently dropped result(s): {len(outcomes)} of {n} came back, in {dt}"
    wrong = [i for i, o in enumerate(outcomes) if i != BAD and o != ["ok", _expected(row, i)]]
    failed_others = [i for i in wrong if outcomes[i][0] == "err"]
    bad = outcomes[BAD]
    if bad[0] == "ok":
        if row == "6":
            text = f"no per-task timeout: waited {dt}, then ok"
        elif row == "7" and bad[1] == "lock":
            text = f"ok: the Lock was passed (fork), in {dt}"
        else:
            text = f"no error: task {BAD} returned {bad[1]!r}, in {dt}"
    elif not wrong:
        text = f"only that task failed: {bad[1]} in {dt}"
    else:
        types = sorted({outcomes[i][1] for i in failed_others} | {bad[1]})
        text = f"{len(failed_others) + 1}/{n} failed: {', '.join(types)} in {dt}"
    silent = [i for i in wrong if outcomes[i][0] == "ok"]
    if silent:
        text += f"; wrong values for tasks {silent}"
    return text


def describe_fault(res: dict[str, Any]) -> str:
    ev = res["events"]
    limit = f"{res['limit']:.0f} s"
    if "first" not in ev:
        if "crash" in ev:
            return f"error before the fault: {ev['crash']['exc']}: {ev['crash']['msg'][:80]}"
        where = "in the fault call" if "warm" in ev else "before the fault call"
        if res["hung"]:
            return f"**hung** {where} (killed after {limit})"
        return f"child died {where} (exit code {res['returncode']})"
    parts = [describe_call(res["row"], ev["first"])]
    second = ev.get("second")
    if second is None:
        parts.append(f"2nd map **hung** (killed after {limit})" if res["hung"] else "2nd map died")
    elif second["status"] == "raised":
        parts.append(f"pool broken afterwards: {second['exc']}")
    else:
        good = [o[0] == "ok" and o[1][0] == i * i for i, o in enumerate(second["outcomes"])]
        if len(good) == 20 and all(good):
            parts.append("pool ok afterwards")
        else:
            parts.append(f"2nd map: {20 - sum(good)}/20 failed or wrong")
    if res.get("orphans"):
        labels = sorted({o.split(" ", 1)[1] for o in res["orphans"]})
        parts.append(f"**left {len(res['orphans'])} processes** after exit ({', '.join(labels)})")
    if second is not None and "closed" not in ev:
        parts.append(f"shutdown **hung** (killed after {limit})" if res["hung"] else "died")
    return "; ".join(parts)


def describe_signal(res: dict[str, Any]) -> str:
    limit = f"{res['limit']:.0f} s"
    if res.get("never_started"):
        ev = res["events"]
        if "crash" in ev:
            return f"error: {ev['crash']['exc']}: {ev['crash']['msg'][:80]}"
        return "tasks never started" + (f" (killed after {limit})" if res["hung"] else "")
    if res["row"] == "13":
        after = res["workers_gone_after"]
        if after is None:
            text = (
                f"**orphaned**: {len(res['workers_alive'])} workers still alive "
                f"{ORPHAN_WATCH:.0f} s later (killed by the harness)"
            )
        elif after <= AFTER_SIGNAL_CHECK:
            text = f"workers gone in {_s(after)}"
        else:
            text = f"workers orphaned, gone after {_s(after)}"
        helpers_after = res["helpers_gone_after"]
        if res["helpers_alive"]:
            text += f"; helpers alive {ORPHAN_WATCH:.0f} s later: " + ", ".join(
                sorted({h.split(" ", 1)[1] for h in res["helpers_alive"]})
            )
        elif helpers_after is not None and helpers_after > AFTER_SIGNAL_CHECK:
            text += f"; helpers gone after {_s(helpers_after)}"
        return text
    parts = []
    if "handler_after" in res:
        parts.append(f"handler ran after {_s(res['handler_after'])}")
        alive = res["workers_alive_2s"]
        parts.append(
            f"**{len(alive)} workers alive** 2 s later" if alive else "workers gone 2 s later"
        )
    else:
        if "raised_after" in res:
            parts.append(
                f"{res['raised']} left the map after {_s(res['raised_after'])} but "
                f"leaving the `with` block **hung** (killed after {limit})"
            )
        elif res["hung"]:
            parts.append(f"**hung**: no KeyboardInterrupt (killed after {limit})")
        else:
            ev = res["events"]
            how = (
                "the map returned normally"
                if "call_returned" in ev
                else f"exited without KeyboardInterrupt (code {res['returncode']})"
            )
            parts.append(how)
        alive = res["workers_alive_2s"]
        if alive:
            parts.append(f"{len(alive)} workers alive then")
    if "exited_after" in res:
        parts.append(f"script exited after {_s(res['exited_after'])}")
        if res["orphans"]:
            labels = sorted({o.split(" ", 1)[1] for o in res["orphans"]})
            parts.append(f"**left {len(res['orphans'])} processes** ({', '.join(labels)})")
    elif res.get("exit_hung"):
        parts.append(f"script exit **hung** (killed after {limit})")
    return "; ".join(parts)


def describe(res: dict[str, Any]) -> str:
    text = describe_signal(res) if res["row"] in SIGNAL_ROWS else describe_fault(res)
    if res["escaped"]:
        text += f"; {len(res['escaped'])} process(es) had left the process group"
    return text


# -- report -----------------------------------------------------------------


def _versions() -> str:
    names = ["fenfa", "joblib", "loky", "mpire", "pebble", "cloudpickle"]
    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except Exception:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _commit() -> str:
    """The repository's commit, and whether the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head}{' with uncommitted changes' if dirty else ''}"


def fenfa_messages(results: list[dict[str, Any]]) -> Iterator[str]:
    """The error messages fenfa gave, for checking them against issue 4."""
    for res in results:
        if not res["contender"].startswith("fenfa"):
            continue
        first = res["events"].get("first")
        if first is None:
            continue
        if first["status"] == "raised":
            msg = f"{first['exc']}: {first['msg']}"
        elif (
            first["outcomes"]
            and len(first["outcomes"]) > BAD
            and first["outcomes"][BAD][0] == "err"
        ):
            _, exc, text = first["outcomes"][BAD]
            msg = f"{exc}: {text}"
        else:
            continue
        msg = " ".join(msg.split())
        yield f"- row {res['row']}, {res['contender']}: `{msg[:300]}`"


LEGEND = """\
How to read a cell: "in X s" is the fault call on a warm pool, from its start to its return or
raise. A map that finishes every healthy task cannot return sooner than about 0.5 s in rows 1-2
(19 tasks of 50 ms on 2 workers), 0.1 s in rows 7-8 and 0.55 s in row 6 (the 0.5 s limit plus
a share of the healthy tasks). "only that task failed": the call gave the other tasks' correct
results and an error for task 7 alone; "N/M failed": healthy tasks failed too; "all failed": the
call raised and gave no result at all. "pool ok afterwards": a second map of 20 tasks on the same
pool returned correct results. "**hung**": the cell passed its hard limit and was killed. Row 12:
"handler ran after" runs from the SIGINT to the script's `except KeyboardInterrupt` handler,
which sits outside the `with` block that owns the pool (so it includes the pool's shutdown);
the workers (the pids of the tasks' marker files) are checked 2 s after the handler ran; "script
exited" runs from the SIGINT to the end of the process. Row 13: workers and helpers (forkserver,
resource tracker) are watched for 10 s after the SIGKILL, then killed by the harness."""


def report(
    results: list[dict[str, Any]], argv: list[str], elapsed: float, load: tuple[float, float]
) -> str:
    rows = [r for r in ROWS if any(res["row"] == r for res in results)]
    names = [n for n in CONTENDERS if any(res["contender"] == n for res in results)]
    cells = {(res["row"], res["contender"]): res["cell"] for res in results}
    lines = [
        "Command: `python " + " ".join(shlex.quote(a) for a in argv) + "`",
        "",
        harness.machine_line(
            f"{platform.system()} {platform.release()}; {_versions()} (commit {_commit()}). "
            f"Whole run: {elapsed:.0f} s; load average (1 min) {load[0]:.2f} before, "
            f"{load[1]:.2f} after.",
            prefix="Machine: ",
        ),
        "",
        *([f"{warning}.", ""] if (warning := harness.busy_warning([max(load)])) else []),
        "Contenders (start method): "
        + "; ".join(
            f"**{c.name}** {c.api} ({c.start_method})"
            for c in CONTENDERS.values()
            if c.name in names
        )
        + ".",
        "",
        harness.markdown_table(
            ["scenario", *names],
            [[ROWS[row], *(cells.get((row, n), "") for n in names)] for row in rows],
            pad=False,
        ),
        "",
        LEGEND,
    ]
    messages = list(fenfa_messages(results))
    if messages:
        lines += ["", "fenfa's error messages (the faulty task's outcome):", "", *messages]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help=f"rows to run, comma-separated (of {','.join(ROWS)})")
    parser.add_argument(
        "--contender", help=f"contenders, comma-separated (of {','.join(CONTENDERS)})"
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="hard limit per cell, in seconds (default 20)"
    )
    parser.add_argument("--out", help="write every cell's raw record to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="rows 1, 7 and 12 only: a smoke run (--only wins)"
    )
    parser.add_argument("--child", nargs=2, metavar=("ROW", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = args.only.split(",") if args.only else ["1", "7", "12"] if args.quick else list(ROWS)
    names = args.contender.split(",") if args.contender else list(CONTENDERS)
    for key, known in ((rows, ROWS), (names, CONTENDERS)):
        unknown = [k for k in key if k not in known]
        if unknown:
            parser.error(f"unknown: {', '.join(unknown)}")
    results = []
    start = time.time()
    load_before = harness.load()[0]
    with tempfile.TemporaryDirectory(prefix="fenfa-faults-") as root:
        for row in rows:
            for name in names:
                res = run_cell(row, name, args.timeout, Path(root))
                print(
                    f"[{row} {name}] {res['cell']}  ({res['wall']:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(res)
    if args.out:
        harness.write_json(args.out, results)
    load = (load_before, harness.load()[0])
    argv = ["benchmarks/bench_faults.py", *sys.argv[1:]]
    print(report(results, argv, time.time() - start, load))


if __name__ == "__main__":
    main()
