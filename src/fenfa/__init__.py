"""fenfa (分发, "dispatch"): run a function over many inputs on the right executor.

See DESIGN.md for the contract; this module only re-exports the public names.
"""

from typing import TYPE_CHECKING, Any

from . import _shadow

try:
    from .api import Executor, imap, imap_unordered, last_insights, map, run, starmap
    from .errors import (
        BackendUnavailable,
        FenfaError,
        PoolClosed,
        SerializationError,
        TaskTimeout,
        WorkerCrashed,
    )
    from .insights import Insights, Summary, TaskRecord
    from .pool import Pool
    from .sharing import Shared, share
    from .shell import ShellResult, shell
    from .worker import WorkerInfo, current_worker
except (AttributeError, ImportError):
    # A standard-library module came from a file beside the user's script:
    # say so, rather than where deep in the standard library it broke.
    _shadow.check()
    raise

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:
    from .aio import aimap, amap


def __getattr__(name: str) -> Any:
    # amap/aimap need asyncio, whose import costs ~30 ms: paid on first use,
    # not by every script that imports fenfa.
    if name in ("amap", "aimap"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'fenfa' has no attribute {name!r}")


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
