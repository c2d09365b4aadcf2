"""One call over many inputs: the in-flight window, batches, retries, errors, order.

A call (``map``, ``imap``...) becomes a :class:`Run`. The run pulls items
from the input only when it has room, cuts them into batches whose size the
:class:`~fenfa.tasks.ChunkSizer` picks from measured task times, hands them
to the backend, and takes the pieces that come back off one queue. Window,
chunking, retries, error handling and ordering live here, once, for every
backend; a backend only runs batches.

The window counts every task pulled from the input and not yet handed to the
consumer, results waiting in the reorder buffer included: a slow first task
in an ordered ``imap`` stops the input being pulled, instead of letting
finished results pile up behind it.

The run reaches its pool through :class:`~fenfa.pool_base.PoolBase` (the backend,
``_submit_batch``, ``insights``), below this module; :class:`fenfa.Pool`, which makes runs, above.
"""

from __future__ import annotations

import itertools
import queue
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from .auto import Decision
from .chunking import ChunkSizer
from .deciding import Memory, conclude, decide
from .options import CallOptions
from .outcomes import Delivery, Report, Witness, annotate, from_input, next_report, record
from .progress import Progress
from .tasks import Batch, Job, Ok, Piece, Style

if TYPE_CHECKING:
    from .backends import Backend
    from .insights import Insights
    from .pool_base import PoolBase
    from .speculation import Speculator

# The default window holds this many batches per worker: one running, one
# queued behind it, and room for finished results on their way back and in
# the reorder buffer, so workers never wait for the consumer's next pull.
WINDOW_BATCHES_PER_WORKER = 4
# ... but never more than this many tasks in flight by default: the results of
# 100,000 tiny tasks are a few MB; more buys no speed (the tiny-task benchmark
# runs at the same rate with 80,000) and only holds memory.
MAX_DEFAULT_WINDOW = 100_000


# The result iterators of fenfa calls, so that a call reading another's
# results (a pipeline stage) can stop it when it stops itself.
_stages: weakref.WeakSet[Iterator[Any]] = weakref.WeakSet()


