"""``fenfa run``'s command line: options, bundled short options, separators.

Options come before the command, as in GNU parallel (getopt with bundling:
``-kj2`` is ``-k -j 2``, ``-j1`` is ``-j 1``); the first word that is not an
option starts the command, and options that look like the command's own
(``echo -n``) belong to it. After the command, input groups start at a
separator: ``:::`` (the arguments that follow), ``::::`` (one input per line
of each file), ``:::+`` and ``::::+`` (linked to the group before: taken side
by side, not multiplied). Anything else spelt with three colons or more
(``:::::``, ``::+``) is refused: a mistyped separator must never become an
input. Whatever follows a separator is input, options included (GNU
parallel reads ``::: a --resume`` as two inputs too).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..backends import usable_cores

# -j 0: "as many as possible". GNU parallel goes up to its file-handle limit
# (~250 on a default ulimit); fenfa runs one job per input, at most this many.
MAX_JOBS = 256
SEPARATORS = (":::", "::::", ":::+", "::::+")
_SEPARATOR_LIKE = re.compile(r":{2,}\+*|:::+\+*.*")


class UsageError(Exception):
    """Bad usage: printed on one line, exit status 255."""


class Evicted(Exception):
    """A job stopped for --memfree: it runs again, and not as one of its --retries."""


@dataclass
class Source:
    """One input group as given: ``:::`` values, or ``::::`` files to read (``-`` is stdin)."""

    kind: str  # ":::" or "::::"
    items: list[str]
    linked: bool = False  # :::+ / ::::+: side by side with the group before


@dataclass
class Options:
    backend: str = "local"  # --backend dask: each job's command on a dask worker (run_dask)
    address: str | None = None  # --address: its scheduler (else DASK_SCHEDULER_ADDRESS)
    jobs: int | None = None  # None: usable cores; 0: one per input (up to MAX_JOBS)
    keep_order: bool = False
    timeout: float | None = None
    attempts: int = 1  # --retries N: N attempts in all, as GNU parallel (0: no limit)
    halt: tuple[str, str, int] | None = None
    joblog: str | None = None
    results: str | None = None
    resume: bool = False
    resume_failed: bool = False
    dry_run: bool = False
    bar: bool = False
    shell: str | None = None
    termseq: list[tuple[int, float]] = field(default_factory=list)
    # Several inputs per job (-n/-N/-L: a fixed number; -X/-m: as many as fit).
    max_args: int | None = None
    context: bool = False  # -X (also -L): the word around {} repeated per input
    multi: bool = False  # -m: {} replaced by every input of the job
    colsep: str | None = None
    header: bool = False
    csv: bool = False
    delimiter: str = "\n"
    # Output: --tag/--tagstring prefix each line; --line-buffer prints lines as
    # they come; -u (--ungroup) hands the jobs this process's stdout and stderr.
    tag: bool = False
    tagstring: str | None = None
    line_buffer: bool = False
    ungroup: bool = False
    quote: bool = False  # -q: the command's words quoted, not shell syntax
    delay: float = 0.0  # seconds between job starts
    wd: str | None = None
    env: list[str] = field(default_factory=list)  # --env: for remote jobs (local ones inherit)
    eta: bool = False  # --eta, --progress: a progress bar with the ETA on stderr
    memfree: int | None = None  # bytes of free memory a job start needs
    load: float | None = None  # the 1-minute load average a job start needs to be under
    results_dir: bool = False  # --results DIR (an existing directory, or ends in "/")
    pipe: bool = False  # --pipe: stdin cut into blocks, each a job's stdin
    pipe_part: bool = False  # --pipe-part: the same, from -a FILE by seeking
    block: int = 1 << 20
    recstart: str = ""
    recend: str | None = None  # None: "\n", or "" when --recstart is given
    command: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Extra attempts after the first (for the journals' bookkeeping)."""
        return self.attempts - 1 if self.attempts else 1 << 30


_FLAGS = {
    "-k": "keep_order", "--keep-order": "keep_order", "--resume": "resume",
    "--resume-failed": "resume_failed", "--dry-run": "dry_run", "--bar": "bar",
    "-X": "context", "--xargs": "multi", "-m": "multi", "--csv": "csv",
    "-0": "null", "--null": "null", "--tag": "tag", "--line-buffer": "line_buffer",
    "--lb": "line_buffer", "-u": "ungroup", "--ungroup": "ungroup", "-q": "quote",
    "--quote": "quote", "--eta": "eta", "--progress": "eta", "--pipe": "pipe",
    "--spreadstdin": "pipe", "--pipe-part": "pipe_part", "--pipepart": "pipe_part",
}  # fmt: skip
_VALUED = {
    "-j": "jobs", "--jobs": "jobs", "-P": "jobs", "--max-procs": "jobs", "--timeout": "timeout",
    "--retries": "retries", "--halt": "halt", "--halt-on-error": "halt", "--joblog": "joblog",
    "--results": "results", "--shell": "shell", "--termseq": "termseq",
    "--term-seq": "termseq", "-n": "n", "--max-args": "n", "-N": "N", "-L": "L",
    "--max-lines": "L", "--colsep": "colsep", "-C": "colsep", "--header": "header",
    "-a": "arg_file", "--arg-file": "arg_file", "-d": "delimiter", "--delimiter": "delimiter",
    "--tagstring": "tagstring", "--delay": "delay", "--wd": "wd", "--workdir": "wd",
    "--env": "env", "--memfree": "memfree", "--load": "load", "--block": "block",
    "--block-size": "block", "--recstart": "recstart", "--recend": "recend",
}  # fmt: skip
_SHORT_FLAGS = {name[1] for name in _FLAGS if len(name) == 2}
_SHORT_VALUED = {name[1] for name in _VALUED if len(name) == 2}
# GNU parallel's default --termseq: TERM, 200 ms, TERM, 100 ms, TERM, 50 ms, KILL.
DEFAULT_TERMSEQ = [(15, 0.2), (15, 0.1), (15, 0.05), (9, 0.025)]
# Where the jobs run: here (the default), or on a dask cluster (see run_dask).
_WHERE = {"--backend": "backend", "--address": "address"}
BACKENDS = ("local", "dask")
_VALUED.update(_WHERE)


