"""A ``fenfa run`` job and what came of it: the records the runner, the
journals (:mod:`.run_journal`) and the output (:mod:`.run_output`) share.

They live below all three so that none of them imports the runner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .._shell_result import ShellResult, TimedOut
from .run_template import Template


@dataclass
class Job:
    seq: int
    values: tuple[str, ...]
    key: str
    template: Template | None = None  # (packed jobs: the template of the job's shape)
    inputs: tuple[str, ...] | None = None  # (packed jobs: the inputs, as given)
    stdin: bytes | None = None  # (--pipe: the job's block)


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
    timed_out: TimedOut | None = None
    halting: bool = False  # this job's end met --halt's condition
    others_running: int = 0  # ... and this many other jobs were running then

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
        if self.timed_out is not None:
            return self.timed_out.signal or 9
        return self.result.signal or 0 if self.result is not None else 0

    @property
    def failed(self) -> bool:
        return self.result is None or self.result.returncode != 0
