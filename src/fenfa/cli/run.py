"""``fenfa run``: shell commands in parallel, GNU parallel style, and crash-safe.

    fenfa run [OPTIONS] COMMAND ::: A B C ::: X Y      (the product: A X, A Y, B X ...)
    fenfa run [OPTIONS] COMMAND :::: FILE               (one input per line)
    producer | fenfa run [OPTIONS] COMMAND              (one input per stdin line)

Replacement strings in COMMAND: ``{}`` the input, ``{.}`` without its
extension, ``{/}`` its base name, ``{//}`` its directory, ``{/.}`` base name
without extension, ``{#}`` the job's number (from 1), ``{%}`` the slot (the
worker, from 1), ``{1}`` ``{2}`` ... one input source each (``{1.}`` etc.
too). An input is never text the shell parses, whatever the quoting around
its field: a file named ``$(rm -rf ~)`` is one argument, never a command
(see "the template" below). With no replacement string the inputs are
appended.

Each job runs under ``/bin/sh -c`` in its own process group (see
:mod:`fenfa.shell`), on a thread pool of ``-j`` workers; its output is
printed whole when it ends (jobs never interleave), in input order with
``-k`` (streamed: a job's output is printed as soon as every job before it
has been). ``--joblog`` and ``--results`` are append-only journals written
one whole line per record as each job ends (:mod:`fenfa.journal`), and
``--resume`` skips the jobs they record as done, by a key made of the
command template and the input, not by position.

Exit status: the number of failed jobs, at most 101 (as GNU parallel); 255
for bad usage, with a one-line error.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import journal
from ..api import imap, imap_unordered
from ..backends import usable_cores
from ..shell import ShellResult, _direct, shell, start_guard
from ..worker import current_slot

USAGE = "usage: fenfa run [OPTIONS] COMMAND [::: ARGS... | :::: FILE...]  (fenfa run --help)"
MAX_EXIT = 101
BAD_USAGE = 255
# -j 0: one worker per input, up to this many.
MAX_JOBS = 256
JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
# What the journals look like: a file that is not one of its kind is refused.
JOBLOG = journal.Kind("a fenfa run --joblog", JOBLOG_HEADER + "\tAttempt\tKey\n")
RESULTS = journal.Kind(
    "a fenfa run --results journal", '{"key": "', frozenset({"key", "seq", "command", "exit"})
)

HELP = (
    __doc__
    + """
Options:
  -j, --jobs N        jobs at once (default: usable cores; 0: one per input, up to 256)
  -k, --keep-order    print outputs in input order (streamed)
  --timeout S         kill a job (its whole process group) after S seconds
  --retries N         run a failed job up to N more times (each attempt in the joblog)
  --halt WHEN,WHAT=N  now,fail=N | soon,fail=N | now,success=N
  --joblog FILE       GNU parallel's tab-separated log, plus Attempt and Key columns
  --results FILE      one JSON record per finished job (input, command, exit, signal,
                      stdout, stderr, start, duration, attempt, key)
  --resume            skip jobs the journal records as done
  --resume-failed     ... and run again those that failed
  --dry-run           print the commands, run nothing
  --bar               a progress bar on stderr

