"""How ``backend="auto"`` measures a task and decides where the rest should run.

The field guide fenfa grew from boils concurrency down to one rule: classify
the task — waiting or computing, tiny or heavy — and dispatch it to the
executor that suits it. ``auto`` makes that classification by measurement,
on the call's own first tasks, whose results are kept (nothing runs twice):

1. *Alone* (10 ms): one probe thread runs tasks, in chunks that double while
   they take under 2 ms. How long the thread *wanted* a CPU (time on a CPU
   plus time runnable but queued for one, from Linux's per-thread schedstat,
   so a busy machine does not make computing look like waiting) against the
   wall clock says whether the task computes (ratio near 1) or waits (near
   0); the process's CPU clock says whether one task already keeps several
   cores busy (a multi-threaded library such as BLAS).
2. *Pair* (10 ms, only for tasks that compute): a second probe thread joins.
   If the two threads' CPU clocks advance together, the task releases the
   GIL (hashlib, zlib, NumPy) and threads suffice; if they take turns, it is
   pure Python holding the GIL, and only processes run it in parallel. On a
   machine whose other programs keep the cores busy this test cannot tell
   the two apart (two threads get one core's worth either way); it then errs
   towards processes, which run both kinds in parallel.

The program's other Python threads are accounted for: CPU they used while a
probe thread ran was mostly the GIL the probe thread waited for, which is not
the task waiting. And whether a task is too small to ship is judged by its
time less the time it was queued for a CPU, which other programs preempting
it does not lengthen.

Then: a coroutine function goes to ``async``; a task that waits goes to
``thread``; one that computes with the GIL released goes to ``thread``; one
that already uses several cores by itself, or is so small that shipping it to
another process would cost more than running it, runs ``serial``; the rest
goes to ``process``. A probe task still running when the decision is made
finishes on its probe thread and its result is used.

The probe threads, the input they share and the clocks they are read by are
:mod:`fenfa.probing`; this module reads them and decides.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .probing import Feed, ProbeThread, cpu_since, schedstat, threads_cpu
from .tasks import Job, is_coroutine_function

# How long each probe phase lasts. 10 ms is ~100 scheduler ticks' worth of
# CPU clock resolution on Linux (1 us), long enough for the thread CPU
# clocks to tell 1 core from 2, and short next to any call worth parallelising.
ALONE_SECONDS = 0.010
PAIR_SECONDS = 0.010
# At most this many tasks are run by the probe (memory for their results).
MAX_PROBE_TASKS = 100_000
# A thread's CPU time over wall time below this: the task mostly waits.
WAITING_BELOW = 0.5
# Two computing threads together advancing more than this many CPU seconds
# per second: they run in parallel, so the task releases the GIL.
PARALLEL_ABOVE = 1.5
# Two copies of a task that holds the GIL keep ~1.0 core busy between them,
# taking turns. Well below that (0.7: a margin for the clocks' 10 ms sample),
# the copies spend their time waiting on something other than the GIL (a
# socket, a disk), which threads overlap for free: a local HTTP scrape whose
# first task looked CPU-bound alone shows ~0.3 here, and runs 1.6-2.8x faster
# on threads than on a freshly started process pool.
PAIR_WAITING_BELOW = 0.7
# ... but for a task whose probe thread was busy this share of the time or
# more alone, a low pair figure on a busy machine means the machine could not
# give two threads their cores (or the GIL), not that the task waits.
ALONE_BUSY_ABOVE = 0.9
# ... unless the machine was quiet (the probe threads queued for a CPU less
# than this share of the time): then a low pair figure is waiting, whatever
# the alone phase said (a first urllib call's imports look like work).
QUIET_BELOW = 0.1
# One task keeping more than this many cores busy by itself is already
# parallel (a 2-thread BLAS shows ~2.0 here). Not lower: the process clock
# also counts fenfa's own threads and start-up work, seen at up to ~1.4 with
# a pure-Python task.
SELF_PARALLEL_ABOVE = 1.8
# Threads that Python did not start (a library's own workers) burning more
# than this many cores while one task runs: the task is parallel inside.
NATIVE_THREADS_ABOVE = 0.15
# Shipping a task to a process and its result back costs about this much
# (fixed) plus this much per pickled byte (both measured with the 200k
# tiny-task benchmark: fenfa's process backend takes ~22 ms where serial
# takes ~9.5 ms on 2 cores, about 0.09 us of overhead per task). A task
# that takes less than twice that runs faster serially: on 2 workers each
# saves at most half its time and pays the whole shipping cost.
SHIP_SECONDS = 0.1e-6
SHIP_SECONDS_PER_BYTE = 1e-9


@dataclass(frozen=True)
class Decision:
    """What ``auto`` chose, and the evidence.

    ``task_seconds`` and ``cpu_seconds`` are per task (None when no task
    finished while measuring); ``cpu_ratio`` is a probe thread's CPU time
    over wall time; ``parallel_slowdown`` is how much two copies running at
    once slowed each other (1.0: not at all, 2.0: they took turns), None when
    not measured; ``reason`` says it in one sentence.
    """

    backend: str
    reason: str
    task_seconds: float | None = None
    cpu_seconds: float | None = None
    cpu_ratio: float | None = None
    parallel_slowdown: float | None = None
    cores_used: float | None = None
    tasks_measured: int = 0
    #: Share of the measuring time the probe threads spent queued for a CPU
    #: that other programs held (Linux); above ~0.25 the GIL test is unreliable.
    contention: float | None = None
    #: Taken from an earlier call of the same function, without probing
    #: (module-level calls: see :mod:`fenfa.deciding`).
    remembered: bool = False


def unmeasured(fn: Callable[..., Any], why: str) -> Decision:
    """The decision when measuring is not possible: by the kind of function only."""
    if is_coroutine_function(fn):
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        return Decision("async", f"{name} is a coroutine function, so it runs on an event loop")
    problem = cannot_ship(fn, None)
    if problem is not None:
        return Decision(
            "thread", f"{why}, and {problem}, so auto chose threads, which need no pickling"
        )
    return Decision("process", f"{why}, so auto chose processes, the safe default for Python code")


def completed(decision: Decision, feed: Feed) -> Decision:
    """``decision`` with the task times its probe measured after deciding.

    A task longer than the probe's 10 ms had not finished when auto decided
    (the decision does not wait: the other cores would idle); once the call
    is over, the probe threads' chunks say how long it took.
    """
    if decision.task_seconds is not None:
        return decision
    done = [thread.done_before(math.inf) for thread in feed.threads]
    tasks = sum(count for count, *_ in done)
    if not tasks:
        return decision
    wall, cpu = sum(seconds for _, seconds, *_ in done), sum(cpu for _, _, cpu, _ in done)
    return dataclasses.replace(
        decision, task_seconds=wall / tasks, cpu_seconds=cpu / tasks, tasks_measured=tasks
    )


def cannot_ship(fn: Callable[..., Any] | None, sample: tuple[Any, Any] | None) -> str | None:
    """Why ``fn`` (or a sample input and result) cannot travel to a process; None if it can.

    Pickled as the process backend does (cloudpickle), but with every
    out-of-band buffer dropped on the floor: a large array captured by the
    function costs nothing to check.
    """
    import cloudpickle  # (a call that never measures, or never ships, does without it)

    for what, obj in (("the function", fn), ("an input and its result", sample)):
        if obj is None:
            continue
        try:
            cloudpickle.dumps(obj, protocol=5, buffer_callback=lambda _buffer: None)
        except Exception as exc:
            return f"{what} cannot be pickled for another process ({type(exc).__name__}: {exc})"
    return None


def _ship_seconds(sample: tuple[Any, Any] | None) -> float:
    if sample is None:
        return SHIP_SECONDS
    try:
        size = len(pickle.dumps(sample, protocol=5))
    except Exception:
        return SHIP_SECONDS
    return SHIP_SECONDS + size * SHIP_SECONDS_PER_BYTE


def probe(job: Job, inputs: Iterator[Any], limit: int | None = None) -> tuple[Decision, Feed]:
    """Run the call's first tasks on probe threads and decide; see the module docstring.

    The tasks' outcomes go to ``job.deliver`` as from any backend. Returns the
    decision and the feed, whose ``next_index`` says how many items were taken
    (and ``exhausted`` whether that was all of them).
    """
    feed = Feed(inputs, job, min(limit or MAX_PROBE_TASKS, MAX_PROBE_TASKS))
    alone = ProbeThread(feed, job, "fenfa-probe-0")
    feed.threads.append(alone)
    native_before, python_before = threads_cpu()
    process_cpu, begin = time.process_time(), time.perf_counter()
    alone.start()
    alone.measured.wait(ALONE_SECONDS)
    # Both clocks at once, before anything that lets go of the GIL: while this
    # thread waits to get it back, a probe thread holding it keeps computing.
    middle, process_cpu = time.perf_counter(), time.process_time() - process_cpu
    native_after, python_after = threads_cpu()
    native = cpu_since(native_before, native_after) / (middle - begin)
    # The GIL the program's other Python threads held meanwhile was not free
    # for the probe thread: that time is not the task waiting.
    others = cpu_since(python_before, python_after, skip={alone.native_id})
    alone.ready.wait()
    cpu_alone = alone.wanted_clock()
    if cpu_alone is not None and alone.wanted_at_start is not None:
        cpu_alone -= alone.wanted_at_start
    cores = process_cpu / (middle - begin)
    tasks, wall, cpu, busy = alone.done_before(middle)
    if cpu_alone is None:  # the thread already ended: all measured in chunks
        cpu_alone = cpu
    if tasks == 0:
        raw = min(1.0, cpu_alone / max(middle - alone.began, 1e-9))
        ratio = min(1.0, cpu_alone / max(middle - alone.began - others, cpu_alone, 1e-9))
    else:
        raw = cpu / wall if wall else 1.0
        ratio = cpu / max(wall - others, cpu) if wall else 1.0
    per_task = wall / tasks if tasks else None
    # What a task costs, less the time it was preempted: on a busy machine
    # the wall clock also counts the time other programs held the CPU.
    task_cost = busy / tasks if tasks else None
    per_cpu = cpu / tasks if tasks else None
    evidence: dict[str, Any] = {
        "task_seconds": per_task,
        "cpu_seconds": per_cpu,
        "cpu_ratio": ratio,
        "cores_used": cores,
        "tasks_measured": tasks,
    }

    def settle(backend: str, reason: str, slowdown: float | None = None) -> tuple[Decision, Feed]:
        feed.close()
        problem = cannot_ship(job.fn, alone.sample) if backend == "process" else None
        if problem is not None:
            # What would have gone to processes runs where it runs serially:
            # correct first, and threads would only take turns on the GIL.
            backend = "serial"
            reason = f"{reason}; but {problem}, so it runs in the caller instead"
        return Decision(backend, reason, parallel_slowdown=slowdown, **evidence), feed

    if native > NATIVE_THREADS_ABOVE:
        return settle(
            "serial",
            f"while one task ran, threads of a library it calls (BLAS, OpenMP...) kept "
            f"{native:.1f} cores busy: the task is already parallel inside, and copies side "
            "by side would only compete for the same cores",
        )
    if cores > SELF_PARALLEL_ABOVE:
        # (Its probe thread may look half idle: it waits for the library's threads.)
        return settle(
            "serial",
            f"one task alone kept {cores:.1f} cores busy (a multi-threaded library), so "
            "running copies side by side would only compete for the same cores",
        )
    if ratio < WAITING_BELOW:
        return settle(
            "thread",
            f"the task spends {1 - ratio:.0%} of its time waiting (CPU {ratio:.0%} of wall "
            "time), and threads wait side by side at almost no cost",
        )
    ship = _ship_seconds(alone.sample)

    def small(reason_tail: str, cost: float = ship) -> tuple[Decision, Feed]:
        assert task_cost is not None
        return settle(
            "serial",
            f"a task takes {task_cost * 1e6:.2g} us, less than twice the ~{cost * 1e6:.2g} us "
            f"that shipping it to another process and its result back would cost{reason_tail}, "
            "so running in the caller is fastest",
        )

    if task_cost is not None and task_cost < 2 * SHIP_SECONDS:
        return small("", SHIP_SECONDS)  # too small for any pool: even a thread hand-off costs more
    # It computes: do two copies run in parallel on threads, or take turns on the GIL?
    pair = ProbeThread(feed, job, "fenfa-probe-1")
    feed.threads.append(pair)
    started = time.perf_counter()
    before, stat_before = alone.cpu_clock(), schedstat(alone.native_id)
    python_before = threads_cpu()[1]
    pair.start()
    pair.join(PAIR_SECONDS)
    elapsed = time.perf_counter() - started
    after, other = alone.cpu_clock(), pair.cpu_clock()
    stats = [schedstat(alone.native_id), schedstat(pair.native_id)]
    probes = {alone.native_id, pair.native_id}
    others = cpu_since(python_before, threads_cpu()[1], skip=probes) / elapsed
    wanted: float | None = None  # cores the pair ran on or queued for (Linux)
    if stat_before is not None and None not in stats:
        on_cpu = sum(s[0] for s in stats if s) - stat_before[0]
        queued = sum(s[1] for s in stats if s) - stat_before[1]
        evidence["contention"] = queued / max(on_cpu + queued, 1e-9)
        wanted = (on_cpu + queued) / elapsed
    gil_bound_small = task_cost is not None and task_cost < 2 * ship
    if before is None or after is None or other is None:
        # A probe thread ended early (the input ran out): use the chunks both
        # threads finished during the pair phase instead of the live clocks.
        finished = [chunk for thread in (alone, pair) for chunk in thread.chunks_after(started)]
        span = max((chunk[0] for chunk in finished), default=started) - started
        if (
            span > PAIR_SECONDS / 4
            and len({id(t) for t in (alone, pair) if t.chunks_after(started)}) == 2
        ):
            before, after, other = 0.0, sum(chunk[3] for chunk in finished), 0.0
            elapsed = span
    if before is None or after is None or other is None:
        # A probe thread ended: the input ran out before two copies could be compared.
        if gil_bound_small:
            return small("")
        return settle(
            "process",
            "the task computes, and the input ran out before two copies could be compared on "
            "threads, so auto chose processes, which run any computing task in parallel",
        )
    parallel = ((after - before) + other) / elapsed
    slowdown = 2.0 / max(parallel, 1e-9)
    together = f"two copies on threads kept {parallel:.2f} cores busy together"
    # (Not what they *wanted*: on a busy machine a thread woken to take the
    # GIL queues for a CPU too, and GIL-bound pairs were seen wanting 1.7.)
    if parallel > PARALLEL_ABOVE:
        return settle(
            "thread",
            f"the task computes with the GIL released: {together} (a task that holds the "
            "GIL keeps at most 1.0 busy), so threads use every core without copying data "
            "to other processes",
            min(slowdown, 2.0),
        )
    # Time queued for a CPU that other programs held is not waiting on IO:
    # judged by what the pair wanted, a busy machine does not look idle.
    # Nor is the GIL the program's other Python threads held (``others``): of
    # two copies taking turns on it with them, each gets its share of what
    # they leave, so the bar is lowered by as much.
    free = max(0.0, 1.0 - others)
    pair_waits = (wanted if wanted is not None else parallel) < PAIR_WAITING_BELOW * free
    quiet = (evidence.get("contention") or 0.0) < QUIET_BELOW
    # (Alone, by its own clock: the others' CPU is an upper bound on the GIL
    # it waited for, and a task that sleeps beside a busy thread looked busy.)
    if pair_waits and (raw < ALONE_BUSY_ABOVE or quiet):
        # Alone it looked busy (a first task's imports and warm-up often do),
        # but side by side the copies mostly wait: on IO, not on the GIL.
        return settle(
            "thread",
            f"{together}, well under the 1.0 of copies taking turns on the GIL, so the task "
            "mostly waits (alone, its first tasks used the CPU for "
            f"{ratio:.0%} of wall time), and threads wait side by side at almost no cost",
            min(slowdown, 2.0),
        )
    if gil_bound_small:
        return small(f", and {together}: they took turns on the GIL")
    return settle(
        "process",
        f"the task computes in pure Python holding the GIL: {together}, as copies taking "
        "turns on one core do, so only processes run it in parallel",
        min(slowdown, 2.0),
    )


__all__ = ["Decision", "cannot_ship", "completed", "is_coroutine_function", "probe", "unmeasured"]
