"""Large data without copies: :func:`share`, automatic sharing, and segment lifetimes.

A *segment* is a file in ``/dev/shm`` (POSIX shared memory on Linux), or in
the temporary directory when ``/dev/shm`` is missing or full, holding the
bytes of one shared object. The parent writes it once; each process worker
maps it once and keeps the mapping while the parent keeps the segment, so a
task receives a view of the same physical memory, not a copy.

How a value crosses::

    parent                                          process worker
    ──────                                          ──────────────
    share(arr) -> Shared handle                     unpickling the handle calls
      pickling it (the first time) writes           _attach_array(path, ...) ->
      the segment; the pickle holds only           mmap once per worker (cached)
      (path, dtype, shape)                          -> ndarray view: read-only,
                                                    or writable with writable=True
    fenfa.map(f, [big] * n)  (no handle)
      the process backend pickles with a            same
      Pickler whose reducer_override shares
      every array >= AUTO_SHARE_BYTES, once
      per call (by identity)

On the thread and serial backends nothing is pickled: arrays pass by
reference, and a :class:`Shared` handle in the arguments (or bound with
``functools.partial``, or in the function's closure) is replaced by its value
before the task runs, so the same code runs on every backend.

Lifetime: a handle's segment is unlinked when the handle is closed or
garbage collected; an automatically shared array's when its call ends; every
segment of this process at exit. Unlinking also tells the process workers to
drop their mappings (a ``FORGET`` frame). If the parent dies without cleaning
up (SIGKILL), its workers, which see it die through their lifeline, unlink
its segments before they exit; and the first segment any fenfa process
creates sweeps segments left by processes that no longer exist.
fenfa does not use ``multiprocessing.shared_memory``: its resource tracker
warns about, and may unlink, segments that are in fact shared on purpose.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import io
import itertools
import mmap
import os
import pickle
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from .errors import FenfaError, SerializationError, short_repr

# A NumPy array of at least this many bytes, passed to a process worker as an
# argument (or bound with functools.partial, or captured by the function), is
# shared instead of pickled. Measured (benchmarks/bench_share.py --only
# threshold; 40 tasks on 2 process workers, 2 cores, Python 3.11): sharing
# costs 1.12-1.28x pickling at 16-256 KiB and wins from 1 MiB on (0.71x at
# 1 MiB, 0.46x at 4 MiB, 0.21x at 64 MiB). joblib memmaps from 1 MB too.
AUTO_SHARE_BYTES = 1 << 20

PREFIX = "fenfa-"
# Set to a directory to put segments there instead of /dev/shm.
DIR_VARIABLE = "FENFA_SHM_DIR"

__all__ = ["AUTO_SHARE_BYTES", "Shared", "share"]


def _directories() -> list[str]:
    """Where segments may go, best first: shared memory, then the temporary directory."""
    chosen = os.environ.get(DIR_VARIABLE)
    first = chosen if chosen else "/dev/shm"
    dirs = [first] if os.path.isdir(first) else []
    import tempfile  # (only where /dev/shm is missing or short)

    temp = tempfile.gettempdir()
    if temp not in dirs:
        dirs.append(temp)
    return dirs


# -- segments (parent side) ------------------------------------------------


_counter = itertools.count()
_swept = False
_swept_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(owner: int | None = None) -> list[str]:
    """Unlink segments of process ``owner`` (or, with None, of every dead process).

    Only this user's files named ``fenfa-<pid>-...`` are touched. Returns the
    paths removed.
    """
    removed = []
    uid = os.getuid()
    for directory in _directories():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not name.startswith(PREFIX):
                continue
            pid_text = name[len(PREFIX) :].split("-", 1)[0]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if owner is not None and pid != owner:
                continue
            if owner is None and (pid == os.getpid() or _pid_alive(pid)):
                continue
            path = os.path.join(directory, name)
            try:
                if os.stat(path).st_uid == uid:
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                pass
    return removed


def _sweep_once() -> None:
    global _swept
    with _swept_lock:
        if _swept:
            return
        _swept = True
    sweep()


class Segment:
    """One file of shared bytes, created by this process; ``release()`` unlinks it."""

    __slots__ = ("__weakref__", "_lock", "creator", "path", "released", "size")

    def __init__(self) -> None:
        self.path: str | None = None
        self.size = 0
        self.creator = os.getpid()
        self.released = False
        self._lock = threading.Lock()

    def create(self, size: int, data: memoryview | None, *, reserve: bool) -> str:
        """Make the file (once) and write ``data`` into it; returns its path."""
        with self._lock:
            if self.path is not None:
                return self.path
            if self.released:
                raise FenfaError("this shared object was already closed")
            _sweep_once()
            tried = []
            for directory in _directories():
                name = f"{PREFIX}{os.getpid()}-{next(_counter)}-{os.urandom(4).hex()}"
                path = os.path.join(directory, name)
                try:
                    _write_file(path, size, data, reserve=reserve)
                except OSError as exc:
                    tried.append(f"{directory}: {exc.strerror or exc}")
                    continue
                self.path, self.size = path, size
                _owned[path] = self
                return path
            raise FenfaError(
                f"could not make room for {_size_text(size)} of shared data ("
                + "; ".join(tried)
                + f"). Free space there, or point {DIR_VARIABLE} at a directory with room."
            )

    def release(self) -> None:
        """Unlink the file (once); workers are told to drop their mappings."""
        with self._lock:
            if self.released:
                return
            self.released = True
            path = self.path
        if path is None or os.getpid() != self.creator:
            return
        _owned.pop(path, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        keys = _function_users.pop(path, set())
        for listener in list(_listeners):
            listener.forget([path], sorted(keys))


def _size_text(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB ({size} bytes)"
    return f"{size} bytes"


def _write_file(path: str, size: int, data: memoryview | None, *, reserve: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if reserve:
            # A later write through a mapping into a full tmpfs would be a
            # SIGBUS: claim every page now, while it is still an OSError.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, size)  # a file system that cannot reserve
        if data is not None:
            written = 0
            while written < size:
                written += os.pwrite(fd, data[written:], written)
        elif not reserve:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


# Every live segment of this process, for the exit sweep.
_owned: dict[str, Segment] = {}
# Segment path -> keys of pickled functions that refer to it (the process
# backend's function cache must drop those when the segment goes).
_function_users: dict[str, set[bytes]] = {}


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()


def add_listener(listener: Any) -> None:
    _listeners.add(listener)


def note_function(key: bytes, paths: Iterable[str]) -> None:
    """The pickled function ``key`` refers to these segments."""
    for path in paths:
        _function_users.setdefault(path, set()).add(key)


def _release_all() -> None:
    for segment in list(_owned.values()):
        segment.release()


# -- handles ---------------------------------------------------------------


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
        return f"<fenfa.Shared {what}, {_size_text(self.nbytes)}, {mode}, {state}>"

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
                return (_rebuild_empty, (array.dtype, array.shape, self.writable))
            path = segment.path or segment.create(array.nbytes, _bytes_of(array), reserve=False)
            return (_attach_array, (path, array.nbytes, array.dtype, array.shape, self.writable))
        if self._kind == "bytes":
            view = self._value
            if view.nbytes == 0:
                return (memoryview, (b"",))
            path = segment.path or segment.create(view.nbytes, view, reserve=False)
            return (_attach_bytes, (path, view.nbytes, self.writable))
        assert self._payload is not None
        path = segment.path or segment.create(
            len(self._payload), memoryview(self._payload), reserve=False
        )
        return (_attach_object, (path, len(self._payload)))


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


def _bytes_of(array: Any) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (any dtype, any shape)."""
    import numpy

    return memoryview(array.reshape(-1).view(numpy.uint8))