A journal (--joblog, --results) is appended to only if it is new, empty, or
already one of its kind; anything else is refused. New ones are created 0600.
"""
)


class UsageError(Exception):
    """Bad usage: printed on one line, exit status 255."""


@dataclass
class Options:
    jobs: int | None = None
    keep_order: bool = False
    timeout: float | None = None
    retries: int = 0
    halt: tuple[str, str, int] | None = None
    joblog: str | None = None
    results: str | None = None
    resume: bool = False
    resume_failed: bool = False
    dry_run: bool = False
    bar: bool = False
    command: list[str] = field(default_factory=list)
    sources: list[list[str]] = field(default_factory=list)


_WITH_VALUE = {"-j", "--jobs", "--timeout", "--retries", "--halt", "--joblog", "--results"}


def parse(argv: Sequence[str]) -> Options:
    options = Options()
    args = list(argv)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in (":::", "::::"):
        name, _, inline = args[i].partition("=")
        if name in _WITH_VALUE:
            if inline:
                value = inline
            else:
                i += 1
                if i >= len(args):
                    raise UsageError(f"{name} needs a value")
                value = args[i]
            _set_value(options, name, value)
        elif inline:
            raise UsageError(f"{name} takes no value")
        elif name in ("-k", "--keep-order"):
            options.keep_order = True
        elif name == "--resume":
            options.resume = True
        elif name == "--resume-failed":
            options.resume = options.resume_failed = True
        elif name == "--dry-run":
            options.dry_run = True
        elif name == "--bar":
            options.bar = True
        else:
            raise UsageError(f"unknown option {name}")
        i += 1
    rest = args[i:]
    separators = [n for n, arg in enumerate(rest) if arg in (":::", "::::")]
    end = separators[0] if separators else len(rest)
    options.command = rest[:end]
    if not options.command:
        raise UsageError("no command given")
    for n, start in enumerate(separators):
        stop = separators[n + 1] if n + 1 < len(separators) else len(rest)
        values = rest[start + 1 : stop]
        if not values:
            raise UsageError(f"nothing after {rest[start]}")
        if rest[start] == ":::":
            options.sources.append(values)
        else:
            lines: list[str] = []
            for path in values:
                lines.extend(_read_file(path))
            options.sources.append(lines)
    if options.resume and not (options.joblog or options.results):
        raise UsageError("--resume needs --joblog FILE or --results FILE to read what is done")
    return options


def _set_value(options: Options, name: str, value: str) -> None:
    try:
        if name in ("-j", "--jobs"):
            options.jobs = int(value)
            if options.jobs < 0:
                raise ValueError
        elif name == "--timeout":
            options.timeout = float(value)
            if not 0 < options.timeout < math.inf:
                raise ValueError
        elif name == "--retries":
            options.retries = int(value)
            if options.retries < 0:
                raise ValueError
        elif name == "--halt":
            options.halt = _parse_halt(value)
        elif name == "--joblog":
            options.joblog = value
        elif name == "--results":
            options.results = value
    except ValueError:
        raise UsageError(f"bad value for {name}: {value!r}") from None


def _parse_halt(value: str) -> tuple[str, str, int]:
    match = re.fullmatch(r"(now|soon),(fail|success)=(\d+)", value)
    if not match or int(match.group(3)) < 1:
        raise ValueError(value)
    return match.group(1), match.group(2), int(match.group(3))


def _read_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as source:
            return [line.rstrip("\n") for line in source]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


# -- the template -----------------------------------------------------------------
#
# An input is never text the shell parses. A command with shell syntax runs as
# ``/bin/sh -c SCRIPT /bin/sh VALUE...``: each field in SCRIPT is a reference to
# a positional parameter, written for the quoting it stands in (bare: "${1}";
# inside "...": ${1}; inside '...': '"${1}"', closing and reopening the quotes;
# in $((...)): ${1}), and the values travel as arguments. A plain word list
# (no shell syntax, every field bare) is exec'd directly with the values in
# its argument list, as the shell would have run it, without paying for the
# shell. Either way a file named ``$(rm -rf ~)`` is one argument. What is
# shown (--dry-run, the journals) is the same command with the values quoted
# for where they stand: it does what the run does.

_FIELD = re.compile(r"\{(\d*)(\.|/|//|/\.)?\}|\{#\}|\{%\}")
_SH = "/bin/sh"


def _transform(value: str, how: str | None) -> str:
    if how is None:
        return value
    if how == ".":
        return os.path.splitext(value)[0]
    if how == "/":
        return os.path.basename(value)
    if how == "//":
        return os.path.dirname(value) or "."
    return os.path.splitext(os.path.basename(value))[0]  # "/."


def has_fields(template: str) -> bool:
    return any(isinstance(piece, _Field) for piece in _scan(template))


@dataclass(frozen=True)
class _Field:
    text: str  # as written: "{}", "{2/.}", "{#}"
    source: int | None  # 1-based; None: every source ("{}", "{.}" ...)
    how: str | None  # the transform: None . / // /.
    quoting: str  # where it stands: "bare", "double", "single" or "arith"


def _scan(template: str) -> Iterator[str | _Field]:
    """The template as literal text and fields, each field with the quoting around it.

    Follows POSIX sh quoting: '...', "...", backslashes, $(...), `...`,
    $((...)). (A field it places wrongly, say in a here-document, is still
    only a parameter reference: the value cannot become shell syntax.)
    """
    # What the text at i is inside, innermost last ("cmd": bare text in $(...),
    # "tick": in `...`), and for $(...) and $((...)) how many parentheses are open.
    inside, depth = ["bare"], [0]
    i = start = 0
    n = len(template)
    while i < n:
        quoting = inside[-1]
        char = template[i]
        if quoting == "single":
            if char == "'":
                _leave(inside, depth)
                i += 1
                continue
        elif char == "\\":
            i += 2  # an escaped character (an escaped "{" starts no field)
            continue
        elif template.startswith("$(", i):  # $((...)) arithmetic, or $(...) a command
            arith = template.startswith("$((", i)
            _enter(inside, depth, "arith" if arith else "cmd", 2 if arith else 1)
            i += 3 if arith else 2
            continue
        elif char == "`":
            if quoting == "tick":
                _leave(inside, depth)
            else:
                _enter(inside, depth, "tick", 0)
            i += 1
            continue
        elif quoting == "double":
            if char == '"':
                _leave(inside, depth)
                i += 1
                continue
        elif char in "()" and quoting in ("arith", "cmd"):
            depth[-1] += 1 if char == "(" else -1
            if depth[-1] == 0:
                _leave(inside, depth)
            i += 1
            continue
        elif quoting != "arith" and char in "'\"":
            _enter(inside, depth, "single" if char == "'" else "double", 0)
            i += 1
            continue
        match = _FIELD.match(template, i) if char == "{" else None
        if match is None:
            i += 1
            continue
        if start < i:
            yield template[start:i]
        text = match.group(0)
        number, how = match.group(1), match.group(2)
        where = "bare" if quoting in ("cmd", "tick") else quoting
        yield _Field(text, int(number) if number else None, how, where)
        i = start = match.end()
    if start < n:
        yield template[start:]


def _enter(inside: list[str], depth: list[int], quoting: str, parentheses: int) -> None:
    inside.append(quoting)
    depth.append(parentheses)


def _leave(inside: list[str], depth: list[int]) -> None:
    if len(inside) > 1:  # (an unbalanced closer is the shell's error to report)
        inside.pop()
        depth.pop()


def _quote(value: str, quoting: str) -> str:
    """``value`` written so that the shell reads it back, where it stands (for display)."""
    if quoting == "bare":
        return shlex.quote(value)
    if quoting == "single":
        return value.replace("'", "'\\''")
    return re.sub(r'([\\$`"])', r"\\\1", value)  # inside "..." (and $((...)))


class Template:
    """A command template, compiled once: how each job's command is made and shown."""

    def __init__(self, template: str, sources: int) -> None:
        self.template = template
        self.sources = sources
        self.pieces = list(_scan(template))
        fields = [p for p in self.pieces if isinstance(p, _Field)]
        for f in fields:
            if f.source is not None and not 1 <= f.source <= sources:
                raise UsageError(f"{f.text} in the command, but there are {sources} sources")
        # Positional parameters: the sources' values, then each transformed value.
        self.derived: list[tuple[int | None, str]] = list(
            dict.fromkeys((f.source, f.how) for f in fields if f.how is not None)
        )
        self.argv = self._words()
        self.script = "".join(self._reference(p) for p in self.pieces)

    def _parameters(self, f: _Field) -> list[int]:
        if f.how is not None:
            return [self.sources + 1 + self.derived.index((f.source, f.how))]
        return [f.source] if f.source is not None else list(range(1, self.sources + 1))

    def _reference(self, piece: str | _Field) -> str:
        if isinstance(piece, str):
            return piece
        if piece.text in ("{#}", "{%}"):
            return piece.text  # (replaced by digits per job: safe in any quoting)
        numbers = self._parameters(piece)
        if piece.quoting == "bare":
            return " ".join(f'"${{{k}}}"' for k in numbers)
        joined = " ".join(f"${{{k}}}" for k in numbers)
        return f"'\"{joined}\"'" if piece.quoting == "single" else joined

    def _words(self) -> list[list[str | _Field]] | None:
        """The template as words of text and fields, if it can be exec'd without a shell."""
        if any(isinstance(p, _Field) and p.quoting != "bare" for p in self.pieces):
            return None
        marks: dict[str, _Field] = {}
        text = ""
        for piece in self.pieces:
            if isinstance(piece, str):
                text += piece
            else:
                mark = f"\ue000{len(marks)}\ue001"  # (private-use characters: plain words)
                marks[mark] = piece
                text += mark
        if _direct(text) is None:  # shell syntax, or not a program on PATH
            return None
        words = shlex.split(text)
        if "\ue000" in words[0]:
            return None  # the program is an input: let the shell find it
        split = re.compile("(\ue000\\d+\ue001)")
        return [
            [marks.get(part, part) for part in split.split(word) if part] or [""] for word in words
        ]

    def _values(self, f: _Field, values: Sequence[str], seq: int, slot: int) -> list[str]:
        if f.text == "{#}":
            return [str(seq)]
        if f.text == "{%}":
            return [str(slot)]
        if f.source is not None:
            return [_transform(values[f.source - 1], f.how)]
        if f.how is None:
            return list(values)
        return [_transform(" ".join(values), f.how)]

    def command(self, values: Sequence[str], seq: int, slot: int) -> list[str]:
        """The argument list to run: the program and its arguments, or sh -c and the values."""
        if self.argv is not None:
            argv: list[str] = []
            for word in self.argv:
                argv.append("")
                for piece in word:
                    if isinstance(piece, str):
                        argv[-1] += piece
                        continue
                    first, *more = self._values(piece, values, seq, slot)
                    argv[-1] += first
                    argv.extend(more)
            return argv
        script = self.script
        if "{#}" in script or "{%}" in script:
            script = script.replace("{#}", str(seq)).replace("{%}", str(slot))
        derived = [
            _transform(values[s - 1] if s is not None else " ".join(values), how)
            for s, how in self.derived
        ]
        return [_SH, "-c", script, _SH, *values, *derived]

    def render(self, values: Sequence[str], seq: int, slot: int) -> str:
        """The command as text, each value quoted for where it stands (what is shown)."""
        out = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            shown = self._values(piece, values, seq, slot)
            if piece.quoting == "bare":
                out.append(" ".join(_quote(v, "bare") for v in shown))
            else:
                out.append(_quote(" ".join(shown), piece.quoting))
        return "".join(out)


