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

import functools
import logging
from collections.abc import Callable

import dask.bag as db
import distributed

import fenfa
import harness
from fenfa.backends.dask.cluster import local_cluster

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


SPIN_LOOPS = harness.spin_loops(0.05, enough=0.01)


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
    calls = {name: functools.partial(run, fn, xs) for name, run in runs.items()}
    return harness.repeat(calls, reps, harness.equal_to([fn(x) for x in xs]))


def table(title: str, times: dict[str, list[float]], limit: str) -> float:
    ref = min(times["client.map"])
    rows = [
        [name, f"{min(t) * 1e3:.1f} ms", f"{min(t) / ref:.2f}x", f"{ref / min(t):.2f}x"]
        for name, t in times.items()
    ]
    headers = ["contender", "min", "ratio to client.map", "speedup over client.map"]
    print(harness.titled_table(title, limit, headers, rows))
    return min(times["fenfa"]) / ref


def main() -> int:
    args = harness.parser(__doc__, "2 repetitions, smaller inputs", reps=5).parse_args()
    reps = 2 if args.quick else args.reps
    tiny = list(range(2_000 if args.quick else 10_000))
    cpu = list(range(40 if args.quick else 200))
    load_before = harness.load()
    with (
        local_cluster(2, silence_logs=logging.ERROR) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
        fenfa.Pool("dask", address=cluster.scheduler_address) as pool,
    ):
        runs = contenders(pool, client)
        tiny_times = measure(runs, square, tiny, reps)
        cpu_times = measure(runs, spin, cpu, reps)
    load_after = harness.load()
    print("## fenfa dask backend vs plain Dask (2-worker LocalCluster)\n")
    print(f"Command: `{harness.command()}`\n")
    print(
        harness.machine_line(
            f"distributed {distributed.__version__}; cluster: 2 worker processes x 1 thread, "
            f"127.0.0.1; min of {reps} interleaved repetitions on warm clients"
        )
    )
    print(harness.load_line(load_before, load_after))
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
        f"{harness.verdict(tiny_met)} ({1 / tiny_ratio:.1f}x)"
    )
    print(
        f"- Goal CPU tasks (within {CPU_GOAL:g}x of client.map): "
        f"{harness.verdict(cpu_met)} ({cpu_ratio:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
