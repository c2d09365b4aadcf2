"""What ``auto``'s probe runs on: the probe threads, the input they share, and the clocks.

:func:`fenfa.auto.probe` starts a :class:`ProbeThread`, and for a task that
computes a second one, and reads their clocks to decide; this module is the
measuring instrument, that one the judgement. A probe thread runs the call's
own tasks (their results go to the call, as from a backend), in chunks that
double while they are quick, and keeps when each chunk ended, how long it
took and how much CPU it used. Both threads pull from one :class:`Feed`.
The clocks are Linux's per-thread ``schedstat``: time on a CPU plus time
runnable but queued, so that a busy machine does not make computing look
like waiting.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

from .batchloop import attach_traceback, caller, run_batch, stamped
from .tasks import Batch, Job, Piece

# The alone phase ends sooner once this many seconds of finished tasks (and at
# least ALONE_TASKS of them) have been timed: while one thread probes, the other
# cores idle, and at 0.6 ms a task (sha256 of 1 MB) 10 ms alone cost a 64-task
# call a fifth of its time.
ALONE_ENOUGH_SECONDS = 0.003
ALONE_TASKS = 4
# A probe chunk doubles while it takes less than this: tiny tasks are timed
# in bulk (two clock reads per chunk, not per task).
CHUNK_SECONDS = 0.002
MAX_PROBE_CHUNK = 10_000


class Feed:
    """The call's input, shared by the probe threads under a lock.

    Only one thread ever pulls from the input: a probe thread holds the lock
    while it pulls (a slow generator keeps it that long), and :meth:`close`
    takes the same lock, so once it returns no probe thread is inside the
    input or will enter it again, and ``next_index`` counts every item taken.
    """

    def __init__(self, inputs: Iterator[Any], job: Job, limit: int) -> None:
        self._inputs = inputs
        self._job = job
        self._limit = limit
        self._lock = threading.Lock()
        self.next_index = 0
        self.exhausted = False
        self.stopped = False
        self.error: Exception | None = None
        self.threads: list[ProbeThread] = []

    def take(self, count: int) -> tuple[int, list[Any]] | None:
        with self._lock:
            if self.stopped or self.exhausted or self._job.cancelled:
                return None
            count = min(count, self._limit - self.next_index)
            if count <= 0:
                return None
            items: list[Any] = []
            try:
                # extend() keeps what the input gave before it raised.
                items.extend(itertools.islice(self._inputs, count))
            except Exception as exc:  # the input itself failed: raised after its items
                self.error = exc
                self.exhausted = True
            if len(items) < count:
                self.exhausted = True
            if not items:
                return None
            start = self.next_index
            self.next_index += len(items)
            return start, items

    def close(self) -> None:
        """Stop the probe threads pulling; returns once none is inside the input."""
        self.stopped = True
        with self._lock:
            pass


class ProbeThread(threading.Thread):
    """Runs tasks from the feed, in growing chunks, timing each chunk."""

    def __init__(self, feed: Feed, job: Job, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._feed = feed
        self._job = job
        self.lock = threading.Lock()
        # (end time, tasks, wall seconds, seconds it wanted a CPU, wall seconds
        # less those queued) per chunk: wanted counts time queued behind other
        # programs, so that a busy machine does not make computing look like
        # waiting; the last leaves it out, so that it does not look slow.
        self.chunks: list[tuple[float, int, float, float, float]] = []
        self.sample: tuple[Any, Any] | None = None  # an input and its result
        self.ready = threading.Event()
        self.measured = threading.Event()  # enough finished tasks timed for the alone phase
        self.began = 0.0
        self.wanted_at_start: float | None = None

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.measured.set()  # (input ran out: nothing more to wait for)
            # The feed lists this thread: no cycle may keep the call's
            # function and inputs alive once the call is over.
            del self._feed, self._job

    def _run(self) -> None:
        # Counted from here, not from start(): on a busy machine a new thread
        # may queue for a while before it first runs, which is not the task's doing.
        self.began = time.perf_counter()
        self.wanted_at_start = wanted_cpu(self.native_id)
        self.ready.set()
        call = caller(self._job.fn, self._job.style)
        size = 1
        while (taken := self._feed.take(size)) is not None:
            start, items = taken
            batch = Batch(self._job, start, items)
            pieces: list[Piece] = []
            stat = schedstat(self.native_id)
            begin, cpu = time.perf_counter(), time.thread_time()
            emit = stamped(pieces.append, self._job)
            ran = run_batch(call, start, items, emit, False, attach_traceback)
            end = time.perf_counter()
            wall, on_cpu = end - begin, time.thread_time() - cpu
            after = schedstat(self.native_id)
            cpu, busy = on_cpu, wall
            if stat is not None and after is not None:
                queued = after[1] - stat[1]
                cpu = max(on_cpu, min(after[0] - stat[0] + queued, wall))
                busy = max(on_cpu, wall - queued)
            batch.done = ran
            with self.lock:
                self.chunks.append((end, ran, wall, cpu, busy))
                if self.sample is None and pieces and hasattr(pieces[0], "values"):
                    self.sample = (items[0], pieces[0].values[0])
                timed = sum(chunk[2] for chunk in self.chunks)
                if timed >= ALONE_ENOUGH_SECONDS and sum(c[1] for c in self.chunks) >= ALONE_TASKS:
                    self.measured.set()
            self._job.deliver(batch, pieces, wall)
            if busy < CHUNK_SECONDS:  # (preempted by other programs is not slow)
                size = min(size * 2, MAX_PROBE_CHUNK)

    def wanted_clock(self) -> float | None:
        """Seconds this thread wanted a CPU so far (ran or queued); None if it ended."""
        if not self.is_alive():
            return None
        wanted = wanted_cpu(self.native_id)
        return wanted if wanted is not None else self.cpu_clock()

    def cpu_clock(self) -> float | None:
        """This thread's CPU seconds so far, read from outside (Linux); None if it ended."""
        if not self.is_alive():
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.ident or 0))
        except (OSError, AttributeError):
            return None

    def chunks_after(self, moment: float) -> list[tuple[float, int, float, float, float]]:
        """The chunks that started after ``moment``."""
        with self.lock:
            return [c for c in self.chunks if c[0] - c[2] >= moment]

    def done_before(self, moment: float) -> tuple[int, float, float, float]:
        """Tasks, wall, wanted and unqueued seconds of the chunks that ended before ``moment``."""
        with self.lock:
            chunks = [c for c in self.chunks if c[0] <= moment]
        return (
            sum(c[1] for c in chunks),
            sum(c[2] for c in chunks),
            sum(c[3] for c in chunks),
            sum(c[4] for c in chunks),
        )


