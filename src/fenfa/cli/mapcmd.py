"""``fenfa map MODULE:FUNC INPUT.jsonl -o OUTPUT.jsonl``: a function over a file of records.

Each non-blank line of INPUT is one JSON record; FUNC gets the decoded value
as its one argument, on the pool's workers, and each record gets one line in
OUTPUT, as soon as its result arrives::

    {"index": 3, "key": "9f0c...", "input": <the record>, "output": <what FUNC returned>}
    {"index": 4, "key": "51ab...", "input": <the record>, "error": {"type": ..., "message": ...}}

How the data flows (one thread, the caller's, reads and writes; auto's
probe threads may pull a few records while it measures, one at a time)::

    INPUT ─line by line─▶ _Records ─(position, value)─▶ Pool.imap_unordered / imap
      (skips blank lines and    │                         │
       keys already done;       │ pending: position ─▶    │ (position, output)
       decodes the JSON)        ▼ (index, key, text)      ▼ or an exception
                             _Writer ◀──────────────────────
                                │ one Journal.write per record
                                ▼
                             OUTPUT (append-only)

Guarantees:

- **Flat memory.** The input is a generator over the file: a line is read
  only when the pool has room for it (its window), and each result is
  written and dropped as it arrives. Only the records in flight are held.
- **Nothing lost, nothing done twice.** OUTPUT is a journal
  (:mod:`fenfa.journal`): every line is written whole, with one ``write``,
  and nothing is ever truncated. ``--resume`` skips each record whose key
  already has a complete line (output or error); a line torn by a crash is
  ignored, and the record it was about runs again. The key is a hash of the
  function's name and the record's text, not its position, so a resumed run
  whose input was reordered, or grew, still skips exactly what is done.
  Identical records share a key: each complete line covers one of them.
- **Errors are records.** ``--on-error return`` (an error line, go on),
  ``skip`` (no line, go on; ``--resume`` tries them again) or ``raise`` (the
  default: stop at the first failure with a one-line error; what was
  written before it stays, and nothing is written for the failed record, so
  ``--resume`` runs it again). A line that is not JSON is a failure of type
  ``MalformedInput``; with ``raise`` the input ends there, so every record
  before it is still run and written. A result that is not
  JSON-serialisable is a failure of type ``SerializationError``.
- Blank lines are not records: they are skipped and take no index.

Exit status: 0; 1 when a record failed (whatever ``--on-error`` says) or the
run was stopped by a failure; 2 for bad usage, a bad target or an unusable
file; 130 after Ctrl-C (as every fenfa command).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from .. import _shadow
from ..backends import default_workers
from ..errors import UnpicklableError
from ..journal import Journal, JournalError, Kind, check, job_key, open_journal, read_json_records
from ..pool import Pool
from ..tasks import is_coroutine_function
from ..window import MAX_DEFAULT_WINDOW
from .advise import BadTarget, _one_line, _output_to_stderr, load_target

PROG = "fenfa map"
ON_ERROR = ("raise", "return", "skip")
# What an OUTPUT journal looks like: an existing file that is not one is refused.
OUTPUT = Kind("a fenfa map OUTPUT", '{"index": ', frozenset({"index", "key", "input"}))
# (dask: a cluster named by DASK_SCHEDULER_ADDRESS, or a local one started for the run)
BACKEND_CHOICES = ("auto", "serial", "thread", "process", "async", "dask")

# The window (records pulled and not yet written) holds about this many bytes
# of input. A record in flight is held as its text and decoded (CPython's
# objects take 2-5x the text), so memory stays at tens of MB whatever the size
# of the file. Measured on 50 MB of 1 KB records (2 cores, thread backend):
# a window of 4,000 records ran as fast as one of 100,000 (fenfa's default
# cap, here the whole file in flight) with 27 MB of RSS instead of 90 MB.
IN_FLIGHT_BYTES = 4 << 20
# The average record size is taken from what the first read brings in.
SAMPLE_BYTES = 64 << 10
# ... and the window never shrinks below this many records per worker.
MIN_WINDOW_PER_WORKER = 4

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
            self._fail(pending, "SerializationError", f"the result is not JSON: {_one_line(exc)}")
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


# -- the command --------------------------------------------------------


def _done_keys(path: str, *, failed_too: bool) -> Counter[str]:
    """How many complete lines each key has in OUTPUT (error lines only if ``failed_too``)."""
    done: Counter[str] = Counter()
    for record in read_json_records(path):
        key = record.get("key")
        if isinstance(key, str) and ("output" in record or (failed_too and "error" in record)):
            done[key] += 1
    return done


def _window(stream: io.BufferedReader, workers: int) -> int:
    """How many records may be in flight: ``IN_FLIGHT_BYTES`` of them, by the first lines' size.

    ``peek`` reads no further than one read of the file or pipe would, so a
    slow producer on stdin is not waited for.
    """
    sample = stream.peek(SAMPLE_BYTES)[:SAMPLE_BYTES]
    per_record = max(1, len(sample) // max(1, sample.count(b"\n")))
    fits = min(MAX_DEFAULT_WINDOW, IN_FLIGHT_BYTES // per_record)
    return max(MIN_WINDOW_PER_WORKER * workers, fits)


def _open_input(path: str) -> io.BufferedReader:
    if path == "-":
        stdin = sys.stdin.buffer
        if not isinstance(stdin, io.BufferedReader):  # replaced, as by a test harness
            raise BadTarget("stdin cannot be read as bytes")
        return stdin
    try:
        # (closed by main; with a buffer size, typeshed says BinaryIO: it is this)
        return cast(io.BufferedReader, open(path, "rb", buffering=SAMPLE_BYTES))
    except OSError as exc:
        raise BadTarget(f"cannot read {path!r}: {exc.strerror or _one_line(exc)}") from exc


def _check_output(args: argparse.Namespace) -> None:
    """Refuse an unusable OUTPUT before any work (creating nothing)."""
    output = args.output
    if args.resume_failed and not args.resume:
        raise BadTarget("--resume-failed goes with --resume")
    if output == "-":
        if args.resume:
            raise BadTarget("--resume reads what is done from OUTPUT: it needs a file, not -")
        return
    exist = args.input != "-" and os.path.exists(output) and os.path.exists(args.input)
    if exist and os.path.samefile(args.input, output):
        raise BadTarget("INPUT and OUTPUT are the same file")
    try:
        check(output, OUTPUT)
    except JournalError as exc:
        raise BadTarget(str(exc)) from None
    regular = os.path.isfile(output)
    if not args.resume and regular and os.path.getsize(output) > 0:
        raise BadTarget(
            f"{output!r} exists: use --resume to go on where it stopped (it is appended to), "
            "or remove it"
        )


def _shown(output: str) -> str:
    return "stdout" if output == "-" else repr(output)


def _check_shadowing(added: list[str]) -> None:
    """A directory the target's import put on sys.path must not hide a standard module."""
    for directory in added:
        try:
            _shadow.check_directory(directory)
        except ImportError as exc:
            raise BadTarget(str(exc)) from None


