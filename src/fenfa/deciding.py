"""What ``auto`` decides for one call: measured by its probe, or remembered.

A module-level call (``fenfa.map(fn, xs)``, backend ``"auto"``) decides
afresh for each call, so ``fenfa.map(download, urls)`` and
``fenfa.map(crunch, xs)`` in one script each get their own backend. The
probe that measures a call costs a few milliseconds (the alone phase, then
the pair phase, while the other cores idle): nothing beside a 1 s call, but
a fifth of a 15 ms one. A script that calls ``fenfa.map`` on the same
function in a loop would pay it every time, for the same answer. So the
router pool keeps a :class:`Memory`: after a call completes, the decision
its probe made is kept for that function, and the function's next calls
use it without probing::

    call 1 of fn:  probe ─▶ decision ─▶ rest of the call ─▶ learn(fn, decision, task time)
    call 2..16:    recall(fn) ─▶ decision ─▶ the whole call on its backend
                                              └─▶ task time 4x off what was learned? forget(fn)
    call 17 (or 60 s later): forgotten, probed again

A remembered decision is dropped, and the next call probes again, when

- the call's task time (measured by the chunk sizer, on the backend that
  ran it) is more than ``SHIFT`` times off the time it was learned with:
  the same function on other inputs (or a machine whose load changed) may
  need another backend;
- it has served ``REMEMBER_CALLS`` calls, or is ``REMEMBER_SECONDS`` old;
- it says ``process`` and the call's first input cannot be pickled (a
  lambda, a lock): the probe then decides where it can run.

Only objects that can be weakly referenced are remembered (functions,
callable objects; not builtins, and not bound methods, which are new
objects at each access), and the memory never keeps one alive. A
``Pool("auto")`` decides once, at its first call, and keeps that backend:
it has no memory to consult.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .auto import Decision, cannot_ship, completed, probe, unmeasured
from .probing import Feed
from .tasks import Job, is_coroutine_function

# A remembered decision serves at most this many calls, and for at most this
# long, before a call measures again: a machine's load and a function's
# inputs drift, and one probe in 16 calls costs little.
REMEMBER_CALLS = 16
REMEMBER_SECONDS = 60.0
# A call whose task time is more than this factor off the remembered one
# (either way) shows that the function's work has changed: it is forgotten.
# Not lower: a task's time on processes and on a probe thread, or on a
# loaded machine, differ by up to ~2x for the same work.
SHIFT = 4.0


@dataclasses.dataclass
class _Entry:
    decision: Decision
    task_seconds: float | None
    learned: float
    calls: int = 0


class Memory:
    """The decisions of a router pool's completed calls, one per function."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[Any, _Entry] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def recall(self, fn: Callable[..., Any]) -> Decision | None:
        """The decision to use for a call of ``fn`` without probing, or None."""
        if not _rememberable(fn):
            return None
        with self._lock:
            entry = self._entries.get(fn)
            if entry is None:
                return None
            if entry.calls >= REMEMBER_CALLS or time.monotonic() - entry.learned > REMEMBER_SECONDS:
                del self._entries[fn]
                return None
            entry.calls += 1
            return entry.decision

    def learn(self, fn: Callable[..., Any], decision: Decision, task_seconds: float | None) -> None:
        if not _rememberable(fn):
            return
        remembered = dataclasses.replace(
            decision,
            remembered=True,
            reason=f"{decision.reason} (remembered from an earlier call of this function: "
            f"auto measures again after {REMEMBER_CALLS} calls, or when its task time changes)",
        )
        with self._lock:
            self._entries[fn] = _Entry(remembered, task_seconds, time.monotonic())

    def check(self, fn: Callable[..., Any], task_seconds: float | None) -> None:
        """A call on a remembered decision has completed: forget it if its task time shifted."""
        with self._lock:
            entry = self._entries.get(fn)
            if entry is None or task_seconds is None:
                return
            if entry.task_seconds is None:
                entry.task_seconds = task_seconds
                return
            ratio = task_seconds / max(entry.task_seconds, 1e-9)
            if ratio > SHIFT or ratio < 1 / SHIFT:
                del self._entries[fn]

    def forget(self, fn: Callable[..., Any]) -> None:
        with self._lock:
            if _rememberable(fn):
                self._entries.pop(fn, None)


def _rememberable(fn: object) -> bool:
    if isinstance(fn, types.MethodType | types.BuiltinFunctionType):
        return False
    try:
        weakref.ref(fn)
        hash(fn)
    except TypeError:
        return False
    return True


def decide(
    memory: Memory | None, job: Job, inputs: Iterator[Any], window: int | None
) -> tuple[Decision, Feed | None, Iterator[Any]]:
    """The call's decision, the probe's feed (None without a probe), and its input.

    The input returned replaces ``inputs``: a remembered ``process`` decision
    looks at the first item (to see that it can be pickled) and puts it back.
    """
    if is_coroutine_function(job.fn):
        return unmeasured(job.fn, ""), None, inputs
    if job.timeout is not None:
        why = "a timeout was given and measuring runs tasks on threads that cannot be stopped"
        return unmeasured(job.fn, why), None, inputs
    decision = memory.recall(job.fn) if memory is not None else None
    if decision is not None and decision.backend == "process":
        inputs, problem = _first_ships(inputs)
        if problem:
            assert memory is not None
            memory.forget(job.fn)
            decision = None
    if decision is not None:
        return decision, None, inputs
    decision, feed = probe(job, inputs, window)
    return decision, feed, inputs


def _first_ships(inputs: Iterator[Any]) -> tuple[Iterator[Any], bool]:
    """The input with its first item put back, and whether that item cannot be pickled."""
    try:
        first = next(inputs)
    except StopIteration:
        return iter(()), False
    except Exception as exc:  # the input's own error: raised where the call pulls it
        return _raising(exc), False
    return itertools.chain((first,), inputs), cannot_ship(None, (first, None)) is not None


def _raising(exc: Exception) -> Iterator[Any]:
    yield from ()  # (a generator: it raises when pulled, not now)
    raise exc


def conclude(
    memory: Memory | None,
    fn: Callable[..., Any],
    decision: Decision,
    feed: Feed | None,
    task_seconds: float | None,
) -> Decision:
    """A completed call's decision, with the probe's late task times; remembered or checked."""
    if feed is not None:
        decision = completed(decision, feed)
    if memory is not None:
        if decision.remembered:
            memory.check(fn, task_seconds)
        elif feed is not None:
            memory.learn(fn, decision, task_seconds)
    return decision


__all__ = ["Memory", "conclude", "decide"]
