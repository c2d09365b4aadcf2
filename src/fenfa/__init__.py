"""fenfa (分发, "dispatch"): run a function over many inputs on the right executor.

See DESIGN.md for the contract; this module only re-exports the public names.
"""

from __future__ import annotations

import copyreg as _copyreg
import importlib
import sys as _sys

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
    "Summary": "insights",
    "TaskRecord": "insights",
    "Pool": "pool",
    "Shared": "sharing",
    "share": "sharing",
    "ShellResult": "shell",
    "WorkerInfo": "worker",
    "current_worker": "worker",
}

if TYPE_CHECKING:
    from typing import Any

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
    from .insights import Insights, Summary, TaskRecord
    from .pool import Pool
    from .sharing import Shared, share
    from .shell import ShellResult, shell
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
    return sorted([*globals(), *_HOMES, "shell"])


class _Package(type(_shadow)):  # type: ignore[misc]
    """This module's class: ``fenfa.shell`` stays the function.

    Importing the submodule ``fenfa.shell`` (as ``fenfa run`` does) sets the
    package's attribute ``shell`` to the module; here that assignment is
    ignored, and the attribute is always the function ``fenfa.shell()``.
    """

    @property
    def shell(self) -> Any:
        from .shell import shell

        return shell

    @shell.setter
    def shell(self, _module: Any) -> None:
        pass


def _by_name(module: Any) -> tuple[Any, tuple[str]]:
    return importlib.import_module, (module.__name__,)


# A module of a class of its own pickles by name, as any module does (a
# function of __main__ sent by value refers to fenfa).
_copyreg.pickle(_Package, _by_name)
_sys.modules[__name__].__class__ = _Package


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
