"""``fenfa run``: shell commands in parallel, GNU parallel style, and crash-safe.

The orchestrator: :mod:`.run_args` reads the command line, :mod:`.run_inputs`
makes the records and packs them into jobs, :mod:`.run_template` makes each
job's command (an input is never shell syntax), and this module runs the
jobs on a thread pool of ``-j`` workers (each in its own process group, see
:mod:`fenfa.shell`), prints each job's output whole as it ends (in input
order with ``-k``, streamed), and writes the journals (:mod:`fenfa.journal`):
``--joblog`` and ``--results`` are append-only, one whole line per record
as each job ends, and ``--resume`` skips what they record as done, by a key
of the command template and the input, not by position.

Exit status as GNU parallel: the number of failed jobs, at most 101; with
``--halt ...,fail=1`` the failing job's own exit status; 255 for bad usage,
with a one-line error.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from .. import journal
from .._shell import shell
from .._shell_result import ShellResult, TimedOut, start_guard
from ..api import imap, imap_unordered
from ..backends import usable_cores
from ..worker import current_slot
from .run_args import DEFAULT_TERMSEQ, MAX_JOBS, Evicted, Options, UsageError, parse
from .run_help import HELP, USAGE
from .run_inputs import Packer, name_fields, packed, records
from .run_jobs import Done, Job
from .run_journal import JOBLOG, JOBLOG_HEADER, RESULTS, done_keys, joblog_line, results_record
from .run_output import Printer, ResultsDir
from .run_template import Template, choose_shell, has_fields, quote_words, render

if TYPE_CHECKING:
    from .run_exec import Gate

MAX_EXIT = 101
BAD_USAGE = 255


def _refuse_off_the_plain_path(options: Options) -> None:
    """``--backend dask`` runs the plain path's call remotely: options beyond it are refused.

    (``--wd`` is not among them: the directory travels with the call.)
    """
    local_only = {
        "--line-buffer": options.line_buffer,
        "--ungroup": options.ungroup,
        "--pipe": options.pipe,
        "--memfree": options.memfree is not None,
        "--load": options.load is not None,
        "--delay": options.delay,
    }
    named = [name for name, on in local_only.items() if on]
    if named:
        raise UsageError(f"{', '.join(named)}: not available with --backend dask (jobs run there)")


class Runner:
    """Runs the jobs, writes the journals, tells the caller's loop what happened."""

    def __init__(
        self, options: Options, template: Template, run_command: Callable[..., ShellResult] = shell
    ) -> None:
        self.shell = run_command  # fenfa.shell, or the same on a dask worker (run_dask)
        if run_command is not shell:
            _refuse_off_the_plain_path(options)
        self.options = options
        self.template = template
        self.joblog = self.results = None
        self.results_dir: ResultsDir | None = None
        self.gate: Gate | None = None
        self.printer = Printer(options, template.shell)
        try:
            if options.joblog:
                self.joblog = journal.open_journal(
                    options.joblog, JOBLOG, header=JOBLOG_HEADER + "\tAttempt\tKey"
                )
            if options.results_dir:
                self.results_dir = ResultsDir(options.results or "", len(options.sources))
            elif options.results:
                self.results = journal.open_journal(options.results, RESULTS)
        except (journal.JournalError, OSError) as exc:
            self.close()
            raise UsageError(str(exc)) from None
        # --halt: set by the job that meets the condition, so no job starts
        # after it (the workers run ahead of the printing loop).
        self.stop_starting = threading.Event()
        self._lock = threading.Lock()
        self.failed = self.succeeded = 0
        self.termseq = options.termseq or DEFAULT_TERMSEQ
        self.running = 0  # jobs between their start and their last attempt's end
        gated = options.delay or options.memfree is not None or options.load is not None
        if gated:
            from .run_exec import Gate  # (imported only when an option needs it)

            self.gate = Gate(options, self.termseq)
        # Off the plain path (fenfa.shell, whose per-job cost is measured) only
        # when an option needs more of the job's process than its whole output.
        general = bool(options.line_buffer or options.ungroup or options.pipe or options.wd)
        if run_command is not shell:
            general = False  # (refused above, but for --wd, which _plain passes on)
        self._start = self._general if general or options.memfree is not None else self._plain

    def close(self) -> None:
        for log in (self.joblog, self.results):
            if log is not None:
                log.close()
        close = getattr(self.shell, "close", None)  # (run_dask's: its client)
        if close is not None:
            close()
        if self.gate is not None:
            self.gate.close()

    def _plain(self, argv: list[str], job: Job, slot: int) -> ShellResult:
        if self.options.wd:  # (only with --backend dask: locally --wd takes _general)
            return self.shell(
                argv, timeout=self.options.timeout, termseq=self.termseq, cwd=self.options.wd
            )
        return self.shell(argv, timeout=self.options.timeout, termseq=self.termseq)

    def _general(self, argv: list[str], job: Job, slot: int) -> ShellResult:
        sink = self.printer.sink(job, slot) if self.options.line_buffer else None
        from .run_exec import execute  # (imported only off the plain path)

        return execute(argv, self.options, self.termseq, job.stdin, sink, self.gate)

    def run_job(self, job: Job) -> Done:
        """A task on a worker thread: every attempt, journaled as it ends."""
        mark = current_slot()
        slot = (mark.id if mark is not None and mark.id is not None else 0) + 1
        template = job.template or self.template
        if self.stop_starting.is_set():
            return Done(job, template, slot, None, 0, time.time(), skipped=True)
        argv = template.command(job.values, job.seq, slot)
        with self._lock:
            self.running += 1
        attempt = 0
        while True:
            attempt += 1
            if self.gate is not None:
                self.gate.wait()
            start = time.time()
            error = timed_out = None
            try:
                result: ShellResult | None = self._start(argv, job, slot)
            except TimedOut as exc:
                result, timed_out = None, exc
            except Evicted:  # (--memfree: runs again, not one of its --retries)
                attempt -= 1
                continue
            except (OSError, ValueError) as exc:  # it could not start: this job fails
                result, error = None, _cannot_start(argv, exc)
            done = Done(job, template, slot, result, attempt, start, error=error)
            done.timed_out = timed_out
            if self.joblog is not None:
                self.joblog.write(joblog_line(done, time.time() - start))
            if not done.failed or attempt > self.options.retries:
                if self.results_dir is not None:
                    self.results_dir.write(done)
                if self.results is not None:
                    self.results.write(results_record(done))
                self._count(done)
                return done

    def _count(self, done: Done) -> None:
        with self._lock:
            if done.failed:
                self.failed += 1
            else:
                self.succeeded += 1
            self.running -= 1
            if not self.stop_starting.is_set() and halted(
                self.options, self.failed, self.succeeded
            ):
                self.stop_starting.set()
                done.halting, done.others_running = True, self.running