def parse(argv: Sequence[str]) -> Options:
    options = Options()
    args = list(argv)
    arg_files: list[str] = []
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, equals, inline = arg.partition("=")
            if name in _VALUED:
                if not equals:
                    i += 1
                    if i >= len(args):
                        raise UsageError(f"{name} needs a value")
                    inline = args[i]
                _set(options, _VALUED[name], name, inline, arg_files)
            elif name in _FLAGS and not equals:
                _flag(options, _FLAGS[name])
            elif name in _FLAGS:
                raise UsageError(f"{name} takes no value")
            else:
                raise UsageError(f"unknown option {name}")
        else:  # -kj2: -k, then -j with the rest of the word (or the next word) as its value
            for n, char in enumerate(arg[1:], 1):
                if char in _SHORT_VALUED:
                    value = arg[n + 1 :]
                    if not value:
                        i += 1
                        if i >= len(args):
                            raise UsageError(f"-{char} needs a value")
                        value = args[i]
                    _set(options, _VALUED["-" + char], "-" + char, value, arg_files)
                    break
                if char not in _SHORT_FLAGS:
                    raise UsageError(f"unknown option -{char}" + (f" (in {arg})" if n > 1 else ""))
                _flag(options, _FLAGS["-" + char])
        i += 1
    options.sources = [Source("::::", [path]) for path in arg_files]
    _command_and_sources(options, args[i:])
    if options.resume and not (options.joblog or options.results):
        raise UsageError("--resume needs --joblog FILE or --results FILE to read what is done")
    if options.context and options.multi:
        raise UsageError("-X and -m are two ways of packing inputs: choose one")
    _check_modes(options, arg_files)
    return options


def _check_modes(options: Options, arg_files: list[str]) -> None:
    """What only makes sense together (or apart), refused before anything runs."""
    if options.results and (os.path.isdir(options.results) or options.results.endswith("/")):
        options.results_dir = True
        if options.resume and not options.joblog:
            raise UsageError("--resume with --results DIR needs --joblog FILE (what is done)")
    if options.ungroup and options.line_buffer:
        raise UsageError("-u and --line-buffer are two ways of printing output: choose one")
    if options.wd is not None and not os.path.isdir(options.wd):
        raise UsageError(f"--wd {options.wd!r}: no such directory")
    if options.pipe_part:
        options.pipe = True
        if len(arg_files) != 1 or any(s.kind == ":::" for s in options.sources):
            raise UsageError("--pipe-part reads one seekable file: give it as -a FILE")
    if options.pipe:
        if options.sources and not options.pipe_part:
            # (GNU parallel reads stdin then, and ignores the inputs: refused, not copied)
            raise UsageError("--pipe reads stdin: no ::: :::: or -a inputs (--pipe-part -a FILE)")
        if options.context or options.multi or options.colsep or options.csv or options.header:
            raise UsageError("--pipe jobs read blocks on stdin: no -X, -m, --colsep or --header")
        if options.max_args == 0:
            raise UsageError("--pipe -N 0: a job needs at least one record")


def _command_and_sources(options: Options, rest: list[str]) -> None:
    for arg in rest:
        if arg not in SEPARATORS and _SEPARATOR_LIKE.fullmatch(arg) and arg != "::":
            raise UsageError(f"unknown separator {arg!r} (separators: {' '.join(SEPARATORS)})")
    starts = [n for n, arg in enumerate(rest) if arg in SEPARATORS]
    end = starts[0] if starts else len(rest)
    options.command = rest[:end]
    if not options.command:
        raise UsageError("no command given")
    for n, start in enumerate(starts):
        stop = starts[n + 1] if n + 1 < len(starts) else len(rest)
        values = rest[start + 1 : stop]
        separator = rest[start]
        if not values:
            raise UsageError(f"nothing after {separator}")
        linked = separator.endswith("+") and bool(options.sources)
        options.sources.append(Source(separator.rstrip("+"), values, linked))