def render(template: str, values: Sequence[str], seq: int, slot: int) -> str:
    """The command for one job as text, values quoted where they stand."""
    return Template(template, len(values)).render(values, seq, slot)


# -- jobs -------------------------------------------------------------------------


@dataclass
class Job:
    seq: int
    values: tuple[str, ...]
    key: str


@dataclass
class Done:
    job: Job
    template: Template
    slot: int
    result: ShellResult | None  # None: timed out, or could not start (error)
    attempt: int
    start: float
    skipped: bool = False
    error: str | None = None  # why the command could not start

    @functools.cached_property
    def command(self) -> str:
        """The command as shown (journals, messages): computed only when one needs it."""
        return self.template.render(self.job.values, self.job.seq, self.slot)

    @property
    def exit(self) -> int:
        if self.result is None:
            return -1
        return self.result.returncode if self.result.returncode >= 0 else -1

    @property
    def signal(self) -> int:
        if self.result is None and self.error is None:
            return 9  # killed on its timeout
        return self.result.signal or 0 if self.result is not None else 0

    @property
    def failed(self) -> bool:
        return self.result is None or self.result.returncode != 0


def inputs(sources: list[list[str]]) -> Iterator[tuple[str, ...]]:
    if sources:
        yield from itertools.product(*sources)
        return
    for line in sys.stdin:
        yield (line.rstrip("\n"),)


