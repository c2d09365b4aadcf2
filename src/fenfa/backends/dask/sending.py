"""What a dask pool sends for a call, and what it scatters once instead of per batch.

A batch's task carries bytes (:mod:`.wire`): its items, and its function or
a reference to it. What is large or reused crosses once, scattered to the
cluster, and tasks refer to it by id:

- a function that pickles to more than ``INLINE_FUNCTION_BYTES``: once per call;
- a ``share()`` handle: once per pool (a writable one is refused: the
  workers may be on other machines, and their writes would be lost);
- a plain NumPy array of ``sharing.AUTO_SHARE_BYTES`` or more: once per
  call, by identity (the call holds the array, so its ``id()`` is not
  reused while the call lasts).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import pickle
import threading
import weakref
from typing import Any

import cloudpickle

from ... import sharing
from ...tasks import Job
from .wire import RefPickler

# A pickled function up to this size travels inside every batch (a module
# function pickles to ~60 bytes, a closure to a few hundred); a larger one (a
# closure over a big object) is scattered to the cluster once per call and
# workers fetch it once. At 64 KiB the copy per batch costs ~10 us of
# pickling and a fraction of a dask round trip (~1-2 ms on one machine).
INLINE_FUNCTION_BYTES = 64 * 1024

# The large arrays a call scattered: id(array) -> (array, id, future).
Arrays = dict[int, tuple[Any, int, Any]]


class Call:
    """What a call sends for its function, made once per call (``job.remote``)."""

    __slots__ = ("arg", "arrays", "key", "refs")

    def __init__(self, key: bytes, arg: Any, refs: dict[int, Any], arrays: Arrays) -> None:
        self.key = key
        self.arg = arg  # the pickled function, or the future of it scattered
        self.refs = refs  # id -> future, for the handles and arrays the function holds
        self.arrays = arrays


class Sender:
    """Pickles a pool's calls and items for its client, scattering what crosses once."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()  # guards _handles and every call's arrays
        self._handles: weakref.WeakKeyDictionary[sharing.Shared, tuple[int, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._hids = itertools.count()

    def _scatter(self, value: Any) -> Any:
        if isinstance(value, memoryview):
            value = value.tobytes()
        # (In a list: scatter would split a list or dict value into many futures.)
        return self._client.scatter([value], hash=False)[0]

    def _ref(self, obj: Any, arrays: Arrays) -> tuple[int, Any]:
        """(id, future) of a share() handle (once per pool) or a large array (once per call)."""
        if type(obj) is sharing.Shared:
            if obj.writable:
                raise ValueError(
                    "a writable fenfa.share() handle cannot go to the dask backend: its "
                    "workers may be on other machines, and their writes would be lost; "
                    "return the values instead, or use the process backend"
                )
            with self._lock:
                entry = self._handles.get(obj)
            if entry is None:
                future = self._scatter(obj.value)
                with self._lock:
                    entry = self._handles.setdefault(obj, (next(self._hids), future))
            return int(entry[0]), entry[1]
        with self._lock:
            known = arrays.get(id(obj))
        if known is None:
            future = self._scatter(obj)
            with self._lock:
                known = arrays.setdefault(id(obj), (obj, next(self._hids), future))
        return int(known[1]), known[2]

    def encode(self, obj: Any, arrays: Arrays, *, function: bool) -> tuple[bytes, dict[int, Any]]:
        """``obj`` pickled, and the futures of the ids it refers to.

        The plain pickle is tried first (fast on small items); only when there
        are share() handles about, or the result is large enough to hold a
        large array, is it pickled again with handles and arrays as ids.
        """
        if not sharing.handles_alive():
            try:
                data: bytes = (cloudpickle if function else pickle).dumps(obj, protocol=5)
            except Exception:
                if function:
                    raise
            else:
                if len(data) < sharing.AUTO_SHARE_BYTES:
                    return data, {}
        buffer = io.BytesIO()
        pickler = RefPickler(buffer, lambda o: self._ref(o, arrays))
        pickler.dump(obj)
        return buffer.getvalue(), pickler.used

    def call(self, job: Job) -> Call:
        """The job's :class:`Call`, made at its first batch."""
        call: Call | None = job.remote
        if call is None:
            arrays: Arrays = {}
            data, used = self.encode(job.fn, arrays, function=True)
            key = hashlib.blake2b(data, digest_size=16).digest()
            arg: Any = data
            if len(data) > INLINE_FUNCTION_BYTES:
                arg = self._client.scatter([data], hash=False)[0]
            call = job.remote = Call(key, arg, used, arrays)
        return call
