"""Module-level ``auto`` remembers a function's decision between its calls.

The probe costs a few milliseconds a call; a loop of ``fenfa.map(fn, ...)``
calls on the same function gets the same answer each time, so the router
keeps it (:mod:`fenfa.deciding`) and measures again when the task time
shifts, after ``REMEMBER_CALLS`` calls, or when a remembered ``process``
call's input cannot be pickled. Which thread ran each task tells whether a
call was probed (its first tasks run on ``fenfa-probe-*`` threads).
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import pytest

import fenfa
import fenfa.api
from fenfa import deciding
from fenfa.auto import Decision

RAN_ON: list[str] = []


def waits(x: int) -> int:
    RAN_ON.append(threading.current_thread().name)
    time.sleep(0.01)
    return x


def slow_when_negative(x: int) -> int:
    RAN_ON.append(threading.current_thread().name)
    if x < 0:
        time.sleep(0.02)
    return x


def identity(x: object) -> object:
    return x


def router() -> fenfa.Pool:
    return fenfa.api._default_pool("auto", None)


def decision() -> Decision:
    made = router().insights.decision
    assert made is not None
    return made


def probed() -> bool:
    """Whether the last call ran tasks on a probe thread; clears the record."""
    names = list(RAN_ON)
    RAN_ON.clear()
    return any(name.startswith("fenfa-probe") for name in names)


def test_a_later_call_of_the_same_function_uses_the_remembered_decision() -> None:
    RAN_ON.clear()
    assert fenfa.map(waits, range(8)) == list(range(8))
    first = decision()
    assert not first.remembered
    assert probed()
    assert first.backend == "thread"
    assert fenfa.map(waits, range(8, 16)) == list(range(8, 16))
    second = decision()
    assert second.remembered
    assert not probed()
    assert second.backend == "thread"
    assert "remembered" in second.reason


def test_a_task_time_that_shifts_makes_the_next_call_measure_again() -> None:
    RAN_ON.clear()
    tiny = list(range(20_000))
    assert fenfa.map(slow_when_negative, tiny) == tiny
    assert not decision().remembered
    assert probed()
    assert fenfa.map(slow_when_negative, tiny) == tiny
    assert decision().remembered
    assert not probed()
    slow = [-1] * 30  # each task now takes 20 ms, not a microsecond
    assert fenfa.map(slow_when_negative, slow) == slow  # on the remembered backend still
    assert decision().remembered
    assert not probed()
    assert fenfa.map(slow_when_negative, slow) == slow
    again = decision()
    assert not again.remembered
    assert probed()
    assert again.backend == "thread"  # a task that sleeps


def test_a_remembered_decision_serves_a_limited_number_of_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deciding, "REMEMBER_CALLS", 2)
    RAN_ON.clear()
    seen = []
    for _ in range(4):
        assert fenfa.map(waits, range(4)) == list(range(4))
        seen.append((decision().remembered, probed()))
    assert seen == [(False, True), (True, False), (True, False), (False, True)]


def test_a_remembered_process_decision_measures_again_for_an_input_it_cannot_send() -> None:
    router()._memory.learn(identity, Decision("process", "learned here"), 1e-6)  # type: ignore[union-attr]
    assert fenfa.map(identity, range(3)) == [0, 1, 2]
    assert decision().remembered
    assert decision().backend == "process"
    locks = [threading.Lock() for _ in range(3)]  # cannot be pickled
    assert fenfa.map(identity, locks) == locks
    assert not decision().remembered
    assert decision().backend != "process"


def test_a_remembered_process_decision_keeps_the_inputs_own_errors_and_empty_inputs() -> None:
    router()._memory.learn(identity, Decision("process", "learned here"), 1e-6)  # type: ignore[union-attr]

    def broken() -> Iterator[int]:
        raise ValueError("the input is broken")
        yield 0

    with pytest.raises(ValueError, match="the input is broken"):
        fenfa.map(identity, broken())
    assert fenfa.map(identity, []) == []
    assert fenfa.map(identity, iter([5])) == [5]
    assert decision().remembered


def test_the_memory_does_not_keep_a_function_alive() -> None:
    def local(x: int) -> int:
        return x + 1

    gc.disable()
    try:
        assert fenfa.map(local, range(100)) == list(range(1, 101))
        assert fenfa.map(local, range(100)) == list(range(1, 101))
        assert decision().remembered
        ref = weakref.ref(local)
        del local
        assert ref() is None
    finally:
        gc.enable()


def test_bound_methods_and_builtins_are_measured_each_call() -> None:
    items = [1, 2, 3]
    for _ in range(2):
        assert fenfa.map(abs, [-1, -2]) == [1, 2]
        assert not decision().remembered
        assert fenfa.map(items.__contains__, [1, 5]) == [True, False]
        assert not decision().remembered
