"""``speculate=True``: a straggler does not hold the whole call.

One slow task (a request that hangs, a node that stalls) keeps ``map``
waiting long after every other task is done. With speculation on, once the
input is exhausted and a worker would otherwise idle, a batch that has run
longer than ``FACTOR`` times the call's median task time (and at least
``FLOOR_SECONDS``) gets a second attempt on that worker. Whichever attempt
reports a task first wins; the other's report of it is dropped, so each
result is delivered once. When the call has every result, the attempts
still running are stopped: process workers killed and replaced, threads
abandoned (a thread cannot be stopped: it runs on, its result discarded),
coroutines cancelled, dask futures released.

Speculation runs tasks twice: only for calls whose tasks may safely run
twice (no side effects, or idempotent ones). It is off unless asked.

The :class:`Speculator` works on the run's side only, from what the run
sees: when it sent each batch, which of its tasks have reported. A batch's
age counts from when it probably started: batches go to workers first come,
first served, so the ``workers`` oldest still out are the running ones.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .tasks import Batch, Err, Ok, Piece

# A batch is a straggler once it has been out this many times the median
# task time: MapReduce's backup tasks (Dean & Ghemawat) fire for the last few
# tasks still running; 4x keeps ordinary spread (a task 2-3x the median is
# common on a loaded machine) from being run twice.
FACTOR = 4.0
# ... and never sooner than this: below a second the second attempt's own
# start (a replacement process takes ~0.1-0.3 s) eats the gain, and timer
# noise on tiny tasks would make every batch look late.
FLOOR_SECONDS = 1.0
# Task times kept for the median (the latest ones).
SAMPLES = 1000


class _Flight:
    """A batch out on a worker: the tasks it has not reported yet."""

    __slots__ = ("batch", "copied", "left", "running_since", "sent")

    def __init__(self, batch: Batch, sent: float) -> None:
        self.batch = batch
        self.sent = sent
        self.left = set(range(batch.start, batch.start + len(batch.items)))
        self.copied = False
        # When it (probably) started: see Speculator._promote.
        self.running_since: float | None = None


class Speculator:
    """The run's bookkeeping for ``speculate=True``; see the module docstring."""

    def __init__(self) -> None:
        #: The backend's workers (set by the run once its backend is known).
        self.workers = 1
        self._flights: dict[int, _Flight] = {}  # batch id (original or copy) -> flight
        self._finished: dict[int, _Flight] = {}  # the same, for raced flights now done
        self._times: deque[float] = deque(maxlen=SAMPLES)
        #: (task index, "first" or "second") for each task a copy was made of.
        self.outcomes: list[tuple[int, str]] = []
        self.copies = 0

    def sent(self, batch: Batch) -> None:
        self._flights[batch.id] = _Flight(batch, time.monotonic())
        self._promote()

    def received(self, batch: Batch, pieces: list[Piece], busy: float) -> list[Piece]:
        """``pieces`` less the tasks another attempt already reported."""
        flight = self._flights.get(batch.id)
        if flight is None and batch.id in self._finished:
            return []  # the slower attempt of a task already delivered
        count = sum(len(p.values) if isinstance(p, Ok) else 1 for p in pieces)
        if count:
            self._times.append(busy / count)
        if flight is None:
            return pieces
        kept: list[Piece] = []
        copy = flight.batch is not batch
        for piece in pieces:
            if isinstance(piece, Err):
                if piece.index in flight.left:
                    flight.left.discard(piece.index)
                    kept.append(piece)
                continue
            kept.extend(self._fresh(piece, flight))
        if flight.copied:
            for piece in kept:
                first = piece.start if isinstance(piece, Ok) else piece.index
                self.outcomes.append((first, "second" if copy else "first"))
        if not flight.left:
            keys = [k for k, f in self._flights.items() if f is flight]
            for key in keys:
                del self._flights[key]
            if flight.copied:
                # The slower attempt may still report: its ids stay known, so
                # that report is dropped instead of delivered a second time.
                for key in keys:
                    self._finished[key] = flight
            self._promote()
        return kept

    def _originals(self) -> list[_Flight]:
        """The flights, once each, oldest first."""
        return sorted({id(f): f for f in self._flights.values()}.values(), key=lambda f: f.sent)

    def _promote(self) -> None:
        """Mark when each batch probably started running.

        Batches are dispatched first come, first served, so the ``workers``
        oldest still out are the ones running; a batch queued behind them
        starts when one of them reports. Its age counts from then, not from
        when it was sent: a batch that waited in line is no straggler.
        """
        now = time.monotonic()
        for flight in self._originals()[: self.workers]:
            if flight.running_since is None:
                flight.running_since = now

    @staticmethod
    def _fresh(piece: Ok, flight: _Flight) -> list[Piece]:
        """The runs of ``piece``'s tasks not reported yet, as Ok pieces."""
        left = flight.left
        end = piece.start + len(piece.values)
        if all(i in left for i in range(piece.start, end)):
            left.difference_update(range(piece.start, end))
            return [piece]
        out: list[Piece] = []
        run: list[Any] = []
        run_start = 0
        for offset, value in enumerate(piece.values):
            index = piece.start + offset
            if index in left:
                if not run:
                    run_start = index
                run.append(value)
                left.discard(index)
            elif run:
                out.append(_with_times(Ok(run_start, run), piece))
                run = []
        if run:
            out.append(_with_times(Ok(run_start, run), piece))
        return out

    def threshold(self) -> float:
        import statistics  # (its import costs ~10 ms: only for calls that speculate)

        median = statistics.median(self._times) if self._times else 0.0
        return max(FLOOR_SECONDS, FACTOR * median)

    def due(self, idle: int | None) -> tuple[list[Batch], float]:
        """Copies to send now, one per idle worker, and seconds until the next may be due
        (``FLOOR_SECONDS`` when nothing runs that could become due).

        ``idle`` is what the backend says; where it cannot tell, the flights
        are counted (a copy keeps a second worker busy).
        """
        self._promote()
        originals = self._originals()
        if idle is None:
            idle = self.workers - sum(1 + f.copied for f in originals[: self.workers])
        now, limit = time.monotonic(), self.threshold()
        copies: list[Batch] = []
        wait: float | None = None
        running = [f for f in originals if f.running_since is not None and not f.copied]
        for flight in sorted(running, key=lambda f: f.running_since or now):
            if len(copies) >= idle:
                break
            late = now - (flight.running_since or now) - limit
            if late < 0:
                wait = -late if wait is None else min(wait, -late)
                continue
            copies.append(self._copy(flight))
        return copies, FLOOR_SECONDS if wait is None else wait

    def _copy(self, flight: _Flight) -> Batch:
        batch = flight.batch
        first = min(flight.left)
        items = [batch.item(i) for i in range(first, batch.start + len(batch.items))]
        copy = Batch(batch.job, first, items, batch.attempt)
        flight.copied = True
        self.copies += 1
        self._flights[copy.id] = flight
        return copy

    @property
    def racing(self) -> bool:
        """Whether any copy was sent: attempts may still run once the call is over."""
        return self.copies > 0


def _with_times(new: Ok, old: Ok) -> Ok:
    new.times = old.times
    return new


__all__ = ["FACTOR", "FLOOR_SECONDS", "Speculator"]
