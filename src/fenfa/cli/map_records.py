"""``fenfa map``'s records in flight: the input pulled lazily, each result made a line.

The two halves of the data flow drawn in :mod:`.mapcmd`: :class:`_Records`
turns INPUT's lines into ``(position, value)`` tasks (skipping blank lines
and keys already done, keeping each record's text for its output line), and
:class:`_Writer` turns each result, or failure, into that line. They live
apart from the command so that what a record *is* can be read (and tested)
without the command line and the pool around it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import UnpicklableError
from ..journal import Journal, job_key
from .target import one_line

PROG = "fenfa map"

# fenfa notes every final failure with the position of its task in the
# call's input (window.annotate); the record it stands for is found by it.
_TASK_NOTE = re.compile(r"fenfa: task (\d+) failed")


class _Malformed:
    """Stands in for a line that is not JSON, so that it keeps its place in order."""


class _Call:
    """FUNC on one ``(position, value)``: ``(position, result)``, so any order can be matched."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        position, value = item
        if isinstance(value, _Malformed):
            return position, value
        return position, self.fn(value)


class _AsyncCall:
    """As :class:`_Call`, for a coroutine function (the async backend awaits it)."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    async def __call__(self, item: tuple[int, Any]) -> tuple[int, Any]:
        position, value = item
        if isinstance(value, _Malformed):
            return position, value
        return position, await self.fn(value)


@dataclass
class _Pending:
    """A record in flight: what its output line needs."""

    index: int
    key: str
    text: str
    line: int
    malformed: str | None = None  # why the line is not JSON


class _Records:
    """The input, pulled lazily: ``(position, value)`` for each record still to do."""

    def __init__(
        self,
        lines: Iterable[bytes],
        name: str,
        done: Counter[str] | None,
        stop_at_malformed: bool,
    ) -> None:
        self._lines = lines
        self._name = name
        self._done = done
        self._stop_at_malformed = stop_at_malformed
        self.pending: dict[int, _Pending] = {}
        self.skipped = 0
        #: (line number, reason) of the line that ended the input under ``raise``.
        self.malformed: tuple[int, str] | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        index = position = 0
        for number, raw in enumerate(self._lines, 1):
            stripped = raw.strip()
            if not stripped:
                continue
            # (Bytes that are not UTF-8 are kept as they are, for the key and the error line.)
            text = stripped.decode("utf-8", "surrogateescape")
            key = job_key(self._name, text)
            done = self._done
            if done is not None and done[key] > 0:
                done[key] -= 1
                self.skipped += 1
                index += 1
                continue
            value: Any
            reason = None
            try:
                value = json.loads(stripped.decode("utf-8"))
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8: {exc.reason} at byte {exc.start}"
            except ValueError as exc:
                reason = f"not JSON: {' '.join(str(exc).split())}"
            except RecursionError:  # (json's C decoder nests as deep as the stack allows)
                reason = "not JSON that Python can read: nested too deeply"
            if reason is not None:
                if self._stop_at_malformed:
                    self.malformed = (number, reason)
                    return
                value = _Malformed()
            self.pending[position] = _Pending(index, key, text, number, reason)
            yield position, value
            index += 1
            position += 1


@dataclass
class _Counts:
    done: int = 0
    failed: int = 0

    def summary(self, skipped: int) -> str:
        return f"{PROG}: {self.done} done, {skipped} skipped (already done), {self.failed} failed"


class _Writer:
    """Turns each result into its output line; stops the run at the first failure if told."""

    def __init__(self, journal: Journal, records: _Records, on_error: str, where: str) -> None:
        self._journal = journal
        self._where = where  # "INPUT.jsonl ", or "" for stdin
        self._records = records
        self._on_error = on_error
        self.counts = _Counts()
        #: The one-line message of the failure that stopped the run (``raise``).
        self.stopped: str | None = None

    def take(self, result: Any) -> None:
        if isinstance(result, BaseException):
            pending = self._records.pending.pop(_position(result, self._records.pending))
            error = result
            self._fail(pending, _error_type(error), str(error))
            return
        position, output = result
        pending = self._records.pending.pop(position)
        if isinstance(output, _Malformed):
            assert pending.malformed is not None
            self._fail(pending, "MalformedInput", f"line {pending.line}: {pending.malformed}")
            return
        try:
            encoded = json.dumps(output)
        except (TypeError, ValueError, RecursionError) as exc:
            self._fail(pending, "SerializationError", f"the result is not JSON: {one_line(exc)}")
            return
        self._journal.write(f'{_head(pending)}, "output": {encoded}}}')
        self.counts.done += 1

    def _fail(self, pending: _Pending, kind: str, message: str) -> None:
        self.counts.failed += 1
        if self._on_error == "raise":
            self.stopped = (
                f"record {pending.index} ({self._where}line {pending.line}) failed: "
                f"{kind}: {' '.join(message.split())}"
            )
        elif self._on_error == "return":
            error = json.dumps({"type": kind, "message": message})
            self._journal.write(f'{_head(pending)}, "error": {error}}}')


def _head(pending: _Pending) -> str:
    """The output line up to its last field: index, key and input."""
    text = pending.text if pending.malformed is None else json.dumps(pending.text)
    return f'{{"index": {pending.index}, "key": "{pending.key}", "input": {text}'


def _error_type(error: BaseException) -> str:
    if isinstance(error, UnpicklableError):
        return error.type_name  # the original's type could not cross back; its name did
    return type(error).__name__


def _position(error: BaseException, pending: dict[int, _Pending]) -> int:
    """The task position fenfa noted on a failure (the latest one still pending).

    The same exception object may have failed several records (a thread
    backend, a function raising one saved instance): each adds its note.
    """
    for note in reversed(getattr(error, "__notes__", ())):
        found = _TASK_NOTE.match(note)
        if found and int(found.group(1)) in pending:
            return int(found.group(1))
    raise RuntimeError(f"{PROG}: a failure without the note of its task: {error!r}")
