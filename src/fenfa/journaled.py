"""``journal=``: a ``map``, ``imap``, ``imap_unordered`` or ``starmap`` that resumes.

``pool.map(fn, xs, journal="run.fenfa")`` appends every finished task's
result to an append-only file; run the same call again after a crash, a
Ctrl-C or a ``kill -9`` and it returns every result, running only the tasks
the journal lacks. How a call flows (one thread, the consumer's, writes)::

    xs ─▶ _Feed ──(index, args)──▶ pool (unordered, on_error="return")
          │ key = hash(fn's name, pickle(args))     │ _Call: (index, value, pickle(value))
          │ in the journal? ─▶ stored: (position, offset)
          ▼                                         ▼ a batch of results at a time
       pending: index ─▶ (position, key)  ──▶  _merge ── one write per batch ─▶ journal
                                                  │ stored results read back by offset
                                                  ▼
                                  results, in input order (map, imap) or as they come

- **Keys.** A task's key is BLAKE2b over the function's qualified name and the
  pickle (protocol 5; cloudpickle if pickle cannot) of its argument tuple, made
  in the caller from the input as given. Inputs whose pickle differs run by run
  (a set of strings, whose order follows the per-process hash seed; objects
  that pickle an id or a time) get a new key each run: they run again.
  Identical inputs share a key and are counted: a journal with two results for
  ``x`` covers two occurrences of ``x``, as ``fenfa map --resume`` does.
- **The file.** A magic line, a header frame (format, the function's name),
  then one frame per batch of results; each frame is written with one
  ``write`` (``O_APPEND``) as the batch arrives, before any of its results is
  handed to the caller, and carries a CRC32. A frame that is torn (the writer
  was killed in it) or damaged (a machine crash leaves blocks of garbage) ends
  the journal: it and anything after it is truncated away when the journal is
  next opened, and those tasks run again. A lock (``flock``) keeps a second
  call, in this process or another, off a journal in use.
- **Durability.** A process crash loses nothing written. ``journal_fsync=
  "batch"`` syncs at most every ``FSYNC_SECONDS`` and when the call ends, so an
  OS crash or power loss loses at most the last second of results (they run
  again); ``"every"`` syncs each batch before its results are handed over.
- **Failures** (``on_error="return"``) are recorded; a rerun returns the
  recorded exception unless ``journal_retry_failed=True``, which runs them
  again. ``raise`` and ``skip`` record nothing for a failure: it runs again.
- **Memory.** Results are not loaded: the journal's index holds one offset per
  record (~100-200 bytes each, for the whole journal), and each stored result
  is read back (``mmap``) when its turn comes. Ordered calls hold fresh results
  that came ahead of their turn, and stored ones not yet reached, up to
  ``window`` (default ``MAX_DEFAULT_WINDOW``) before they stop pulling input.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import mmap
import os
import pickle
import re
import struct
import time
import weakref
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import (
    FenfaError,
    RemoteTraceback,
    SerializationError,
    pack_exception,
    short_repr,
    unpack_exception,
)
from .options import check_callable
from .tasks import is_coroutine_function
from .window import MAX_DEFAULT_WINDOW, _stages, from_input

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["FORMAT", "JournalError", "function_name", "journaled", "journaled_list"]

FORMAT = 1
MAGIC = b"fenfa-journal\n"
FSYNC = ("batch", "every")
# journal_fsync="batch" syncs at most this often: an fdatasync took 2.6 ms on
# this machine's disk, so a sync a second costs well under 1 % of a call.
FSYNC_SECONDS = 1.0
_FRAME = struct.Struct("<2sBxQI")  # b"FJ", kind, length of the body, CRC32 of the body
_RECORD = struct.Struct("<16sBQ")  # key, status, length of the pickle that follows
_HEADER, _RECORDS = 1, 2
_OK, _FAILED = 0, 1
_NOTE = re.compile(r"fenfa: task (\d+) failed((?: after \d+ attempts)?); input: ")


class JournalError(FenfaError, ValueError):
    """A journal that cannot be used for this call: another function's, not a journal, in use."""


def function_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of ``fn`` (of its class for a callable object): the journal's owner."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({function_name(fn.func)})"
    target: Any = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


