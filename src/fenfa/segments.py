"""Shared-memory segments: the files that hold shared bytes, and their lifetimes.

A *segment* is a file in ``/dev/shm`` (POSIX shared memory on Linux), or in
the temporary directory when ``/dev/shm`` is missing or full, holding the
bytes of one shared object. The parent writes it once (``pwrite``: the
parent maps nothing, so its memory does not grow by the object's size); each
process worker maps it once and keeps the mapping while the parent keeps the
segment, so a task receives a view of the same physical memory, not a copy.

This module knows bytes and paths only. What a segment holds is decided
above it: :mod:`fenfa.sharing` (a ``share()`` handle's object) and
:mod:`fenfa.autoshare` (an array a call shares on its own). The worker-side
functions at the end (``attach_*``) are what their pickles call to rebuild
the value from a path.

Lifetime: a segment is unlinked when its owner releases it (a handle closed
or collected, a call ended), and every segment of this process at exit.
Unlinking also tells the listeners (the process backend) so that their
workers drop their mappings (a ``FORGET`` frame), with every cached function
whose pickle referred to the segment. If the parent dies without cleaning
up (SIGKILL), its workers, which see it die through their lifeline, unlink
its segments before they exit (:func:`sweep`); and the first segment any
fenfa process creates sweeps segments left by processes that no longer exist.
fenfa does not use ``multiprocessing.shared_memory``: its resource tracker
warns about, and may unlink, segments that are in fact shared on purpose.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import mmap
import os
import pickle
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from .errors import FenfaError

PREFIX = "fenfa-"
# Set to a directory to put segments there instead of /dev/shm.
DIR_VARIABLE = "FENFA_SHM_DIR"


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
                f"could not make room for {size_text(size)} of shared data ("
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


def size_text(size: int) -> str:
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


def bytes_of(array: Any) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (any dtype, any shape)."""
    import numpy

    return memoryview(array.reshape(-1).view(numpy.uint8))


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


# -- the worker side -------------------------------------------------------

# Per process: mapped segments and unpickled shared objects, by path.
_maps: dict[str, mmap.mmap] = {}
_objects: dict[str, Any] = {}


def mapping(path: str, size: int, *, writable: bool) -> mmap.mmap:
    """This process's mapping of the segment at ``path`` (made once, then cached)."""
    found = _maps.get(path)
    if found is None:
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
            found = mmap.mmap(fd, size, flags=flags, prot=prot)
        finally:
            os.close(fd)
        _maps[path] = found
    return found


def attach_array(path: str, size: int, dtype: Any, shape: tuple[int, ...], writable: bool) -> Any:
    import numpy

    return numpy.ndarray(shape, dtype, buffer=mapping(path, size, writable=writable))


def rebuild_empty(dtype: Any, shape: tuple[int, ...], writable: bool) -> Any:
    import numpy

    array = numpy.empty(shape, dtype)
    array.flags.writeable = writable
    return array


def attach_bytes(path: str, size: int, writable: bool) -> memoryview:
    return memoryview(mapping(path, size, writable=writable))


def attach_object(path: str, size: int) -> Any:
    if path not in _objects:
        _objects[path] = pickle.loads(mapping(path, size, writable=False))
        # The object is built; its bytes are not needed any more.
        _maps.pop(path, None)
    return _objects[path]


def forget(paths: Iterable[str]) -> None:
    """The parent released these segments: drop this process's mappings of them."""
    for path in paths:
        _maps.pop(path, None)
        _objects.pop(path, None)


atexit.register(_release_all)
