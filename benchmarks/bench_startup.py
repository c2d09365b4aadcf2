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
import functools
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

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


def interleaved(contenders: dict[str, list[str]], samples: int, cwd: str) -> dict[str, list[float]]:
    """Wall times of whole processes, rotated one place a round (no warm-up: cold is the point)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name in harness.interleave(list(contenders), samples, stride=1, turn=False):
        run = functools.partial(subprocess.run, contenders[name], cwd=cwd, check=True)
        times[name].append(harness.timed(functools.partial(run, capture_output=True))[0])
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
    load = harness.load()
    print(
        harness.machine_line(
            f"load {load[0]:.1f}; {samples} samples each, interleaved", prefix="machine: "
        )
    )
    print(harness.compile_fenfa())
    if warning := harness.busy_warning(load):
        print(warning)
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
    rows = []
    for name, runs in startup.items():
        report[name] = {"min": min(runs), "median": statistics.median(runs)}
        rows.append(
            [
                name,
                f"{min(runs) * 1e3:.0f} ms",
                f"{statistics.median(runs) * 1e3:.0f} ms",
                f"{min(runs) / reference:.2f}x",
            ]
        )
    headers = (
        "whole process: start a 2-worker pool, one result, exit | min | median | min / fork Pool"
    )
    print("\n" + harness.markdown_table(headers, rows, pad=False))
    bare = min(importing.pop("(bare interpreter)"))
    mp_pool = min(importing["multiprocessing.pool"]) - bare
    rows = []
    for name, runs in importing.items():
        cost = [run - bare for run in runs]
        report[f"import {name}"] = {"min": min(cost), "median": statistics.median(cost)}
        rows.append(
            [
                f"`{IMPORTS[name]}`",
                f"{min(cost) * 1e3:.1f} ms",
                f"{statistics.median(cost) * 1e3:.1f} ms",
                f"{min(cost) / mp_pool:.2f}x",
            ]
        )
    headers = "import, above a bare interpreter | min | median | / multiprocessing.pool"
    print("\n" + harness.markdown_table(headers, rows, pad=False))
    print(f"\ncommand: {harness.command('benchmarks/bench_startup.py')}")
    if args.json:
        harness.write_json(args.json, report)


if __name__ == "__main__":
    main()
