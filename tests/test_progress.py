"""Issue 7, section 1: ``progress=`` draws one tqdm bar per call, counting tasks.

The bar writes to a ``StringIO`` here (``progress={"file": ...}``), and every
redraw is kept (``mininterval=0``, ``miniters=1``), so the tests read what a
user would have seen, in order.
"""

from __future__ import annotations

import _thread
import asyncio
import gc
import io
import re
from typing import Any

import pytest
from tqdm import tqdm

import fenfa


def square(x: int) -> int:
    return x * x


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"{x} is a multiple of 7")
    return x


def interrupt_at_5(x: int) -> int:
    if x == 5:
        _thread.interrupt_main()
    return x


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def counts(text: str) -> list[int]:
    """Every task count the bar showed, in order."""
    return [int(n) for n in re.findall(r"(\d+)(?:/\d+|task)? \[", text)]


def bar(**extra: Any) -> tuple[io.StringIO, dict[str, Any]]:
    out = io.StringIO()
    return out, {"file": out, "mininterval": 0, "miniters": 1, **extra}


def live_bars() -> int:
    gc.collect()
    return len(tqdm._instances)  # type: ignore[attr-defined]


def test_the_bar_counts_every_task_on_every_backend(backend: str) -> None:
    out, options = bar()
    assert fenfa.map(square, range(300), backend=backend, progress=options) == [
        x * x for x in range(300)
    ]
    text = out.getvalue()
    assert "300/300" in text
    assert "square" in text  # named after the function
    assert counts(text)[-1] == 300
    assert live_bars() == 0


def test_it_counts_tasks_not_chunks(backend: str) -> None:
    out, options = bar()
    fenfa.map(square, range(1000), backend=backend, chunksize=100, progress=options)
    shown = counts(out.getvalue())
    assert shown[-1] == 1000
    assert shown == sorted(shown)


def test_failures_are_counted_in_the_postfix(backend: str) -> None:
    out, options = bar()
    results = fenfa.map(
        fail_on_sevens, range(30), backend=backend, on_error="return", progress=options
    )
    assert sum(isinstance(r, ValueError) for r in results) == 5  # 0, 7, 14, 21, 28
    text = out.getvalue()
    assert "30/30" in text
    assert "failed=5" in text


def test_with_imap_the_bar_follows_what_the_consumer_took() -> None:
    out, options = bar()
    results = fenfa.imap(square, range(50), backend="thread", chunksize=1, progress=options)
    for taken, _ in enumerate(results, 1):
        assert counts(out.getvalue())[-1] <= taken
    assert counts(out.getvalue())[-1] == 50


def test_an_unknown_length_shows_a_count_without_a_total() -> None:
    out, options = bar()
    fenfa.map(square, (x for x in range(40)), backend="thread", progress=options)
    text = out.getvalue()
    assert counts(text)[-1] == 40
    assert "/40" not in text


@pytest.mark.parametrize("how", ["error", "break", "ctrl-c"])
def test_the_bar_is_closed_however_the_call_ends(how: str) -> None:
    out, options = bar()
    results = fenfa.imap(
        fail_on_sevens, range(1, 100), backend="thread", chunksize=1, progress=options
    )
    if how == "error":
        with pytest.raises(ValueError, match="7 is a multiple"):
            list(results)
    elif how == "break":
        for value in results:
            if value == 3:
                break
        results.close()  # type: ignore[attr-defined]
    else:
        # A real Ctrl-C in the waiting caller: interrupt_main() signals the main
        # thread as SIGINT does, while the call waits for results.
        del results
        with pytest.raises(KeyboardInterrupt):
            fenfa.map(
                interrupt_at_5, range(1, 100), backend="thread", chunksize=1, progress=options
            )
    assert live_bars() == 0
    assert out.getvalue().endswith("\n")  # tqdm's close leaves the line finished


def test_amap_and_aimap_draw_the_bar_too() -> None:
    async def main() -> list[int]:
        out, options = bar()
        first = await fenfa.amap(async_square, range(20), progress=options)
        assert "20/20" in out.getvalue()
        out2, options2 = bar()
        second = [
            x async for x in fenfa.aimap(square, range(10), backend="thread", progress=options2)
        ]
        assert "10/10" in out2.getvalue()
        return first + second

    assert asyncio.run(main()) == [x * x for x in range(20)] + [x * x for x in range(10)]


def test_a_pool_default_applies_to_its_calls() -> None:
    out, options = bar()
    with fenfa.Pool("thread", 2, progress=options) as pool:
        pool.map(square, range(12))
    assert "12/12" in out.getvalue()


@pytest.mark.parametrize("bad", ["yes", 1, ["file"], {1: 2}])
def test_bad_progress_values_are_refused_at_call_time(bad: object) -> None:
    with pytest.raises(ValueError, match="progress must be True, False, or a dict"):
        fenfa.map(square, range(3), progress=bad)


def test_tqdm_arguments_it_does_not_know_are_named() -> None:
    with pytest.raises(ValueError, match="bogus"):
        fenfa.map(square, range(3), backend="serial", progress={"bogus": 1})
