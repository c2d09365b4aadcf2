"""Pool start-up per start method: a fresh interpreter per sample.

Start-up (10-200 ms) dwarfs the steady-state cost of most calls, so it is
timed on its own: each sample is a new interpreter that imports fenfa, starts
a 2-worker process pool with the given start method, waits for the first
result, and shuts the pool down. Reported: the minimum of N samples of each
phase (the least-disturbed run), as BENCHMARKING.md asks.

    python benchmarks/bench_startup.py [--samples N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import fenfa
t1 = time.perf_counter()
with fenfa.Pool("process", 2, start_method=sys.argv[1]) as pool:
    assert pool.map(abs, [-1, -2]) == [1, 2]
    t2 = time.perf_counter()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first_result": t2 - t1, "shutdown": t3 - t2}))
"""


def sample(method: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"# Pool start-up: {cores} usable cores, Python {platform.python_version()}")
    print(f"`python benchmarks/bench_startup.py --samples {args.samples}`\n")
    print("| start method | import fenfa | start-up + first result | shutdown |")
    print("|---|---|---|---|")
    for method in ("fork", "forkserver", "spawn"):
        runs = [sample(method) for _ in range(args.samples)]
        best = {key: min(run[key] for run in runs) * 1000 for key in runs[0]}
        print(
            f"| {method} | {best['import']:.0f} ms | {best['first_result']:.0f} ms "
            f"| {best['shutdown']:.0f} ms |"
        )


if __name__ == "__main__":
    main()
