"""The pipe protocol of the process backend: what goes over each worker's pipe.

Both sides import this module: the parent (``process.py`` and its parts) and
the child (``_worker.py``, which the forkserver preloads), so it imports
little. Messages in both directions are *frames*: one kind byte, a 4-byte
header length, a pickled header, then a body whose pickling may fail on its
own (the header always gets through, so the other side always knows which
tasks a failed body stood for).

Parent -> worker::

    FUNC   header (key,)                                    body: cloudpickled function
    BATCH  header (batch_id, key, style, start, count, mode, timed)    body: pickled items
    FORGET header (paths, keys)  shared segments released: drop their mappings and
           the functions that refer to them (the parent's mirror drops them too)
    STOP   -

Worker -> parent::

    READY       -   the initializer (if any) ran; tasks may come
    RESULT      header (batch_id, busy_seconds, spans, sizes)   body: one payload per span
                 spans: [(start, count, ok, times)]; ok -> a list of values, else a packed
                 exception; times: when and where it ran (insights on), else None
                 sizes: the byte counts of the pickle's out-of-band buffers (large NumPy
                 results), written raw to the socket right after the frame
    STARTED     header (batch_id, index)  a task with a timeout starts now (its clock runs)
    RETIRE      header (batch_id,)  this worker reached max_tasks_per_worker and exits
    OUTPUT      header (stream, text)   printed by a task (see fenfa.relay)
    LOG         header record attributes    logged by a task (see fenfa.relay)
    INIT_FAILED header packed exception from the initializer

Here too are the parent's halves of the bodies: a batch's BATCH frame (its
mode chosen from its tasks' expected time; a task whose input will not
pickle fails alone) and a RESULT body read back into pieces. The worker's
halves (running a batch, encoding its results) are ``_worker.py``'s.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

import cloudpickle

from .. import autoshare, segments
from ..errors import SerializationError, unpack_exception
from ..tasks import Batch, Err, Job, Ok, Piece, Style

FUNC, BATCH, FORGET, STOP = b"F", b"B", b"G", b"S"
READY, RESULT, RETIRE, INIT_FAILED, OUTPUT, LOG = b"Y", b"R", b"T", b"I", b"O", b"L"
STARTED = b"A"
_HLEN = struct.Struct("!I")

# Functions kept per worker, least recently used dropped first. The parent
# mirrors this cache exactly (same size, same order of use), so it knows
# without asking whether a worker still holds a function.
FUNCTION_CACHE_SIZE = 32
# A result buffer (a NumPy array's data) this large or larger crosses out of
# band: written from the array's memory straight to the socket and read
# straight into the buffer the parent's array will use. Smaller ones ride
# inside the pickle, where one message beats three.
OUT_OF_BAND_BYTES = 64 * 1024

# How a batch reports (the BATCH header's mode): all at the end; all at the
# end with each task's index stored in the worker's shared marks; task by task.
FAST_MODE = 0
MARKED_MODE = 1
STREAM_MODE = 2
# Task by task, and each task says STARTED first: a task with a timeout is
# timed from when it really starts (not while its function unpickles, nor
# while a retiring worker says goodbye).
TIMED_MODE = 3

# Tasks expected to take longer than this report one by one, so a crash is
# blamed on exactly one task and no finished task runs again. A message costs
# a few microseconds, so one per task costs at most ~2% above this; shorter
# tasks report once per batch.
STREAM_ABOVE_SECONDS = 0.0002
# Tasks expected to take longer than this (and shorter than the above) report
# at the end of their batch but store their index in a word the parent reads
# when the worker dies: the task that killed it fails once, without being run
# again to find it. One store costs ~50 ns, at most 1% above this; shorter
# tasks keep the loop that runs in C, and a crash among them may run the
# crashing task a second time (streamed, to pin it).
MARK_ABOVE_SECONDS = 5e-6


class Marks:
    """Two 64-bit words a worker shares with its parent: (batch id, index of its running task).

    A memfd mapped by both: the worker stores before each task of a MARKED
    batch, the parent reads after the worker died. It travels to a spawned
    or forkserver child as a descriptor, the way multiprocessing sends a
    Connection (``reduction.DupFd``); a forked child inherits the mapping.
    (Not ``multiprocessing.RawArray``: its import of ctypes costs ~20 ms.)
    """

    def __init__(self, fd: int | None = None) -> None:
        self.fd = os.memfd_create("fenfa-marks") if fd is None else fd
        if fd is None:
            os.ftruncate(self.fd, 16)
        self._map = mmap.mmap(self.fd, 16)
        self.view = memoryview(self._map).cast("q")
        if fd is None:
            self.view[0] = self.view[1] = -1

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        return _attach_marks, (reduction.DupFd(self.fd),)

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self.fd)


def _attach_marks(duplicate: Any) -> Marks:
    return Marks(duplicate.detach())


def frame(kind: bytes, header: Any, body: bytes = b"") -> bytes:
    head = pickle.dumps(header, protocol=5)
    return b"".join((kind, _HLEN.pack(len(head)), head, body))


def unframe(message: bytes) -> tuple[bytes, Any, memoryview]:
    view = memoryview(message)
    (hlen,) = _HLEN.unpack_from(view, 1)
    header = pickle.loads(view[5 : 5 + hlen])
    return message[:1], header, view[5 + hlen :]


def dumps(obj: Any, buffers: list[memoryview] | None = None) -> bytes:
    """Pickle with the standard library (fast); cloudpickle only when that fails.

    With ``buffers``, large buffers (see OUT_OF_BAND_BYTES) are left out of the
    pickle and appended there instead.
    """
    callback = None if buffers is None else _out_of_band(buffers)
    try:
        return pickle.dumps(obj, protocol=5, buffer_callback=callback)
    except Exception:
        if buffers:
            buffers.clear()
        return cloudpickle.dumps(obj, protocol=5, buffer_callback=callback)  # type: ignore[no-any-return]


def _out_of_band(buffers: list[memoryview]) -> Callable[[pickle.PickleBuffer], bool]:
    def keep_in_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: in band
            return True
        if raw.nbytes < OUT_OF_BAND_BYTES:
            return True
        buffers.append(raw)
        return False

    return keep_in_band


# -- the parent's half --------------------------------------------------


def function_payload(job: Job) -> tuple[bytes, bytes]:
    """The FUNC frame's key and body for ``job``'s function: cloudpickled, once per call.

    The key is a hash of the bytes, never the function's name or id: a
    function redefined in a notebook must not be served stale.
    """
    try:
        data, paths = autoshare.dumps_function(job.fn, job.scope())
    except Exception as exc:
        raise SerializationError(
            f"the function {job.fn!r} could not be pickled: {type(exc).__name__}: {exc}",
            what="function",
        ) from exc
    key = hashlib.blake2b(data, digest_size=16).digest()
    segments.note_function(key, paths)
    return key, data


def streams(batch: Batch) -> bool:
    count = len(batch.items)
    return count > 1 and (
        batch.job.timeout is not None
        or batch.expected is None
        or batch.expected / count > STREAM_ABOVE_SECONDS
    )


def _marks(batch: Batch) -> bool:
    count = len(batch.items)
    return count > 1 and batch.expected is not None and batch.expected / count > MARK_ABOVE_SECONDS


def mode(batch: Batch) -> int:
    if batch.job.timeout is not None:
        return TIMED_MODE
    if streams(batch):
        return STREAM_MODE
    return MARKED_MODE if _marks(batch) else FAST_MODE


def wire(batch: Batch) -> bytes:
    """The BATCH frame of ``batch``: its items pickled, large arrays among them shared
    (once per call)."""
    body = autoshare.dumps_items(batch.items, batch.job.scope())
    job = batch.job
    assert job.payload is not None
    count = len(batch.items)
    header = (batch.id, job.payload[0], int(job.style), batch.start, count, mode(batch), job.timed)
    return frame(BATCH, header, body)


def encode(batch: Batch) -> list[Batch]:
    """Give ``batch`` its wire form; a task whose input will not pickle fails alone."""
    try:
        batch.wire = wire(batch)
        return [batch]
    except Exception:
        pass
    parts: list[Batch] = []
    good: list[Any] = []
    first = batch.start
    for index, item in enumerate(batch.items, batch.start):
        try:
            dumps(item)
        except Exception as exc:
            if good:
                parts.append(Batch(batch.job, first, good, batch.attempt))
                good = []
            which = _unpicklable_part(item, batch.job.style)
            error = SerializationError(
                f"{which} of task {index} could not be pickled: {type(exc).__name__}: {exc}",
                index=index,
                what="argument",
            )
            error.__cause__ = exc
            bad = Batch(batch.job, index, [item], batch.attempt)
            batch.job.deliver(bad, [Err(index, error)], 0.0)
            first = index + 1
        else:
            good.append(item)
    if good:
        parts.append(Batch(batch.job, first, good, batch.attempt))
    for part in parts:
        part.wire = wire(part)
    return parts


def _unpicklable_part(item: Any, style: Style) -> str:
    """Which argument of a task's input does not pickle, in words."""
    if style is Style.ONE:
        return "the argument"
    args, kwargs = (item, {}) if style is Style.STAR else item
    for position, value in enumerate(args):
        try:
            dumps(value)
        except Exception:
            return f"argument {position}"
    for name, value in kwargs.items():
        try:
            dumps(value)
        except Exception:
            return f"argument {name!r}"
    return "the arguments"