def _dumps(obj: object) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        import cloudpickle  # lambdas, closures, __main__ classes; imported only when needed

        data: bytes = cloudpickle.dumps(obj, protocol=5)
        return data


class _Call:
    """``fn`` on one ``(index, args)``: ``(index, value, pickle of value)``, in the worker."""

    __slots__ = ("fn", "star")

    def __init__(self, fn: Callable[..., Any], star: bool) -> None:
        self.fn, self.star = fn, star

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any, bytes]:
        index, args = item
        value = self.fn(*args) if self.star else self.fn(args)
        return index, value, _encode(value)


class _AsyncCall(_Call):
    __slots__ = ()

    async def __call__(self, item: tuple[int, Any]) -> tuple[int, Any, bytes]:  # type: ignore[override]
        index, args = item
        value = await (self.fn(*args) if self.star else self.fn(args))
        return index, value, _encode(value)


def _encode(value: object) -> bytes:
    try:
        return _dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"journal=: the result could not be pickled to be recorded: {type(exc).__name__}: {exc}"
        ) from exc


class Journal:
    """The journal file, open and locked: its index of stored records, and appends."""

    def __init__(self, path: str, name: str, fsync: str) -> None:
        self.path, self.name, self._every = path, name, fsync == "every"
        self._ok: dict[bytes, int | list[int]] = {}
        self._failed: dict[bytes, int | list[int]] = {}
        self._map: mmap.mmap | None = None
        self._dirty = False
        self._synced = time.monotonic()
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
        unpack, size = _RECORD.unpack_from, _RECORD.size
        while offset < end:
            key, status, length = unpack(data, offset)
            into = self._ok if status == _OK else self._failed
            found = into.get(key)
            if found is None:
                into[key] = offset
            elif isinstance(found, int):
                into[key] = [found, offset]
            else:
                found.append(offset)
            offset += size + length

    def _create(self) -> None:
        header = json.dumps({"format": FORMAT, "function": self.name, "pickle": 5}).encode()
        self._write(MAGIC + _FRAME.pack(b"FJ", _HEADER, len(header), zlib.crc32(header)) + header)
        self.sync()
        try:  # the new file's name, too, survives a machine crash
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
        """The stored result at ``offset``; a recorded failure as a :class:`_Failure`."""
        assert self._map is not None
        _, status, length = _RECORD.unpack_from(self._map, offset)
        start = offset + _RECORD.size
        try:
            value = pickle.loads(self._map[start : start + length])
            if status == _OK:
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
        return _Failure(error)

    def append(self, parts: list[bytes]) -> None:
        """One frame of records (``_RECORD`` headers and pickles), in one write."""
        body = b"".join(parts)
        self._write(_FRAME.pack(b"FJ", _RECORDS, len(body), zlib.crc32(body)), body)
        self._dirty = True
        if self._every or time.monotonic() - self._synced >= FSYNC_SECONDS:
            self.sync()

    def _write(self, *chunks: bytes) -> None:
        written = os.writev(self._fd, chunks)
        if written < sum(map(len, chunks)):  # (a regular file takes it whole; but be sure)
            rest = memoryview(b"".join(chunks))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]

    def sync(self) -> None:
        getattr(os, "fdatasync", os.fsync)(self._fd)
        self._dirty = False
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._dirty:
                self.sync()
        finally:
            if self._map is not None:
                self._map.close()
                self._map = None
            os.close(self._fd)  # (releases the lock)
            self._fd = -1


