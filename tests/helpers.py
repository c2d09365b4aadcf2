"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

#: How long a "hung" task may wait before a watchdog releases it: a pool that
#: fails to interrupt a task then leaves a failing test, not a hung session.
WATCHDOG_SECONDS = 15.0

ENDLESS_LIMIT = 1_000_000


def endless(start: int = 0) -> Iterator[int]:
    """``itertools.count(start)`` for a lazy consumer; fails loudly for an eager one.

    A pool that drains its input would turn a bare ``count()`` into a list
    that grows until the machine runs out of memory, before any timeout fires.
    """
    for i in itertools.count(start):
        if i - start >= ENDLESS_LIMIT:
            raise RuntimeError(f"{ENDLESS_LIMIT} items pulled: the input is not pulled lazily")
        yield i


def hang(directory: str) -> None:
    """A stuck task: returns only when the test creates ``release`` (or after 60 s)."""
    release = Path(directory) / "release"
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll for a condition another process brings about; fail clearly if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.002)
