"""Large data without copies: fenfa's sharing against its peers (issue 6).

Run from the repository root (the ``bench`` extra brings NumPy and the peers;
``threadpoolctl``, when installed, shows the BLAS threads of the ``native`` workload)::

    python benchmarks/bench_share.py [--quick] [--scale K] [--reps N] [--workers W]
                                     [--only NAME] [--out FILE.json]

Method (``shared/BENCHMARKING.md``): every contender of a table runs in this one
process run, back to back on the same inputs; the repetitions are interleaved
round-robin and the order is varied per repetition (forwards, backwards, rotated),
so that a noisy spell, or the BLAS threads a previous contender left spinning,
hits all of them alike. The table shows the minimum of the repetitions (the
least-disturbed run), the median beside it, and the ratio of the minima to a named
reference row. Every timed call's output is checked against the serial answer.
Garbage is collected before each timing, not during. Warm against warm: every
contender runs once before the clock is used, and the pools that outlive a call
(fenfa's default pools, ``multiprocessing.Pool``, ``ProcessPoolExecutor``, joblib's
reusable loky executor, mpire with ``keep_alive``) are started before timing, so
their start-up is excluded. The exceptions are named in each row: a
``Pool(initializer=...)`` or an mpire ``WorkerPool(shared_objects=...)`` binds the
data when the pool starts, so handing new data to workers that way costs a pool
start, and those rows time the start plus the map (the pool's teardown, like every
row's clean-up, runs after the clock stops). The peers get the ``forkserver``
context (fenfa's default on Linux) and, where the data rides on the pool start,
also ``fork`` (Python 3.11's default on Linux, where workers inherit the array
without a copy).

Workloads (``--only`` picks one, repeatable; ``--scale K`` multiplies task counts):

``args``
    An 80 MB float64 array (10M seeded normals) and 40 tasks; task i sums slice i
    of 40 and returns a float. fenfa with the array passed plainly
    (``partial(task, big)``: automatic sharing), the same with automatic sharing
    disabled (``fenfa.sharing.AUTO_SHARE_BYTES = 1 << 62``: what the copy costs),
    with ``fenfa.share(big)`` made inside the timed call and made once outside,
    against ``Pool.map(partial(task, big))`` (the guide's pitfall),
    ``Pool(initializer=set_global, initargs=(big,))`` (pool start + map, and map
    only on a pool whose workers already hold the data), mpire
    ``WorkerPool(shared_objects=big)`` and joblib ``Parallel`` (loky, automatic
    memmapping of arrays over 1 MB). Also the peak growth of the parent's RSS and
    of /dev/shm use per contender, sampled every millisecond in one extra untimed
    run. Goal (issue 6): fenfa with the plain call <= 1.2x Pool+initializer.
``results``
    40 tasks each returning a 20 MB float64 array (``np.full(2_621_440, i)``): fenfa
    process (pickle protocol 5 out-of-band buffers) against ``Pool.map``,
    ``ProcessPoolExecutor.map``, joblib and mpire; fenfa's thread backend as the
    no-copy reference.
``threshold``
    The measurement behind ``fenfa.sharing.AUTO_SHARE_BYTES``: arrays of 16 KiB to
    64 MiB, each bound with ``partial`` to 40 tasks that return its first element;
    fenfa's process backend with automatic sharing forced on for every array
    (threshold 0) against forced off (threshold ``1 << 62``). The smallest size
    from which sharing wins at every larger size is the constant's measured value.
``native``
    16 tasks, each a chain of 4 float64 512x512 matrix multiplies, on
    ``fenfa.Pool(backend="process", workers=2, native_threads=...)`` with the native
    thread pools capped (``"auto"``) and left alone (``False``); each pool's workers
    also report their OS thread count (``/proc/self/task``) and the BLAS/OpenMP
    thread pools threadpoolctl sees, to show the cap took effect.

The load average is printed before and after each workload: other work on the
machine inflates times, and the run should be repeated then.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import functools
import gc
import math
import multiprocessing
import multiprocessing.pool
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

import fenfa
import harness
from harness import fmt_time, markdown_table, verdict

# Ratios down to 0.01x are common here (fenfa's thread backend against copies).
fmt_ratio = functools.partial(harness.fmt_ratio, fine=True)

CORES = harness.CORES
WORKLOADS = ("args", "results", "threshold", "native")
PEER_START_METHOD = "forkserver"  # fenfa's default on Linux; the peers get the same
NEVER_SHARE = 1 << 62  # AUTO_SHARE_BYTES that no array reaches
GOAL_RATIO = 1.2  # issue 6: fenfa plain call <= 1.2x Pool+initializer
TIE = 1.05  # threshold workload: ratios this close to 1 are run-to-run noise here
SEED = 20240601
KIB = 1024
MIB = 1024 * KIB

# --- task functions (module level: every backend's workers import them) ---------------------

_WORKER_ARRAY: Any = None  # set in each worker by the Pool initializer


def slice_sum(big: Any, part: slice) -> float:
    """The ``args`` task: the sum of one slice of the big array."""
    return float(big[part].sum())


def set_worker_array(big: Any) -> None:
    """``Pool(initializer=...)``: keep the array in a global of the worker."""
    global _WORKER_ARRAY
    _WORKER_ARRAY = big


def global_slice_sum(part: slice) -> float:
    """The ``args`` task reading the array the initializer stored."""
    return float(_WORKER_ARRAY[part].sum())


def mpire_slice_sum(shared: Any, part: slice) -> float:
    """mpire passes its ``shared_objects`` as the first argument."""
    return float(shared[part].sum())


def make_block(i: int, size: int) -> Any:
    """The ``results`` task: a ``size``-element float64 array full of ``i``."""
    return np.full(size, i, dtype=np.float64)


def socket_writer(sock: socket.socket, size: int, tasks: int, first: int, step: int) -> None:
    """The ``results`` raw reference: send ``make_block(i)``'s bytes on ``sock`` for every
    ``step``-th ``i`` from ``first``."""
    with sock:
        for i in range(first, tasks, step):
            sock.sendall(memoryview(make_block(i, size)).cast("B"))


def first_element(arr: Any, _: int) -> float:
    """The ``threshold`` task: touch the array, return almost nothing."""
    return float(arr[0])


def matmul_chain(i: int, size: int, steps: int) -> float:
    """The ``native`` task: ``steps`` multiplies of seeded ``size`` x ``size`` matrices."""
    rng = np.random.default_rng(i)
    a = rng.standard_normal((size, size))
    b = rng.standard_normal((size, size)) / math.sqrt(size)  # keeps the chain bounded
    for _ in range(steps):
        a = a @ b
    return float(a.sum())


def thread_report(_: Any) -> dict[str, Any]:
    """This worker's pid, OS thread count, native thread pools and thread env variables."""
    pools: list[str] | None
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pools = None
    else:
        pools = [
            f"{p.get('internal_api')}={p.get('num_threads')}"
            for p in threadpool_info()
            if p.get("user_api") in ("blas", "openmp")
        ]
    env_names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        "pid": os.getpid(),
        "os_threads": len(os.listdir("/proc/self/task")),
        "thread_names": sorted(thread_names()),
        "pools": pools,
        "env": {k: os.environ[k] for k in env_names if k in os.environ},
    }