def _writable_array(segment: Segment, array: Any) -> Any:
    import numpy

    if array.nbytes == 0:
        return array.copy()
    path = segment.create(array.nbytes, None, reserve=True)
    mapping = _map(path, array.nbytes, writable=True)
    out = numpy.ndarray(array.shape, array.dtype, buffer=mapping)
    out[...] = array
    return out


def _writable_bytes(segment: Segment, view: memoryview) -> memoryview:
    if view.nbytes == 0:
        return memoryview(bytearray())
    path = segment.create(view.nbytes, None, reserve=True)
    out = memoryview(_map(path, view.nbytes, writable=True))
    out[:] = view
    return out


def _pickle_once(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        pass
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


# -- the worker side -------------------------------------------------------

# Per process: mapped segments and unpickled shared objects, by path.
_maps: dict[str, mmap.mmap] = {}
_objects: dict[str, Any] = {}


def _map(path: str, size: int, *, writable: bool) -> mmap.mmap:
    mapping = _maps.get(path)
    if mapping is None:
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise FenfaError(
                f"the shared segment {path} is gone: the object was closed (or its call "
                "ended) before this task started"
            ) from None
        try:
            # Every page mapped in one call (MAP_POPULATE), not one fault per
            # 4 KiB page as the task first reads it: ~20,000 faults for 80 MB.
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, size, flags=flags, prot=prot)
        finally:
            os.close(fd)
        _maps[path] = mapping
    return mapping