def _done_keys(options: Options) -> set[str]:
    """Keys of the jobs the journals record as finished (succeeded only, with --resume-failed)."""
    done: set[str] = set()
    if options.results:
        for record in journal.read_json_records(options.results):
            key = record.get("key")
            if isinstance(key, str) and (not options.resume_failed or record.get("exit") == 0):
                done.add(key)
        return done
    assert options.joblog is not None
    for line in journal.read_lines(options.joblog):
        columns = line.split("\t")
        if len(columns) < 11 or columns[0] == "Seq":
            continue
        exit_value, attempt, key = columns[6], columns[9], columns[10]
        succeeded = exit_value == "0"
        final = succeeded or (attempt.isdigit() and int(attempt) > options.retries)
        if final and (succeeded or not options.resume_failed):
            done.add(key)
    return done


class Runner:
    """Runs the jobs, writes the journals, tells the caller's loop what happened."""

    def __init__(self, options: Options, template: Template) -> None:
        self.options = options
        self.template = template
        self.host = socket.gethostname()
        self.joblog = self.results = None
        try:
            if options.joblog:
                self.joblog = journal.open_journal(
                    options.joblog, JOBLOG, header=JOBLOG_HEADER + "\tAttempt\tKey"
                )
            if options.results:
                self.results = journal.open_journal(options.results, RESULTS)
        except journal.JournalError as exc:
            self.close()
            raise UsageError(str(exc)) from None
        # --halt: set by the job that meets the condition, so no job starts
        # after it (the workers run ahead of the printing loop).
        self.stop_starting = threading.Event()
        self._lock = threading.Lock()
        self.failed = self.succeeded = 0

    def close(self) -> None:
        for log in (self.joblog, self.results):
            if log is not None:
                log.close()

    def run_job(self, job: Job) -> Done:
        """A task on a worker thread: every attempt, journaled as it ends."""
        mark = current_slot()
        slot = (mark.id if mark is not None and mark.id is not None else 0) + 1
        if self.stop_starting.is_set():
            return Done(job, self.template, slot, None, 0, time.time(), skipped=True)
        argv = self.template.command(job.values, job.seq, slot)
        attempt = 0
        while True:
            attempt += 1
            start = time.time()
            error = None
            try:
                result: ShellResult | None = shell(argv, timeout=self.options.timeout)
            except subprocess.TimeoutExpired:
                result = None
            except (OSError, ValueError) as exc:  # it could not start: this job fails
                result, error = None, _cannot_start(argv, exc)
            done = Done(job, self.template, slot, result, attempt, start, error=error)
            self._log(done, time.time() - start)
            if not done.failed or attempt > self.options.retries:
                self._record(done)
                self._count(done)
                return done

    def _count(self, done: Done) -> None:
        with self._lock:
            if done.failed:
                self.failed += 1
            else:
                self.succeeded += 1
            halt = self.options.halt
            if halt is not None:
                _when, what, count = halt
                if (self.failed if what == "fail" else self.succeeded) >= count:
                    self.stop_starting.set()

    def _log(self, done: Done, runtime: float) -> None:
        if self.joblog is None:
            return
        result = done.result
        sent = 0
        received = len(result.stdout) + len(result.stderr) if result is not None else 0
        command = re.sub(r"[\t\n\r\0]", " ", done.command)
        self.joblog.write(
            f"{done.job.seq}\t{self.host}\t{done.start:.3f}\t{runtime:.3f}\t{sent}\t"
            f"{received}\t{done.exit}\t{done.signal}\t{command}\t{done.attempt}\t{done.job.key}"
        )

    def _record(self, done: Done) -> None:
        if self.results is None:
            return
        result = done.result
        record = {
            "key": done.job.key,
            "seq": done.job.seq,
            "input": list(done.job.values),
            "command": done.command,
            "exit": done.exit,
            "signal": done.signal,
            "stdout": result.text if result is not None else "",
            "stderr": result.error_text if result is not None else done.error or "",
            "start": round(done.start, 6),
            "duration": round(result.duration, 6) if result is not None else None,
            "attempt": done.attempt,
            "timed_out": result is None and done.error is None,
        }
        self.results.write(json.dumps(record, ensure_ascii=False))


