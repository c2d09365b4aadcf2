"""``fenfa map MODULE:FUNC INPUT.jsonl -o OUTPUT.jsonl``: a function over a file of records.

Each non-blank line of INPUT is one JSON record; FUNC gets the decoded value
as its one argument, on the pool's workers, and each record gets one line in
OUTPUT, as soon as its result arrives::

    {"index": 3, "key": "9f0c...", "input": <the record>, "output": <what FUNC returned>}
    {"index": 4, "key": "51ab...", "input": <the record>, "error": {"type": ..., "message": ...}}

How the data flows (one thread, the caller's, reads and writes; auto's
probe threads may pull a few records while it measures, one at a time;
``_Records`` and ``_Writer`` are in :mod:`.map_records`)::

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
import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from .. import _shadow
from ..backends import default_workers
from ..journal import Journal, JournalError, Kind, check, open_journal, read_json_records
from ..pool import Pool
from ..tasks import is_coroutine_function
from ..window import MAX_DEFAULT_WINDOW
from .map_records import PROG, _AsyncCall, _Call, _Records, _Writer
from .target import BadTarget, add_target, load_target, one_line, output_to_stderr

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
        raise BadTarget(f"cannot read {path!r}: {exc.strerror or one_line(exc)}") from exc


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
            redirect.enter_context(output_to_stderr())
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


MAP_DESCRIPTION = """\
Run MODULE:FUNC on each record of INPUT.jsonl (one JSON value per line; blank
lines are skipped) and write one line per record to OUTPUT.jsonl as each
result arrives:
  {"index": 0, "key": "...", "input": RECORD, "output": RESULT}
  {"index": 1, "key": "...", "input": RECORD, "error": {"type": ..., "message": ...}}
The input is streamed (memory stays flat), and a run stopped by a crash or
Ctrl-C goes on where it stopped with --resume: nothing lost, nothing done twice."""

MAP_EPILOG = """\
examples:
  fenfa map work:square in.jsonl -o out.jsonl -k
      one line per record in out.jsonl, in input order
  fenfa map work.py:fetch urls.jsonl -o out.jsonl --backend thread -j 32 --on-error return
      32 threads; a failed record gets an error line and the run goes on
  fenfa map work:square in.jsonl -o out.jsonl --resume
      after a crash: the records with a line in out.jsonl are skipped

exit status:
  0    every record has its output line
  1    a record failed (whatever --on-error says), or the run stopped at a failure
  2    bad usage, a target that cannot be imported, an unusable INPUT or OUTPUT
  130  interrupted (Ctrl-C): what was written stays; --resume goes on from there
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "map",
        help="run a Python function over a file of JSON records, resumably",
        description=MAP_DESCRIPTION,
        epilog=MAP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target(parser, "it gets each record's value as its one argument")
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
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="where FUNC runs (default auto: measured on the first records; dask: the "
        "cluster at DASK_SCHEDULER_ADDRESS, or a local one)",
    )
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
