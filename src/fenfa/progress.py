"""The ``progress`` option: one tqdm bar per call, counting tasks, updated by the caller.

Workers never touch the bar: the call's results come back to the caller's
thread, which advances the bar by the number of tasks each piece of results
covers (a batch of 10,000 tiny tasks is one update, so the bar costs next to
nothing per task). The bar's postfix counts failed tasks (after retries).
A widget in notebooks (with ipywidgets), text elsewhere.
"""

from __future__ import annotations

import sys
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


def _bar_class() -> Any:
    """tqdm's notebook widget in a Jupyter kernel that has ipywidgets; its text bar elsewhere.

    (Not ``tqdm.auto``: without ipywidgets it warns "IProgress not found" in
    the cell before falling back to text.)
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        try:
            import ipywidgets  # type: ignore[import-not-found]  # noqa: F401
            from tqdm.notebook import tqdm as notebook_bar  # type: ignore[import-untyped]
        except ImportError:
            pass
        else:
            return notebook_bar
    from tqdm.std import tqdm as text_bar  # type: ignore[import-untyped]

    return text_bar


class Progress:
    """A bar for one call."""

    def __init__(self, spec: bool | dict[str, Any], total: int | None, fn: Callable[..., Any]):
        tqdm = _bar_class()
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
