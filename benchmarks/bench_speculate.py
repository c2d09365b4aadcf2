"""Stragglers: the tail of a call with heavy-tailed task times, with and without ``speculate``.

Run from the repository root::

    python benchmarks/bench_speculate.py [--quick] [--reps N] [--tasks N]

Workload: tasks that wait (``time.sleep``, so the 2 cores are not the limit)
for a time drawn afresh *per attempt*: Pareto (alpha 2, 5 ms scale) for most,
and with probability 1 in 50 a stall of 5 s, as with a request that hangs or
a node that stalls; a second attempt of a straggler draws a new time, as a
retry on another node would. The draws are seeded by (repetition, task,
attempt), so both contenders meet the same stalls. What users feel is the
call's wall time: the p100 of its tasks, the last result. Each repetition
uses the same seeds for both contenders, interleaved (shared/BENCHMARKING.md).
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import fenfa
import harness

ALPHA = 2.0
SCALE_SECONDS = 0.005
STALL_CHANCE = 0.02
STALL_SECONDS = 5.0


def task(arguments: tuple[str, int, int]) -> int:
    """Sleeps for a heavy-tailed time: the same for both contenders, new for a second attempt."""
    directory, seed, x = arguments
    try:  # the first attempt of task x makes its marker; a second finds it
        os.close(os.open(os.path.join(directory, str(x)), os.O_CREAT | os.O_EXCL))
        attempt = 1
    except FileExistsError:
        attempt = 2
    draw = random.Random(f"{seed}-{x}-{attempt}")
    stalled = draw.random() < STALL_CHANCE
    time.sleep(STALL_SECONDS if stalled else SCALE_SECONDS * draw.paretovariate(ALPHA))
    return x


def one_call(backend: str, workers: int, tasks: int, seed: int, speculate: bool) -> float:
    with (
        tempfile.TemporaryDirectory() as markers,
        fenfa.Pool(backend, workers=workers, speculate=speculate) as pool,
    ):
        pool.map(abs, [-1])  # workers up: start-up is not the tail
        started = time.perf_counter()
        out = pool.map(task, [(markers, seed, x) for x in range(tasks)], chunksize=1)
        took = time.perf_counter() - started
    assert out == list(range(tasks))
    return took


def main() -> None:
    args = harness.parser(__doc__, "3 repetitions of 100 tasks", reps=9, tasks=200).parse_args()
    reps, tasks = (3, 100) if args.quick else (args.reps, args.tasks)
    load = harness.load()
    print(
        harness.machine_line(
            f"load {load[0]:.1f}; {tasks} tasks, Pareto(alpha={ALPHA}) x "
            f"{SCALE_SECONDS * 1e3:g} ms, stalls of {STALL_SECONDS:g} s with chance "
            f"{STALL_CHANCE:g}; {reps} repetitions",
            prefix="machine: ",
        )
    )
    if warning := harness.busy_warning(load):
        print(warning)
    print(
        harness.markdown_table(
            ["backend, workers", "without speculate (median, max)", "with (median, max)", "ratio"],
            [],
            pad=False,
        )
    )
    for backend, workers in (("thread", 8), ("process", 2)):
        times: dict[bool, list[float]] = {False: [], True: []}
        for rep, order in enumerate(harness.orders(2, reps, stride=0)):
            for speculate in ((True, False)[i] for i in order):  # alternate who goes first
                times[speculate].append(one_call(backend, workers, tasks, rep, speculate))
        off, on = times[False], times[True]
        ratio = statistics.median(on) / statistics.median(off)
        print(
            f"| {backend}, {workers} | {statistics.median(off):.2f} s, {max(off):.2f} s "
            f"| {statistics.median(on):.2f} s, {max(on):.2f} s | {ratio:.2f}x |",
            flush=True,
        )
    print(f"command: {harness.command()}")


if __name__ == "__main__":
    main()