def _cannot_start(argv: list[str], exc: Exception) -> str:
    if any("\0" in arg for arg in argv):
        return "fenfa run: cannot start the command: an input holds a NUL byte"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"fenfa run: cannot start the command: {reason}"


def _emit(done: Done) -> None:
    result = done.result
    if done.error is not None:
        print(f"{done.error} (job {done.job.seq}: {done.command})", file=sys.stderr, flush=True)
        return
    if result is None:
        print(
            f"fenfa run: job {done.job.seq} timed out after {done.attempt} attempt(s): "
            f"{done.command}",
            file=sys.stderr,
            flush=True,
        )
        return
    if result.stdout:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
    if result.stderr:
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()


def main(argv: Sequence[str]) -> int:
    if any(
        arg in ("-h", "--help")
        for arg in itertools.takewhile(lambda a: a not in (":::", "::::"), argv)
    ):
        print(HELP)
        return 0
    try:
        options = parse(argv)
    except UsageError as exc:
        print(f"fenfa run: {exc}\n{USAGE}", file=sys.stderr)
        return BAD_USAGE
    text = " ".join(options.command)
    if not has_fields(text):
        text += " {}"
    try:
        return _run(options, Template(text, max(1, len(options.sources))))
    except UsageError as exc:
        print(f"fenfa run: {exc}", file=sys.stderr)
        return BAD_USAGE


