"""Automatic sharing: a call's large arrays go to process workers through shared memory.

``fenfa.map(f, [big] * n)`` on the process backend, with no ``share()`` in
sight, still sends ``big`` once: the picklers here write every plain NumPy
array of ``fenfa.sharing.AUTO_SHARE_BYTES`` or more (an argument, bound with
``functools.partial``, captured by the function) into a segment the first
time the call pickles it, and pickle only its ``(path, dtype, shape)`` after
that. A call's arrays belong to its :class:`Scope`, by identity (the same
array object in 40 tasks is one segment), and their segments are unlinked
when the call ends; the array is read-only in the workers, as joblib's
memmapping (``mmap_mode="r"``).

The same picklers write a ``share()`` handle as its segment's reference and
record which segments a pickled function refers to (the process backend's
function cache must drop a function whose segment is gone). Items try the
standard pickler first (fast, and it calls ``reducer_override`` only for
objects it cannot save itself); cloudpickle only when that fails.
"""

from __future__ import annotations

import functools
import io
import pickle
import threading
import types
from typing import Any

from . import sharing
from .errors import FenfaError
from .segments import Segment, attach_array, bytes_of, rebuild_empty

__all__ = ["Scope", "dumps_function", "dumps_items", "dumps_sharing"]


class Scope:
    """The arrays one call shares on its own; released when the call ends."""

    __slots__ = ("_lock", "_segments", "closed")

    def __init__(self) -> None:
        self._segments: dict[int, tuple[Any, Segment, tuple[Any, ...]]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def reduce(self, array: Any) -> tuple[Any, ...]:
        with self._lock:
            entry = self._segments.get(id(array))
            if entry is not None:
                return entry[2]
            if self.closed:
                raise FenfaError("the call that shared this array has ended")
            segment = Segment()
            contiguous = array if array.flags.c_contiguous else array.copy(order="C")
            path = segment.create(contiguous.nbytes, bytes_of(contiguous), reserve=False)
            spec = (attach_array, (path, array.nbytes, array.dtype, array.shape, False))
            # Holding the array keeps its id from being reused during the call.
            self._segments[id(array)] = (array, segment, spec)
            return spec

    def release(self) -> None:
        with self._lock:
            self.closed = True
            entries = list(self._segments.values())
            self._segments.clear()
        for _array, segment, _spec in entries:
            segment.release()


@functools.cache
def _sharing_pickler() -> type[Any]:
    """The pickler class, made at first use: cloudpickle costs ~7 ms to import,
    which a script that only ever runs threads should not pay."""
    import cloudpickle

    class _SharingPickler(cloudpickle.Pickler):  # type: ignore[misc]
        """cloudpickle, plus: large plain arrays are shared, handles record their segments."""

        def __init__(self, file: io.BytesIO, scope: Scope | None) -> None:
            super().__init__(file, protocol=5)
            self.scope = scope
            self.paths: list[str] = []

        def reducer_override(self, obj: Any) -> Any:
            if (
                self.scope is not None
                and sharing._is_plain_array(obj)
                and obj.nbytes >= sharing.AUTO_SHARE_BYTES
            ):
                spec = self.scope.reduce(obj)
                self.paths.append(spec[1][0])
                return spec
            if type(obj) is sharing.Shared:
                spec = obj.__reduce__()
                if spec[0] is not rebuild_empty and spec[0] is not memoryview:
                    self.paths.append(spec[1][0])
                return spec
            if type(obj) is types.CodeType:
                # cloudpickle writes "<dynamic-code>" as every function's file (a
                # payload independent of where it was defined): tracebacks in the
                # worker would show no file and no source. The real name travels.
                _rebuild, args = cloudpickle.cloudpickle._code_reduce(obj)
                return _code_in_file, (args, obj.co_filename)
            return super().reducer_override(obj)

    return _SharingPickler


def _code_in_file(args: tuple[Any, ...], filename: str) -> types.CodeType:
    """A code object as cloudpickle rebuilds it, with its own file name back."""
    return types.CodeType(*args).replace(co_filename=filename)


class _ByValue(Exception):
    """A class or function of ``__main__``: the standard pickle would name it."""


class _PlainSharingPickler(pickle.Pickler):
    """The standard pickler (fast, no lambdas), sharing large plain arrays.

    (Not called for ints, strs, tuples, lists, dicts...: the C pickler saves
    those itself, so the tiny-task path pays ~1 us per batch for it.)
    """

    def __init__(self, file: io.BytesIO, scope: Scope) -> None:
        super().__init__(file, protocol=5)
        self.scope = scope

    def reducer_override(self, obj: Any) -> Any:
        if sharing._is_plain_array(obj) and obj.nbytes >= sharing.AUTO_SHARE_BYTES:
            return self.scope.reduce(obj)
        if isinstance(obj, type | types.FunctionType) and obj.__module__ == "__main__":
            # Pickled by name, a class or function defined in a notebook cell (or
            # in a script a worker did not import) is missing in the worker:
            # "Can't get attribute 'Box' on <module '__main__'>". By value, then.
            raise _ByValue
        return NotImplemented


def dumps_sharing(obj: Any, scope: Scope) -> bytes:
    """Pickle ``obj`` for a process worker, sharing large arrays within ``scope``."""
    buffer = io.BytesIO()
    _PlainSharingPickler(buffer, scope).dump(obj)
    return buffer.getvalue()


def dumps_items(obj: Any, scope: Scope) -> bytes:
    """Like :func:`dumps_sharing`, with cloudpickle (lambdas, ``__main__``) when needed."""
    try:
        return dumps_sharing(obj, scope)
    except Exception:
        pass
    buffer = io.BytesIO()
    _sharing_pickler()(buffer, scope if sharing._ndarray_type() is not None else None).dump(obj)
    return buffer.getvalue()


def dumps_function(fn: Any, scope: Scope | None) -> tuple[bytes, list[str]]:
    """cloudpickle ``fn``; also the segments its bytes refer to."""
    buffer = io.BytesIO()
    pickler = _sharing_pickler()(buffer, scope if sharing._ndarray_type() is not None else None)
    pickler.dump(fn)
    return buffer.getvalue(), pickler.paths
