"""``fenfa bench``: the field guide's experiment, with honest numbers.

The guide times an IO-bound mock task (``time.sleep``) and a CPU-bound one
(counting in pure Python) serially, on threads and on processes, and prints
which process and thread ran each. This runs the same two tasks over every
backend on warm pools (start-up is not the point here; the IO task also as a
coroutine on the ``async`` backend) and prints one table: wall time, speedup
over serial, how busy the CPUs were, how many distinct workers took part,
and what ``auto`` chose and why. ``--html FILE`` writes the timeline of each
run (who ran which task, when) side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..api import _default_pool
from ..backends import usable_cores
from ..insights import Insights
from ..timeline import render
from ..worker import current_worker
from .paths import unwritable


def io_task(seconds: float) -> tuple[int, str, float]:
    """Wait, as a network call would (the guide's ``IO_task``)."""
    begin = time.thread_time()
    time.sleep(seconds)
    return os.getpid(), threading.current_thread().name, time.thread_time() - begin


def cpu_task(n: int) -> tuple[int, str, float]:
    """Count in pure Python, holding the GIL (the guide's ``CPU_task``)."""
    begin = time.thread_time()
    x = 0
    while x < n:
        x += 1
    return os.getpid(), threading.current_thread().name, time.thread_time() - begin


async def io_task_async(seconds: float) -> tuple[int, str, float]:
    """The IO task as a coroutine: waiting costs no thread at all."""
    import asyncio

    await asyncio.sleep(seconds)
    return os.getpid(), threading.current_thread().name, 0.0


REPEATS = 3


@dataclass
class Row:
    workload: str
    backend: str
    resolved: str
    wall: float
    speedup: float
    cpu_use: float
    workers_seen: int
    reason: str = ""


def _measure(
    workload: str,
    backend: str,
    fn: Any,
    arg: Any,
    tasks: int,
    serial_wall: float | None,
    timelines: list[tuple[str, Insights]] | None = None,
) -> Row:
    # The least-disturbed of a few runs, on warm pools. "auto" is the module-level
    # call, which measures each call afresh: its warm-up is one whole call, so the
    # pool it picks is warm too; the fixed backends warm up every worker.
    pool = _default_pool(backend, None)
    if backend == "auto":
        pool.map(fn, [arg] * tasks)
    else:
        pool.map(fn, [type(arg)(0)] * (pool.workers or 1))
    runs = []
    for _ in range(REPEATS):
        insights = Insights()  # (recording costs a few clock reads per task here)
        begin = time.perf_counter()
        results = pool.map(fn, [arg] * tasks, insights=insights)
        runs.append((time.perf_counter() - begin, results, insights))
    wall, results, insights = min(runs, key=lambda run: run[0])
    decision = insights.decision if backend == "auto" else None
    resolved = decision.backend if decision is not None else pool.backend
    if timelines is not None:
        label = backend if backend == resolved else f"{backend} -> {resolved}"
        timelines.append((f"{workload} on {label}: {wall:.3f} s", insights))
    cpu = sum(r[2] for r in results)
    seen = len({(pid, thread) for pid, thread, _ in results})
    return Row(
        workload,
        backend,
        resolved,
        wall,
        (serial_wall or wall) / wall,
        cpu / (wall * usable_cores()),
        seen,
        decision.reason if decision is not None else "",
    )


def run_bench(quick: bool, timelines: list[tuple[str, Insights]] | None = None) -> list[Row]:
    tasks = 8 if quick else 16
    sleep = 0.02 if quick else 0.5
    count = 1_000_000 if quick else 10_000_000  # the guide's CPU_task counts to 10**7
    rows: list[Row] = []
    for workload, fn, arg in (("io", io_task, sleep), ("cpu", cpu_task, count)):
        serial = _measure(workload, "serial", fn, arg, tasks, None, timelines)
        rows.append(serial)
        for backend in ("thread", "process", "async", "auto"):
            task: Any = fn
            if backend == "async":
                if workload != "io":
                    continue  # counting never awaits: nothing for an event loop to overlap
                task = io_task_async
            rows.append(_measure(workload, backend, task, arg, tasks, serial.wall, timelines))
    return rows


def format_table(rows: list[Row], quick: bool) -> str:
    cores = usable_cores()
    lines = [
        f"fenfa bench{' --quick' if quick else ''}: {cores} usable cores, "
        f"caller pid {current_worker().pid}, warm pools, best of {REPEATS} runs",
        "",
        f"{'workload':<9}{'backend':<14}{'wall s':>8}{'speedup':>9}{'CPU use':>9}{'workers':>9}",
    ]
    for row in rows:
        name = row.backend if row.backend == row.resolved else f"{row.backend}->{row.resolved}"
        lines.append(
            f"{row.workload:<9}{name:<14}{row.wall:>8.3f}{row.speedup:>8.2f}x"
            f"{row.cpu_use:>8.0%}{row.workers_seen:>9}"
        )
    lines += [
        "",
        "io: tasks that wait (time.sleep) overlap on every backend but serial, the CPUs idle;",
        "    how many overlap is how many workers wait at once: processes (one per core) <",
        "    threads (cores + 4) < coroutines (cheap enough to run them all at once).",
        "cpu: pure-Python counting holds the GIL: threads take turns and gain nothing;",
        f"    only processes use all {cores} cores.",
        "auto measured each call's first tasks and chose the backend after the arrow:",
    ]
    for row in rows:
        if row.reason:
            lines.append(f"  {row.workload}: {row.reason}.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.html and (why := unwritable(args.html)) is not None:
        print(f"fenfa bench: {why}", file=sys.stderr)  # (before the benchmark, not after)
        return 2
    timelines: list[tuple[str, Insights]] | None = [] if args.html else None
    rows = run_bench(args.quick, timelines)
    if args.html and timelines is not None:
        path = write_timelines(args.html, timelines)
        print(f"timelines: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print(format_table(rows, args.quick))
    return 0


def write_timelines(path: str, timelines: list[tuple[str, Insights]]) -> str:
    """One HTML page with every run's summary and timeline, in the order they ran."""
    text = render([(title, ins._snapshot(), ins.summary()) for title, ins in timelines])
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(temporary, path)
    return path


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="time IO-bound and CPU-bound mock tasks on every backend",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--html", metavar="FILE", help="also write every run's timeline to FILE (one HTML page)"
    )
    parser.set_defaults(handler=main)
