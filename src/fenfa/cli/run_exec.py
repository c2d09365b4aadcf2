"""``fenfa run``'s jobs off the plain path: streamed output, stdin, a directory, memory.

The plain path (output captured whole, no stdin) is :func:`fenfa.shell`,
whose per-job cost is measured (bench_run); nothing here touches it. The
options that need more of a job's process run it here instead:

- ``--line-buffer``: each complete line goes to the printer as it is read,
  under one lock, so lines of different jobs interleave but are never torn;
- ``-u``: the job writes to this process's own stdout and stderr;
- ``--pipe``: the job's block is written to its stdin while its output is
  read (one ``poll`` over every pipe and a pidfd, so neither side can fill
  a pipe and stall the other);
- ``--wd DIR``: the job starts in DIR;
- ``--memfree``: the job is registered while it runs, so the memory watch
  can stop the youngest one (:class:`Gate`).

Each job still leads its own process group, registered with the guard, and a
timeout follows ``--termseq`` exactly as on the plain path.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .._shell import CANCEL_POLL_SECONDS
from .._shell_result import (
    ShellResult,
    TimedOut,
    drain,
    guard_add,
    guard_remove,
    kill_and_reap,
    kill_group,
    terminate,
)
from ..worker import current_slot, current_worker
from .run_args import Evicted, Options

# How often a job waiting for memory or load looks again, and how often the
# memory watch looks (GNU parallel looks about once a second).
GATE_POLL_SECONDS = 0.1
Sink = Callable[[bytes, bool], None]  # (complete lines, from stderr?)


@dataclass
class Running:
    pid: int
    started: float
    evicted: bool = False


def _cancelled() -> bool:
    """Whether the call of the task on this thread was given up (Ctrl-C, --halt now)."""
    slot = current_slot()
    return slot is not None and bool(getattr(slot.job, "cancelled", False))


def execute(
    argv: list[str],
    options: Options,
    termseq: Sequence[tuple[int, float]],
    stdin: bytes | None = None,
    sink: Sink | None = None,
    gate: Gate | None = None,
) -> ShellResult:
    """Run one job: ``sink`` gets its lines as they come (else its output is captured)."""
    start = time.monotonic()
    inherit = options.ungroup
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=None if inherit else subprocess.PIPE,
        stderr=None if inherit else subprocess.PIPE,
        cwd=options.wd,
        start_new_session=True,
    )
    pid = process.pid
    guard_add(pid)
    running = Running(pid, start)
    if gate is not None:
        gate.started(running)
    try:
        code, out, err = _wait(process, stdin, sink, options.timeout, termseq, start)
    finally:
        guard_remove(pid)
        if gate is not None:
            gate.ended(running)
    if running.evicted:
        raise Evicted
    return ShellResult(argv, code, out, err, time.monotonic() - start)


def _wait(
    process: subprocess.Popen[bytes],
    data: bytes | None,
    sink: Sink | None,
    timeout: float | None,
    termseq: Sequence[tuple[int, float]],
    start: float,
) -> tuple[int, bytes, bytes]:
    pid = process.pid
    pipes = {p.fileno(): p for p in (process.stdout, process.stderr) if p is not None}
    out_fd = process.stdout.fileno() if process.stdout is not None else -1
    err_fd = process.stderr.fileno() if process.stderr is not None else -1
    chunks: dict[int, list[bytes]] = {fd: [] for fd in pipes}
    pending = dict.fromkeys(pipes, b"")  # (--line-buffer: a line not yet ended)
    status: int | None = None
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (*pipes, pidfd):
        poller.register(fd, select.POLLIN)
    writer, offset = (process.stdin, 0) if data is not None else (None, 0)
    if writer is not None:
        os.set_blocking(writer.fileno(), False)
        poller.register(writer.fileno(), select.POLLOUT)
    watch = current_worker().backend in ("thread", "serial")  # (a thread cannot be interrupted)
    try:
        open_pipes = len(pipes)
        while open_pipes or status is None:
            if timeout is not None and time.monotonic() - start >= timeout:
                if status is None:
                    status = terminate(pid, pidfd, termseq)
                    for fd in pipes:
                        chunks[fd].append(drain(fd))
                        if sink is not None and (pending[fd] or chunks[fd][-1]):
                            sink(pending[fd] + chunks[fd].pop(), fd == err_fd)
                out, err = (b"".join(chunks.get(fd, [])) for fd in (out_fd, err_fd))
                raise TimedOut(list(process.args), timeout, out, err, status)  # type: ignore[arg-type]
            if watch and _cancelled():
                raise KeyboardInterrupt("the call was given up")
            wait = None if timeout is None else timeout - (time.monotonic() - start)
            if watch:
                wait = CANCEL_POLL_SECONDS if wait is None else min(wait, CANCEL_POLL_SECONDS)
            for fd, event in poller.poll(None if wait is None else max(wait, 0.0) * 1000):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    _, status = os.waitpid(pid, 0)
                    process.returncode = os.waitstatus_to_exitcode(status)
                    kill_group(pid)  # (what it left behind may hold the pipes open)
                elif writer is not None and fd == writer.fileno():
                    assert data is not None
                    offset = _feed(writer.fileno(), data, offset, event)
                    if offset >= len(data):
                        poller.unregister(fd)
                        writer.close()
                        writer = None
                else:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        poller.unregister(fd)
                        open_pipes -= 1
                        if sink is not None and pending[fd]:
                            sink(pending[fd], fd == err_fd)
                    elif sink is None:
                        chunks[fd].append(chunk)
                    else:
                        whole, newline, pending[fd] = (pending[fd] + chunk).rpartition(b"\n")
                        if newline:
                            sink(whole + newline, fd == err_fd)
    except BaseException:
        kill_and_reap(pid, status)
        raise
    finally:
        os.close(pidfd)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
    assert status is not None
    out, err = (b"".join(chunks.get(fd, [])) for fd in (out_fd, err_fd))
    return os.waitstatus_to_exitcode(status), out, err


def _feed(fd: int, data: bytes, offset: int, event: int) -> int:
    """Write what the job's stdin takes now; a job that closed it gets no more (as GNU)."""
    if event & (select.POLLERR | select.POLLHUP):
        return len(data)
    try:
        return offset + os.write(fd, data[offset : offset + 65536])
    except BlockingIOError:
        return offset
    except (BrokenPipeError, OSError):
        return len(data)


