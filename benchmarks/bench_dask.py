"""fenfa's dask backend against plain Dask, on one 2-worker ``LocalCluster``.

Run from the repository root (needs ``pip install fenfa[dask]``)::

    python benchmarks/bench_dask.py [--quick] [--reps N]

Two workloads (issue 10): 10,000 tiny tasks (``x*x``) and 200 CPU tasks of
~50 ms each. Contenders, all on the same cluster (2 worker processes, one
thread each, on 127.0.0.1), in this one process:

- ``fenfa``: ``Pool("dask", address=cluster.scheduler_address).map``;
- ``client.map``: ``client.gather(client.map(fn, xs, pure=False))``, one dask
  task per input (Dask's own default);
- ``dask.bag``: ``db.from_sequence(xs).map(fn).compute()`` on the cluster
  (its default partitioning: about 100 partitions).

Goals: fenfa >= 2x faster than ``client.map`` on tiny tasks, within 1.1x of
it on the CPU tasks.

Method (``shared/BENCHMARKING.md``): warm pool and client (each has run the
workload once), repetitions interleaved round-robin with the order varied,
the minimum reported with its ratio to ``client.map``; every call's output is
checked against the serial answer.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dask.bag as db
import distributed

import fenfa
from fenfa.backends.dask import local_cluster

TINY_GOAL = 2.0  # fenfa at least this many times faster than client.map
CPU_GOAL = 1.10  # fenfa at most this many times client.map's time


def square(x: int) -> int:
    return x * x


def spin(x: int) -> int:
    """About 50 ms of pure-Python CPU work (calibrated at import)."""
    total = 0
    for i in range(SPIN_LOOPS):
        total += i ^ x
    return total


def _calibrate(seconds: float = 0.05) -> int:
    loops = 100_000
    while True:
        start = time.perf_counter()
        total = 0
        for i in range(loops):
            total += i ^ 1
        took = time.perf_counter() - start
        if took > 0.01:
            return int(loops * seconds / took)
        loops *= 4


SPIN_LOOPS = int(os.environ.get("FENFA_BENCH_SPIN_LOOPS", "0")) or _calibrate()
# (Workers import this module afresh: the environment carries the calibration.)
os.environ["FENFA_BENCH_SPIN_LOOPS"] = str(SPIN_LOOPS)


def contenders(
    pool: fenfa.Pool, client: distributed.Client
) -> dict[str, Callable[[Callable[[int], int], list[int]], list[int]]]:
    return {
        "fenfa": lambda fn, xs: pool.map(fn, xs),
        "client.map": lambda fn, xs: client.gather(client.map(fn, xs, pure=False)),
        "dask.bag": lambda fn, xs: db.from_sequence(xs).map(fn).compute(scheduler=client),
    }


def measure(
    runs: dict[str, Callable[[Callable[[int], int], list[int]], list[int]]],
    fn: Callable[[int], int],
    xs: list[int],
    reps: int,
) -> dict[str, list[float]]:
    want = [fn(x) for x in xs]
    for run in runs.values():  # warm: the function is on every worker
        assert run(fn, xs) == want
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        order = names if rep % 2 == 0 else names[::-1]
        shift = (rep // 2) % len(order)
        for name in order[shift:] + order[:shift]:
            gc.collect()
            start = time.perf_counter()
            out = runs[name](fn, xs)
            times[name].append(time.perf_counter() - start)
            assert out == want, name
    return times


def table(title: str, times: dict[str, list[float]], limit: str) -> float:
    ref = min(times["client.map"])
    print(f"\n### {title}\n")
    print(f"Physical limit: {limit}\n")
    print("| contender | min | ratio to client.map | speedup over client.map |")
    print("| --- | --- | --- | --- |")
    for name, samples in times.items():
        best = min(samples)
        print(f"| {name} | {best * 1e3:.1f} ms | {best / ref:.2f}x | {ref / best:.2f}x |")
    return min(times["fenfa"]) / ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions, smaller inputs")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    tiny = list(range(2_000 if args.quick else 10_000))
    cpu = list(range(40 if args.quick else 200))
    load_before = os.getloadavg()
    with (
        local_cluster(2, silence_logs=logging.ERROR) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        fenfa.Pool("dask", address=cluster.scheduler_address) as pool,
    ):
        runs = contenders(pool, client)
        tiny_times = measure(runs, square, tiny, reps)
        cpu_times = measure(runs, spin, cpu, reps)
    load_after = os.getloadavg()
    print("## fenfa dask backend vs plain Dask (2-worker LocalCluster)\n")
    print(f"Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"- {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
        f"distributed {distributed.__version__}; cluster: 2 worker processes x 1 thread, "
        f"127.0.0.1; min of {reps} interleaved repetitions on warm clients"
    )
    print(f"- load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    tiny_ratio = table(
        f"{len(tiny):,} tiny tasks (`x*x`)",
        tiny_times,
        "serial `map` takes well under 1 ms; any cluster round trip costs ~1 ms",
    )
    cpu_ratio = table(
        f"{len(cpu)} CPU tasks of ~50 ms",
        cpu_times,
        f"{len(cpu)} x 50 ms / 2 workers = {len(cpu) * 0.05 / 2:.1f} s",
    )
    print()
    tiny_met = 1 / tiny_ratio >= TINY_GOAL
    cpu_met = cpu_ratio <= CPU_GOAL
    print(
        f"- Goal tiny tasks (>= {TINY_GOAL:g}x faster than client.map): "
        f"{'MET' if tiny_met else 'MISSED'} ({1 / tiny_ratio:.1f}x)"
    )
    print(
        f"- Goal CPU tasks (within {CPU_GOAL:g}x of client.map): "
        f"{'MET' if cpu_met else 'MISSED'} ({cpu_ratio:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
