"""The ``progress`` option: one tqdm bar per call, counting tasks, updated by the caller.

Workers never touch the bar: the call's results come back to the caller's
thread, which advances the bar by the number of tasks each piece of results
covers (a batch of 10,000 tiny tasks is one update, so the bar costs next to
nothing per task). The bar's postfix counts failed tasks (after retries).
``tqdm.auto`` draws a widget in notebooks and text elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "check_progress"]


def check_progress(value: object) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return
    raise ValueError(
        "progress must be True, False, or a dict of tqdm keyword arguments, "
        f"got {type(value).__name__} {value!r}"
    )


class Progress:
    """A bar for one call."""

    def __init__(self, spec: bool | dict[str, Any], total: int | None, fn: Callable[..., Any]):
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        options: dict[str, Any] = {
            "total": total,
            "unit": "task",
            "desc": getattr(fn, "__name__", None) or type(fn).__name__,
            "dynamic_ncols": True,
        }
        if isinstance(spec, dict):
            options.update(spec)
        try:
            self._bar = tqdm(**options)
        except Exception as exc:  # tqdm's own complaint about an unknown argument
            raise ValueError(f"progress: tqdm refused {spec!r}: {exc}") from exc
        self.failed = 0

    def advance(self, tasks: int) -> None:
        if tasks:
            self._bar.update(tasks)

    def failure(self) -> None:
        self.failed += 1
        self._bar.set_postfix(failed=self.failed, refresh=False)

    def close(self) -> None:
        self._bar.close()