def _attach_array(path: str, size: int, dtype: Any, shape: tuple[int, ...], writable: bool) -> Any:
    import numpy

    return numpy.ndarray(shape, dtype, buffer=_map(path, size, writable=writable))


def _rebuild_empty(dtype: Any, shape: tuple[int, ...], writable: bool) -> Any:
    import numpy

    array = numpy.empty(shape, dtype)
    array.flags.writeable = writable
    return array


def _attach_bytes(path: str, size: int, writable: bool) -> memoryview:
    return memoryview(_map(path, size, writable=writable))


def _attach_object(path: str, size: int) -> Any:
    if path not in _objects:
        _objects[path] = pickle.loads(_map(path, size, writable=False))
        # The object is built; its bytes are not needed any more.
        _maps.pop(path, None)
    return _objects[path]


def forget(paths: Iterable[str]) -> None:
    """The parent released these segments: drop this process's mappings of them."""
    for path in paths:
        _maps.pop(path, None)
        _objects.pop(path, None)


# -- automatic sharing: one scope per call ---------------------------------


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
            path = segment.create(contiguous.nbytes, _bytes_of(contiguous), reserve=False)
            spec = (_attach_array, (path, array.nbytes, array.dtype, array.shape, False))
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


class _SharingPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, plus: large plain arrays are shared, handles record their segments."""

    def __init__(self, file: io.BytesIO, scope: Scope | None) -> None:
        super().__init__(file, protocol=5)
        self.scope = scope
        self.paths: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if self.scope is not None and _is_plain_array(obj) and obj.nbytes >= AUTO_SHARE_BYTES:
            spec = self.scope.reduce(obj)
            self.paths.append(spec[1][0])
            return spec
        if type(obj) is Shared:
            spec = obj.__reduce__()
            if spec[0] is not _rebuild_empty and spec[0] is not memoryview:
                self.paths.append(spec[1][0])
            return spec
        if type(obj) is types.CodeType:
            # cloudpickle writes "<dynamic-code>" as every function's file (a
            # payload independent of where it was defined): tracebacks in the
            # worker would show no file and no source. The real name travels.
            _rebuild, args = cloudpickle.cloudpickle._code_reduce(obj)
            return _code_in_file, (args, obj.co_filename)
        return super().reducer_override(obj)


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
        if _is_plain_array(obj) and obj.nbytes >= AUTO_SHARE_BYTES:
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
    _SharingPickler(buffer, scope if _ndarray_type() is not None else None).dump(obj)
    return buffer.getvalue()


def dumps_function(fn: Any, scope: Scope | None) -> tuple[bytes, list[str]]:
    """cloudpickle ``fn``; also the segments its bytes refer to."""
    buffer = io.BytesIO()
    pickler = _SharingPickler(buffer, scope if _ndarray_type() is not None else None)
    pickler.dump(fn)
    return buffer.getvalue(), pickler.paths


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


atexit.register(_release_all)
