"""fenfa (分发, "dispatch"): run a function over many inputs on the right executor.

See DESIGN.md for the contract; this module only re-exports the public names.
"""

from __future__ import annotations

import importlib

from . import _shadow

# (Not typing's: importing typing costs more than all of this module.)
TYPE_CHECKING = False

__version__ = "0.1.0.dev0"

# Where each public name lives. Nothing is imported until a name is first
# used: `import fenfa` costs ~1 ms, and a script pays for the machinery it
# calls (fenfa.map: the pool and a backend; not insights, sharing, asyncio).
_HOMES = {
    "Executor": "executor",
    "imap": "api",
    "imap_unordered": "api",
    "last_insights": "api",
    "map": "api",
    "run": "api",
    "starmap": "api",
    "aimap": "aio",
    "amap": "aio",
    "BackendUnavailable": "errors",
    "FenfaError": "errors",
    "PoolClosed": "errors",
    "SerializationError": "errors",
    "TaskTimeout": "errors",
    "WorkerCrashed": "errors",
    "Insights": "insights",
    "Summary": "summary",
    "TaskRecord": "summary",
    "Pool": "pool",
    "Shared": "sharing",
    "share": "sharing",
    "ShellResult": "_shell_result",
    "shell": "_shell",
    "WorkerInfo": "worker",
    "current_worker": "worker",
}

if TYPE_CHECKING:
    from typing import Any

    from ._shell import shell
    from ._shell_result import ShellResult
    from .aio import aimap, amap
    from .api import imap, imap_unordered, last_insights, map, run, starmap
    from .errors import (
        BackendUnavailable,
        FenfaError,
        PoolClosed,
        SerializationError,
        TaskTimeout,
        WorkerCrashed,
    )
    from .executor import Executor
    from .insights import Insights
    from .pool import Pool
    from .sharing import Shared, share
    from .summary import Summary, TaskRecord
    from .worker import WorkerInfo, current_worker


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fenfa' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f".{home}", __name__), name)
    except (AttributeError, ImportError):
        # A standard-library module came from a file beside the user's script:
        # say so, rather than where deep in the standard library it broke.
        _shadow.check()
        raise
    globals()[name] = value  # (the next look-up is a plain attribute)
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


def __reduce_ex__(_protocol: int) -> tuple[Any, tuple[str]]:
    """The package pickles by name (pickle takes no module otherwise).

    pickle looks ``__reduce_ex__`` up on the object itself, so this function
    of the module is used. (cloudpickle, which sends a ``__main__`` function
    by value with the globals it refers to, fenfa among them, pickles any
    importable module by name on its own.)
    """
    return importlib.import_module, (__name__,)


__all__ = [
    "BackendUnavailable",
    "Executor",
    "FenfaError",
    "Insights",
    "Pool",
    "PoolClosed",
    "SerializationError",
    "Shared",
    "ShellResult",
    "Summary",
    "TaskRecord",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerInfo",
    "aimap",
    "amap",
    "current_worker",
    "imap",
    "imap_unordered",
    "last_insights",
    "map",
    "run",
    "share",
    "shell",
    "starmap",
]