def _open_output(path: str) -> Journal:
    if path == "-":
        return Journal(os.dup(sys.stdout.fileno()), None)
    try:
        return open_journal(path, OUTPUT)
    except JournalError as exc:
        raise BadTarget(str(exc)) from None


def main(args: argparse.Namespace) -> int:
    try:
        _check_output(args)
        path_before = list(sys.path)
        fn, _, code_name = load_target(args.target)
        if args.backend not in ("serial", "thread", "async"):  # (workers of their own)
            _check_shadowing([p for p in sys.path if p not in path_before])
        coroutine = is_coroutine_function(fn)
        if coroutine and args.backend not in ("auto", "async"):
            raise BadTarget(f"{code_name} is a coroutine function: use --backend async (or auto)")
        if not coroutine and args.backend == "async":
            raise BadTarget(f"{code_name} is not a coroutine function (async def): --backend async")
        done = _done_keys(args.output, failed_too=not args.resume_failed) if args.resume else None
        stream = _open_input(args.input)
        try:
            journal = _open_output(args.output)
        except BaseException:
            if stream is not sys.stdin.buffer:
                stream.close()
            raise
    except BadTarget as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    # With -o -, stdout holds the records only: what the function prints goes to stderr.
    with contextlib.ExitStack() as redirect:
        if args.output == "-":
            redirect.enter_context(_output_to_stderr())
        return _map(args, fn, coroutine, code_name, done, stream, journal)