def thread_names() -> list[str]:
    """The kernel's name of each thread of this process."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names


# --- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    quick: bool
    scale: int
    reps: int
    workers: int
    args_elements: int  # float64 elements of the big array
    args_tasks: int
    results_elements: int  # float64 elements of each returned array
    results_tasks: int
    threshold_sizes: tuple[int, ...]  # bytes
    threshold_tasks: int
    native_size: int
    native_steps: int
    native_tasks: int

    @classmethod
    def make(cls, quick: bool, scale: int, reps: int | None, workers: int | None) -> Settings:
        sizes = (16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB)
        return cls(
            quick=quick,
            scale=scale,
            reps=reps or (3 if quick else 5),
            workers=workers or CORES,
            args_elements=1_000_000 if quick else 10_000_000,
            args_tasks=40 * scale,
            results_elements=262_144 if quick else 2_621_440,
            results_tasks=40 * scale,
            threshold_sizes=sizes[:5] if quick else sizes,
            threshold_tasks=40 * scale,
            native_size=256 if quick else 512,
            native_steps=4,
            native_tasks=16 * scale,
        )


# --- helpers ----------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:g} MiB"
    return f"{n / KIB:g} KiB"


@contextlib.contextmanager
def auto_share(threshold: int) -> Iterator[None]:
    """Force ``fenfa.sharing.AUTO_SHARE_BYTES`` (read in this, the calling, process)."""
    import fenfa.sharing

    saved = fenfa.sharing.AUTO_SHARE_BYTES
    fenfa.sharing.AUTO_SHARE_BYTES = threshold
    try:
        yield
    finally:
        fenfa.sharing.AUTO_SHARE_BYTES = saved


def auto_share_default() -> str:
    try:
        import fenfa.sharing
    except ImportError as exc:
        return f"n/a ({exc})"
    return f"{fenfa.sharing.AUTO_SHARE_BYTES:,} bytes"


def release(handle: Any) -> None:
    """Free a ``fenfa.share`` handle's segment now, by whichever method it offers."""
    for name in ("close", "release", "unlink"):
        method = getattr(handle, name, None)
        if callable(method):
            method()
            return


