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

import functools
import os
import statistics
from typing import Any

import fenfa
import harness

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
    with (
        fenfa.Pool("process", worker_output="relay") as relay,
        fenfa.Pool("process", worker_output="inherit") as inherit,
    ):
        calls = {
            name: functools.partial(pool.map, square, inputs)
            for name, pool in (("relay", relay), ("inherit", inherit))
        }
        return harness.repeat(calls, reps, harness.equal_to(want), stride=0)


def main() -> int:
    args = harness.parser(__doc__, "20k tasks, 3 repetitions", reps=25, tasks=200_000).parse_args()
    tasks = 20_000 if args.quick else args.tasks
    reps = 3 if args.quick else args.reps
    inputs = list(range(tasks))
    want = [square(x) for x in inputs]
    load_before = harness.load()
    relay_times = relay_cost(inputs, want, reps)
    with open(os.devnull, "w") as devnull:
        options = variants(devnull)
        calls = {
            (backend, variant): functools.partial(
                fenfa.map, square, inputs, backend=backend, **options[variant]
            )
            for backend in BACKENDS
            for variant in options
        }
        times = harness.repeat(calls, reps, harness.equal_to(want))  # warms every pool and path
    load_after = harness.load()
    print("# What watching costs: progress and insights on tiny tasks\n")
    print(f"Command: `{harness.command()}`\n")
    print(harness.machine_line(f"{tasks:,} x `x*x`, min of {reps} interleaved repetitions"))
    print(harness.load_line(load_before, load_after, "; the bar writes to os.devnull") + "\n")
    verdicts = []
    rows = []
    for backend in BACKENDS:
        base = min(times[(backend, "plain")])
        cells = [backend, f"{base * 1e3:.1f} ms"]
        for variant in ("progress", "insights", "both"):
            best = min(times[(backend, variant)])
            median = statistics.median(times[(backend, variant)]) / statistics.median(
                times[(backend, "plain")]
            )
            ratio = best / base
            cells.append(f"{best * 1e3:.1f} ms ({ratio:.2f}x; median {median:.2f}x)")
            if variant != "both":
                verdicts.append((backend, variant, ratio))
        rows.append(cells)
    headers = ["backend", "plain", "progress", "insights", "progress + insights"]
    print(harness.markdown_table(headers, rows, pad=False))
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