class _Failure:
    """A failed task's exception, among results (a result may itself be an exception)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Feed:
    """The input, pulled lazily by the pool: ``(index, args)`` for each task still to run."""

    def __init__(
        self, source: Iterator[Any], star: bool, journal: Journal, retry_failed: bool, limit: int
    ) -> None:
        self.source, self.star, self.journal = source, star, journal
        self.retry_failed, self.limit = retry_failed, limit
        base = hashlib.blake2b(digest_size=16)
        name = journal.name.encode("utf-8", "surrogateescape")
        base.update(len(name).to_bytes(8, "little") + name)
        self._base = base
        self.position = 0
        self.pending: dict[int, tuple[int, bytes, Any]] = {}  # index -> (position, key, args)
        self.stored: collections.deque[tuple[int, int]] = collections.deque()  # (position, offset)
        # ordered: position -> fresh results from there on, ahead of their turn
        self.ready: dict[int, list[Any]] = {}
        self.exhausted = self.stop = False
        self.error: Exception | None = None

    def segment(self) -> Iterator[tuple[int, Any]]:
        """One pool call's input: it ends early when ``limit`` results wait in the caller."""
        pending, stored, ready, limit, star = (
            self.pending,
            self.stored,
            self.ready,
            self.limit,
            self.star,
        )
        take = self.journal.take if self.journal.has_records else None
        failed_too, copy, dumps = not self.retry_failed, self._base.copy, pickle.dumps
        index = 0
        while not self.stop and len(stored) + len(ready) < limit:
            try:
                args = next(self.source)
                if star and type(args) is not tuple:
                    args = tuple(args)
                digest = copy()
                try:
                    digest.update(dumps(args if star else (args,), 5))
                except Exception:
                    digest.update(_dumps(args if star else (args,)))
                key = digest.digest()
            except StopIteration:
                self.exhausted = True
                return
            except Exception as exc:  # the input's own error, or an input that cannot be keyed
                if isinstance(exc, pickle.PicklingError | TypeError | AttributeError):
                    exc = SerializationError(
                        f"journal=: input {self.position} could not be pickled for its key: "
                        f"{type(exc).__name__}: {exc}"
                    )
                self.error, self.exhausted = from_input(exc, self.position), True
                return
            if take is not None and (offset := take(key, failed_too)) is not None:
                stored.append((self.position, offset))
            else:
                pending[index] = (self.position, key, args)
                yield index, args
                index += 1
            self.position += 1


def journaled(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: dict[str, Any],
    *,
    ordered: bool,
    star: bool = False,
) -> Iterator[Any] | None:
    """Take the ``journal`` options out of ``options``; None without a journal (a plain call).

    ``star``: ``iterables`` is one iterable of argument tuples (``starmap``).
    """
    chunks = _start(pool, fn, iterables, options, ordered, star)
    if chunks is None:
        return None
    results = _flatten(chunks)
    _stages.add(results)  # (a pipeline stage downstream stops this one when it stops)
    return results


def journaled_list(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: dict[str, Any],
    *,
    star: bool = False,
) -> list[Any] | None:
    """As :func:`journaled`, for ``map`` and ``starmap``: the list of results."""
    chunks = _start(pool, fn, iterables, options, True, star)
    return None if chunks is None else list(itertools.chain.from_iterable(chunks))


def _flatten(chunks: Generator[list[Any], None, None]) -> Generator[Any, None, None]:
    try:
        for chunk in chunks:
            yield from chunk
    finally:
        chunks.close()


def _start(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: dict[str, Any],
    ordered: bool,
    star: bool,
) -> Generator[list[Any], None, None] | None:
    if not {"journal", "journal_fsync", "journal_retry_failed"} & options.keys():
        return None
    path = options.pop("journal", None)
    fsync = options.pop("journal_fsync", "batch")
    retry_failed = options.pop("journal_retry_failed", False)
    if fsync not in FSYNC:
        raise ValueError(f"journal_fsync must be 'batch' or 'every', got {fsync!r}")
    if not isinstance(retry_failed, bool):
        raise ValueError(f"journal_retry_failed must be True or False, got {retry_failed!r}")
    if path is None:
        if fsync != "batch" or retry_failed:
            raise ValueError("journal_fsync and journal_retry_failed go with journal=PATH")
        return None
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    check_callable(fn)
    pool._check_fits(fn)
    pool._check_open()
    call = pool._options.update(options)  # (checks them now, as a plain call does)
    source = iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
    star = star or len(iterables) > 1
    journal = Journal(os.fspath(path), function_name(fn), fsync)
    feed = _Feed(source, star, journal, retry_failed, call.window or MAX_DEFAULT_WINDOW)
    wrapper = (_AsyncCall if is_coroutine_function(fn) else _Call)(fn, star)
    inner = {**options, "on_error": "return"}  # (on_error is applied here, in input order)
    chunks = _merge(pool, wrapper, feed, inner, call.on_error, ordered)
    weakref.finalize(chunks, journal.close)  # (an imap never iterated)
    return chunks


