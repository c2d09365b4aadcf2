"""What crosses between the caller and a dask worker, as bytes fenfa pickles.

Both sides of the dask backend agree on this format, so it lives apart from
either: the caller pickles a batch's items (and its function) here, with
``share()`` handles and large arrays written as ids of values scattered to
the cluster once; the worker unpickles them against those values, and sends
its pieces back as one pickle of plain tuples, which the caller turns back
into pieces on its own clock.

Dask never sees the user's data, only these bytes: it then never walks (or
misreads: a tuple starting with a callable is a task in Dask's graph format)
a value, and a value that does not pickle fails its own task with
:class:`~fenfa.errors.SerializationError`, not the dask task.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from ... import sharing
from ...errors import SerializationError, unpack_exception
from ...tasks import Batch, Err, Ok, Piece
from .._worker import fail_unpicklable

# A piece as it crosses: (ok, start or index, values or packed error, times).
Flat = tuple[bool, int, Any, Any]


class RefPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with share() handles and large arrays written as ids.

    Each :class:`~fenfa.sharing.Shared` handle, and each plain NumPy array of
    ``sharing.AUTO_SHARE_BYTES`` or more, crosses once, scattered to the
    cluster; a task's bytes carry only the id, which the worker maps back to
    the value. ``ref`` gives an object's (id, future); ``used`` collects them.
    """

    def __init__(self, file: io.BytesIO, ref: Callable[[Any], tuple[int, Any]]) -> None:
        super().__init__(file, protocol=5)
        self._ref = ref
        self.used: dict[int, Any] = {}

    def persistent_id(self, obj: Any) -> int | tuple[str, int] | None:
        if type(obj) is sharing.Shared or (
            sharing._is_plain_array(obj) and obj.nbytes >= sharing.AUTO_SHARE_BYTES
        ):
            hid, future = self._ref(obj)
            self.used[hid] = future
            if type(obj) is sharing.Shared and isinstance(obj.value, memoryview):
                return ("view", hid)  # bytes cross; the task gets a memoryview, as elsewhere
            return hid
        return None


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, values: dict[int, Any]) -> None:
        super().__init__(file)
        self._values = values

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple):
            return memoryview(self._values[pid[1]])
        return self._values[pid]


def loads(data: bytes, values: dict[int, Any]) -> Any:
    """Unpickle ``data``, its ids mapped to ``values`` (the scattered handles and arrays)."""
    if not values:
        return pickle.loads(data)
    return _RefUnpickler(io.BytesIO(data), values).load()


def dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle.dumps(obj, protocol=5)  # type: ignore[no-any-return]


# -- results: worker -> caller -----------------------------------------------


def encode_pieces(pieces: list[Piece], busy: float) -> bytes:
    """A batch's pieces, its busy seconds and this machine's clock offset, pickled.

    A result that does not pickle fails its own task (``fail_unpicklable``).
    """
    clock = time.time() - time.monotonic()
    try:
        return dumps((_flat(pieces), busy, clock))
    except Exception:
        pass
    fixed = fail_unpicklable(pieces, dumps)
    return dumps((_flat(fixed), busy, clock))


def _flat(pieces: list[Piece]) -> list[Flat]:
    return [
        (True, p.start, p.values, p.times)
        if isinstance(p, Ok)
        else (False, p.index, p.error, p.times)
        for p in pieces
    ]


def decode_pieces(data: bytes, batch: Batch) -> tuple[list[Piece], float]:
    """The pieces (and busy seconds) a worker sent for ``batch``, times on this clock."""
    try:
        flat, busy, clock = pickle.loads(data)
    except Exception as exc:
        why = (
            f"the results of tasks {batch.start}..{batch.start + len(batch.items) - 1} "
            f"could not be unpickled here: {type(exc).__name__}: {exc}"
        )
        return [
            Err(i, SerializationError(why, index=i, what="result"))
            for i in range(batch.start, batch.start + len(batch.items))
        ], 0.0
    # time.monotonic of that worker's machine, as this process's clock.
    shift = clock - (time.time() - time.monotonic())
    pieces: list[Piece] = []
    for ok, start, payload, times in flat:
        piece: Piece = Ok(start, payload) if ok else Err(start, unpack_exception(payload))
        if times is not None:
            began, ended, cpu, who = times
            piece.times = (began + shift, ended + shift, cpu, who)
        pieces.append(piece)
    return pieces, float(busy)
