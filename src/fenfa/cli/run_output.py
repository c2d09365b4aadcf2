"""Where ``fenfa run``'s job output goes: the terminal (whole, or by line), and --results DIR.

By default a job's output is printed whole when it ends (GNU parallel's
``--group``). ``--line-buffer`` prints each complete line as the job writes
it (lines of different jobs interleave, none is torn); ``-u`` lets the jobs
write to our stdout and stderr themselves (nothing is read; ``--tag`` then
does nothing, as in GNU parallel 20221122). ``--tag`` prefixes every line,
of stdout and stderr, with the job's inputs and a TAB; ``--tagstring STR``
with STR, replacement strings expanded as text (not quoted: a tag is shown,
never run).

``--results DIR`` writes GNU parallel's layout and prints nothing, as GNU
parallel does: ``DIR/1/<input 1>/2/<input 2>/stdout``, ``stderr``, ``seq``.
In a name, ``\\`` is written ``\\\\`` and ``/`` ``\\_``, as GNU writes them;
where GNU's names collide or escape DIR, fenfa's differ, on purpose: an
empty input is ``\\0`` (GNU writes into the parent), ``.`` and ``..`` are
``\\.`` and ``\\.\\.`` (GNU's ``..`` writes next to DIR), a name over 255
bytes is cut to 237 and ends ``\\#`` and 16 hex digits of its hash (GNU cuts
it at 255, so long inputs that start alike share their files), and a job
without inputs (``--pipe``, ``-N0``) writes to ``DIR/<job number>`` (GNU:
every such job to ``DIR`` itself). Files are created 0600 and directories
0700, as the journals: they hold what the jobs printed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .run_args import Options
from .run_template import Template

if TYPE_CHECKING:
    from .run_exec import Sink
    from .run_jobs import Done, Job

NAME_MAX = 255


def tagged(data: bytes, tag: bytes) -> bytes:
    return b"".join(tag + line for line in data.splitlines(keepends=True))


class Printer:
    """Prints what the jobs said, in the way the options ask."""

    def __init__(self, options: Options, shell: str) -> None:
        self.tagging = (options.tag or options.tagstring is not None) and not options.ungroup
        self.streamed = options.line_buffer or options.ungroup  # (printed as the job ran)
        self.quiet = options.results_dir
        self.tagstring = options.tagstring
        self.shell = shell
        self._templates: dict[int, Template] = {}
        self._lock = threading.Lock()
        # -k --line-buffer: the oldest job not yet printed streams its lines; the
        # others' are held (by job number) until it is their turn, as in GNU parallel.
        self.ordered = options.keep_order and options.line_buffer
        self._held: dict[int, list[tuple[bytes, bool]]] = {}

    def tag(self, job: Job, slot: int) -> bytes:
        values = job.inputs if job.inputs is not None else job.values
        if self.tagstring is None:
            text = " ".join(values)
        else:
            template = self._templates.get(len(values))
            if template is None:
                template = Template(self.tagstring, len(values), self.shell)
                self._templates[len(values)] = template
            text = template.text(values, job.seq, slot)
        return text.encode("utf-8", "surrogateescape") + b"\t"

    def sink(self, job: Job, slot: int) -> Sink:
        """Where --line-buffer sends a job's complete lines (from its worker thread)."""
        tag = self.tag(job, slot) if self.tagging else b""
        seq = job.seq

        def write(data: bytes, error: bool) -> None:
            data = tagged(data, tag) if tag else data
            with self._lock:
                if self.ordered and seq != min(self._held):
                    self._held[seq].append((data, error))
                else:
                    _put(data, error)

        return write

    def queued(self, jobs: Iterable[Job]) -> Iterable[Job]:
        """The jobs, each registered (in input order) as it is handed to a worker (-k)."""
        return self._registered(jobs) if self.ordered else jobs

    def _registered(self, jobs: Iterable[Job]) -> Iterator[Job]:
        for job in jobs:
            with self._lock:
                self._held[job.seq] = []
            yield job

    def _next_turn(self, seq: int) -> None:
        """-k --line-buffer: job ``seq`` is printed; the next one's held lines go out."""
        with self._lock:
            for data, error in self._held.pop(seq, []):
                _put(data, error)
            if self._held:
                turn = min(self._held)
                for data, error in self._held[turn]:
                    _put(data, error)
                self._held[turn] = []

    def emit(self, done: Done) -> None:
        if self.ordered:
            self._next_turn(done.job.seq)
        result = done.result
        if done.error is not None:
            print(f"{done.error} (job {done.job.seq}: {done.command})", file=sys.stderr, flush=True)
            return
        stdout, stderr = (result.stdout, result.stderr) if result is not None else (b"", b"")
        if done.timed_out is not None:  # (GNU parallel's words; what it printed follows)
            print(
                "fenfa run: Warning: This job was killed because it timed out:\n"
                f"fenfa run: Warning: {done.command}",
                file=sys.stderr,
                flush=True,
            )
            stdout, stderr = done.timed_out.stdout or b"", done.timed_out.stderr or b""
        if self.streamed or self.quiet:
            return
        if self.tagging and (stdout or stderr):
            tag = self.tag(done.job, done.slot)
            stdout, stderr = tagged(stdout, tag), tagged(stderr, tag)
        if stdout:
            _put(stdout, False)
        if stderr:
            _put(stderr, True)


class ResultsDir:
    """--results DIR: each finished job's stdout, stderr and seq, in GNU parallel's layout."""

    def __init__(self, root: str, sources: int) -> None:
        self.root = os.fsencode(root)
        self.sources = max(1, sources)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def path(self, job: Job) -> bytes:
        values = job.inputs if job.inputs is not None else job.values
        if not values:
            return os.path.join(self.root, b"%d" % job.seq)
        parts = [self.root]
        for n, value in enumerate(values):
            parts += [b"%d" % (n % self.sources + 1), _name(value)]
        return os.path.join(*parts)

    def write(self, done: Done) -> None:
        where = self.path(done.job)
        os.makedirs(where, mode=0o700, exist_ok=True)
        result, timed_out = done.result, done.timed_out
        stdout = result.stdout if result is not None else b""
        stderr = result.stderr if result is not None else (done.error or "").encode()
        if timed_out is not None:
            stdout, stderr = timed_out.stdout or b"", timed_out.stderr or b""
        for name, data in (
            (b"seq", b"%d" % done.job.seq),
            (b"stdout", stdout),
            (b"stderr", stderr),
        ):
            with open(os.path.join(where, name), "wb", opener=_private) as file:
                file.write(data)


def _put(data: bytes, error: bool) -> None:
    stream = sys.stderr if error else sys.stdout
    stream.buffer.write(data)
    stream.flush()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _name(value: str) -> bytes:
    """An input as one file name: GNU parallel's escapes, and none that collides or escapes."""
    if value in ("", ".", ".."):
        return {"": b"\\0", ".": b"\\.", "..": b"\\.\\."}[value]
    name = os.fsencode(value).replace(b"\\", b"\\\\").replace(b"/", b"\\_")
    if len(name) > NAME_MAX:
        digest = hashlib.blake2b(name, digest_size=8).hexdigest().encode()
        name = name[: NAME_MAX - 18] + b"\\#" + digest
    return name
