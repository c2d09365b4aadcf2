"""joblib on the backend "fenfa" against joblib on loky, side by side in one run.

Run from the repository root (needs ``pip install fenfa[joblib] scikit-learn``)::

    python benchmarks/bench_joblib.py [--quick] [--reps N]

Three workloads (issue 16), each ``joblib.Parallel(n_jobs=-1)`` with joblib's
auto batching:

- 100,000 tiny ``delayed`` calls (``x*x``);
- 16 CPU-bound calls of ~100 ms of pure Python each;
- a scikit-learn ``GridSearchCV`` fit (a small random forest, 4 candidates x
  5 folds).

Contenders: ``loky`` (joblib's default), ``fenfa`` (``parallel_config(backend=
"fenfa")``, joblib's auto batching), and ``fenfa ramp``, a variant whose
batches grow 16x per measured batch instead of joblib's 2x (as fenfa's own
chunk sizer does), measured to decide which batching the backend uses.
(Aiming joblib's batching at fenfa's 10 ms batches instead of its 0.2 s was
measured too, in a first run: 1.66x loky's time on tiny calls; dropped.)

Goals: fenfa no slower than loky on any workload, faster on the tiny calls.

Method (``shared/BENCHMARKING.md``): warm pools (each contender has run the
workload once), repetitions interleaved round-robin with the order varied,
min and median reported with the ratio of the min to loky's; every call's
output is checked against the first loky answer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import joblib
import sklearn
from joblib import Parallel, delayed, parallel_config
from joblib.externals.loky import get_reusable_executor
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import GridSearchCV

import fenfa.joblib
import harness

TINY_GOAL = 1.0  # fenfa's time over loky's: below this on tiny calls
OTHER_GOAL = 1.0  # ... and at most this on the others (the noise is a few %)


class FastRamp(fenfa.joblib.Backend):
    """The variant: batches grow up to 16x per measurement, not 2x.

    joblib doubles the batch size at most at each completed batch, so 100,000
    tiny calls take ~14 round trips to reach their batch size; fenfa's own
    chunk sizer grows as fast as the measurements allow.
    """

    def compute_batch_size(self) -> int:
        old = self._effective_batch_size
        duration = self._smoothed_batch_duration
        if 0 < duration < self.MIN_IDEAL_BATCH_DURATION:
            new = max(1, min(16 * old, int(old * self.MIN_IDEAL_BATCH_DURATION / duration) * 2))
            if new != old:
                self._effective_batch_size = new
                self._smoothed_batch_duration = self._DEFAULT_SMOOTHED_BATCH_DURATION
            return new
        return int(super().compute_batch_size())


def square(x: int) -> int:
    return x * x


SPIN_LOOPS = harness.spin_loops(0.1, enough=0.02)


def spin(x: int) -> int:
    """About 100 ms of pure-Python CPU work (calibrated at import)."""
    total = 0
    for i in range(SPIN_LOOPS):
        total += i ^ x
    return total


Workload = Callable[[], Any]


def workloads(quick: bool) -> dict[str, tuple[Workload, str]]:
    tiny = 20_000 if quick else 100_000
    cpu = 8 if quick else 16
    X, y = make_classification(n_samples=300 if quick else 1000, n_features=20, random_state=0)
    grid = {"max_depth": [4, 8], "min_samples_leaf": [1, 4]}
    trees = 10 if quick else 30

    def tiny_calls() -> Any:
        return Parallel(n_jobs=-1)(delayed(square)(i) for i in range(tiny))

    def cpu_calls() -> Any:
        return Parallel(n_jobs=-1)(delayed(spin)(i) for i in range(cpu))

    def grid_search() -> Any:
        forest = RandomForestClassifier(n_estimators=trees, random_state=0)
        search = GridSearchCV(forest, grid, cv=5, n_jobs=-1).fit(X, y)
        return search.best_params_, list(search.cv_results_["mean_test_score"])

    cores = harness.CORES
    return {
        f"{tiny:,} tiny calls (`x*x`)": (
            tiny_calls,
            "serial: a list comprehension over `delayed` takes ~0.1 s of the caller's "
            "time for 100,000 calls; both backends pay it",
        ),
        f"{cpu} CPU-bound calls of ~100 ms": (
            cpu_calls,
            f"{cpu} x 0.1 s / {cores} cores = {cpu * 0.1 / cores:.2f} s",
        ),
        f"GridSearchCV: {trees} trees, 4 candidates x 5 folds": (
            grid_search,
            f"20 fits over {cores} cores",
        ),
    }


def contenders() -> dict[str, Any]:
    return {"loky": "loky", "fenfa": "fenfa", "fenfa ramp": FastRamp()}


def measure(work: Workload, reps: int) -> dict[str, list[float]]:
    runs = contenders()

    def under(backend: Any) -> Callable[[], Any]:
        def call() -> Any:
            with parallel_config(backend=backend):
                return work()

        return call

    calls = {name: under(backend) for name, backend in runs.items()}
    return harness.repeat(calls, reps, harness.same_as_first())  # loky's warm-up


def table(title: str, times: dict[str, list[float]], limit: str) -> float:
    ref = min(times["loky"])
    rows = [
        [
            name,
            f"{min(samples) * 1e3:.0f} ms",
            f"{statistics.median(samples) * 1e3:.0f} ms",
            f"{min(samples) / ref:.2f}x",
        ]
        for name, samples in times.items()
    ]
    headers = ["contender", "min", "median", "min / loky's min"]
    print(harness.titled_table(title, limit, headers, rows))
    return min(times["fenfa"]) / ref


def main() -> int:
    args = harness.parser(__doc__, "2 repetitions, smaller inputs", reps=5).parse_args()
    reps = 2 if args.quick else args.reps
    load_before = harness.load()
    results = []
    try:
        for title, (work, limit) in workloads(args.quick).items():
            results.append((title, measure(work, reps), limit))
    finally:
        fenfa.joblib.shutdown()
        get_reusable_executor().shutdown(wait=True)
    load_after = harness.load()
    print('## joblib: backend "fenfa" vs loky\n')
    print(f"Command: `{harness.command()}`\n")
    print(
        harness.machine_line(
            f"joblib {joblib.__version__}, scikit-learn {sklearn.__version__}; n_jobs=-1, "
            f"joblib's auto batching; min and median of {reps} interleaved repetitions, "
            "warm pools"
        )
    )
    print(harness.load_line(load_before, load_after))
    ratios = [table(title, times, limit) for title, times, limit in results]
    print()
    for number, ((title, _times, _limit), ratio) in enumerate(zip(results, ratios, strict=True)):
        goal = TINY_GOAL if number == 0 else OTHER_GOAL
        met = ratio < goal if number == 0 else ratio <= goal
        wanted = "faster than loky" if number == 0 else "no slower than loky"
        print(f"- Goal {title} ({wanted}): {harness.verdict(met)} (fenfa {ratio:.2f}x loky's time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