def shm_entries() -> set[str]:
    """Names in /dev/shm, without joblib's memmapping folders and loky's semaphores (its
    reusable executor owns them until this process exits)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names if not n.startswith(("joblib_memmapping", "sem.loky-"))}


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc), so that RSS shows new growth.

    Without it a large buffer freed earlier stays in RSS (glibc raises its mmap
    threshold after freeing a big block and keeps later ones in the heap), and the
    next contender's pickles reuse those pages without growing RSS at all.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def shm_used() -> int:
    """Bytes in use on /dev/shm (every process's; 0 without /dev/shm)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class PeakMemory:
    """Peak growth of this process's RSS, and of /dev/shm, while the block runs.

    Sampled every millisecond from a thread: use it in an untimed run, not a timed
    one. A shared-memory segment written with ``pwrite`` (as fenfa writes its
    segments) or a joblib memmap dump is in /dev/shm, not in the writer's RSS; the
    pages of one written through a mapping count in both.
    """

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.rss_base = self.rss_peak = self.shm_base = self.shm_peak = 0

    def _take(self) -> None:
        self.rss_peak = max(self.rss_peak, self._proc.memory_info().rss)
        self.shm_peak = max(self.shm_peak, shm_used())

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._take()

    def __enter__(self) -> PeakMemory:
        gc.collect()
        trim_heap()
        self.rss_base = self.rss_peak = self._proc.memory_info().rss
        self.shm_base = self.shm_peak = shm_used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._take()
        self._stop.set()
        self._thread.join()

    @property
    def rss_mb(self) -> float:
        return (self.rss_peak - self.rss_base) / 1e6

    @property
    def shm_mb(self) -> float:
        return (self.shm_peak - self.shm_base) / 1e6


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    pools = [
        f"{p.get('internal_api')} {p.get('version')}, {p.get('num_threads')} threads"
        for p in threadpool_info()
        if p.get("user_api") in ("blas", "openmp")
    ]
    return "; ".join(pools) or "no BLAS loaded"


def machine_info(settings: Settings) -> dict[str, Any]:
    import joblib

    shm = shutil.disk_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    return harness.machine_info(
        workers=settings.workers,
        fenfa_start_method=harness.fenfa_start_method(workers=settings.workers),
        peer_start_method=PEER_START_METHOD,
        numpy=np.__version__,
        blas=blas_info(),
        joblib=joblib.__version__,
        mpire=version("mpire"),
        auto_share_bytes=auto_share_default(),
        dev_shm=f"{shm.total / 2**30:.1f} GiB" if shm else "none",
    )


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"Machine: {m['usable_cores']} usable cores (os.cpu_count() {m['os_cpu_count']}), "
        f"{m['workers']} workers per pool, {m['python']}, {m['platform']}; NumPy {m['numpy']} "
        f"({m['blas']}); start methods: fenfa {m['fenfa_start_method']} (observed), peers "
        f"{m['peer_start_method']} (and fork where named), joblib loky; joblib {m['joblib']}, "
        f"mpire {m['mpire']}; fenfa.sharing.AUTO_SHARE_BYTES default {m['auto_share_bytes']}; "
        f"/dev/shm {m['dev_shm']}; load average at start {m['loadavg_at_start']}"
    )


# --- contenders and the measuring loop ---------------------------------------------------


@dataclass
class Contender:
    name: str
    start: str  # start method, "loky", or "-" in this process
    run: Callable[[], Any]
    note: str = ""
    # Runs after the clock stops: a pool made inside the timed region is shut down here.
    cleanup: Callable[[], None] | None = None


@dataclass
class Result(harness.Samples):
    contender: Contender
    rss_mb: float | None = None  # parent peak RSS growth, untimed run
    shm_mb: float | None = None  # /dev/shm peak growth, same run
    checked: int = 0  # timed outputs compared with the serial answer

    def json(self) -> dict[str, Any]:
        c = self.contender
        return {
            "name": c.name,
            "start_method": c.start,
            "note": c.note,
            **self.times_json(),
            "parent_rss_growth_mb": self.rss_mb,
            "dev_shm_growth_mb": self.shm_mb,
            "outputs_checked": self.checked,
            "error": self.error,
        }


