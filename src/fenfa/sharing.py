"""Large data without copies: :func:`share`, its handles, and what a task receives.

How a value crosses::

    parent                                          process worker
    ──────                                          ──────────────
    share(arr) -> Shared handle                     unpickling the handle calls
      pickling it (the first time) writes           segments.attach_array(path, ...)
      a segment; the pickle holds only             -> mmap once per worker (cached)
      (path, dtype, shape)                          -> ndarray view: read-only,
                                                    or writable with writable=True
    fenfa.map(f, [big] * n)  (no handle)
      the process backend pickles with a            same
      Pickler whose reducer_override shares
      every array >= AUTO_SHARE_BYTES, once
      per call (by identity): fenfa.autoshare

On the thread and serial backends nothing is pickled: arrays pass by
reference, and a :class:`Shared` handle in the arguments (or bound with
``functools.partial``, or in the function's closure) is replaced by its value
before the task runs (:func:`resolve`), so the same code runs on every backend.

Three modules, lowest first: :mod:`fenfa.segments` (the files and their
lifetimes: a handle's segment is unlinked when the handle is closed or
garbage collected, every segment of the process at exit), this one (the
public handle, ``fenfa.share``, and the threshold of automatic sharing), and
:mod:`fenfa.autoshare` (the picklers that share a call's large arrays on
their own, and record which segments a pickled function refers to).
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from .errors import FenfaError, SerializationError, short_repr
from .segments import (
    Segment,
    attach_array,
    attach_bytes,
    attach_object,
    bytes_of,
    mapping,
    rebuild_empty,
    size_text,
)

# A NumPy array of at least this many bytes, passed to a process worker as an
# argument (or bound with functools.partial, or captured by the function), is
# shared instead of pickled. Measured (benchmarks/bench_share.py --only
# threshold; 40 tasks on 2 process workers, 2 cores, Python 3.11): sharing
# costs 1.12-1.28x pickling at 16-256 KiB and wins from 1 MiB on (0.71x at
# 1 MiB, 0.46x at 4 MiB, 0.21x at 64 MiB). joblib memmaps from 1 MB too.
# (Read at each use by fenfa.autoshare: set it here to change it.)
AUTO_SHARE_BYTES = 1 << 20

__all__ = ["AUTO_SHARE_BYTES", "Shared", "share"]


def _ndarray_type() -> Any:
    """``numpy.ndarray`` once NumPy is imported; None before (then no array exists)."""
    numpy = sys.modules.get("numpy")
    return None if numpy is None else numpy.ndarray


def _is_plain_array(obj: Any) -> bool:
    ndarray = _ndarray_type()
    return ndarray is not None and type(obj) is ndarray and not obj.dtype.hasobject


_handles_alive = 0
_handles_lock = threading.Lock()


def _count_handles(change: int) -> None:
    global _handles_alive
    with _handles_lock:
        _handles_alive += change


def handles_alive() -> bool:
    """Whether any :class:`Shared` handle exists in this process (cheap)."""
    return _handles_alive > 0


class Shared:
    """A handle to an object shared once with every worker; see :func:`share`.

    Pass it where the object would go (an argument, inside tuples, lists or
    dicts of arguments, bound with ``functools.partial``, captured by the
    function): the task receives the object, not the handle. ``value`` is the
    object as tasks see it; ``close()`` (or leaving a ``with`` block, or
    dropping the handle) frees the shared memory.
    """

    __slots__ = ("__weakref__", "_kind", "_payload", "_segment", "_spec", "_value", "writable")

    def __init__(self, obj: Any, *, writable: bool = False) -> None:
        self.writable = writable
        self._segment = Segment()
        self._spec: tuple[Any, ...] | None = None
        self._payload: bytes | None = None
        if isinstance(obj, Shared):
            raise TypeError("share() got a Shared handle: share the object itself")
        ndarray = _ndarray_type()
        if _is_plain_array(obj):
            self._kind = "array"
            import numpy

            array = numpy.ascontiguousarray(obj)
            if writable:
                self._value: Any = _writable_array(self._segment, array)
            else:
                readonly = array.view()
                readonly.flags.writeable = False
                self._value = readonly
        elif _is_buffer(obj) and not (ndarray is not None and isinstance(obj, ndarray)):
            # (An ndarray subclass, or an array of objects, is pickled whole below.)
            self._kind = "bytes"
            view = memoryview(obj)
            if not view.c_contiguous:
                raise TypeError(
                    f"share() needs a contiguous buffer; got a non-contiguous {type(obj).__name__}"
                )
            view = view.cast("B")
            if writable:
                self._value = _writable_bytes(self._segment, view)
            else:
                self._value = view.toreadonly()
        else:
            if writable:
                raise TypeError(
                    "share(..., writable=True) needs a NumPy array (of numbers, not objects) "
                    f"or a bytes-like object, got {type(obj).__name__}"
                )
            self._kind = "object"
            self._value = obj
            self._payload = _pickle_once(obj)
        _count_handles(1)
        weakref.finalize(self, _finish_handle, self._segment)

    @property
    def value(self) -> Any:
        """The shared object as tasks see it (a read-only view unless ``writable``)."""
        return self._value

    @property
    def nbytes(self) -> int:
        if self._kind == "object":
            assert self._payload is not None
            return len(self._payload)
        return int(self._value.nbytes)

    def close(self) -> None:
        """Free the shared memory now; tasks already holding the value keep it."""
        self._segment.release()

    def __enter__(self) -> Shared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self._segment.path or "not yet in shared memory"
        if self._kind == "array":
            what = f"ndarray {self._value.dtype} {self._value.shape}"
        elif self._kind == "bytes":
            what = "bytes"
        else:
            what = type(self._value).__name__
        mode = "writable" if self.writable else "read-only"
        state = "closed" if self._segment.released else where
        return f"<fenfa.Shared {what}, {size_text(self.nbytes)}, {mode}, {state}>"

    def __reduce__(self) -> tuple[Any, ...]:
        if self._segment.released:
            raise FenfaError(f"this shared object was already closed: {self!r}")
        if self._spec is None:
            self._spec = self._make_spec()
        return self._spec

    def _make_spec(self) -> tuple[Any, ...]:
        segment = self._segment
        if self._kind == "array":
            array = self._value
            if array.nbytes == 0:
                return (rebuild_empty, (array.dtype, array.shape, self.writable))
            path = segment.path or segment.create(array.nbytes, bytes_of(array), reserve=False)
            return (attach_array, (path, array.nbytes, array.dtype, array.shape, self.writable))
        if self._kind == "bytes":
            view = self._value
            if view.nbytes == 0:
                return (memoryview, (b"",))
            path = segment.path or segment.create(view.nbytes, view, reserve=False)
            return (attach_bytes, (path, view.nbytes, self.writable))
        assert self._payload is not None
        path = segment.path or segment.create(
            len(self._payload), memoryview(self._payload), reserve=False
        )
        return (attach_object, (path, len(self._payload)))


def _finish_handle(segment: Segment) -> None:
    _count_handles(-1)
    segment.release()


def _is_buffer(obj: Any) -> bool:
    if isinstance(obj, str):
        return False
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def _writable_array(segment: Segment, array: Any) -> Any:
    import numpy

    if array.nbytes == 0:
        return array.copy()
    path = segment.create(array.nbytes, None, reserve=True)
    out = numpy.ndarray(array.shape, array.dtype, buffer=mapping(path, array.nbytes, writable=True))
    out[...] = array
    return out


def _writable_bytes(segment: Segment, view: memoryview) -> memoryview:
    if view.nbytes == 0:
        return memoryview(bytearray())
    path = segment.create(view.nbytes, None, reserve=True)
    out = memoryview(mapping(path, view.nbytes, writable=True))
    out[:] = view
    return out


def _pickle_once(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        pass
    import cloudpickle  # (only for what the standard pickle cannot do)

    try:
        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(
            f"share() could not pickle {type(obj).__name__} {short_repr(obj)}: "
            f"{type(exc).__name__}: {exc}",
            what="argument",
        ) from exc


def share(obj: Any, *, writable: bool = False) -> Shared:
    """Share ``obj`` with every worker once, instead of pickling it into each task.

    NumPy arrays and bytes-like objects go into shared memory and reach
    process workers as zero-copy views: read-only by default; with
    ``writable=True`` the workers and ``handle.value`` in the caller are the
    same memory (tasks writing the same elements race: give each task its own
    slice). Any other object is pickled once and unpickled once per worker.
    On the thread and serial backends tasks get ``handle.value`` itself.
    """
    return Shared(obj, writable=writable)


# -- in-process backends: handles become their values ----------------------


def resolve(value: Any) -> Any:
    """``value`` with every :class:`Shared` inside tuples, lists and dicts replaced."""
    kind = type(value)
    if kind is Shared:
        return value.value
    if kind is tuple or kind is list:
        items = [resolve(item) for item in value]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return kind(items)
    if kind is dict:
        fixed = {key: resolve(item) for key, item in value.items()}
        if all(fixed[key] is value[key] for key in value):
            return value
        return fixed
    return value


def resolve_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with handles bound by ``functools.partial`` or in its closure replaced."""
    if isinstance(fn, functools.partial):
        func = resolve_function(fn.func)
        args = resolve(fn.args)
        keywords = resolve(fn.keywords)
        if func is fn.func and args is fn.args and keywords is fn.keywords:
            return fn
        return functools.partial(func, *args, **keywords)
    closure = getattr(fn, "__closure__", None)
    if isinstance(fn, types.FunctionType) and closure:
        cells = []
        changed = False
        for cell in closure:
            try:
                content = cell.cell_contents
            except ValueError:  # an empty cell
                cells.append(cell)
                continue
            new = resolve(content)
            changed = changed or new is not content
            cells.append(types.CellType(new))
        if changed:
            copy = types.FunctionType(
                fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells)
            )
            copy.__kwdefaults__ = fn.__kwdefaults__
            copy.__dict__.update(fn.__dict__)
            copy.__qualname__ = fn.__qualname__
            return copy
    return fn
