"""What ``journal=`` costs: the same ``map`` with and without a journal.

Run from the repository root::

    python benchmarks/bench_journal.py [--quick] [--reps N]

Two workloads (issue 19 part 3), each on the process and thread backends:
200,000 tiny tasks (``x*x``) and 1,000 tasks of 10 ms (``time.sleep``, so
that two cores can hold them all at once whatever else runs). Contenders, on
one warm pool per backend: ``pool.map(fn, xs)``, ``pool.map(fn, xs,
journal=new)`` (a fresh journal each repetition: every result is written),
the same with ``journal_fsync="every"``, and a rerun on a complete journal
(every result read back, nothing run).

Goals: a fresh journal costs at most 1.3x on tiny tasks and 1.02x on 10 ms
tasks (by the minimum).

Method (``shared/BENCHMARKING.md``): warm pools (each contender has run
once), repetitions interleaved round-robin with the order varied, min and
median reported with the ratio to the plain call on the same backend; every
call's output is checked against the serial answer. The journals live in a
temporary directory (here on the same disk as the repository).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fenfa
import harness

GOALS = {"tiny": 1.30, "10 ms": 1.02}
BACKENDS = ("process", "thread")


def square(x: int) -> int:
    return x * x


def nap(x: int) -> int:
    time.sleep(0.010)
    return x


def main() -> int:
    args = harness.parser(__doc__, "20k tiny, 100 x 10 ms, 3 reps", reps=5).parse_args()
    reps = 3 if args.quick else args.reps
    workloads: dict[str, tuple[Callable[[int], int], list[int]]] = {
        "tiny": (square, list(range(20_000 if args.quick else 200_000))),
        "10 ms": (nap, list(range(100 if args.quick else 1_000))),
    }
    variants = ("plain", "journal", "journal, fsync every", "rerun, all stored")
    load_before = harness.load()
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        counter = iter(range(10**9))

        def call(pool: fenfa.Pool, workload: str, variant: str) -> float:
            fn, xs = workloads[workload]
            options: dict[str, Any] = {}
            if variant.startswith("journal"):
                options["journal"] = os.path.join(directory, f"j{next(counter)}")
                if "every" in variant:
                    options["journal_fsync"] = "every"
            elif variant.startswith("rerun"):
                options["journal"] = os.path.join(directory, f"complete-{workload}-{pool.backend}")
            elapsed, out = harness.timed(lambda: pool.map(fn, xs, **options))
            assert out == [fn(x) if fn is square else x for x in xs]
            if variant.startswith("journal"):
                os.unlink(options["journal"])
            return elapsed

        pools = {backend: fenfa.Pool(backend, workers=2) for backend in BACKENDS}
        try:
            contenders = [(b, w, v) for b in BACKENDS for w in workloads for v in variants]
            for backend, workload, variant in contenders:  # warm; fill the complete journals
                call(pools[backend], workload, variant)
                times[(backend, workload, variant)] = []
            for backend, workload, variant in harness.interleave(contenders, reps):
                seconds = call(pools[backend], workload, variant)
                times[(backend, workload, variant)].append(seconds)
        finally:
            for pool in pools.values():
                pool.shutdown()
    load_after = harness.load()
    print("# What journal= costs\n")
    print(f"Command: `{harness.command()}`\n")
    print(harness.machine_line(f"2 workers; min (median) of {reps} interleaved repetitions"))
    print(harness.load_line(load_before, load_after) + "\n")
    verdicts = []
    rows = []
    for backend in BACKENDS:
        for workload, (_, xs) in workloads.items():
            base = times[(backend, workload, "plain")]
            cells = [f"{min(base) * 1e3:.0f} ms ({statistics.median(base) * 1e3:.0f})"]
            for variant in variants[1:]:
                got = times[(backend, workload, variant)]
                ratio = min(got) / min(base)
                median = statistics.median(got) / statistics.median(base)
                cells.append(f"{min(got) * 1e3:.0f} ms: {ratio:.2f}x ({median:.2f}x)")
                if variant == "journal":
                    verdicts.append((backend, workload, ratio))
            rows.append([backend, f"{len(xs):,} {workload}", *cells])
    print(harness.markdown_table(["backend", "workload", *variants], rows, pad=False))
    print()
    for backend, workload, ratio in verdicts:
        goal = GOALS[workload]
        verdict = "met" if ratio <= goal else "MISSED"
        print(f"- {workload} on {backend}: {ratio:.2f}x, goal <= {goal}x: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
