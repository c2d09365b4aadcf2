"""``fenfa run``: shell commands in parallel, GNU parallel style, and crash-safe.

    fenfa run [OPTIONS] COMMAND ::: A B C ::: X Y      (the product: A X, A Y, B X ...)
    fenfa run [OPTIONS] COMMAND :::: FILE               (one input per line)
    producer | fenfa run [OPTIONS] COMMAND              (one input per stdin line)

Replacement strings in COMMAND: ``{}`` the input, ``{.}`` without its
extension, ``{/}`` its base name, ``{//}`` its directory, ``{/.}`` base name
without extension, ``{#}`` the job's number (from 1), ``{%}`` the slot (the
worker, from 1), ``{1}`` ``{2}`` ... one input source each (``{1.}`` etc.
too). Inputs are shell-quoted where they are substituted, so a file named
``a; rm -rf ~`` is one argument, never a command. With no replacement
string the inputs are appended.

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

import itertools
import json
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
from ..shell import ShellResult, shell, start_guard
from ..worker import current_slot

USAGE = "usage: fenfa run [OPTIONS] COMMAND [::: ARGS... | :::: FILE...]  (fenfa run --help)"
MAX_EXIT = 101
BAD_USAGE = 255
# -j 0: one worker per input, up to this many.
MAX_JOBS = 256
JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"

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
            if not options.timeout > 0:
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

_FIELD = re.compile(r"\{(\d*)(\.|/|//|/\.)?\}|\{#\}|\{%\}")


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
    return _FIELD.search(template) is not None


def render(template: str, values: Sequence[str], seq: int, slot: int) -> str:
    """The command for one job: fields replaced, inputs shell-quoted."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "{#}":
            return str(seq)
        if text == "{%}":
            return str(slot)
        number, how = match.group(1), match.group(2)
        if number:
            position = int(number)
            if not 1 <= position <= len(values):
                raise UsageError(f"{text} in the command, but there are {len(values)} sources")
            value = values[position - 1]
        else:
            value = " ".join(values)
            if how is None:
                return " ".join(shlex.quote(v) for v in values)
        return shlex.quote(_transform(value, how))

    return _FIELD.sub(replace, template)


# -- jobs -------------------------------------------------------------------------


@dataclass
class Job:
    seq: int
    values: tuple[str, ...]
    key: str


@dataclass
class Done:
    job: Job
    command: str
    result: ShellResult | None  # None: timed out
    attempt: int
    start: float
    skipped: bool = False

    @property
    def exit(self) -> int:
        if self.result is None:
            return -1
        return self.result.returncode if self.result.returncode >= 0 else -1

    @property
    def signal(self) -> int:
        if self.result is None:
            return 9  # killed on its timeout
        return self.result.signal or 0

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

    def __init__(self, options: Options, template: str) -> None:
        self.options = options
        self.template = template
        self.host = socket.gethostname()
        self.joblog = (
            journal.Journal(options.joblog, header=JOBLOG_HEADER + "\tAttempt\tKey")
            if options.joblog
            else None
        )
        self.results = journal.Journal(options.results) if options.results else None
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
        command = render(self.template, job.values, job.seq, slot)
        if self.stop_starting.is_set():
            return Done(job, command, None, 0, time.time(), skipped=True)
        attempt = 0
        while True:
            attempt += 1
            start = time.time()
            try:
                result: ShellResult | None = shell(command, timeout=self.options.timeout)
            except subprocess.TimeoutExpired:
                result = None
            done = Done(job, command, result, attempt, start)
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
        command = done.command.replace("\t", " ").replace("\n", " ")
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
            "stderr": result.error_text if result is not None else "",
            "start": round(done.start, 6),
            "duration": round(result.duration, 6) if result is not None else None,
            "attempt": done.attempt,
            "timed_out": result is None,
        }
        self.results.write(json.dumps(record, ensure_ascii=False))


def _emit(done: Done) -> None:
    result = done.result
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
    template = " ".join(options.command)
    if not has_fields(template):
        template += " {}"
    try:
        return _run(options, template)
    except UsageError as exc:
        print(f"fenfa run: {exc}", file=sys.stderr)
        return BAD_USAGE


def _jobs(options: Options, template: str, skip: set[str]) -> Iterator[Job]:
    for seq, values in enumerate(inputs(options.sources), 1):
        key = journal.job_key(template, json.dumps(list(values)))
        if key not in skip:
            yield Job(seq, values, key)


def _run(options: Options, template: str) -> int:
    if options.dry_run:
        for job in _jobs(options, template, set()):
            print(render(template, job.values, job.seq, 1))
        return 0
    skip = _done_keys(options) if options.resume else set()
    workers = options.jobs if options.jobs else None
    if options.jobs == 0:
        workers = min(MAX_JOBS, max(1, _count(options.sources)))
    start_guard()  # before the worker threads start: it forks
    runner = Runner(options, template)
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
