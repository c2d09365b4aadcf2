"""The file behind ``journal=``: its format, reading it back to resume, and appends.

A journal is a magic line, a header frame (format, the function's name),
then one frame per batch of results: records (a key, a status and a pickle
each: what a resumed run writes), or one bulk frame (the batch's inputs and
results, two pickles: what a fresh journal gets, keyed when read back).
Each frame is written with one ``write`` (``O_APPEND``) and carries a CRC32, so a reader can tell a
complete frame from one that is torn (the writer was killed in it) or
damaged (a machine crash leaves blocks of garbage): such a frame ends the
journal, and it and anything after it is truncated away when the journal is
next opened (those tasks run again). A lock (``flock``) keeps a second call,
in this process or another, off a journal in use.

Opening a journal indexes it without loading a result: one offset per record
(~100-200 bytes each), by key, and each stored result is read back
(``mmap``) when its turn comes. ``journal_fsync="batch"`` syncs at most every
``FSYNC_SECONDS`` and when the call ends, so an OS crash or power loss loses
at most the last second of results (they run again); ``"every"`` syncs each
batch before its results are handed over. A process crash loses nothing
written.

What goes in (keys, which results, in which order they are handed out) is
:mod:`fenfa.journaled`'s; this module knows frames, records and offsets.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import struct
import time
import zlib
from typing import Any

from .errors import FenfaError, unpack_exception

__all__ = ["FORMAT", "Failure", "Journal", "JournalError", "dumps", "input_key", "key_base"]

FORMAT = 1
MAGIC = b"fenfa-journal\n"
FSYNC = ("batch", "every")
# journal_fsync="batch" syncs at most this often: an fdatasync took 2.6 ms on
# this machine's disk, so a sync a second costs well under 1 % of a call.
FSYNC_SECONDS = 1.0
# Buffers one ``writev`` takes at most (Linux's IOV_MAX is 1024).
_IOV_MAX = 512
_FRAME = struct.Struct("<2sBxQI")  # b"FJ", kind, length of the body, CRC32 of the body
# A record: key, status, length of the pickle that follows (then the pickle).
RECORD = struct.Struct("<16sBQ")
# A bulk frame (a batch written whole: see append_bulk): the length of its first pickle.
_BULK_HEAD = struct.Struct("<Q")
_HEADER, _RECORDS, _BULK = 1, 2, 3
OK, FAILED = 0, 1
# A bulk record's place in the index: -((frame body offset << BULK_BITS) | its index) - 1,
# told from a record's offset (never negative) by its sign.
BULK_BITS = 24


def dumps(obj: object) -> bytes:
    """The standard pickle (protocol 5); cloudpickle where it cannot (lambdas, ``__main__``)."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle  # imported only when needed

        data: bytes = cloudpickle.dumps(obj, protocol=5)
        return data


# zlib lets go of the GIL to checksum more than 5 KiB; the caller's thread then
# waits for a thread-backend worker's switch interval (5 ms) to get it back,
# for a job of microseconds: 22 ms of a 45 ms call of 200,000 tiny tasks on
# threads went there. In slices below that size it keeps the GIL throughout.
_CRC_SLICE = 4096


def _crc(data: bytes) -> int:
    if len(data) <= _CRC_SLICE:
        return zlib.crc32(data)
    crc, view = 0, memoryview(data)
    for start in range(0, len(data), _CRC_SLICE):
        crc = zlib.crc32(view[start : start + _CRC_SLICE], crc)
    return crc


def key_base(name: str) -> Any:
    """The BLAKE2b state every key of the function ``name`` starts from."""
    base = hashlib.blake2b(digest_size=16)
    encoded = name.encode("utf-8", "surrogateescape")
    base.update(len(encoded).to_bytes(8, "little") + encoded)
    return base


def input_key(base: Any, args: tuple[Any, ...]) -> bytes:
    """A task's key: BLAKE2b over the function's name and the pickle of its argument tuple."""
    digest = base.copy()
    try:
        digest.update(pickle.dumps(args, 5))
    except Exception:
        digest.update(dumps(args))
    key: bytes = digest.digest()
    return key


class JournalError(FenfaError, ValueError):
    """A journal that cannot be used for this call: another function's, not a journal, in use."""