def receive_buffers(sock: socket.socket, sizes: list[int]) -> list[bytearray] | None:
    """The out-of-band buffers that follow a RESULT frame; None if the worker died first."""
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        if not _receive_into(sock, buffer):
            return None  # died halfway: as if nothing had come
        buffers.append(buffer)
    return buffers


def _receive_into(sock: socket.socket, buffer: bytearray) -> bool:
    """Fill ``buffer`` from ``sock``; False if the other end closed first."""
    view = memoryview(buffer)
    while view:
        try:
            count = sock.recv_into(view)
        except OSError:
            return False
        if count == 0:
            return False
        view = view[count:]
    return True


def decode_results(spans: list[Any], body: memoryview, buffers: list[bytearray]) -> list[Piece]:
    """The pieces a RESULT frame stands for; a body that will not unpickle fails its tasks."""
    pieces: list[Piece] = []
    try:
        payloads = pickle.loads(body, buffers=buffers)
    except Exception as exc:
        for start, count, _ok, _times in spans:
            for index in range(start, start + count):
                error = SerializationError(
                    f"the result of task {index} could not be unpickled: "
                    f"{type(exc).__name__}: {exc}",
                    index=index,
                    what="result",
                )
                pieces.append(Err(index, error))
    else:
        for (start, _count, ok, times), payload in zip(spans, payloads, strict=True):
            piece = Ok(start, payload) if ok else Err(start, unpack_exception(payload))
            piece.times = times
            pieces.append(piece)
    return pieces


__all__ = [
    "Marks",
    "decode_results",
    "dumps",
    "encode",
    "frame",
    "function_payload",
    "receive_buffers",
    "unframe",
    "wire",
]
