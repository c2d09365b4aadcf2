"""``fenfa run --pipe`` and ``--pipe-part``: input cut into blocks, each block a job's stdin.

A *record* ends where ``--recend`` (default a newline) is followed by
``--recstart`` (default nothing); given ``--recstart`` alone, ``--recend`` is
empty (GNU parallel's rule). Blocks are whole records:

- ``--pipe -N N``: N records a job;
- ``--pipe --block SIZE`` (default 1M): as many whole records as fit in SIZE
  bytes, and a record longer than SIZE alone (GNU parallel then raises its
  block size and warns; the jobs get the same records);
- ``--pipe-part -a FILE --block SIZE``: the file is cut near every SIZE bytes
  by seeking, each cut moved on to the first record end at or after it, as
  GNU parallel 20221122 cuts it. Only the bytes of a job's part are read,
  when the job is made.

Blocks are produced lazily (the run's window holds a few per worker), so the
memory used is a few blocks, whatever the input's size.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator
from typing import BinaryIO

from .run_args import Options, UsageError

READ_SIZE = 1 << 16


def separators(options: Options) -> tuple[bytes, bytes]:
    """(recend, recstart) as bytes, with GNU parallel's defaults."""
    recend = options.recend
    if recend is None:
        recend = "" if options.recstart else "\n"
    if not recend and not options.recstart:
        raise UsageError("--recend and --recstart are both empty: no record would ever end")
    code = "utf-8", "surrogateescape"
    return recend.encode(*code), options.recstart.encode(*code)


def block_key(block: bytes) -> str:
    """What names a block for the journals (--resume): its content, not its position."""
    return hashlib.blake2b(block, digest_size=8).hexdigest()


def blocks(options: Options) -> Iterator[bytes]:
    """Every job's stdin, in order."""
    recend, recstart = separators(options)
    boundary = re.compile(re.escape(recend) + b"(?=" + re.escape(recstart) + b")")
    path = options.sources[0].items[0] if options.sources else "-"
    if options.pipe_part:
        yield from _parts(path, options.block, boundary)
        return
    try:
        stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if options.max_args is not None:
            yield from _records(stream, options.max_args, boundary)
        else:
            yield from _sized(stream, options.block, boundary, (recend, recstart))
    finally:
        if path != "-":
            stream.close()


def _ends(buffer: bytes, boundary: re.Pattern[bytes], start: int = 0) -> Iterator[int]:
    """Where records end in ``buffer`` (never at 0: the input's start is no boundary)."""
    for match in boundary.finditer(buffer, start):
        if match.end() > 0:
            yield match.end()


def _records(stream: BinaryIO, count: int, boundary: re.Pattern[bytes]) -> Iterator[bytes]:
    buffer = b""
    found = scanned = 0  # record ends seen in the buffer, and up to where
    while True:
        chunk = stream.read(READ_SIZE)
        buffer += chunk
        while True:  # every whole block of `count` records in the buffer
            end = None
            for end in _ends(buffer, boundary, scanned):
                found, scanned = found + 1, end
                if found == count:
                    break
            if found < count:
                break
            assert end is not None
            yield buffer[:end]
            buffer, found, scanned = buffer[end:], 0, 0
        if not chunk:
            if buffer:
                yield buffer
            return


def _sized(
    stream: BinaryIO, size: int, boundary: re.Pattern[bytes], separators: tuple[bytes, bytes]
) -> Iterator[bytes]:
    buffer = b""
    eof = False
    lookahead = len(boundary.pattern)  # (enough to see a --recstart past the block's end)
    while True:
        while not eof and len(buffer) <= size + lookahead:
            chunk = stream.read(max(READ_SIZE, size - len(buffer) + 1))
            eof = not chunk
            buffer += chunk
        if eof and len(buffer) <= size:
            if buffer:
                yield buffer
            return
        # The last record end within `size` bytes; if none, the first one after.
        cut = _last_end(buffer, size, *separators)
        if not cut:
            cut = next(_ends(buffer, boundary, max(0, size - len(separators[0]) + 1)), 0)
        if not cut:
            if eof:
                yield buffer
                return
            chunk = stream.read(READ_SIZE)  # a record longer than the block: read on
            eof = not chunk
            buffer += chunk
            continue
        yield buffer[:cut]
        buffer = buffer[cut:]


def _last_end(buffer: bytes, size: int, recend: bytes, recstart: bytes) -> int:
    """The last record end at or before ``size`` (0: none), found from the end, in C."""
    if not recend:  # (records start at --recstart: an end is where one starts)
        return max(0, buffer.rfind(recstart, 1, size + len(recstart)))
    high = size
    while (found := buffer.rfind(recend, 0, high)) >= 0:
        end = found + len(recend)
        if buffer.startswith(recstart, end):
            return end
        high = end - 1
    return 0


def _parts(path: str, size: int, boundary: re.Pattern[bytes]) -> Iterator[bytes]:
    try:
        source = open(path, "rb")  # noqa: SIM115
        total = os.fstat(source.fileno()).st_size
    except OSError as exc:
        raise UsageError(f"--pipe-part: cannot read {path}: {exc.strerror or exc}") from None
    with source:
        if not source.seekable():
            raise UsageError(f"--pipe-part: {path} is not seekable (use --pipe)")
        start = 0
        while start < total:
            end = _next_end(source, start + size, total, boundary)
            source.seek(start)
            yield source.read(end - start)
            start = end


def _next_end(source: BinaryIO, at: int, total: int, boundary: re.Pattern[bytes]) -> int:
    """The first record end whose separator starts at or after ``at`` (or the file's end)."""
    window = READ_SIZE
    while at < total:
        source.seek(at)
        data = source.read(window)
        for match in boundary.finditer(data):
            if match.end() < len(data) or at + len(data) >= total:
                return at + match.end()
        if at + len(data) >= total:
            break
        window *= 2  # (a separator across the window's end: read more from the same place)
    return total
