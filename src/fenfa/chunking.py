"""The adaptive chunk size (``chunksize=None``): how many tasks the next batch holds.

Sized from measured task times so that a batch holds about 10 ms of work:
enough that dispatch costs ~1%, little enough that the input's end stays
balanced over the workers. The run (:mod:`fenfa.window`) asks it before
cutting each batch and feeds it every report's busy time. Pure arithmetic
under a lock: no threads of its own, easy to test alone.
"""

from __future__ import annotations

import math
import threading

# Adaptive chunk size. A batch costs about 50-150 us of fixed work (pickle,
# two thread hand-offs, one pipe round trip; measured on 2 cores with the
# tiny-task benchmark), so a batch of 10 ms of work spends ~1% on dispatch.
# Larger batches gain little and hurt balance at the end of the input.
TARGET_BATCH_SECONDS = 0.010
# Near the end of a known input, batches shrink so every worker finishes at
# about the same time, but never below this much work: below it dispatch
# costs more than the imbalance it removes.
MIN_BATCH_SECONDS = 0.002
# Above this, larger batches save nothing measurable and only hold memory.
MAX_CHUNKSIZE = 10_000
# With a known input length, what remains is spread over at least this many
# batches per worker, so no worker idles while another finishes a big one.
TAIL_BATCHES_PER_WORKER = 4
# Slow start: a batch holds at most this many times the tasks measured so
# far. The estimate comes from the first tasks; if they were cheap and the
# rest are not, a batch sized from them alone would swallow an unknown-length
# input whole (seen: 2 instant tasks, then 198 of 3 ms each: 179 of them went
# to one of two workers, 0.61 s, no faster than serial). Measured on 2 cores:
# growth 4x costs 200k tiny tasks 25 % (round trips while ramping up), 16x
# 18 %, 64x nothing measurable (15.3 ms against 15.1 ms without a cap),
# while the bad case improves to 129/71 tasks and 0.39 s (16x: 97/103, 0.31 s).
GROWTH = 64


class ChunkSizer:
    """Chooses how many tasks go into the next batch, from measured task times.

    Before anything is measured a batch holds one task (a probe). Each
    finished batch reports its busy time; the estimate of one task's time is
    busy time over tasks, with older batches' share halved at each report: it
    follows a change of pace within a few batches, and a slow probe (the
    first call in a worker is cold) weighs as one task, not as one batch.
    """

    def __init__(self, workers: int, total: int | None, fixed: int | None) -> None:
        self.workers = workers
        self.total = total
        self.fixed = fixed
        self.task_seconds: float | None = None
        self._busy = 0.0
        self._tasks = 0.0
        self._measured = 0  # tasks measured so far, all told
        self._lock = threading.Lock()

    def measured(self, busy: float, tasks: int) -> None:
        if tasks <= 0:
            return
        with self._lock:
            self._busy = 0.5 * self._busy + busy
            self._tasks = 0.5 * self._tasks + tasks
            self._measured += tasks
            self.task_seconds = self._busy / self._tasks

    def size(self, next_index: int) -> int:
        if self.fixed is not None:
            return self.fixed
        seconds = self.task_seconds
        if seconds is None:
            return 1
        seconds = max(seconds, 1e-9)
        size = min(MAX_CHUNKSIZE, max(1, round(TARGET_BATCH_SECONDS / seconds)))
        size = min(size, GROWTH * self._measured)
        if self.total is not None:
            remaining = self.total - next_index
            balanced = math.ceil(remaining / (self.workers * TAIL_BATCHES_PER_WORKER))
            size = min(size, max(balanced, round(MIN_BATCH_SECONDS / seconds), 1))
        return size

    def expected(self, tasks: int) -> float | None:
        seconds = self.task_seconds
        return None if seconds is None else seconds * tasks
