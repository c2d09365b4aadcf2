"""How a ``fenfa.shell()`` command ends: its result, its timeout, the killing of its group.

A command leads its own process group (a new session), so ending it means
ending the group, grandchildren included: at once with SIGKILL, or by
``termseq`` steps (GNU parallel's ``--termseq``) on a timeout, then reading
what it printed while it was stopped. ``TimedOut`` carries that output and
the signal that ended it; ``ShellResult`` is what a command that ran to its
end leaves. Kept apart from the running of commands (:mod:`fenfa._shell`):
this is what ``fenfa run`` also needs on its own (the result type, the
timeout, and the guard it starts before any job).

The *guard*: a small process that outlives this one only long enough to kill
every registered group when this process dies, even by SIGKILL
(:func:`start_guard`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "ShellResult",
    "TimedOut",
    "drain",
    "guard_add",
    "guard_remove",
    "kill_and_reap",
    "kill_group",
    "start_guard",
    "terminate",
]


@dataclass(frozen=True)
class ShellResult:
    """What a command did: ``args``, ``returncode``, ``stdout``, ``stderr`` (bytes), ``duration``.

    ``returncode`` is negative when a signal ended the command (as in
    ``subprocess``); ``signal`` then names it.
    """

    args: str | list[str]
    returncode: int
    stdout: bytes = field(repr=False)
    stderr: bytes = field(repr=False)
    duration: float

    @property
    def text(self) -> str:
        """``stdout`` decoded (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check_returncode(self) -> None:
        if self.returncode:
            raise subprocess.CalledProcessError(
                self.returncode, self.args, self.stdout, self.stderr
            )


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_and_reap(pid: int, status: int | None) -> None:
    """A command given up: its group killed, its leader reaped unless it already was."""
    kill_group(pid)
    if status is None:
        os.waitpid(pid, 0)


class TimedOut(subprocess.TimeoutExpired):
    """``TimeoutExpired`` that also says which signal ended the command (None: unknown)."""

    def __init__(
        self, cmd: str | list[str], timeout: float, stdout: bytes, stderr: bytes, status: int | None
    ) -> None:
        super().__init__(cmd, timeout, stdout, stderr)
        code = os.waitstatus_to_exitcode(status) if status is not None else 0
        self.signal = -code if code < 0 else None


def terminate(pid: int, pidfd: int, termseq: Sequence[tuple[int, float]]) -> int:
    """Send ``termseq`` to the group of ``pid`` while it lives, then SIGKILL; reap the leader."""
    for number, wait in termseq:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, number)
        if select.select([pidfd], [], [], wait)[0]:
            break
    kill_group(pid)
    return os.waitpid(pid, 0)[1]


def drain(fd: int) -> bytes:
    """What is left in a pipe whose writers are dead (or, if one lives on, what is there now)."""
    os.set_blocking(fd, False)
    data = []
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 65536):
            data.append(chunk)
    return b"".join(data)


# -- the guard: kill our groups if we die ---------------------------------------

_guard_lock = threading.Lock()
_guard_fd: int | None = None


def start_guard() -> None:
    """Start the guard process (once): it kills every registered group when we die.

    It reads ``+pgid`` / ``-pgid`` lines from a pipe only this process
    writes; end of file means this process is gone, and it kills what is
    still registered. Costs one small process per run and one short write
    per command. Call it early, while the process has one thread.
    """
    global _guard_fd
    with _guard_lock:
        if _guard_fd is not None:
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the guard
            try:
                os.close(write_end)
                os.setsid()  # out of the caller's group: a Ctrl-C there is not for it
                _guard_main(read_end)
            finally:
                os._exit(0)
        os.close(read_end)
        _guard_fd = write_end


def _guard_main(read_end: int) -> None:
    for fd in range(3, 256):  # hold nothing of the caller's open (pipes, sockets)
        if fd != read_end:
            with contextlib.suppress(OSError):
                os.close(fd)
    live: set[int] = set()
    pending = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"+"):
                live.add(int(line[1:]))
            elif line.startswith(b"-"):
                live.discard(int(line[1:]))
    for pgid in live:
        kill_group(pgid)


def _guard_send(message: bytes) -> None:
    fd = _guard_fd
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, message)


def guard_add(pgid: int) -> None:
    _guard_send(b"+%d\n" % pgid)


def guard_remove(pgid: int) -> None:
    _guard_send(b"-%d\n" % pgid)