class Run:
    """One call over many inputs: window, batches, retries, errors, order."""

    def __init__(
        self,
        pool: PoolBase | None,
        fn: Callable[..., Any],
        style: Style,
        inputs: Iterator[Any],
        *,
        total: int | None,
        ordered: bool,
        options: CallOptions,
        deadline: float | None = None,
        chooser: Callable[[Decision], PoolBase] | None = None,
        recorder: Insights | None = None,
    ) -> None:
        # With ``chooser`` (backend "auto"), the pool is known only once the
        # first tasks are measured: see _settle.
        self._pool = pool
        self._chooser = chooser
        self._results: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self.decision: Decision | None = None
        self._feed: Any = None  # auto's probe feed, for the evidence that comes late
        self._memory: Memory | None = None  # a router's remembered decisions
        self._inputs = self._upstream = inputs
        self._ordered = ordered
        self._options = options
        self._deadline = deadline
        # A run driven in the background (map_async) was accepted whole: it
        # may go on pulling input after shutdown() has been called.
        self.background = False
        # The job reports to the queue, not to this run: no reference cycle,
        # so what the call holds (its function, its inputs) is freed as soon
        # as the call ends, without waiting for the cycle collector.
        self._report = Report(self._results)
        self._job = Job(fn, style, self._report)
        self._job.timeout = options.timeout
        # Nothing after a failure will be used: a backend that runs tasks in
        # order (serial) stops there, as builtins.map does.
        self._job.stop_on_error = options.on_error == "raise" and options.retries == 0
        self._total = total
        if chooser is None:
            assert pool is not None
            assert pool._backend is not None
            self._backend: Backend = pool._backend
            self._sizer = ChunkSizer(self._backend.workers, total, options.chunksize)
        self._next = 0  # index of the next item pulled
        self._input_error: Exception | None = None
        self._exhausted = False
        self._in_window = 0  # pulled and not yet handed to the consumer
        self._unfinished = 0  # pulled and without a final outcome yet
        self._probes = 0
        # ordered: start index -> (tasks covered, values or an error to raise)
        self._ready: dict[int, tuple[int, list[Any] | BaseException]] = {}
        self._cursor = 0
        self._out: deque[tuple[int, list[Any] | BaseException]] = deque()
        self._progress: Progress | None = None
        self._speculator: Speculator | None = None
        if options.speculate:
            from .speculation import Speculator

            self._speculator = Speculator()
        #: Told each final outcome as it comes; flushed once a report is absorbed.
        self.witness: Witness | None = None
        self._recorder = recorder
        if recorder is not None:
            self._call = recorder.new_call()
            self._job.timed = True

    # -- pulling input --------------------------------------------------

    def _settle(self) -> None:
        """Measure the first tasks (they run for real), then pick the pool for the rest."""
        assert self._chooser is not None
        memory = self._memory = self._pool._memory if self._pool is not None else None
        decision, feed, self._inputs = decide(memory, self._job, self._inputs, self._options.window)
        self._feed, taken, exhausted = feed, 0, False
        if feed is not None:
            taken, exhausted = feed.next_index, feed.exhausted
            if feed.error is not None:
                # Raised once the probe's results before it are delivered.
                self._input_error = from_input(feed.error, taken)
        self.decision = decision
        if self._recorder is not None:
            self._recorder.decision = decision
        self._next = taken
        self._in_window += taken
        self._unfinished += taken
        self._exhausted = exhausted
        self._pool = self._chooser(decision)
        assert self._pool._backend is not None
        self._backend = self._pool._backend
        self._sizer = ChunkSizer(self._backend.workers, self._total, self._options.chunksize)
        if decision.task_seconds is not None:
            self._sizer.measured(
                decision.task_seconds * decision.tasks_measured, decision.tasks_measured
            )

    @property
    def _target(self) -> PoolBase:
        assert self._pool is not None, "settled before the first batch"
        return self._pool

    def fill(self) -> None:
        if self._chooser is not None and self.decision is None:
            self._settle()
        backend = self._backend
        workers = backend.workers
        per_worker = 1 if backend.inline else WINDOW_BATCHES_PER_WORKER
        while not self._exhausted:
            size = self._sizer.size(self._next)
            if self._options.window is not None:
                window = self._options.window
                size = min(size, max(1, window // workers))
            else:
                window = min(per_worker * workers * size, MAX_DEFAULT_WINDOW)
                size = min(size, window)
            if window - self._in_window < size:
                # Wait for room for a whole batch: filling every small gap
                # would echo small batches through the window forever.
                return
            probing = self._sizer.task_seconds is None and self._options.chunksize is None
            if probing and self._probes >= workers:
                return  # one task per worker until a time is measured
            items: list[Any] = []
            try:
                # extend() keeps the items the input gave before it raised.
                items.extend(itertools.islice(self._inputs, size))
            except Exception as exc:
                # As builtins.map: what came before the broken input is still
                # delivered, in order; then the input's error is raised.
                self._input_error = from_input(exc, self._next + len(items))
                self._exhausted = True
            if len(items) < size:
                self._exhausted = True
            if not items:
                return
            batch = Batch(self._job, self._next, items, expected=self._sizer.expected(len(items)))
            self._next += len(items)
            self._in_window += len(items)
            self._unfinished += len(items)
            self._probes += probing
            if self._speculator is not None:
                self._speculator.workers = workers
                self._speculator.sent(batch)
            self._target._submit_batch(batch, internal=self.background)
            if self._backend.inline:
                return  # it ran already: look at its outcome before running more

    def _complete_decision(self) -> None:
        """Add the probe's late task times (long tasks); let the router remember or check it."""
        if self.decision is None:
            return
        seconds = self._sizer.task_seconds
        decision = conclude(self._memory, self._job.fn, self.decision, self._feed, seconds)
        if decision is not self.decision:
            for holder in (self._recorder, self._target.insights):
                if holder is not None and holder.decision is self.decision:
                    holder.decision = decision
            self.decision = decision

    # -- taking results -------------------------------------------------

    def _next_report(self) -> Delivery | None:
        """The next report; with ``speculate``, stragglers get a second attempt meanwhile."""
        speculator = self._speculator
        if speculator is None:
            return next_report(self._results, self._deadline)
        # A worker may idle because the input is exhausted, or because the
        # window is full behind a slow task (an ordered call's reorder buffer
        # waiting for it): either way nothing else can be sent it.
        idle = self._backend.idle_workers()
        if not self._exhausted and not idle:
            return next_report(self._results, self._deadline)
        speculator.workers = self._backend.workers
        copies, wait = speculator.due(idle)
        for copy in copies:
            self._target._submit_batch(copy, urgent=True, internal=True)
        return next_report(self._results, self._deadline, wait)

    def _stop_the_slower_attempts(self) -> None:
        """Every result is in: attempts still running lost the race; stop them."""
        speculator = self._speculator
        if speculator is None or not speculator.racing:
            return
        self._backend.abandon(self._job)
        self._target.insights.speculations.extend(speculator.outcomes)

    def _absorb(self, batch: Batch, pieces: list[Piece], busy: float) -> None:
        tasks = 0
        options = self._options
        if self._speculator is not None:
            pieces = self._speculator.received(batch, pieces, busy)
        for piece in pieces:
            if piece.times is not None and self._recorder is not None:
                record(self._recorder, self._call, batch, piece)
            if isinstance(piece, Ok):
                count = len(piece.values)
                tasks += count
                self._unfinished -= count
                if self.witness is not None:  # (journal=: it records them now)
                    self.witness(batch, piece.start, piece.values, False)
                self._put(piece.start, count, piece.values)
                continue
            tasks += 1
            index = piece.index
            item = batch.item(index)
            if batch.attempt <= options.retries:
                retry = Batch(self._job, index, [item], batch.attempt + 1)
                if self._speculator is not None:
                    self._speculator.sent(retry)
                self._target._submit_batch(retry, urgent=True, internal=True)
                continue
            self._unfinished -= 1
            if self._progress is not None:
                self._progress.failure()
            error = annotate(piece.error, index, item, batch.attempt)
            if self.witness is not None:
                self.witness(batch, index, [error], True)
            if options.on_error == "return":
                self._put(index, 1, [error])
            elif options.on_error == "skip":
                self._put(index, 1, [])
            elif not self._ordered:
                del piece, pieces  # (no cycle through this frame: see pieces())
                try:
                    raise error
                finally:
                    del error
            else:
                # Raised when the consumer reaches it, as builtins.map raises
                # the first failure in input order; nothing after it is needed.
                self._put(index, 1, error)
                self._exhausted = True
        if self.witness is not None:
            self.witness.flush()
        self._sizer.measured(busy, tasks)

    def _put(self, start: int, count: int, values: list[Any] | BaseException) -> None:
        if self._ordered:
            self._ready[start] = (count, values)
        else:
            self._out.append((count, values))

    def _take(self) -> tuple[int, list[Any] | BaseException] | None:
        if not self._ordered:
            return self._out.popleft() if self._out else None
        entry = self._ready.pop(self._cursor, None)
        if entry is not None:
            self._cursor += entry[0]
        return entry

    def pieces(self) -> Generator[list[Any], None, None]:
        """Lists of results, in the order the call promised; cleans up however it is left.

        A piece counts against the window until the consumer asks for the
        next one, that is, until it has taken every value of this one.
        """
        if self._options.progress:
            self._progress = Progress(self._options.progress, self._total, self._job.fn)
        try:
            while True:
                self.fill()
                entry = self._take()
                if entry is not None:
                    count, values = entry
                    if isinstance(values, BaseException):
                        # No local refers to the exception as it leaves: its
                        # traceback holds this frame, and a cycle through it
                        # would keep the call's function and inputs alive.
                        error, entry, values = values, None, []
                        try:
                            raise error
                        finally:
                            del error
                    if self._progress is not None:
                        self._progress.advance(count)
                    yield values
                    self._in_window -= count
                    continue
                if self._exhausted and self._unfinished == 0:
                    self._stop_the_slower_attempts()
                    self._complete_decision()
                    if self._input_error is not None:
                        raise self._input_error
                    return
                report = self._next_report()
                if report is not None:
                    self._absorb(*report)
                    report = None  # (no cycle through this frame: see above)
        except KeyboardInterrupt:
            # Ctrl-C: nobody wants these results; stop the tasks now running
            # (process workers are killed and replaced).
            if self.decision is not None or self._chooser is None:
                self._backend.abandon(self._job)
            raise
        finally:
            self.cancel()
            if self._progress is not None:
                self._progress.close()

    def results(self) -> Iterator[Any]:
        """One value at a time; a generator, so ``close()`` cancels the call."""
        stream = self._stream()
        _stages.add(stream)
        return stream

    def _stream(self) -> Generator[Any, None, None]:
        pieces = self.pieces()
        try:
            for values in pieces:
                yield from values
        finally:
            pieces.close()

    def collect(self) -> list[Any]:
        out: list[Any] = []
        for values in self.pieces():
            out.extend(values)
        return out

    def cancel(self) -> None:
        """Drop every batch not started yet; running ones finish, unseen.

        In a pipeline (this call's input is another fenfa call's results), the
        stage upstream is stopped too: nobody will pull from it any more.
        """
        self._job.cancelled = True
        backend: Backend | None = getattr(self, "_backend", None)  # (auto: None until settled)
        if backend is not None:
            backend.drop(self._job)
        self._job.release_shared()
        # Nothing waits for results now: free them, and what they refer to.
        self._report.close()
        self._ready.clear()
        self._out.clear()
        upstream = self._upstream
        if upstream in _stages:
            upstream.close()  # type: ignore[attr-defined]


__all__ = ["MAX_DEFAULT_WINDOW", "Run"]
