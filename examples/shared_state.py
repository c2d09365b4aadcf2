"""The field guide's first pitfall, fixed: big arguments shared, not copied into every task.

The guide warns ("死亡操作警告") that each process has its own memory, so
an argument passed to a pool is copied into every process, many times over
for a big one; and that processes had better not talk at all ("最好不要通讯"),
short of Queue, Pipe or multiprocessing's shared-memory types.

fenfa puts a big NumPy array into shared memory once for the whole call:
pass it plainly (arrays of 1 MiB or more are shared by themselves on the
process backend), or make a handle with `fenfa.share(arr)` to share it once
across many calls. Tasks get a read-only view, nothing is copied per task.
A writable handle is one memory for every worker and for the caller: tasks
fill their own slots, the caller reads `handle.value`. State a worker should
build once (a model, a connection) goes in `fenfa.current_worker().state`,
filled by an `initializer`. Leaving `with fenfa.share(...)` frees the memory.

Run: python examples/shared_state.py [--mb 80] [--parts 40]
"""

from __future__ import annotations

import argparse
import functools
import os

import numpy as np

import fenfa


def slice_sum(big: np.ndarray, i: int, parts: int) -> float:
    """The sum of the i-th of `parts` slices (the task receives the array, not the handle)."""
    step = -(-len(big) // parts)
    return float(big[i * step : (i + 1) * step].sum())


def view_of(big: np.ndarray) -> str:
    return f"{type(big).__name__} {big.dtype}{list(big.shape)}, writeable={big.flags.writeable}"


def fill_slot(out: np.ndarray, big: np.ndarray, parts: int, i: int) -> None:
    out[i] = slice_sum(big, i, parts)  # each task writes its own slot: no race


def load_model(scale: float) -> None:
    """Once per worker: the expensive load ("model" here is a number)."""
    state = fenfa.current_worker().state
    state["model"] = scale
    state["loads"] = state.get("loads", 0) + 1
    state["tasks"] = 0


def predict(x: float) -> tuple[int | None, int, int, float]:
    me = fenfa.current_worker()
    me.state["tasks"] += 1  # the state lives as long as the worker
    return me.id, me.state["loads"], me.state["tasks"], me.state["model"] * x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=80, help="size of the big array")
    parser.add_argument("--parts", type=int, default=40, help="tasks that read it")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    parts, workers = args.parts, args.workers

    big = np.random.default_rng(0).random(int(args.mb * 2**20) // 8)
    expected = float(big.sum())
    print(f"big: {big.nbytes / 2**20:.1f} MiB, {parts} tasks, caller pid {os.getpid()}")

    # 1. Plainly: the array bound with partial is shared once for the whole call.
    plain = functools.partial(slice_sum, big, parts=parts)
    sums = fenfa.map(plain, range(parts), backend="process", workers=workers)
    copies = parts * big.nbytes / 2**20
    print(
        f"plain partial: sum {sum(sums):.6f} (expected {expected:.6f}), {copies:.0f} MiB not copied"
    )

    # 2. A handle: shared once for several calls, freed when the block ends.
    with fenfa.share(big) as handle:
        print(f"handle: {handle!r}")
        seen = fenfa.map(view_of, [handle], backend="process", workers=workers)
        print(f"a task received: {seen[0]}")
        with fenfa.Pool("auto", workers) as pool:
            sums = pool.map(slice_sum, [handle] * parts, range(parts), [parts] * parts)
        print(f"handle, call 2: sum {sum(sums):.6f} (on {pool.backend}, which auto chose)")

        # 3. Writable: the workers fill the caller's array in place.
        with fenfa.share(np.zeros(parts), writable=True) as out:
            fill = functools.partial(fill_slot, out, handle, parts)
            fenfa.map(fill, range(parts), backend="process", workers=workers)
            filled = out.value
            print(
                f"writable: {np.count_nonzero(filled)}/{parts} slots filled by the workers, "
                f"sum {filled.sum():.6f}, equal to the tasks' results: "
                f"{np.allclose(filled, sums)}"
            )
    print(f"after the block: {handle!r}")

    # 4. Per-worker state: the model is loaded once per worker, not once per task.
    with fenfa.Pool("process", workers, initializer=load_model, initargs=(2.0,)) as pool:
        results = pool.map(predict, range(parts), chunksize=1)
    right = all(y == 2.0 * x for x, (_, _, _, y) in enumerate(results))
    loads = {worker: n for worker, n, _, _ in sorted(results)}
    tasks = {worker: n for worker, _, n, _ in sorted(results)}  # each worker's last count
    print(f"per-worker state: {len(results)} predictions (right: {right})")
    print(f"  model loads per worker {loads}, tasks per worker {tasks}")


if __name__ == "__main__":
    main()
