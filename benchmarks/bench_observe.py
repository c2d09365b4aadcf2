"""What watching costs: ``progress=``, ``insights=``, the output relay, on 200k tiny tasks.

Run from the repository root::

    python benchmarks/bench_observe.py [--quick] [--reps N] [--tasks N]

Goals: the progress bar slows 200k tiny tasks by at most 10 %; insights cost
at most 10 % when on (issue 7); the relay of worker output costs nothing
measurable when workers print nothing (issue 8: a process pool with
``worker_output="relay"``, the default, against ``"inherit"``). (When *off*,
insights cost one attribute check per piece of results: the "free when off"
goal of <= 2 % is read from ``bench_core.py``'s tiny-task ratio to
``multiprocessing.Pool.map`` before and after insights existed, see RESULTS.md.)

Method (``shared/BENCHMARKING.md``): every contender runs in this one process,
on warm default pools, repetitions interleaved round-robin in a varied order,
the minimum reported with its ratio to the plain call on the same backend.
The bar writes to ``os.devnull`` (a terminal's drawing speed is not fenfa's),
with tqdm's default refresh interval. Each call's output is checked.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fenfa

BACKENDS = ("serial", "thread", "process")
GOAL = 1.10


def square(x: int) -> int:
    return x * x


def variants(devnull: Any) -> dict[str, dict[str, Any]]:
    return {
        "plain": {},
        "progress": {"progress": {"file": devnull}},
        "insights": {"insights": True},
        "both": {"progress": {"file": devnull}, "insights": True},
    }


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def relay_cost(inputs: list[int], want: list[int], reps: int) -> dict[str, list[float]]:
    """The same call on two process pools: workers' output relayed, or inherited."""
    times: dict[str, list[float]] = {"relay": [], "inherit": []}
    with (
        fenfa.Pool("process", worker_output="relay") as relay,
        fenfa.Pool("process", worker_output="inherit") as inherit,
    ):
        pools = {"relay": relay, "inherit": inherit}
        for pool in pools.values():
            assert pool.map(square, inputs) == want
        for rep in range(reps):
            for name in ("relay", "inherit") if rep % 2 == 0 else ("inherit", "relay"):
                gc.collect()
                start = time.perf_counter()
                out = pools[name].map(square, inputs)
                times[name].append(time.perf_counter() - start)
                assert out == want
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k tasks, 3 repetitions")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--tasks", type=int, default=200_000)
    args = parser.parse_args()
    tasks = 20_000 if args.quick else args.tasks
    reps = 3 if args.quick else args.reps
    inputs = list(range(tasks))
    want = [square(x) for x in inputs]
    load_before = os.getloadavg()
    relay_times = relay_cost(inputs, want, reps)
    with open(os.devnull, "w") as devnull:
        options = variants(devnull)
        contenders = [(b, v) for b in BACKENDS for v in options]
        for backend, variant in contenders:  # warm every pool and code path
            assert fenfa.map(square, inputs, backend=backend, **options[variant]) == want
        times: dict[tuple[str, str], list[float]] = {c: [] for c in contenders}
        for rep in range(reps):
            order = contenders if rep % 2 == 0 else contenders[::-1]
            shift = (rep // 2) % len(order)
            for backend, variant in order[shift:] + order[:shift]:
                gc.collect()
                start = time.perf_counter()
                out = fenfa.map(square, inputs, backend=backend, **options[variant])
                times[(backend, variant)].append(time.perf_counter() - start)
                assert out == want
    load_after = os.getloadavg()
    print("# What watching costs: progress and insights on tiny tasks\n")
    print(f"Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"- {len(os.sched_getaffinity(0))} usable cores, Python {platform.python_version()}, "
        f"{tasks:,} x `x*x`, min of {reps} interleaved repetitions"
    )
    print(
        f"- load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
        "the bar writes to os.devnull\n"
    )
    print("| backend | plain | progress | insights | progress + insights |")
    print("| --- | --- | --- | --- | --- |")
    verdicts = []
    for backend in BACKENDS:
        base = min(times[(backend, "plain")])
        cells = [f"{base * 1e3:.1f} ms"]
        for variant in ("progress", "insights", "both"):
            best = min(times[(backend, variant)])
            median = statistics.median(times[(backend, variant)]) / statistics.median(
                times[(backend, "plain")]
            )
            ratio = best / base
            cells.append(f"{best * 1e3:.1f} ms ({ratio:.2f}x; median {median:.2f}x)")
            if variant != "both":
                verdicts.append((backend, variant, ratio))
        print(f"| {backend} | " + " | ".join(cells) + " |")
    relay, inherit = min(relay_times["relay"]), min(relay_times["inherit"])
    print(
        f"\nOutput relay (process pool, 2 workers, tasks print nothing): relay "
        f"{relay * 1e3:.1f} ms, inherit {inherit * 1e3:.1f} ms: {relay / inherit:.2f}x "
        f"(median {_median_ratio(relay_times['relay'], relay_times['inherit']):.2f}x)"
    )
    print()
    met = [v for v in verdicts if v[2] <= GOAL]
    print(
        f"Goal (progress <= {GOAL}x, insights on <= {GOAL}x, by the min): "
        f"{len(met)}/{len(verdicts)} met"
    )
    for backend, variant, ratio in verdicts:
        if ratio > GOAL:
            print(f"- MISSED: {variant} on {backend}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
