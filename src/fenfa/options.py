"""The options of a call and of a pool: names, defaults, and checks at call time.

Every mistake in an option is reported when the call is made, naming the
option and what was wrong, not when a worker first trips over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .errors import short_repr
from .progress import check_progress

ON_ERROR = ("raise", "return", "skip")
CALL_OPTIONS = (
    "chunksize",
    "window",
    "timeout",
    "retries",
    "on_error",
    "progress",
    "insights",
    "speculate",
)
POOL_ONLY_OPTIONS = (
    "initializer",
    "initargs",
    "start_method",
    "max_tasks_per_worker",
    "native_threads",
    "worker_output",
    "address",
)
START_METHODS = ("fork", "forkserver", "spawn")
WORKER_OUTPUT = ("relay", "inherit")


def positive(name: str, value: object, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def worker_count(value: object) -> int | None:
    """``workers`` as given: None, a count >= 1, or joblib's negatives.

    As joblib's ``n_jobs``: -1 means every usable core, -2 all but one, and
    so on (never fewer than one); 0 is refused.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        from .backends import usable_cores

        return max(1, usable_cores() + 1 + value)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(
            f"workers must be a whole number >= 1, or negative as joblib's n_jobs "
            f"(-1: every usable core, -2: all but one), got {value!r}"
        )
    return value


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2}
_UNITS |= {"mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4}
_UNITS |= {"tb": 1000**4, "tib": 1024**4}


def size_in_bytes(name: str, value: int | str | None) -> int | None:
    """A memory size option: bytes, or a string such as ``"2GiB"``, ``"500MB"``; None stays."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number) :]
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if unit in _UNITS and 0 < amount < math.inf:
            return int(amount * _UNITS[unit])
    raise ValueError(
        f"{name} must be a number of bytes > 0 or a size such as '2GiB', got {value!r}"
    )


@dataclass(frozen=True)
class CallOptions:
    """The per-call options, validated; a Pool holds the defaults."""

    chunksize: int | None = None
    window: int | None = None
    timeout: float | None = None
    retries: int = 0
    on_error: str = "raise"
    progress: bool | dict[str, Any] = False
    # True: record into the pool's insights; an Insights: record there.
    insights: Any = False
    # Re-run a straggler on an idle worker once the input is exhausted.
    speculate: bool = False

    def __post_init__(self) -> None:
        check_progress(self.progress)
        from .insights import Insights

        if not isinstance(self.insights, bool | Insights):
            raise ValueError(
                f"insights must be True, False or a fenfa.Insights, got {self.insights!r}"
            )
        positive("chunksize", self.chunksize)
        positive("window", self.window)
        if self.timeout is not None and (
            not isinstance(self.timeout, int | float)
            or isinstance(self.timeout, bool)
            or not 0 < self.timeout < math.inf
        ):
            raise ValueError(
                f"timeout must be a finite number of seconds > 0 (None for no limit), "
                f"got {self.timeout!r}"
            )
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {self.retries!r}")
        if not isinstance(self.speculate, bool):
            raise ValueError(f"speculate must be True or False, got {self.speculate!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(
                f"on_error must be one of {', '.join(map(repr, ON_ERROR))}, got {self.on_error!r}"
            )

    def update(self, overrides: dict[str, Any]) -> CallOptions:
        unknown = [name for name in overrides if name not in CALL_OPTIONS]
        if unknown:
            raise TypeError(
                f"unknown option {unknown[0]!r} for a pool call; "
                f"options are: {', '.join(CALL_OPTIONS)}"
            )
        return replace(self, **overrides) if overrides else self


def check_native_threads(value: object) -> None:
    if value == "auto" or value is False:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    raise ValueError(f"native_threads must be 'auto', a whole number >= 1, or False, got {value!r}")


def check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {short_repr(fn)}")


__all__ = [
    "CALL_OPTIONS",
    "POOL_ONLY_OPTIONS",
    "START_METHODS",
    "WORKER_OUTPUT",
    "CallOptions",
    "check_callable",
    "check_native_threads",
    "positive",
]
