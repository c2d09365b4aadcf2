"""The pure parts: the batch loop (fenfa.batchloop) and the adaptive chunk size (fenfa.chunking)."""

from __future__ import annotations

from typing import Any

import pytest

from fenfa.batchloop import caller, run_batch
from fenfa.chunking import (
    GROWTH,
    MAX_CHUNKSIZE,
    MIN_BATCH_SECONDS,
    TARGET_BATCH_SECONDS,
    ChunkSizer,
)
from fenfa.tasks import Err, Ok, Piece, Style


def fails_on_odd_multiples_of_three(x: int) -> int:
    if x % 3 == 0 and x % 2 == 1:
        raise ValueError(x)
    return x * 10


def shape(pieces: list[Piece]) -> list[tuple[str, int, Any]]:
    return [
        ("ok", p.start, p.values) if isinstance(p, Ok) else ("err", p.index, repr(p.error))
        for p in pieces
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_run_batch_reports_every_task_once_with_its_index(stream: bool) -> None:
    pieces: list[Piece] = []
    ran = run_batch(
        fails_on_odd_multiples_of_three,
        100,
        list(range(10)),
        pieces.append,
        stream,
        lambda exc: exc,
    )
    assert ran == 10
    done: dict[int, Any] = {}
    for piece in pieces:
        if isinstance(piece, Ok):
            for offset, value in enumerate(piece.values):
                assert piece.start + offset not in done
                done[piece.start + offset] = value
        else:
            assert piece.index not in done
            done[piece.index] = piece.error
    assert sorted(done) == list(range(100, 110))
    for i in range(10):
        value = done[100 + i]
        if i in (3, 9):
            assert isinstance(value, ValueError)
            assert value.args == (i,)
        else:
            assert value == i * 10


def test_run_batch_batches_successes_unless_streaming() -> None:
    pieces: list[Piece] = []
    run_batch(
        fails_on_odd_multiples_of_three, 0, [0, 1, 2, 3, 4], pieces.append, False, lambda exc: exc
    )
    assert shape(pieces) == [("ok", 0, [0, 10, 20]), ("err", 3, "ValueError(3)"), ("ok", 4, [40])]
    pieces.clear()
    run_batch(fails_on_odd_multiples_of_three, 0, [0, 1], pieces.append, True, lambda e: e)
    assert shape(pieces) == [("ok", 0, [0]), ("ok", 1, [10])]


def raise_base(x: int) -> int:
    if x == 1:
        raise KeyboardInterrupt
    if x == 2:
        raise SystemExit(2)
    return x


def test_base_exceptions_are_the_tasks_failures() -> None:
    pieces: list[Piece] = []
    run_batch(raise_base, 0, [0, 1, 2, 3], pieces.append, False, lambda exc: exc)
    kinds = [(p.index, type(p.error)) for p in pieces if isinstance(p, Err)]
    assert kinds == [(1, KeyboardInterrupt), (2, SystemExit)]
    assert [p.values for p in pieces if isinstance(p, Ok)] == [[0], [3]]


def test_caller_styles() -> None:
    def f(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return args, kwargs

    assert caller(f, Style.ONE)(5) == ((5,), {})
    assert caller(f, Style.STAR)((1, 2)) == ((1, 2), {})
    assert caller(f, Style.CALL)(((1,), {"k": 2})) == ((1,), {"k": 2})


def test_sizer_probes_one_task_until_something_is_measured() -> None:
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    assert sizer.size(0) == 1
    assert sizer.expected(5) is None


def test_sizer_aims_at_the_target_batch_time() -> None:
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=0.001 * 10, tasks=10)  # 1 ms per task
    assert sizer.size(0) == round(TARGET_BATCH_SECONDS / 0.001)
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=1e-8 * 3000, tasks=3000)  # far below the target: capped
    assert sizer.size(0) == MAX_CHUNKSIZE
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=1.0, tasks=1)  # slower than the target: one per batch
    assert sizer.size(0) == 1


def test_sizer_grows_no_faster_than_its_evidence() -> None:
    # Two cheap first tasks must not size a batch for the whole input: the
    # rest may be slow (slow start, GROWTH x what was measured).
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=2e-7, tasks=2)
    assert sizer.size(2) == GROWTH * 2
    sizer.measured(busy=8 * 1e-7, tasks=8)
    assert sizer.size(10) == GROWTH * 10


def test_a_cold_probe_weighs_as_one_task_not_one_batch() -> None:
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=10e-6, tasks=1)  # cold first call: 10 us
    sizer.measured(busy=1000 * 0.1e-6, tasks=1000)  # warm: 0.1 us each
    assert sizer.task_seconds is not None
    assert sizer.task_seconds < 0.2e-6


def test_sizer_follows_a_change_of_pace() -> None:
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(busy=1000 * 1e-6, tasks=1000)
    for _ in range(6):
        sizer.measured(busy=10 * 1e-3, tasks=10)
    assert sizer.task_seconds is not None
    assert 0.5e-3 < sizer.task_seconds < 1.5e-3


def test_sizer_shrinks_towards_the_end_but_not_below_the_floor() -> None:
    sizer = ChunkSizer(workers=2, total=100_000, fixed=None)
    sizer.measured(busy=1e-3 * 100, tasks=100)  # 1 ms per task: target 10 per batch
    assert sizer.size(0) == 10
    # Near the end, still at least MIN_BATCH_SECONDS of work per batch.
    assert sizer.size(99_990) == max(1, int(MIN_BATCH_SECONDS / 1e-3))
    sizer = ChunkSizer(workers=2, total=10_000, fixed=None)
    sizer.measured(busy=1e-5 * 1000, tasks=1000)  # 10 us: target 1000, floor 200
    assert sizer.size(0) == 1000
    assert sizer.size(8_000) == 250  # 2000 left over 2 workers x 4 batches
    assert sizer.size(9_900) == 200  # the floor


def test_a_fixed_chunksize_is_kept() -> None:
    sizer = ChunkSizer(workers=2, total=10, fixed=7)
    sizer.measured(busy=1.0, tasks=1)
    assert sizer.size(0) == 7
