"""``fenfa run``'s journals: what ``--joblog`` and ``--results FILE`` hold, and what is done.

Both are append-only (:mod:`fenfa.journal`): one whole line per record,
written as each attempt (joblog) or each job (results) ends, so a crash
leaves at most a torn last line, which is ignored. ``--resume`` reads them
back by each job's key (a hash of the command template and the input), not
its position: reordered inputs still skip what is done, and a job running
at the crash has no final record and runs again.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .. import journal
from .run_args import Options

if TYPE_CHECKING:
    from .run_jobs import Done

JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand"
# What the journals look like: a file that is not one of its kind is refused.
JOBLOG = journal.Kind("a fenfa run --joblog", JOBLOG_HEADER + "\tAttempt\tKey\n")
RESULTS = journal.Kind(
    "a fenfa run --results journal", '{"key": "', frozenset({"key", "seq", "command", "exit"})
)


def done_keys(options: Options) -> set[str]:
    """Keys of the jobs the journals record as finished (succeeded only, with --resume-failed)."""
    done: set[str] = set()
    if options.results and not options.results_dir:
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
        # (--retries N is N attempts in all; 0: no limit, so only a success is final)
        if final and (succeeded or not options.resume_failed):
            done.add(key)
    return done


def joblog_line(done: Done, runtime: float) -> str:
    """One attempt, as GNU parallel writes it, plus the Attempt and Key columns.

    Host is ``:`` (this machine), JobRuntime ``%10.3f``, Send the bytes of
    the job's stdin (--pipe), Receive the bytes of its stdout.
    """
    result = done.result
    received = len(result.stdout) if result is not None else 0
    if done.timed_out is not None:
        received = len(done.timed_out.stdout or b"")
    sent = len(done.job.stdin) if done.job.stdin is not None else 0
    command = re.sub(r"[\t\n\r\0]", " ", done.command)
    return (
        f"{done.job.seq}\t:\t{done.start:.3f}\t{runtime:10.3f}\t{sent}\t"
        f"{received}\t{done.exit}\t{done.signal}\t{command}\t{done.attempt}\t{done.job.key}"
    )


def results_record(done: Done) -> str:
    """A finished job (its last attempt) as one JSON line of --results FILE."""
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
        "timed_out": done.timed_out is not None,
    }
    return json.dumps(record, ensure_ascii=False)
