"""Cold start: whole fresh processes, as a user's script meets them (issue 17).

Two tables, each contender a fresh ``python`` process per sample, samples
interleaved round-robin so that a busy moment hits every contender alike
(shared/BENCHMARKING.md); the minimum and the median are reported:

- *Start-up*: a script that imports its library, starts a 2-worker process
  pool, gets one result and exits; timed from outside (the whole process,
  interpreter start and exit included). Contenders: fenfa's default pool,
  ``multiprocessing.Pool`` under fork and forkserver, and, for comparison of
  phases, fenfa under each start method.
- *Import*: ``python -c "import X"`` minus ``python -c "pass"``.

    python benchmarks/bench_startup.py [--samples N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = {
    "fenfa (default: forkserver)": """
import fenfa
def one(x):
    return x + 1
if __name__ == "__main__":
    with fenfa.Pool("process", 2) as pool:
        assert pool.map(one, [1]) == [2]
""",
    "fenfa, fork": """
import fenfa
def one(x):
    return x + 1
if __name__ == "__main__":
    with fenfa.Pool("process", 2, start_method="fork") as pool:
        assert pool.map(one, [1]) == [2]
""",
    "multiprocessing.Pool, fork": """
import multiprocessing
def one(x):
    return x + 1
if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(one, [1]) == [2]
""",
    "multiprocessing.Pool, forkserver": """
import multiprocessing
def one(x):
    return x + 1
if __name__ == "__main__":
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        assert pool.map(one, [1]) == [2]
""",
}

IMPORTS = {
    "fenfa": "import fenfa",
    "fenfa, then fenfa.Pool looked up": "import fenfa; fenfa.Pool",
    "multiprocessing.pool": "import multiprocessing.pool",
    "concurrent.futures (process)": "import concurrent.futures.process",
    "loky": "import loky",
}


def wall(argv: list[str], cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def interleaved(contenders: dict[str, list[str]], samples: int, cwd: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(samples):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(wall(contenders[name], cwd))
    return times


def available(module: str) -> bool:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 samples")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    samples = 5 if args.quick else args.samples
    cores = len(os.sched_getaffinity(0))
    print(
        f"machine: {cores} usable cores, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.1f}; {samples} samples each, interleaved"
    )
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as directory:
        scripts = {}
        for index, (name, text) in enumerate(SCRIPTS.items()):
            path = Path(directory, f"script{index}.py")
            path.write_text(text)
            scripts[name] = [sys.executable, str(path)]
        startup = interleaved(scripts, samples, directory)
        imports = {"(bare interpreter)": [sys.executable, "-c", "pass"]}
        for name, code in IMPORTS.items():
            if available(code.split()[1].rstrip(";")):
                imports[name] = [sys.executable, "-c", code]
        importing = interleaved(imports, samples, directory)
    reference = min(startup["multiprocessing.Pool, fork"])
    print(
        "\n| whole process: start a 2-worker pool, one result, exit | min | median | min / fork Pool |"
    )
    print("|---|---|---|---|")
    for name, runs in startup.items():
        report[name] = {"min": min(runs), "median": statistics.median(runs)}
        print(
            f"| {name} | {min(runs) * 1e3:.0f} ms | {statistics.median(runs) * 1e3:.0f} ms "
            f"| {min(runs) / reference:.2f}x |"
        )
    bare = min(importing.pop("(bare interpreter)"))
    mp_pool = min(importing["multiprocessing.pool"]) - bare
    print("\n| import, above a bare interpreter | min | median | / multiprocessing.pool |")
    print("|---|---|---|---|")
    for name, runs in importing.items():
        cost = [run - bare for run in runs]
        report[f"import {name}"] = {"min": min(cost), "median": statistics.median(cost)}
        print(
            f"| `{IMPORTS[name]}` | {min(cost) * 1e3:.1f} ms | "
            f"{statistics.median(cost) * 1e3:.1f} ms | {min(cost) / mp_pool:.2f}x |"
        )
    print(f"\ncommand: python benchmarks/bench_startup.py {' '.join(sys.argv[1:])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