class Fresh:
    """A pool started inside the timed region and shut down after the clock stops."""

    def __init__(self, make: Callable[[], Any], call: Callable[[Any], Any]) -> None:
        self._make, self._call = make, call
        self._pool: Any = None

    def run(self) -> Any:
        self._pool = self._make()
        return self._call(self._pool)

    def cleanup(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            with contextlib.suppress(AttributeError):
                pool.join()


class ShareInside:
    """``fenfa.share(big)`` inside the timed call; the handle is released afterwards."""

    def __init__(self, big: Any, call: Callable[[Any], Any]) -> None:
        self._big, self._call = big, call
        self._handle: Any = None

    def run(self) -> Any:
        self._handle = fenfa.share(self._big)
        return self._call(self._handle)

    def cleanup(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            release(handle)


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text[:160]


def measure(
    contenders: Sequence[Contender],
    check: Callable[[Any], bool],
    reps: int,
    rss: bool = False,
) -> list[Result]:
    """Warm every contender with one run, time ``reps`` interleaved rounds, check outputs.

    With ``rss``, one more untimed run per contender samples the parent's peak RSS and
    the peak use of /dev/shm.
    """
    results = [Result(c) for c in contenders]

    def once(r: Result, timed: bool) -> None:
        c = r.contender
        try:
            gc.collect()
            start = time.perf_counter()
            out = c.run()
            seconds = time.perf_counter() - start
        except Exception as exc:  # a contender that fails is reported, not fatal
            r.error = describe(exc)
            return
        finally:
            if c.cleanup is not None:
                with contextlib.suppress(Exception):
                    c.cleanup()
        ok = check(out)
        del out
        if not ok:
            r.error = "WRONG RESULT"
        elif timed:
            r.samples.append(seconds)
            r.checked += 1

    for r in results:
        once(r, timed=False)
    for order in harness.orders(len(results), reps):
        for i in order:
            if results[i].error is None:
                once(results[i], timed=True)
    if rss:
        for r in results:
            if r.error is not None:
                continue
            c = r.contender
            gc.collect()
            try:
                with PeakMemory() as peak:
                    out = c.run()
                r.rss_mb, r.shm_mb = peak.rss_mb, peak.shm_mb
                del out
            except Exception as exc:
                r.error = describe(exc)
            finally:
                if c.cleanup is not None:
                    with contextlib.suppress(Exception):
                        c.cleanup()
    gc.collect()
    return results


def ratio_to(results: Sequence[Result], name: str) -> Callable[[Result], float]:
    ref = next((r for r in results if r.contender.name == name), None)
    ref_best = ref.best if ref is not None else math.nan
    return lambda r: r.best / ref_best if ref_best else math.nan


def time_cells(r: Result, reference: str, ratio: Callable[[Result], float]) -> list[str]:
    """A row's first cells: contender, start method, min, median, ratio to the reference."""
    name = r.contender.name + (" (reference)" if r.contender.name == reference else "")
    return [name, r.contender.start, fmt_time(r.best), fmt_time(r.median), fmt_ratio(ratio(r))]


def find(results: Sequence[Result], name: str) -> Result:
    return next(r for r in results if r.contender.name == name)


# --- workload: args ---------------------------------------------------------------------

ARGS_PLAIN = "fenfa.map(partial(task, big)) (plain call, automatic sharing)"
ARGS_REFERENCE = "Pool+initializer: pool start + map"
ARGS_REF_FORK = "Pool+initializer (fork): pool start + map"
ARGS_MAP_ONLY = "Pool+initializer, data already in workers: map only"


def workload_args(settings: Settings, fstart: str) -> dict[str, Any]:
    from joblib import Parallel, delayed
    from mpire.pool import WorkerPool

    w, n, tasks = settings.workers, settings.args_elements, settings.args_tasks
    big = np.random.default_rng(SEED).standard_normal(n)
    parts = [slice(i * n // tasks, (i + 1) * n // tasks) for i in range(tasks)]
    expected = [float(big[p].sum()) for p in parts]

    def check(out: Any) -> bool:
        return len(out) == tasks and bool(np.allclose(out, expected, rtol=1e-9, atol=1e-9))

    peer = PEER_START_METHOD
    ctx = multiprocessing.get_context(peer)
    fork = multiprocessing.get_context("fork")
    shm_before = shm_entries()
    contenders: list[Contender] = []
    with contextlib.ExitStack() as stack:
        mpool = stack.enter_context(ctx.Pool(w))
        ipool = stack.enter_context(ctx.Pool(w, initializer=set_worker_array, initargs=(big,)))
        wpool = stack.enter_context(
            WorkerPool(n_jobs=w, shared_objects=big, start_method=peer, keep_alive=True)
        )

        def fenfa_plain() -> list[float]:
            return fenfa.map(functools.partial(slice_sum, big), parts, backend="process", workers=w)

        def fenfa_copy() -> list[float]:
            with auto_share(NEVER_SHARE):
                return fenfa_plain()

        def fenfa_with(handle: Any) -> list[float]:
            fn = functools.partial(slice_sum, handle)
            return fenfa.map(fn, parts, backend="process", workers=w)

        shared_once: list[Any] = []  # made on first use; a failure is the row's error

        def once_handle() -> Any:
            if not shared_once:
                shared_once.append(fenfa.share(big))
            return shared_once[0]

        inside = ShareInside(big, fenfa_with)
        init_fresh = Fresh(
            lambda: ctx.Pool(w, initializer=set_worker_array, initargs=(big,)),
            lambda pool: pool.map(global_slice_sum, parts),
        )
        init_fork = Fresh(
            lambda: fork.Pool(w, initializer=set_worker_array, initargs=(big,)),
            lambda pool: pool.map(global_slice_sum, parts),
        )
        mpire_fresh = Fresh(
            lambda: WorkerPool(n_jobs=w, shared_objects=big, start_method=peer),
            lambda pool: pool.map(mpire_slice_sum, parts),
        )
        mpire_fork = Fresh(
            lambda: WorkerPool(n_jobs=w, shared_objects=big, start_method="fork"),
            lambda pool: pool.map(mpire_slice_sum, parts),
        )
        warm = "warm pool"
        contenders = [
            Contender(
                "serial builtin map",
                "-",
                lambda: list(map(functools.partial(slice_sum, big), parts)),
                "no transfer; the physical limit is about this / cores",
            ),
            Contender(
                "fenfa.map backend='thread'",
                "-",
                lambda: fenfa.map(
                    functools.partial(slice_sum, big), parts, backend="thread", workers=w
                ),
                f"{warm}; no copy at all",
            ),
            Contender(ARGS_PLAIN, fstart, fenfa_plain, warm),
            Contender(
                "fenfa.map plain, automatic sharing off",
                fstart,
                fenfa_copy,
                f"{warm}; AUTO_SHARE_BYTES = 1 << 62: the array is pickled with the function",
            ),
            Contender(
                "fenfa.share(big) inside the timed call",
                fstart,
                inside.run,
                f"{warm}; the copy into shared memory is timed; handle released after",
                inside.cleanup,
            ),
            Contender(
                "fenfa.share(big) once, partial(task, h) reused",
                fstart,
                lambda: fenfa_with(once_handle()),
                f"{warm}; handle made once, outside the timed calls",
            ),
            Contender(
                "fenfa.share(big) once, h as an argument",
                fstart,
                lambda: fenfa.map(
                    slice_sum, [once_handle()] * tasks, parts, backend="process", workers=w
                ),
                f"{warm}; fenfa.map(task, [h] * {tasks}, slices)",
            ),
            Contender(
                "Pool.map(partial(task, big))",
                peer,
                lambda: mpool.map(functools.partial(slice_sum, big), parts),
                f"{warm}; default chunksize; the array is pickled with every chunk",
            ),
            Contender(
                ARGS_REFERENCE,
                peer,
                init_fresh.run,
                "pool started inside the timed region (the array reaches the workers "
                "through initargs); terminated after",
                init_fresh.cleanup,
            ),
            Contender(
                ARGS_REF_FORK,
                "fork",
                init_fork.run,
                "as above, fork: workers inherit the array, nothing is pickled",
                init_fork.cleanup,
            ),
            Contender(
                ARGS_MAP_ONLY,
                peer,
                lambda: ipool.map(global_slice_sum, parts),
                "warm pool started with initargs=(big,) before timing: the data is already there",
            ),
            Contender(
                "mpire shared_objects: pool start + map",
                peer,
                mpire_fresh.run,
                "WorkerPool(shared_objects=big) started inside the timed region (the objects "
                "are bound at pool start)",
                mpire_fresh.cleanup,
            ),
            Contender(
                "mpire shared_objects (fork): pool start + map",
                "fork",
                mpire_fork.run,
                "as above, fork (mpire's default): copy-on-write",
                mpire_fork.cleanup,
            ),
            Contender(
                "mpire shared_objects, keep_alive: map only",
                peer,
                lambda: wpool.map(mpire_slice_sum, parts),
                "warm pool started with the shared objects before timing",
            ),
            Contender(
                f"joblib Parallel(n_jobs={w})",
                "loky",
                lambda: Parallel(n_jobs=w)(delayed(slice_sum)(big, p) for p in parts),
                "warm reusable executor; arrays over 1 MB memmapped (dumped once per call)",
            ),
        ]
        try:
            results = measure(contenders, check, settings.reps, rss=True)
        finally:
            for handle in shared_once:
                release(handle)
            del shared_once[:]
    gc.collect()
    leftovers = sorted(shm_entries() - shm_before)
    ratio = ratio_to(results, ARGS_REFERENCE)
    rows = [
        [
            *time_cells(r, ARGS_REFERENCE, ratio),
            "-" if r.rss_mb is None else f"{r.rss_mb:+.0f} MB",
            "-" if r.shm_mb is None else f"{r.shm_mb:+.0f} MB",
            r.contender.note,
            r.error or f"ok ({r.checked}/{len(r.samples)})",
        ]
        for r in results
    ]
    table = markdown_table(
        (
            "contender | start method | wall (min) | median | vs reference | "
            "parent peak RSS growth | /dev/shm peak growth | note | result"
        ),
        rows,
    )
    plain = find(results, ARGS_PLAIN).best
    goal_ratio = plain / find(results, ARGS_REFERENCE).best
    fork_ratio = plain / find(results, ARGS_REF_FORK).best
    map_ratio = plain / find(results, ARGS_MAP_ONLY).best
    pitfall = find(results, "Pool.map(partial(task, big))").best / plain
    copy_cost = find(results, "fenfa.map plain, automatic sharing off").best / plain
    met = goal_ratio <= GOAL_RATIO
    goals = [
        f"- fenfa plain call / Pool+initializer ({PEER_START_METHOD}, pool start + map timed): "
        f"{fmt_ratio(goal_ratio)} (goal <= {GOAL_RATIO}x): {verdict(met)}",
        f"- fenfa plain call / Pool+initializer (fork, pool start + map timed; Python 3.11's "
        f"default start method): {fmt_ratio(fork_ratio)} "
        f"({verdict(fork_ratio <= GOAL_RATIO)} against {GOAL_RATIO}x)",
        f"- fenfa plain call / Pool+initializer map only (data already in the workers; fenfa's "
        f"call includes getting the data there): {fmt_ratio(map_ratio)}",
        f"- fenfa plain call is {fmt_ratio(pitfall)} faster than Pool.map(partial(task, big)) "
        f"(the guide's pitfall) and {fmt_ratio(copy_cost)} faster than itself with automatic "
        "sharing off",
        f"- new /dev/shm entries left after the workload (joblib's excluded): "
        f"{', '.join(leftovers) if leftovers else 'none'}",
    ]
    text = harness.section(
        (
            f"A {big.nbytes / 1e6:.0f} MB float64 array, {tasks} tasks each summing one slice of "
            f"{tasks}; {w} workers per pool; min of {settings.reps} interleaved runs (order varied "
            "per run). fenfa's pools, Pool.map's, the map-only rows' and joblib's are warm (their "
            "start-up excluded); the 'pool start + map' rows start their pool inside the timed "
            f"region because that is how new data reaches their workers. Reference: "
            f"{ARGS_REFERENCE} ({PEER_START_METHOD}, fenfa's start method). Memory: one extra "
            "untimed run per contender, sampled every 1 ms: the parent's peak RSS growth (after "
            "handing free heap pages back with malloc_trim) and the peak growth of /dev/shm "
            "use (fenfa's segments and joblib's memmap dumps live there, outside any RSS). "
            "Physical limit: serial time / cores, plus getting the "
            "data to the workers once."
        ),
        table,
        goals,
    )
    return {
        "text": text,
        "goals": [
            {
                "goal": f"fenfa plain <= {GOAL_RATIO}x Pool+initializer (pool start + map)",
                "ratio": goal_ratio,
                "ratio_vs_fork": fork_ratio,
                "ratio_vs_map_only": map_ratio,
                "met": met,
            }
        ],
        "array_bytes": big.nbytes,
        "tasks": tasks,
        "shm_leftovers": leftovers,
        "results": [r.json() for r in results],
    }


# --- workload: results ------------------------------------------------------------------


def raw_socket(size: int, tasks: int, workers: int) -> list[Any]:
    """What the bytes cost through sockets: ``workers`` forked children (not a pool) make
    the arrays and send their raw bytes (no pickling) each on its own Unix socket pair,
    as fenfa's workers do; this process reads result i from child i % workers into a
    new buffer."""
    ctx = multiprocessing.get_context("fork")
    socks, children = [], []
    for k in range(workers):
        mine, theirs = socket.socketpair()
        child = ctx.Process(target=socket_writer, args=(theirs, size, tasks, k, workers))
        child.start()
        theirs.close()
        socks.append(mine)
        children.append(child)
    out = []
    try:
        for i in range(tasks):
            buf = bytearray(size * 8)
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = socks[i % workers].recv_into(view[got:])
                if n == 0:
                    raise EOFError("a socket writer stopped early")
                got += n
            out.append(np.frombuffer(buf, dtype=np.float64))
    finally:
        for sock in socks:
            sock.close()
        for child in children:
            child.join()
    return out


RESULTS_REFERENCE = "Pool.map"
RAW_SOCKET = "raw socketpair per forked child"


def workload_results(settings: Settings, fstart: str) -> dict[str, Any]:
    from joblib import Parallel, delayed
    from mpire.pool import WorkerPool

    w, size, tasks = settings.workers, settings.results_elements, settings.results_tasks
    xs = list(range(tasks))
    fn = functools.partial(make_block, size=size)

    def check(out: Any) -> bool:
        return len(out) == tasks and all(
            isinstance(a, np.ndarray) and a.shape == (size,) and bool((a == i).all())
            for i, a in enumerate(out)
        )

    peer = PEER_START_METHOD
    ctx = multiprocessing.get_context(peer)
    with contextlib.ExitStack() as stack:
        mpool = stack.enter_context(ctx.Pool(w))
        ppe = stack.enter_context(concurrent.futures.ProcessPoolExecutor(w, mp_context=ctx))
        wpool = stack.enter_context(WorkerPool(n_jobs=w, start_method=peer, keep_alive=True))
        contenders = [
            Contender("serial builtin map", "-", lambda: list(map(fn, xs)), "no transfer"),
            Contender(
                "fenfa.map backend='thread'",
                "-",
                lambda: fenfa.map(fn, xs, backend="thread", workers=w),
                "warm pool; no copy: the no-copy reference",
            ),
            Contender(
                RAW_SOCKET,
                "fork",
                functools.partial(raw_socket, size, tasks, w),
                f"not a pool: {w} forked children make the arrays and send their bytes on a "
                "Unix socket each, this process reads them (no pickling; child start included)",
            ),
            Contender(
                "fenfa.map backend='process'",
                fstart,
                lambda: fenfa.map(fn, xs, backend="process", workers=w),
                "warm pool",
            ),
            Contender(
                RESULTS_REFERENCE,
                peer,
                lambda: mpool.map(fn, xs),
                "warm pool; default chunksize",
            ),
            Contender(
                "ProcessPoolExecutor.map",
                peer,
                lambda: list(ppe.map(fn, xs)),
                "warm pool; chunksize 1 (its default)",
            ),
            Contender(
                f"joblib Parallel(n_jobs={w})",
                "loky",
                lambda: Parallel(n_jobs=w)(delayed(fn)(x) for x in xs),
                "warm reusable executor; auto batching",
            ),
            Contender(
                "mpire WorkerPool(keep_alive)",
                peer,
                lambda: wpool.map(fn, xs, concatenate_numpy_output=False),
                "warm pool; concatenate_numpy_output=False (its default glues the arrays)",
            ),
        ]
        results = measure(contenders, check, settings.reps)
    ratio = ratio_to(results, RESULTS_REFERENCE)
    thread_ratio = ratio_to(results, "fenfa.map backend='thread'")
    rows = [
        [
            *time_cells(r, RESULTS_REFERENCE, ratio),
            fmt_ratio(thread_ratio(r)),
            r.contender.note,
            r.error or f"ok ({r.checked}/{len(r.samples)})",
        ]
        for r in results
    ]
    table = markdown_table(
        (
            "contender | start method | wall (min) | median | vs Pool.map | vs fenfa thread | "
            "note | result"
        ),
        rows,
    )
    fp = find(results, "fenfa.map backend='process'")
    raw = find(results, RAW_SOCKET)
    others = [
        r
        for r in results
        if r.contender.start != "-" and r not in (fp, raw) and r.error is None and r.samples
    ]
    best_peer = min(others, key=lambda r: r.best) if others else None
    goals = [
        f"- fenfa process / Pool.map: {fmt_ratio(ratio(fp))}; / the fastest process peer "
        + (
            f"({best_peer.contender.name}): {fmt_ratio(fp.best / best_peer.best)}"
            if best_peer
            else ": -"
        ),
        f"- fenfa process / fenfa thread (what moving {tasks} x "
        f"{size * 8 / 1e6:.0f} MB between processes costs): {fmt_ratio(thread_ratio(fp))}; "
        f"/ the raw sockets: {fmt_ratio(fp.best / raw.best)}",
    ]
    text = "\n".join(
        [
            f"{tasks} tasks each returning a {size * 8 / 1e6:.0f} MB float64 array "
            f"(np.full({size:,}, i)); {w} workers; warm pools; min of {settings.reps} interleaved "
            "runs; every output's values checked. Reference: Pool.map (default chunksize). "
            "Physical limit: making the arrays (serial / cores) plus one copy of each result "
            "into the parent (the raw socketpair row: no pool, no pickling); the thread "
            "backend makes no copy at all.",
            "",
            table,
            "",
            *goals,
        ]
    )
    return {
        "text": text,
        "array_bytes": size * 8,
        "tasks": tasks,
        "results": [r.json() for r in results],
    }


# --- workload: threshold ----------------------------------------------------------------


def workload_threshold(settings: Settings, fstart: str) -> dict[str, Any]:
    w, tasks = settings.workers, settings.threshold_tasks
    xs = list(range(tasks))
    shm_before = shm_entries()
    per_size: list[dict[str, Any]] = []
    for size in settings.threshold_sizes:
        arr = np.random.default_rng(SEED).standard_normal(size // 8)
        want = float(arr[0])

        def check(out: Any, want: float = want) -> bool:
            return len(out) == tasks and all(x == want for x in out)

        def call(threshold: int, arr: Any = arr) -> list[float]:
            with auto_share(threshold):
                fn = functools.partial(first_element, arr)
                return fenfa.map(fn, xs, backend="process", workers=w)

        contenders = [
            Contender("always share", fstart, functools.partial(call, 0)),
            Contender("never share", fstart, functools.partial(call, NEVER_SHARE)),
        ]
        always, never = measure(contenders, check, settings.reps)
        per_size.append(
            {
                "bytes": size,
                "share": always,
                "copy": never,
                "ratio": always.best / never.best if always.samples and never.samples else math.nan,
            }
        )
        del arr
    leftovers = sorted(shm_entries() - shm_before)
    rows = []
    for entry in per_size:
        share, copy, ratio = entry["share"], entry["copy"], entry["ratio"]
        errors = "; ".join(e for e in (share.error, copy.error) if e)
        winner = "-" if math.isnan(ratio) else "share" if ratio < 1 / TIE else "copy"
        if not math.isnan(ratio) and 1 / TIE <= ratio <= TIE:
            winner = "tie"
        rows.append(
            [
                fmt_bytes(entry["bytes"]),
                fmt_time(share.best),
                fmt_time(share.median),
                fmt_time(copy.best),
                fmt_time(copy.median),
                fmt_ratio(ratio),
                winner,
                errors or "ok",
            ]
        )
    table = markdown_table(
        (
            "array size | always share (min) | median | never share (min) | median | "
            "share / never | faster | result"
        ),
        rows,
    )
    # The smallest size from which sharing wins, beyond a tie, at this size and every
    # larger one.
    crossover: int | None = None
    for entry in reversed(per_size):
        if math.isnan(entry["ratio"]) or entry["ratio"] >= 1 / TIE:
            break
        crossover = entry["bytes"]
    first_win = next((e["bytes"] for e in per_size if e["ratio"] < 1 / TIE), None)
    lines = [
        f"- smallest size from which sharing wins (by more than a tie) at every larger size: "
        f"{fmt_bytes(crossover) if crossover else 'none measured'}"
        f" (first size where it wins at all: {fmt_bytes(first_win) if first_win else 'none'}); "
        f"fenfa.sharing.AUTO_SHARE_BYTES is {auto_share_default()}",
        f"- new /dev/shm entries left after the workload: "
        f"{', '.join(leftovers) if leftovers else 'none'}",
    ]
    text = "\n".join(
        [
            f"{tasks} tasks on fenfa's warm process pool ({w} workers), each getting the same "
            "array bound with functools.partial and returning its first element; "
            "fenfa.sharing.AUTO_SHARE_BYTES forced to 0 (every array shared, a new segment per "
            "call) and to 1 << 62 (the array is pickled); min of "
            f"{settings.reps} interleaved runs per size. Ratio < 1: sharing is faster; within "
            f"{TIE:.2f}x either way counts as a tie.",
            "",
            table,
            "",
            *lines,
        ]
    )
    return {
        "text": text,
        "crossover_bytes": crossover,
        "first_win_bytes": first_win,
        "shm_leftovers": leftovers,
        "sizes": [
            {
                "bytes": e["bytes"],
                "ratio": e["ratio"],
                "share": e["share"].json(),
                "copy": e["copy"].json(),
            }
            for e in per_size
        ],
    }


# --- workload: native -------------------------------------------------------------------


def worker_threads(pool: Any, w: int) -> list[dict[str, Any]]:
    """One report per distinct worker pid seen over a few tasks."""
    seen: dict[int, dict[str, Any]] = {}
    for report in pool.map(thread_report, range(8 * w), chunksize=1):
        seen.setdefault(report["pid"], report)
    return list(seen.values())


def have_threadpoolctl() -> str:
    try:
        return f"yes, {version('threadpoolctl')}"
    except PackageNotFoundError:
        return "no"


def threads_cell(reports: Sequence[dict[str, Any]]) -> str:
    if not reports:
        return "-"
    parts = []
    for r in reports:
        pools = "threadpoolctl not installed" if r["pools"] is None else ", ".join(r["pools"])
        env = ", ".join(f"{k}={v}" for k, v in r["env"].items()) or "no thread env"
        names = ", ".join(
            f"{n} x{r['thread_names'].count(n)}" for n in sorted(set(r["thread_names"]))
        )
        parts.append(f"{r['os_threads']} OS threads ({names}); {pools}; {env}")
    return " / ".join(parts)


def workload_native(settings: Settings, fstart: str) -> dict[str, Any]:
    w, size, steps = settings.workers, settings.native_size, settings.native_steps
    xs = list(range(settings.native_tasks))
    fn = functools.partial(matmul_chain, size=size, steps=steps)
    expected = list(map(fn, xs))

    def check(out: Any) -> bool:
        return len(out) == len(xs) and bool(np.allclose(out, expected, rtol=1e-7))

    variants: list[tuple[str, Any]] = [("auto", "auto"), ("False", False)]
    threads: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    contenders = [
        Contender(
            "serial in this process",
            "-",
            lambda: list(map(fn, xs)),
            f"this process's BLAS threads ({blas_info()})",
        )
    ]
    with contextlib.ExitStack() as stack:
        for label, value in variants:
            try:
                pool = stack.enter_context(
                    fenfa.Pool(backend="process", workers=w, native_threads=value)
                )
                pool.map(fn, xs[: 2 * w])  # start the workers, load BLAS
                threads[label] = worker_threads(pool, w)
            except Exception as exc:
                errors[label] = describe(exc)
                continue
            contenders.append(
                Contender(
                    f"fenfa.Pool(process, native_threads={label})",
                    fstart,
                    functools.partial(pool.map, fn, xs),
                    "capped" if label == "auto" else "uncapped",
                )
            )
        results = measure(contenders, check, settings.reps)
    ref_name = "fenfa.Pool(process, native_threads=False)"
    ratio = ratio_to(results, ref_name)
    serial = find(results, "serial in this process").best
    rows = []
    for r in results:
        label = r.contender.name.partition("native_threads=")[2].rstrip(")")
        rows.append(
            [
                r.contender.name + (" (reference)" if r.contender.name == ref_name else ""),
                fmt_time(r.best),
                fmt_time(r.median),
                fmt_ratio(ratio(r)),
                f"{serial / r.best:.2f}" if r.samples else "-",
                threads_cell(threads.get(label, [])) if label else r.contender.note,
                r.error or f"ok ({r.checked}/{len(r.samples)})",
            ]
        )
    for label, error in errors.items():
        rows.append(
            [f"fenfa.Pool(process, native_threads={label})", "-", "-", "-", "-", "-", error]
        )
    table = markdown_table(
        (
            "contender | wall (min) | median | vs uncapped | speedup over serial | "
            "each worker: threads, native pools, env | result"
        ),
        rows,
    )
    text = "\n".join(
        [
            f"{len(xs)} tasks, each {steps} float64 {size}x{size} matrix multiplies (matrices "
            f"made from a seeded generator), on two warm fenfa.Pool(backend='process', "
            f"workers={w}) pools that differ only in native_threads; min of {settings.reps} "
            "interleaved runs (order varied per run: BLAS threads spin on after a call). The "
            f"worker columns come from tasks run after a warm-up. Physical limit: {CORES} cores "
            f"in all; uncapped, {w} workers x their BLAS threads compete for them.",
            "",
            table,
            "",
            "The worker column is read inside the workers: their OS thread count (OpenBLAS's "
            "threads included), the BLAS/OpenMP pools threadpoolctl reports (installed here: "
            f"{have_threadpoolctl()}) and the thread variables set when the worker started. This "
            "script imports NumPy at module level, and forkserver or spawn workers import the "
            "main module before fenfa's worker code runs: OpenBLAS has started its threads "
            "before the variables are set, so here the cap takes effect through threadpoolctl.",
        ]
    )
    return {
        "text": text,
        "worker_threads": threads,
        "errors": errors,
        "results": [r.json() for r in results],
    }


# --- main -------------------------------------------------------------------------------

WORKLOAD_FUNCS: dict[str, Callable[[Settings, str], dict[str, Any]]] = {
    "args": workload_args,
    "results": workload_results,
    "threshold": workload_threshold,
    "native": workload_native,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = harness.workload_parser(
        __doc__, WORKLOADS, quick="small sizes: a smoke run", scale="multiply the task counts by K"
    )
    parser.add_argument("--reps", type=int, help="timed repetitions (default 5, --quick 3)")
    parser.add_argument(
        "--workers", type=int, help=f"workers per pool (default: usable cores, {CORES})"
    )
    args = harness.check_scale(parser, parser.parse_args(argv))
    if args.reps is not None and args.reps < 3:
        parser.error("--reps must be >= 3 (BENCHMARKING.md: min of 3+)")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings.make(args.quick, args.scale, args.reps, args.workers)
    machine = machine_info(settings)
    fstart = machine["fenfa_start_method"]
    harness.run_workloads(
        "fenfa sharing benchmarks",
        "benchmarks/bench_share.py",
        {name: functools.partial(func, settings, fstart) for name, func in WORKLOAD_FUNCS.items()},
        args,
        machine=machine,
        machine_text=machine_line(machine),
        settings=settings,
    )


if __name__ == "__main__":
    main()