def _map(
    args: argparse.Namespace,
    fn: Callable[[Any], Any],
    coroutine: bool,
    code_name: str,
    done: Counter[str] | None,
    stream: io.BufferedReader,
    journal: Journal,
) -> int:
    call: Callable[[tuple[int, Any]], Any] = _AsyncCall(fn) if coroutine else _Call(fn)
    kind = "async" if coroutine else "thread" if args.backend == "auto" else args.backend
    window = _window(stream, args.jobs or default_workers(kind))
    records = _Records(stream, code_name, done, stop_at_malformed=args.on_error == "raise")
    bar = args.bar if args.bar is not None else sys.stderr.isatty()
    progress: bool | dict[str, Any] = (
        {"file": sys.stderr, "desc": code_name, "unit": "record"} if bar else False
    )
    where = "" if args.input == "-" else f"{args.input} "
    writer = _Writer(journal, records, args.on_error, where)
    try:
        pool = Pool(args.backend, args.jobs)
        try:
            imap = pool.imap if args.keep_order else pool.imap_unordered
            results = imap(
                call,
                records,
                timeout=args.timeout,
                retries=args.retries,
                chunksize=args.chunksize,
                window=window,
                on_error="return",  # the writer decides, per record
                progress=progress,
            )
            try:
                for result in results:
                    try:
                        writer.take(result)
                    except OSError as exc:  # a full disk; a closed pipe (-o - | head)
                        writer.stopped = f"cannot write {_shown(args.output)}: {exc.strerror}"
                    if writer.stopped is not None:
                        break
            finally:
                getattr(results, "close", lambda: None)()  # stop the call: nothing more is read
        finally:
            # Every result is taken by now, or the call was given up (raise,
            # Ctrl-C): what may still run is a task no one waits for, like one
            # past its --timeout on a thread, which cannot be stopped. A plain
            # shutdown (`with Pool`) would join that thread however long it
            # hangs; cancel_futures gives it the backend's grace, then abandons
            # it (a daemon thread: it does not keep the process alive).
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        journal.close()
        if stream is not sys.stdin.buffer:
            stream.close()
        if writer.stopped is None and records.malformed is not None:
            number, reason = records.malformed
            writer.counts.failed += 1
            writer.stopped = f"{where}line {number}: {reason}"
        if writer.stopped is not None:
            print(f"{PROG}: {writer.stopped}", file=sys.stderr)
        print(writer.counts.summary(records.skipped), file=sys.stderr)
    return 1 if writer.stopped is not None or writer.counts.failed else 0


# -- the parser ---------------------------------------------------------


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "map",
        help="run a Python function over a file of JSON records, resumably",
        description=(
            "Run MODULE:FUNC on each record of INPUT.jsonl (one JSON value per line; blank "
            "lines are skipped) and write one line per record to OUTPUT.jsonl as each result "
            'arrives: {"index", "key", "input", "output"} or {..., "error": {"type", '
            '"message"}}. Streamed (memory stays flat), and resumable after a crash with '
            "--resume: nothing lost, nothing done twice."
        ),
    )
    parser.add_argument(
        "target",
        metavar="MODULE:FUNC",
        help="a module importable from here (or a .py file) and a function of one argument",
    )
    parser.add_argument("input", metavar="INPUT.jsonl", help="the records; - for stdin")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT.jsonl",
        required=True,
        help="where the lines go; - for stdout (then the function's own printing goes to "
        "stderr, and there is nothing to --resume from). An existing OUTPUT must be one "
        "fenfa map wrote, and is only appended to, with --resume",
    )
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    parser.add_argument(
        "-j", "--jobs", type=_at_least(1), metavar="N", help="workers (default: the backend's)"
    )
    parser.add_argument("--timeout", type=_seconds, metavar="S", help="seconds per record")
    parser.add_argument(
        "--retries", type=_at_least(0), default=0, metavar="N", help="tries again after a failure"
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="raise",
        help="raise: stop at the first failure (exit 1); return: write an error line and go on; "
        "skip: write nothing for it and go on (default: raise)",
    )
    parser.add_argument(
        "-k", "--keep-order", action="store_true", help="lines in input order (default: as done)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip records that already have a line in OUTPUT, and append to it",
    )
    parser.add_argument(
        "--resume-failed",
        action="store_true",
        help="with --resume, run records whose line is an error again (the newer line counts)",
    )
    parser.add_argument(
        "--bar",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("--chunksize", type=_at_least(1), metavar="N", help="records per batch")
    parser.set_defaults(handler=main)