class Journal:
    """The journal file, open and locked: its index of stored records, and appends."""

    def __init__(self, path: str, name: str, fsync: str) -> None:
        self.path, self.name, self._every = path, name, fsync == "every"
        self._ok: dict[bytes, int | list[int]] = {}
        self._failed: dict[bytes, int | list[int]] = {}
        self._map: mmap.mmap | None = None
        self._bulk: tuple[int, list[Any], set[int]] | None = None  # the last bulk frame read
        self._dirty = self._new = False
        self._synced = time.monotonic()
        self._held: list[bytes] = []  # bulk frames not yet written (see append_bulk)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._lock()
            self._load()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # (not POSIX: no lock)
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(f"journal {self.path!r} is in use by another call") from None

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, len(MAGIC), 0)
        if not MAGIC.startswith(head) or (size > len(MAGIC) and head != MAGIC):
            raise JournalError(f"{self.path!r} exists and is not a fenfa journal: refusing it")
        end = self._scan(size) if size >= len(MAGIC) + _FRAME.size else 0
        if end < size:
            os.ftruncate(self._fd, end)  # a torn or damaged tail: its tasks run again
        if end == 0:
            self._create()
        elif self._ok or self._failed:
            self._map = mmap.mmap(self._fd, end, prot=mmap.PROT_READ)

    def _scan(self, size: int) -> int:
        """Index the complete frames; the offset where the valid journal ends (0: no header)."""
        with mmap.mmap(self._fd, size, prot=mmap.PROT_READ) as data, memoryview(data) as view:
            offset, end = len(MAGIC), 0
            while offset + _FRAME.size <= size:
                tag, kind, length, crc = _FRAME.unpack_from(data, offset)
                body = offset + _FRAME.size
                if (
                    tag != b"FJ"
                    or body + length > size
                    or zlib.crc32(view[body : body + length]) != crc
                ):
                    break
                if end == 0:
                    if kind != _HEADER:
                        break
                    self._check_header(bytes(view[body : body + length]))
                elif kind == _RECORDS:
                    self._index(data, body, body + length)
                elif kind == _BULK:
                    self._index_bulk(data, body)
                offset = end = body + length
            return end

    def _check_header(self, body: bytes) -> None:
        try:
            header = json.loads(body)
            stored, version = header["function"], header["format"]
        except (ValueError, KeyError, TypeError):
            raise JournalError(
                f"{self.path!r}: a fenfa journal with an unreadable header"
            ) from None
        if version != FORMAT:
            raise JournalError(f"{self.path!r} is a journal of format {version}, not {FORMAT}")
        if stored != self.name:
            raise JournalError(
                f"journal {self.path!r} holds the results of {stored}, not of {self.name}: "
                "give this function a journal of its own (or remove that one)"
            )

    def _index(self, data: mmap.mmap, offset: int, end: int) -> None:
        unpack, size = RECORD.unpack_from, RECORD.size
        while offset < end:
            key, status, length = unpack(data, offset)
            _add(self._ok if status == OK else self._failed, key, offset)
            offset += size + length

    def _index_bulk(self, data: mmap.mmap, body: int) -> None:
        """Key a bulk frame's inputs (the same keys as the records' keys)."""
        (head,) = _BULK_HEAD.unpack_from(data, body)
        start = body + _BULK_HEAD.size
        star, items, failed = pickle.loads(data[start : start + head])
        base, failed = key_base(self.name), set(failed)
        for index, item in enumerate(items):
            key = input_key(base, tuple(item) if star else (item,))
            into = self._failed if index in failed else self._ok
            _add(into, key, -((body << BULK_BITS) | index) - 1)

    def _create(self) -> None:
        header = json.dumps({"format": FORMAT, "function": self.name, "pickle": 5}).encode()
        self._write(MAGIC + _FRAME.pack(b"FJ", _HEADER, len(header), zlib.crc32(header)) + header)
        # Synced with the first results (or at the end): a sync here, before
        # anything worth keeping, cost a 50 ms call of tiny tasks 5 %.
        self._dirty = self._new = True

    def _sync_directory(self) -> None:
        """The new file's name, too, survives a machine crash."""
        try:
            directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(directory)
        except OSError:
            pass
        finally:
            os.close(directory)

    @property
    def has_records(self) -> bool:
        return bool(self._ok or self._failed)

    def take(self, key: bytes, failed_too: bool) -> int | None:
        """The offset of a stored record for ``key``, which no other input gets; None if none."""
        for held in (self._ok, self._failed) if failed_too else (self._ok,):
            found = held.get(key)
            if found is None:
                continue
            if isinstance(found, int):
                del held[key]
                return found
            offset = found.pop()
            if len(found) == 1:
                held[key] = found[0]
            return offset
        return None

    def read(self, offset: int, position: int) -> Any:
        """The stored result at ``offset``; a recorded failure as a :class:`Failure`."""
        assert self._map is not None
        try:
            if offset < 0:
                status, value = self._read_bulk(-offset - 1)
            else:
                _, status, length = RECORD.unpack_from(self._map, offset)
                start = offset + RECORD.size
                value = pickle.loads(self._map[start : start + length])
            if status == OK:
                return value
            error = unpack_exception(value)
        except Exception as exc:
            raise JournalError(
                f"a result stored in {self.path!r} (offset {offset}) could not be unpickled: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        error.add_note(
            f"fenfa: task {position}'s failure was read from journal {self.path!r} "
            "(journal_retry_failed=True runs it again)"
        )
        return Failure(error)

    def _read_bulk(self, reference: int) -> tuple[int, Any]:
        """A bulk frame's result: the frame's results are unpickled once, for all of them."""
        assert self._map is not None
        body, index = reference >> BULK_BITS, reference & ((1 << BULK_BITS) - 1)
        if self._bulk is None or self._bulk[0] != body:
            length = _FRAME.unpack_from(self._map, body - _FRAME.size)[2]
            (head,) = _BULK_HEAD.unpack_from(self._map, body)
            start = body + _BULK_HEAD.size
            failed = set(pickle.loads(self._map[start : start + head])[2])
            values = pickle.loads(self._map[start + head : body + length])
            self._bulk = (body, values, failed)
        _, values, failed = self._bulk
        return (FAILED if index in failed else OK), values[index]

    def append(self, parts: list[bytes]) -> None:
        """One frame of records (``RECORD`` headers and pickles), in one write."""
        body = b"".join(parts)
        self._write(_FRAME.pack(b"FJ", _RECORDS, len(body), _crc(body)), body)
        self._dirty = True
        if self._every or time.monotonic() - self._synced >= FSYNC_SECONDS:
            self.sync()

    def append_bulk(self, head: bytes, values: bytes) -> None:
        """One batch whole, as one frame: ``head`` pickles ``(star, inputs, failed indexes)``,
        ``values`` the results (a failure's packed exception in its place).

        What a fresh journal writes (:mod:`fenfa.journal_fast`): two pickles a
        batch instead of a key, a header and a pickle a task; the keys are
        made when the journal is read back. The frame waits for :meth:`flush`
        (or the next write, or closing), to go with others in one write.
        """
        body = _BULK_HEAD.pack(len(head)) + head + values
        self._held += (_FRAME.pack(b"FJ", _BULK, len(body), _crc(body)), body)

    def flush(self) -> None:
        """Write the held frames, in one write; sync if it is time to."""
        if not self._held:
            return
        self._write()
        self._dirty = True
        if self._every or time.monotonic() - self._synced >= FSYNC_SECONDS:
            self.sync()

    def _write(self, *chunks: bytes) -> None:
        if self._held:
            chunks, self._held = (*self._held, *chunks), []
        for at in range(0, len(chunks), _IOV_MAX):
            self._write_all(chunks[at : at + _IOV_MAX])

    def _write_all(self, chunks: tuple[bytes, ...]) -> None:
        written = os.writev(self._fd, chunks)
        if written < sum(map(len, chunks)):  # (a regular file takes it whole; but be sure)
            rest = memoryview(b"".join(chunks))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]

    def sync(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self._fd)
        if self._new:
            self._sync_directory()
            self._new = False
        self._dirty = False
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
            if self._dirty:
                self.sync()
        finally:
            self._bulk = None
            if self._map is not None:
                self._map.close()
                self._map = None
            os.close(self._fd)  # (releases the lock)
            self._fd = -1


def _add(index: dict[bytes, int | list[int]], key: bytes, place: int) -> None:
    """One more stored record of ``key`` (most keys have one: an int, not a list)."""
    found = index.get(key)
    if found is None:
        index[key] = place
    elif isinstance(found, int):
        index[key] = [found, place]
    else:
        found.append(place)


class Failure:
    """A failed task's exception, among results (a result may itself be an exception)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