# -- when a job may start: --delay, --memfree, --load ------------------------------


def available_memory() -> int:
    """Bytes of memory available for new work (MemAvailable of /proc/meminfo)."""
    with open("/proc/meminfo", "rb") as meminfo:
        for line in meminfo:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> float:
    return os.getloadavg()[0]


class Gate:
    """Holds each job's start until --delay, --memfree and --load allow it.

    With ``--memfree SIZE``, a watch thread stops the youngest running job
    (by ``--termseq``) when less than half of SIZE is free; that job runs
    again once SIZE is free, and the attempt is not one of its ``--retries``.
    The last running job is never stopped (GNU parallel would stop it too,
    and restart it into the same shortage for ever).
    """

    def __init__(self, options: Options, termseq: Sequence[tuple[int, float]]) -> None:
        self.options = options
        self.termseq = termseq
        self._lock = threading.Lock()
        self._next_start = 0.0
        self.running: list[Running] = []
        self._ended = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        if options.memfree is not None:
            self._watch = threading.Thread(target=self._watch_memory, daemon=True)
            self._watch.start()

    def wait(self) -> None:
        """Return when a job may start now (and, with --delay, count it as started)."""
        options = self.options
        while (options.memfree is not None and available_memory() < options.memfree) or (
            options.load is not None and load_average() > options.load
        ):
            if _cancelled():
                raise KeyboardInterrupt("the call was given up")
            time.sleep(GATE_POLL_SECONDS)
        if options.delay:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + options.delay
            if start > now:
                time.sleep(start - now)

    def started(self, running: Running) -> None:
        with self._lock:
            self.running.append(running)

    def ended(self, running: Running) -> None:
        with self._lock:
            self.running.remove(running)
            self._ended.notify_all()

    def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()

    def _watch_memory(self) -> None:
        assert self.options.memfree is not None
        half = self.options.memfree / 2
        while not self._stop.wait(GATE_POLL_SECONDS):
            if available_memory() >= half:
                continue
            with self._lock:
                if len(self.running) < 2:
                    continue
                youngest = max(self.running, key=lambda r: r.started)
                youngest.evicted = True
            self._stop_job(youngest)

    def _stop_job(self, job: Running) -> None:
        for number, wait in (*self.termseq, (9, 0.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, number)
            with self._lock:
                if self._ended.wait_for(lambda: job not in self.running, timeout=wait or None):
                    return
