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
- **The file** (:mod:`fenfa.journal_file`): a header naming the function,
  then one CRC-checked frame per batch of results, written before any of its
  results is handed to the caller; a torn or damaged tail is truncated away
  on the next open (those tasks run again), and a lock keeps a second call
  off a journal in use. ``journal_fsync`` says how often it is synced.
- **Failures** (``on_error="return"``) are recorded; a rerun returns the
  recorded exception unless ``journal_retry_failed=True``, which runs them
  again. ``raise`` and ``skip`` record nothing for a failure: it runs again.
- **Memory.** Results are not loaded: the journal's index holds one offset per
  record, and each stored result is read back when its turn comes. Ordered
  calls hold fresh results that came ahead of their turn, and stored ones not
  yet reached, up to ``window`` (default ``MAX_DEFAULT_WINDOW``) before they
  stop pulling input.

This module sits below :mod:`fenfa.pool`, which hands it a call only when a
``journal`` option is given; it reaches the pool through the few methods
named by ``_Pool``, and never imports it.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import re
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import SerializationError, pack_failure, short_repr
from .journal_file import (
    FAILED,
    FSYNC,
    OK,
    RECORD,
    Failure,
    Journal,
    JournalError,
    dumps,
    key_base,
)
from .options import check_callable
from .outcomes import from_input
from .tasks import is_coroutine_function
from .window import MAX_DEFAULT_WINDOW, _stages

if TYPE_CHECKING:
    from typing import Protocol

    from .options import CallOptions
    from .tasks import Style
    from .window import Run

    class _Pool(Protocol):
        """What a journaled call needs of its :class:`fenfa.Pool`."""

        _options: CallOptions

        def _check_fits(self, fn: Callable[..., Any]) -> None: ...
        def _check_open(self) -> None: ...
        def _run(
            self,
            fn: Callable[..., Any],
            style: Style,
            inputs: Iterable[Any],
            *,
            total: int | None,
            ordered: bool,
            options: dict[str, Any],
        ) -> Run: ...
        def _spread(
            self,
            fn: Callable[..., Any],
            iterables: tuple[Iterable[Any], ...],
            ordered: bool,
            options: dict[str, Any],
        ) -> Run: ...


# (JournalError is documented here, as fenfa.journaled.JournalError.)
__all__ = ["JournalError", "function_name", "journaled"]

_NOTE = re.compile(r"fenfa: task (\d+) failed((?: after \d+ attempts)?); input: ")


def function_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of ``fn`` (of its class for a callable object): the journal's owner."""
    if isinstance(fn, functools.partial):
        return f"functools.partial({function_name(fn.func)})"
    target: Any = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', None) or '?'}.{target.__qualname__}"


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
        return dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"journal=: the result could not be pickled to be recorded: {type(exc).__name__}: {exc}"
        ) from exc


class _Feed:
    """The input, pulled lazily by the pool: ``(index, args)`` for each task still to run."""

    def __init__(
        self, source: Iterator[Any], star: bool, journal: Journal, retry_failed: bool, limit: int
    ) -> None:
        self.source, self.star, self.journal = source, star, journal
        self.retry_failed, self.limit = retry_failed, limit
        self._base = key_base(journal.name)
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
                    digest.update(dumps(args if star else (args,)))
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
    pool: _Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: dict[str, Any],
    *,
    ordered: bool,
    star: bool = False,
    collect: bool = False,
) -> Iterator[Any] | list[Any] | None:
    """Take the ``journal`` options out of ``options``; None without a journal (a plain call).

    ``star``: ``iterables`` is one iterable of argument tuples (``starmap``).
    ``collect``: the list of the results (``map``, ``starmap``), made a chunk at a time.
    """
    chunks = _start(pool, fn, iterables, options, ordered, star)
    if chunks is None:
        return None
    if collect:
        out: list[Any] = []
        try:
            for chunk in chunks:
                out.extend(chunk)
        finally:
            chunks.close()
        return out
    results = _flatten(chunks)
    _stages.add(results)  # (a pipeline stage downstream stops this one when it stops)
    return results


def _flatten(chunks: Generator[list[Any], None, None]) -> Generator[Any, None, None]:
    try:
        for chunk in chunks:
            yield from chunk
    finally:
        chunks.close()


def _start(
    pool: _Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    options: dict[str, Any],
    ordered: bool,
    star: bool,
) -> Generator[list[Any], None, None] | None:
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
    star = star or len(iterables) > 1
    journal = Journal(os.fspath(path), function_name(fn), fsync)
    inner = {**options, "on_error": "return"}  # (on_error is applied here, in input order)
    if not journal.has_records:  # nothing to skip: the whole call runs, written batch by batch
        from .journal_fast import fresh

        chunks = fresh(pool._run, fn, iterables, star, journal, inner, call.on_error, ordered)
    else:
        source = iter(iterables[0]) if len(iterables) == 1 else zip(*iterables, strict=False)
        feed = _Feed(source, star, journal, retry_failed, call.window or MAX_DEFAULT_WINDOW)
        wrapper = (_AsyncCall if is_coroutine_function(fn) else _Call)(fn, star)
        chunks = _merge(pool, wrapper, feed, inner, call.on_error, ordered)
    weakref.finalize(chunks, journal.close)  # (an imap never iterated)
    return chunks


def _merge(
    pool: _Pool, wrapper: _Call, feed: _Feed, options: dict[str, Any], on_error: str, ordered: bool
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
    if not any(type(value) is Failure for value in chunk):
        return chunk
    out = []
    for value in chunk:
        if type(value) is not Failure:
            out.append(value)
        elif on_error == "raise":
            raise value.error
        elif on_error == "return":
            out.append(value.error)
    return out


def _record(feed: _Feed, values: list[Any], on_error: str) -> list[tuple[int, list[Any]]]:
    """Append one batch of fresh results to the journal; them, in runs of adjacent positions."""
    pending, pack, after = feed.pending, RECORD.pack, -1
    parts: list[bytes] = []
    chunks: list[tuple[int, list[Any]]] = []
    chunk: list[Any] | None = None
    for result in values:
        if type(result) is tuple:
            index, value, blob = result
            position, key, _ = pending.pop(index)
            parts += (pack(key, OK, len(blob)), blob)
        else:
            index = _task_of(result, pending)
            position, key, args = pending.pop(index)
            _renote(result, index, position, args)
            if on_error == "return":
                blob = pickle.dumps(pack_failure(result), protocol=5)
                parts += (pack(key, FAILED, len(blob)), blob)
            elif on_error == "raise":
                feed.stop = True  # nothing after the first failure is needed
            value = Failure(result)
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
