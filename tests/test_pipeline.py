"""Pipelines: one call's lazy results are the next call's input.

``fenfa.imap(parse, fenfa.imap(fetch, urls, backend="thread"), backend="process")``
is the guide's producer-consumer without queues: every stage pulls from the
one before only when its window has room, so a slow consumer throttles the
source, and an error anywhere stops every stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

import fenfa

WINDOW = 8


class Source:
    """Counts what the pipeline pulled from it."""

    def __init__(self, n: int | None = None) -> None:
        self.pulled = 0
        self.n = n

    def __iter__(self) -> Iterator[int]:
        for i in itertools.count() if self.n is None else range(self.n):
            self.pulled += 1
            yield i


def fetch(x: int) -> int:
    return x + 1


def parse(x: int) -> int:
    if x == -1:
        raise ValueError("bad record")
    return x * 10


def store(x: int) -> tuple[int, int]:
    return x, x % 7


def three_stages(source: Iterator[int], **opts: object) -> Iterator[tuple[int, int]]:
    fetched = fenfa.imap(fetch, source, backend="thread", window=WINDOW, **opts)
    parsed = fenfa.imap(parse, fetched, backend="process", window=WINDOW, workers=2, **opts)
    return fenfa.imap(store, parsed, backend="thread", window=WINDOW, **opts)


@pytest.mark.timeout(120)
def test_three_stages_give_every_result_in_order_with_bounded_pulls() -> None:
    source = Source(3000)
    consumed = 0
    worst = 0
    for consumed, result in enumerate(three_stages(iter(source)), 1):
        assert result == ((consumed - 1 + 1) * 10, (consumed * 10) % 7)
        worst = max(worst, source.pulled - consumed)
    assert consumed == 3000
    # Each stage holds at most its window (+1: a stage may pull one item
    # before its consumer's counter moves): memory does not grow with the input.
    assert worst <= 3 * (WINDOW + 1), worst


def test_an_endless_source_is_only_pulled_as_the_consumer_asks() -> None:
    source = Source()
    pipeline = three_stages(iter(source))
    taken = [next(pipeline) for _ in range(50)]
    assert taken[0] == (10, 3)
    held = source.pulled
    assert held - 50 <= 3 * (WINDOW + 1)
    # The consumer holds off: nothing is pulled while it does not ask.
    assert source.pulled == held
    pipeline.close()  # type: ignore[attr-defined]


def test_an_error_in_a_middle_stage_stops_every_stage() -> None:
    def records() -> Iterator[int]:
        yield from range(20)
        yield -2  # fetch turns it into -1: parse fails on it
        yield from range(20, 10_000)

    source = Source()
    source_iter = iter(source)

    def counted() -> Iterator[int]:
        for x, _ in zip(records(), source_iter, strict=False):
            yield x

    got: list[tuple[int, int]] = []
    with pytest.raises(ValueError, match="bad record") as info:
        got.extend(three_stages(counted()))
    assert any("task 20" in note for note in info.value.__notes__)
    assert len(got) == 20  # everything before the failing record arrived, in order
    # The source was not drained after the error: upstream stages stopped.
    assert source.pulled <= 20 + 3 * (WINDOW + 1)
