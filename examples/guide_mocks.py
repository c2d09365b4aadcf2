"""The field guide's IO and CPU mock tasks, timed serially, on threads and on processes.

The guide defines two mocks that print where they run, then starts one
thread or process per task by hand and times each way:

    def IO_task():
        print("PID: %s, Process Name: %s, Thread Name: %s" % (
            os.getpid(), multiprocessing.current_process().name,
            threading.current_thread().name))
        time.sleep(1)
    def CPU_task():
        ...                                   # the same print, then
        x = 0
        while x < 10000000: x += 1
    threads = [threading.Thread(target=only_sleep) for _ in range(NUM_WORKERS)]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]

Below, one function per task and one line per way to run it: fenfa starts,
reuses and reaps the threads and processes, and `fenfa.current_worker()`
says who ran the task (with a worker id the guide's print lacks). The
lesson is the guide's: tasks that wait overlap on threads as well as on
processes; tasks that compute in Python only speed up on processes. And
`backend="auto"` measures the first tasks and picks that way by itself.

Run: python examples/guide_mocks.py [--tasks 4] [--n 10000000] [--sleep 1]
(or set FENFA_MOCK_N for the count)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import fenfa


def where() -> str:
    me = fenfa.current_worker()
    return (
        f"PID: {me.pid}, Process Name: {me.process_name}, Thread Name: {me.thread_name}, "
        f"worker id {me.id} ({me.backend})"
    )


def io_task(seconds: float) -> None:
    """Do nothing, wait for a timer to expire."""
    # The line and its newline in one write: print(x) writes them apart, and
    # lines of threads printing at once would mix. (What a process worker
    # prints fenfa sends to the caller's stdout, in order with its results.)
    print(f"{where()}\n", end="")
    time.sleep(seconds)


def cpu_task(n: int) -> None:
    """Do some computations."""
    print(f"{where()}\n", end="")
    x = 0
    while x < n:
        x += 1


def timed(backend: str, task: Callable[..., None], arg: float, tasks: int) -> float:
    print(f"-- {task.__name__} on {backend}")
    # One worker per task and one task per message (chunksize=1), as the guide does.
    with fenfa.Pool(backend, workers=None if backend == "auto" else tasks) as pool:
        start = time.perf_counter()
        pool.map(task, [arg] * tasks, chunksize=1)
        seconds = time.perf_counter() - start
        if backend == "auto":
            print(f"   auto chose {pool.backend}: {pool.insights.decision.reason}")
    print(f"   {backend} time = {seconds:.2f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4, help="tasks per run (the guide's 4)")
    parser.add_argument(
        "--n", type=int, default=int(os.environ.get("FENFA_MOCK_N", 10**7)), help="CPU count"
    )
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each IO task waits")
    args = parser.parse_args()
    print(f"caller: PID {os.getpid()}, {os.cpu_count()} CPUs")

    times: dict[tuple[str, str], float] = {}
    for task, arg in ((io_task, args.sleep), (cpu_task, args.n)):
        for backend in ("serial", "thread", "process", "auto"):
            times[task.__name__, backend] = timed(backend, task, arg, args.tasks)

    print("\nseconds     serial  thread process    auto")
    for name in ("io_task", "cpu_task"):
        row = "".join(f"{times[name, b]:8.2f}" for b in ("serial", "thread", "process", "auto"))
        print(f"{name:10}{row}")
    io_s, io_t, io_p = (times["io_task", b] for b in ("serial", "thread", "process"))
    cpu_s, cpu_t, cpu_p = (times["cpu_task", b] for b in ("serial", "thread", "process"))
    print(f"waiting:   threads {io_s / io_t:.1f}x, processes {io_s / io_p:.1f}x faster than serial")
    print(f"computing: threads {cpu_s / cpu_t:.1f}x, processes {cpu_s / cpu_p:.1f}x", end=" ")
    print("(the GIL lets one thread compute at a time; processes each have their own)")


if __name__ == "__main__":
    main()
