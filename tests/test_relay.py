"""Issue 8, section 1: what process workers print and log reaches the caller."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from typing import Any

import psutil
import pytest

import fenfa

log = logging.getLogger("fenfa_tests.work")


def chatty(x: int) -> int:
    print(f"task {x} says hi")
    log.info("task %d logged", x)
    log.debug("task %d debug", x)  # below the caller's level: never sent
    return x


def to_stderr(x: int) -> int:
    sys.stderr.write(f"err {x}\n")
    return x


def stream_type(_: object) -> str:
    return type(sys.stdout).__name__


def long_lines(x: int) -> int:
    """Lines written in many small pieces, by two workers at once."""
    for line in range(50):
        for _ in range(40):
            print(chr(ord("a") + x), end="")
        print(f" {line}")
    return x


def numbered(x: int) -> int:
    for n in range(200):
        print(f"{os.getpid()} {n}")
    return x


def crash_after_print(x: int) -> int:
    if x == 1:
        print("last words", flush=False)
        print("partial, never finished", end="")
        os._exit(7)
    return x


def flood(megabytes: int) -> int:
    line = "x" * 1023 + "\n"
    for _ in range(megabytes * 1024):
        sys.stdout.write(line)
    return megabytes


def failing_log(x: int) -> int:
    try:
        raise ValueError("inside the task")
    except ValueError:
        log.exception("task %d failed", x)
    return x


def test_prints_reach_the_callers_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with fenfa.Pool("process", 2) as pool:
        assert pool.map(chatty, range(6)) == list(range(6))
        assert pool.map(to_stderr, range(3)) == [0, 1, 2]
    captured = capsys.readouterr()
    assert sorted(re.findall(r"task \d says hi", captured.out)) == [
        f"task {x} says hi" for x in range(6)
    ]
    assert sorted(captured.err.splitlines()) == [f"err {x}" for x in range(3)]


def test_log_records_reach_the_callers_handlers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fenfa_tests")  # before the workers start
    with fenfa.Pool("process", 2) as pool:
        pool.map(chatty, range(4), chunksize=2)
        pool.map(failing_log, [9])
    records = [r for r in caplog.records if r.name == "fenfa_tests.work"]
    infos = sorted((r.getMessage(), r.fenfa_task) for r in records if r.levelno == logging.INFO)  # type: ignore[attr-defined]
    assert infos == [(f"task {x} logged", x) for x in range(4)]
    assert {r.fenfa_worker for r in records} <= {0, 1}  # type: ignore[attr-defined]
    assert not [r for r in records if r.levelno == logging.DEBUG]
    (error,) = [r for r in records if r.levelno == logging.ERROR]
    assert error.getMessage() == "task 9 failed"
    assert "ValueError: inside the task" in (error.exc_text or "")
    assert error.process != os.getpid()  # made in the worker


def test_lines_from_two_workers_never_mix(capsys: pytest.CaptureFixture[str]) -> None:
    with fenfa.Pool("process", 2) as pool:
        pool.map(long_lines, range(2), chunksize=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 100
    for line in lines:
        letters, number = line.split(" ")
        assert letters in ("a" * 40, "b" * 40), line
        assert 0 <= int(number) < 50


def test_each_workers_lines_arrive_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    with fenfa.Pool("process", 2) as pool:
        pool.map(numbered, range(4), chunksize=1)
    seen: dict[str, list[int]] = {}
    for line in capsys.readouterr().out.splitlines():
        pid, n = line.split()
        seen.setdefault(pid, []).append(int(n))
    for numbers in seen.values():
        runs = [numbers[i : i + 200] for i in range(0, len(numbers), 200)]
        assert all(run == list(range(200)) for run in runs)


def test_a_line_printed_just_before_a_crash_is_delivered(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with fenfa.Pool("process", 2) as pool:
        results = pool.map(crash_after_print, range(3), on_error="return", chunksize=1)
    assert isinstance(results[1], fenfa.WorkerCrashed)
    assert "last words" in capsys.readouterr().out


def test_worker_output_inherit_leaves_the_streams_alone() -> None:
    with fenfa.Pool("process", 1) as pool:
        assert pool.map(stream_type, [0]) == ["RelayStream"]
    with fenfa.Pool("process", 1, worker_output="inherit") as pool:
        assert pool.map(stream_type, [0]) != ["RelayStream"]
    with pytest.raises(ValueError, match="worker_output must be one of 'relay', 'inherit'"):
        fenfa.Pool("process", 1, worker_output="pipe")


class _Counter(io.TextIOBase):
    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)


@pytest.mark.timeout(120)
def test_a_worker_printing_100_mb_does_not_fill_the_callers_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = _Counter()
    me = psutil.Process()
    with fenfa.Pool("process", 1) as pool:
        pool.map(flood, [0])  # started
        monkeypatch.setattr(sys, "stdout", sink)
        before = me.memory_info().rss
        assert pool.map(flood, [100]) == [100]
        after = me.memory_info().rss
    assert sink.chars == 100 * 1024 * 1024
    assert (after - before) / 2**20 < 50


def square_and_say(x: int) -> int:
    print(f"task {x} says hi")
    return x * x


def test_printed_lines_do_not_break_the_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()  # the bar and the printed lines share one "terminal"
    monkeypatch.setattr(sys, "stdout", screen)
    options: dict[str, Any] = {"file": screen, "mininterval": 0, "miniters": 1}
    with fenfa.Pool("process", 2) as pool:
        pool.map(square_and_say, range(20), chunksize=1, progress=options)
    segments = re.split(r"[\r\n]", screen.getvalue())
    said = [s.strip() for s in segments if "says hi" in s]
    # Each printed line stands alone: the bar was cleared before it, redrawn after.
    assert sorted(said) == sorted(f"task {x} says hi" for x in range(20))