def _cannot_start(argv: list[str], exc: Exception) -> str:
    if any("\0" in arg for arg in argv):
        return "fenfa run: cannot start the command: an input holds a NUL byte"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"fenfa run: cannot start the command: {reason}"


def halted(options: Options, failed: int, succeeded: int) -> bool:
    if options.halt is None:
        return False
    _when, what, count = options.halt
    met = {"fail": failed, "success": succeeded, "done": failed + succeeded}[what]
    return met >= count


_HALT_WORDS = {
    "fail": "This job failed", "success": "This job succeeded", "done": "This job finished",
}  # fmt: skip


def _tell_halt(options: Options, done: Done) -> None:
    """GNU parallel's words, for each job that counts towards --halt."""
    assert options.halt is not None
    what = options.halt[1]
    if what == "done" or (what == "fail") == done.failed:
        print(f"fenfa run: {_HALT_WORDS[what]}:\n{done.command}", file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
    if any(arg in ("-h", "--help") for arg in itertools.takewhile(lambda a: a != ":::", argv)):
        print(HELP)
        return 0
    try:
        options = parse(argv)
        shell_path = choose_shell(options.shell, os.environ)
        stream, names = records(options) if not options.pipe else (iter(()), [])
    except UsageError as exc:
        print(f"fenfa run: {exc}\n{USAGE}", file=sys.stderr)
        return BAD_USAGE
    command = quote_words(options.command) if options.quote else " ".join(options.command)
    text = name_fields(command, names)
    if not has_fields(text) and not options.pipe:
        text += " {}"
    try:
        workers = _workers(options)
        if options.pipe:  # (a job's input is its block on stdin, not in the command)
            from .run_pipe import block_key, blocks

            template = Template(text, 0, shell_path)
            jobs = (
                Job(seq, (), journal.job_key(text, block_key(block)), stdin=block)
                for seq, block in enumerate(blocks(options), 1)
            )
        elif packed(options):
            packer = Packer(options, text, shell_path, workers)
            jobs = (
                Job(seq, values, journal.job_key(text, json.dumps(values)), template, inputs)
                for seq, (template, values, inputs) in enumerate(packer.jobs(stream), 1)
            )
            template = packer.template(1, 0)
        else:
            template = Template(text, max(1, len(options.sources)), shell_path)
            jobs = (
                Job(seq, values, journal.job_key(text, json.dumps(list(values))))
                for seq, values in enumerate(stream, 1)
            )
        return _run(options, template, jobs, workers)
    except UsageError as exc:
        print(f"fenfa run: {exc}", file=sys.stderr)
        return BAD_USAGE


def _workers(options: Options) -> int:
    if options.jobs is None:
        return usable_cores()
    if options.jobs:
        return options.jobs
    # -j 0: one per input when they are counted (::: groups), else MAX_JOBS.
    if options.sources and all(s.kind == ":::" for s in options.sources):
        total, linked = 1, len(options.sources[0].items)
        for source in options.sources[1:]:
            if source.linked:
                linked = min(linked, len(source.items))
            else:
                total, linked = total * linked, len(source.items)
        return min(MAX_JOBS, max(1, total * linked))
    return MAX_JOBS


def _progress(options: Options) -> dict[str, object] | bool:
    """--bar, --eta, --progress: one bar on stderr (done, rate, time left)."""
    if not (options.bar or options.eta):
        return False
    return {"file": sys.stderr, "unit": "job", "desc": "fenfa run"}


def _run(options: Options, template: Template, jobs: Iterator[Job], workers: int) -> int:
    if options.dry_run:
        for job in jobs:
            print((job.template or template).render(job.values, job.seq, 1))
        return 0
    run_command: Callable[..., ShellResult] = shell
    if options.backend == "dask" or options.address is not None:
        from . import run_dask  # (each job's command on a dask worker)

        remote = run_dask.connect(options)  # (unreachable: a usage error, nothing run)
        run_command, workers = remote, workers if options.jobs is not None else remote.threads
    runner = Runner(options, template, run_command)  # (the journals: refused before any job runs)
    try:
        skip = done_keys(options) if options.resume else set()
    except BaseException:
        runner.close()
        raise
    start_guard()  # before the worker threads start: it forks
    failed = 0
    status: int | None = None  # set by --halt
    call = imap if options.keep_order else imap_unordered
    results: Iterable[Done] = call(
        runner.run_job,
        runner.printer.queued(job for job in jobs if job.key not in skip),
        backend="thread",
        workers=workers,
        # (--pipe: each job holds a block of up to --block bytes; a few per worker)
        window=2 * workers if options.pipe else None,
        progress=_progress(options),
        on_error="raise",
    )
    try:
        for done in results:
            if done.skipped:
                continue
            runner.printer.emit(done)
            failed += done.failed
            if options.halt is None or status is not None:
                continue
            _tell_halt(options, done)
            if done.halting:
                when, what, count = options.halt
                status = 0 if what == "success" else min(failed, MAX_EXIT)
                if what == "fail" and count == 1 and done.exit > 0:
                    status = done.exit  # (GNU parallel: the failing job's own status)
                if when == "now":
                    break  # leaving the loop cancels the call: running jobs are killed
                if done.others_running:
                    print(
                        "fenfa run: Starting no more jobs. "
                        f"Waiting for {done.others_running} jobs to finish.",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
        runner.close()
    return min(failed, MAX_EXIT) if status is None else status


__all__ = ["main", "parse", "render"]
