"""The backend registry: a name, the module that implements it, imported lazily.

``auto`` is not a backend of its own: the pool resolves it to one of these.
"""

from __future__ import annotations

import importlib
import os

from ..errors import BackendUnavailable
from .base import Backend

# name -> (module, class, the extra that provides its dependencies)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "serial": ("serial", "SerialBackend", None),
    "thread": ("thread", "ThreadBackend", None),
    "process": ("process", "ProcessBackend", None),
    "async": ("asyncio", "AsyncBackend", None),
    "dask": ("dask", "DaskBackend", "dask"),
}
BACKENDS = ("auto", *_REGISTRY)

# The default `workers` of the async backend: coroutines in flight at once.
# A waiting coroutine costs a few KB, not a thread, so the bound is what the
# far end tolerates, not this machine: 100 is aiohttp's default connection
# limit, a common bound for concurrent requests to one service.
ASYNC_CONCURRENCY = 100


def usable_cores() -> int:
    """CPUs this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(backend: str) -> int:
    if backend == "serial":
        return 1
    if backend in ("process", "dask"):
        # (dask: the size of the local cluster a pool starts; a pool connected
        # to a scheduler by address counts the cluster's threads instead.)
        return usable_cores()
    if backend == "async":
        return ASYNC_CONCURRENCY
    # Threads wait more than they compute: as concurrent.futures sizes them.
    return min(32, usable_cores() + 4)


def check_name(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def backend_class(name: str) -> type[Backend]:
    module_name, class_name, extra = _REGISTRY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        if extra is None or exc.name is None or exc.name.startswith("fenfa"):
            raise
        raise BackendUnavailable(
            f"the {name!r} backend needs the {extra!r} extra ({exc.name} is not "
            f"installed): pip install fenfa[{extra}]"
        ) from exc
    cls: type[Backend] = getattr(module, class_name)
    return cls


__all__ = ["BACKENDS", "Backend", "backend_class", "check_name", "default_workers", "usable_cores"]
