"""Append-only, crash-safe journals: what ``fenfa run`` and ``fenfa map`` have done.

A journal is a text file of one record per line. Each record is written with
one ``write()`` on a file opened with ``O_APPEND`` and then flushed to the
kernel, so a record is either wholly in the file or (if the writer is killed
in the middle, or the machine stops) a *torn* last line without its newline.
Readers skip a torn line; a writer that reopens the journal first ends a
torn line with a newline, so the next record starts on a line of its own.
Nothing is ever truncated or rewritten.

Resume keys are stable: a hash of what the job is (the command template and
its input; the function and the input record), never its position, so a
resumed run whose inputs come in another order still skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["Journal", "job_key", "read_lines"]


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


class Journal:
    """An append-only journal file; ``write(line)`` puts one record in it, whole."""

    def __init__(self, path: str, *, header: str | None = None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self._fd).st_size
        if size and not _ends_with_newline(path, size):
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