def _jobs(options: Options, template: Template, skip: set[str]) -> Iterator[Job]:
    for seq, values in enumerate(inputs(options.sources), 1):
        key = journal.job_key(template.template, json.dumps(list(values)))
        if key not in skip:
            yield Job(seq, values, key)


def _run(options: Options, template: Template) -> int:
    if options.dry_run:
        for job in _jobs(options, template, set()):
            print(template.render(job.values, job.seq, 1))
        return 0
    runner = Runner(options, template)  # (the journals: refused before any job runs)
    try:
        skip = _done_keys(options) if options.resume else set()
    except BaseException:
        runner.close()
        raise
    workers = options.jobs if options.jobs else None
    if options.jobs == 0:
        workers = min(MAX_JOBS, max(1, _count(options.sources)))
    start_guard()  # before the worker threads start: it forks
    failed = succeeded = 0
    call = imap if options.keep_order else imap_unordered
    results: Iterable[Done] = call(
        runner.run_job,
        _jobs(options, template, skip),
        backend="thread",
        workers=workers or usable_cores(),
        progress={"file": sys.stderr, "unit": "job", "desc": "fenfa run"} if options.bar else False,
        on_error="raise",
    )
    try:
        for done in results:
            if done.skipped:
                continue
            _emit(done)
            failed += done.failed
            succeeded += not done.failed
            if options.halt is not None and options.halt[0] == "now":
                _when, what, count = options.halt
                if (failed if what == "fail" else succeeded) >= count:
                    break  # leaving the loop cancels the call: running jobs are killed
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        runner.close()
    return min(failed, MAX_EXIT)


def _count(sources: list[list[str]]) -> int:
    if not sources:
        return MAX_JOBS
    total = 1
    for source in sources:
        total *= len(source)
    return total


__all__ = ["main", "parse", "render"]