def _flag(options: Options, name: str) -> None:
    if name == "null":
        options.delimiter = "\0"
    elif name == "resume_failed":
        options.resume = options.resume_failed = True
    else:
        setattr(options, name, True)


def _set(options: Options, what: str, name: str, value: str, arg_files: list[str]) -> None:
    if what in _WHERE.values():
        _where(options, what, value)
        return
    try:
        if what == "jobs":
            options.jobs = jobs_from(value, usable_cores())
        elif what == "timeout":
            options.timeout = float(value)
            if not 0 < options.timeout < math.inf:
                raise ValueError
        elif what == "retries":
            options.attempts = int(value)
            if options.attempts < 0:
                raise ValueError
        elif what == "halt":
            options.halt = None if value == "0" else _parse_halt(value)
        elif what in ("joblog", "results", "shell", "colsep"):
            if not value:
                raise ValueError
            setattr(options, what, value)
        elif what == "termseq":
            options.termseq = _parse_termseq(value)
        elif what in ("n", "N", "L"):
            options.max_args = int(value)
            if options.max_args < (0 if what == "N" else 1):
                raise ValueError
            options.context = options.context or what == "L"  # (-L implies -X)
        elif what == "header":
            if value != ":":
                raise UsageError(f"--header {value!r}: only --header : (the first line) is known")
            options.header = True
        elif what == "arg_file":
            arg_files.append(value)
        elif what == "delimiter":
            options.delimiter = _unescape(value)
            if not options.delimiter:
                raise ValueError
        elif what in ("tagstring", "wd"):
            setattr(options, what, value)
        elif what in ("recstart", "recend"):
            setattr(options, what, _unescape(value))
        elif what == "env":
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                raise ValueError
            options.env.append(value)
        elif what in ("memfree", "block"):
            setattr(options, what, size_from(value))
        elif what == "delay":
            options.delay = duration_from(value)
        elif what == "load":
            options.load = load_from(value, usable_cores())
    except ValueError:
        raise UsageError(f"bad value for {name}: {value!r}") from None


_SIZES = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
          "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}  # fmt: skip
_DURATIONS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def size_from(value: str) -> int:
    """A size as GNU parallel reads it: 10k = 10,000 bytes, 10K = 10,240 (and M G T P)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([bkmgtpKMGTP]?)", value)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(value)
    return max(1, int(float(match.group(1)) * _SIZES[match.group(2)]))


def duration_from(value: str) -> float:
    """Seconds, as GNU parallel reads them: 0.5, 3s, 2m, 1h, 1d."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([smhd]?)", value)
    if match is None:
        raise ValueError(value)
    return float(match.group(1)) * _DURATIONS[match.group(2)]


def load_from(value: str, cores: int) -> float:
    """--load as GNU parallel reads it (the syntax of -j): N, +N, -N, N% (100%: the cores)."""
    if value.endswith("%"):
        return cores * float(value[:-1]) / 100
    if value[:1] in "+-":
        return max(0.0, cores + float(value))
    load = float(value)
    if not 0 <= load < math.inf:
        raise ValueError(value)
    return load


def jobs_from(value: str, cores: int) -> int:
    """-j as GNU parallel reads it: N, +N (cores + N), -N (cores - N), N% (of the cores)."""
    if value.endswith("%"):
        share = float(value[:-1])
        if not 0 < share < math.inf:
            raise ValueError(value)
        return max(1, int(cores * share / 100))
    if value[:1] in "+-" and value[1:].isdigit():
        return max(1, cores + int(value))
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def _parse_halt(value: str) -> tuple[str, str, int]:
    match = re.fullmatch(r"(now|soon),(fail|success|done)=(\d+)", value)
    if match is None and value in ("1", "2"):
        # GNU parallel's old spelling: --halt 1 = soon,fail=1; 2 = now,fail=1 (0: never).
        return ("soon" if value == "1" else "now"), "fail", 1
    if not match or int(match.group(3)) < 1:
        raise ValueError(value)
    return match.group(1), match.group(2), int(match.group(3))


def _parse_termseq(value: str) -> list[tuple[int, float]]:
    """``TERM,200,TERM,100,KILL,25``: signal, milliseconds to wait, ... (as GNU parallel)."""
    import signal

    words = value.split(",")
    if len(words) % 2:
        words.append("25")
    steps = []
    for name, wait in zip(words[::2], words[1::2], strict=True):
        number = int(name) if name.isdigit() else getattr(signal, "SIG" + name.upper(), None)
        if number is None or not wait.isdigit():
            raise ValueError(value)
        steps.append((int(number), int(wait) / 1000))
    return steps


def _unescape(value: str) -> str:
    return {"\\n": "\n", "\\t": "\t", "\\0": "\0", "\\r": "\r"}.get(value, value)


def _where(options: Options, what: str, value: str) -> None:
    if what == "backend" and value not in BACKENDS:
        raise UsageError(f"unknown --backend {value!r} (choose {' or '.join(BACKENDS)})")
    if what == "address" and not value:
        raise UsageError("--address needs the dask scheduler's address (tcp://HOST:PORT)")
    setattr(options, what, value)