def _merge(
    pool: Pool, wrapper: _Call, feed: _Feed, options: dict[str, Any], on_error: str, ordered: bool
) -> Generator[list[Any], None, None]:
    """Lists of results, stored and fresh, in input order or as they come; ``on_error`` applied."""
    journal, stored, ready = feed.journal, feed.stored, feed.ready
    pieces: Generator[list[Any], None, None] | None = None
    turn = 0  # ordered: the position whose result is handed out next
    try:
        while True:
            while True:  # hand out what is here
                if stored and (not ordered or stored[0][0] == turn):
                    position, offset = stored.popleft()
                    chunk = [journal.read(offset, position)]
                elif ordered and turn in ready:
                    chunk = ready.pop(turn)
                else:
                    break
                turn += len(chunk)
                yield _applied(chunk, on_error)
            if pieces is None:
                if feed.exhausted or feed.stop:
                    break
                pieces = pool._spread(wrapper, (feed.segment(),), False, options).pieces()
            try:
                values = next(pieces)
            except StopIteration:
                pieces = None
                continue
            for start, chunk in _record(feed, values, on_error):
                if ordered:
                    ready[start] = chunk
                else:
                    yield _applied(chunk, on_error)
        if feed.error is not None:
            raise feed.error
    finally:
        if pieces is not None:
            pieces.close()
        journal.close()


def _applied(chunk: list[Any], on_error: str) -> list[Any]:
    if not any(type(value) is _Failure for value in chunk):
        return chunk
    out = []
    for value in chunk:
        if type(value) is not _Failure:
            out.append(value)
        elif on_error == "raise":
            raise value.error
        elif on_error == "return":
            out.append(value.error)
    return out


def _record(feed: _Feed, values: list[Any], on_error: str) -> list[tuple[int, list[Any]]]:
    """Append one batch of fresh results to the journal; them, in runs of adjacent positions."""
    pending, pack, after = feed.pending, _RECORD.pack, -1
    parts: list[bytes] = []
    chunks: list[tuple[int, list[Any]]] = []
    chunk: list[Any] | None = None
    for result in values:
        if type(result) is tuple:
            index, value, blob = result
            position, key, _ = pending.pop(index)
            parts += (pack(key, _OK, len(blob)), blob)
        else:
            index = _task_of(result, pending)
            position, key, args = pending.pop(index)
            _renote(result, index, position, args)
            if on_error == "return":
                blob = pickle.dumps(_packed(result), protocol=5)
                parts += (pack(key, _FAILED, len(blob)), blob)
            elif on_error == "raise":
                feed.stop = True  # nothing after the first failure is needed
            value = _Failure(result)
        if position != after or chunk is None:
            chunk = []
            chunks.append((position, chunk))
        chunk.append(value)
        after = position + 1
    if parts:
        feed.journal.append(parts)
    return chunks


def _task_of(error: BaseException, pending: dict[int, Any]) -> int:
    """The task index fenfa noted on a failure (the latest still pending: one exception
    object may have failed several tasks, each adding its note)."""
    for note in reversed(getattr(error, "__notes__", ())):
        found = _NOTE.match(note)
        if found and int(found.group(1)) in pending:
            return int(found.group(1))
    raise RuntimeError(f"journal=: a failure without the note of its task: {error!r}")


def _renote(error: BaseException, index: int, position: int, args: Any) -> None:
    """Name the task's position in the caller's input, and its input, not the wrapper's."""
    notes: list[str] = getattr(error, "__notes__", [])
    for n in range(len(notes) - 1, -1, -1):
        found = _NOTE.match(notes[n])
        if found and int(found.group(1)) == index:
            notes[n] = f"fenfa: task {position} failed{found.group(2)}; input: {short_repr(args)}"
            return


def _packed(error: BaseException) -> tuple[bytes | None, str, str, str]:
    """What :func:`fenfa.errors.unpack_exception` rebuilds the failure from, on a rerun."""
    data, tb, type_name, message = pack_exception(error)
    if isinstance(error.__cause__, RemoteTraceback):
        tb = error.__cause__.tb  # the worker's traceback, not the caller's re-raise
    return data, tb, type_name, message
