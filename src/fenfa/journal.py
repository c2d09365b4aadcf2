"""Append-only, crash-safe journals: what ``fenfa run`` and ``fenfa map`` have done.

A journal is a text file of one record per line. Each record is written with
one ``write()`` on a file opened with ``O_APPEND`` and then flushed to the
kernel, so a record is either wholly in the file or (if the writer is killed
in the middle, or the machine stops) a *torn* last line without its newline.
Readers skip a torn line; a writer that reopens the journal first ends a
torn line with a newline, so the next record starts on a line of its own.
Nothing is ever truncated or rewritten.

One rule for every journal: it is appended to only if it is empty, new, or
already a journal of the same kind (a ``fenfa run --joblog``, a ``fenfa run
--results``, a ``fenfa map`` OUTPUT), judged by its first line; any other
file, a directory, a journal of another kind, is refused (:class:`JournalError`)
before any work starts. A new journal is created ``0600``: it holds what the
jobs printed, which may be private.

Resume keys are stable: a hash of what the job is (the command template and
its input; the function and the input record), never its position, so a
resumed run whose inputs come in another order still skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Journal", "JournalError", "Kind", "check", "job_key", "open_journal", "read_lines"]

# A journal's first line, when it is read to tell its kind: records hold whole
# outputs and may be long, so beyond this only its beginning is looked at.
FIRST_LINE_BYTES = 1 << 20


class JournalError(Exception):
    """A path that cannot be (or is not) a journal of the kind wanted: a one-line reason."""


@dataclass(frozen=True)
class Kind:
    """What a journal of one kind looks like: how it begins, and its records' fields."""

    name: str  # for errors: "a fenfa run --joblog"
    begins: str  # the first characters of every such journal
    fields: frozenset[str] = frozenset()  # a JSON record's keys (none: not JSON)

    def accepts(self, head: bytes, complete: bool) -> bool:
        """Whether a file beginning with ``head`` (its first line, or its torn start) is one."""
        text = head.decode("utf-8", "surrogateescape")
        n = min(len(text), len(self.begins))
        if text[:n] != self.begins[:n]:
            return False
        if not complete or not self.fields:
            return True
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            return False
        return isinstance(record, dict) and self.fields <= record.keys()


def job_key(*parts: str) -> str:
    """A stable key for a job: 16 hex digits of BLAKE2b over its parts."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = part.encode("utf-8", "surrogateescape")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def read_lines(path: str) -> Iterator[str]:
    """The complete lines of a journal (a torn last line is left out)."""
    try:
        with open(path, "rb") as journal:
            for raw in journal:
                if not raw.endswith(b"\n"):
                    return  # torn: the writer died in the middle of it
                yield raw[:-1].decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return


def read_json_records(path: str) -> Iterator[dict[str, Any]]:
    """The complete JSON records of a journal; lines that do not parse are skipped."""
    for line in read_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def _why_not(fd: int, path: str, kind: Kind) -> str | None:
    """Why the open file ``fd`` cannot be appended to as a journal of ``kind``; None if it can."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        return None  # new or empty; or a device or pipe (/dev/null, /dev/stderr): written as is
    with open(path, "rb") as journal:
        head = journal.readline(FIRST_LINE_BYTES)
    complete = head.endswith(b"\n")
    if kind.accepts(head.rstrip(b"\n") if complete else head, complete):
        return None
    return f"{path!r} exists and is not {kind.name}: refusing to append to it (remove it?)"


def _describe(path: str, exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return f"{path!r} is a directory"
    return f"cannot write {path!r}: {exc.strerror or exc}"


def check(path: str, kind: Kind) -> None:
    """Raise :class:`JournalError` unless ``path`` can be opened as a journal of ``kind``.

    Creates nothing: for a command that has more to check before it writes.
    """
    if os.path.isdir(path):
        raise JournalError(f"{path!r} is a directory")
    if not os.path.lexists(path):
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise JournalError(f"cannot write {path!r}: no directory {parent!r}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise JournalError(f"cannot write {path!r}: the directory is not writable")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
    except OSError as exc:
        raise JournalError(_describe(path, exc)) from None
    try:
        reason = _why_not(fd, path, kind)
    finally:
        os.close(fd)
    if reason is not None:
        raise JournalError(reason)


def open_journal(path: str, kind: Kind, *, header: str | None = None) -> Journal:
    """Open (or create, ``0600``) the journal at ``path``; :class:`JournalError` if unusable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise JournalError(_describe(path, exc)) from None
    try:
        reason = _why_not(fd, path, kind)
    except BaseException:
        os.close(fd)
        raise
    if reason is not None:
        os.close(fd)
        raise JournalError(reason)
    return Journal(fd, path, header=header)


class Journal:
    """An append-only journal on an open descriptor; ``write(line)`` puts one record in it, whole.

    Made by :func:`open_journal`, or on any writable descriptor with no path
    (``fenfa map -o -``: a copy of stdout), which it then owns.
    """

    def __init__(self, fd: int, path: str | None, *, header: str | None = None) -> None:
        self.path = path  # None: a stream (stdout), whatever was written to it before
        self._fd = fd
        info = os.fstat(fd)
        size = info.st_size if stat.S_ISREG(info.st_mode) and path is not None else 0
        if path is not None and size and not _ends_with_newline(path, size):
            os.write(self._fd, b"\n")  # end the torn line: it stays, unread
        if header is not None and size == 0:
            self.write(header)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "surrogateescape")
        written = os.write(self._fd, data)
        while written < len(data):  # (a regular file takes it whole; be sure)
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_with_newline(path: str, size: int) -> bool:
    with open(path, "rb") as journal:
        journal.seek(size - 1)
        return journal.read(1) == b"\n"
