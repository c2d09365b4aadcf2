"""``fenfa bench``: the field guide's experiment, with honest numbers.

The guide times an IO-bound mock task (``time.sleep``) and a CPU-bound one
(counting in pure Python) serially, on threads and on processes, and prints
which process and thread ran each. This runs the same two tasks over every
backend on warm pools (start-up is not the point here) and prints one table:
wall time, speedup over serial, how busy the CPUs were, and how many
distinct workers took part.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..api import _default_pool
from ..backends import usable_cores
from ..worker import current_worker


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


def _measure(
    workload: str, backend: str, fn: Any, arg: Any, tasks: int, serial_wall: float | None
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
        begin = time.perf_counter()
        results = pool.map(fn, [arg] * tasks)
        runs.append((time.perf_counter() - begin, results))
    wall, results = min(runs, key=lambda run: run[0])
    decision = pool.insights.decision
    resolved = decision.backend if decision is not None else pool.backend
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
    )


def run_bench(quick: bool) -> list[Row]:
    tasks = 8 if quick else 16
    sleep = 0.02 if quick else 0.5
    count = 1_000_000 if quick else 10_000_000  # the guide's CPU_task counts to 10**7
    rows: list[Row] = []
    for workload, fn, arg in (("io", io_task, sleep), ("cpu", cpu_task, count)):
        serial = _measure(workload, "serial", fn, arg, tasks, None)
        rows.append(serial)
        for backend in ("thread", "process", "auto"):
            rows.append(_measure(workload, backend, fn, arg, tasks, serial.wall))
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
        "io: tasks that wait (time.sleep); threads overlap the waiting.",
        f"cpu: pure-Python counting holds the GIL; only processes use all {cores} cores.",
        "auto measured each call's first tasks and chose the backend shown after the arrow.",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    rows = run_bench(args.quick)
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print(format_table(rows, args.quick))
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="time IO-bound and CPU-bound mock tasks on every backend",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a few seconds")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.set_defaults(handler=main)