def schedstat(native_id: int | None) -> tuple[float, float] | None:
    """Seconds a thread ran on a CPU, and seconds it was runnable but queued (Linux)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as stats:
            on_cpu, queued, _slices = stats.read().split()
    except (OSError, ValueError):
        return None
    return int(on_cpu) / 1e9, int(queued) / 1e9


def threads_cpu() -> tuple[dict[int, float], dict[int, float]]:
    """CPU seconds of each thread of this process Python did not start, and of each it did (Linux).

    The first are a library's own workers (OpenBLAS, MKL, OpenMP): if they
    burn CPU while one task runs, the task is already parallel inside. The
    second are the program's other Python threads: CPU they used while a probe
    thread ran was mostly time they held the GIL, which the probe thread spent
    waiting for it, and that is not the task waiting.
    """
    ours = {thread.native_id for thread in threading.enumerate()}
    native: dict[int, float] = {}
    python: dict[int, float] = {}
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return native, python
    for tid in tids:
        stat = schedstat(tid)
        if stat is not None:
            (python if tid in ours else native)[tid] = stat[0]
    return native, python


def cpu_since(
    before: dict[int, float], after: dict[int, float], *, skip: Collection[int | None] = ()
) -> float:
    """CPU seconds the threads of ``after`` (but those in ``skip``) used since ``before``."""
    return sum(seconds - before.get(tid, 0.0) for tid, seconds in after.items() if tid not in skip)


def wanted_cpu(native_id: int | None) -> float | None:
    """Seconds a thread ran on a CPU plus seconds it was runnable but queued."""
    stat = schedstat(native_id)
    return None if stat is None else stat[0] + stat[1]
