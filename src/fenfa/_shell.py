"""``fenfa.shell()``: one command in a subprocess, as a task function.

(A private module: the package's ``fenfa.shell`` is this module's function,
and a submodule of the same name would be set as the package's attribute of
that name when imported. How a command ends, its result and the guard are
:mod:`fenfa._shell_result`.)

Every command starts a new session, so it leads its own process group: on a
timeout, or when the task that waits for it is cancelled, the whole group is
killed, grandchildren included (``sh -c 'sleep 100 & wait'`` leaves nothing
behind). Output is captured as bytes; ``ShellResult.text`` decodes it.

A command string runs under ``/bin/sh -c``, unless it is a plain word list
(no quoting beyond quotes, no ``$ ; | & < > ( ) * ? [ ~ #`` or backslash, a
first word that is a program on ``PATH``): that is executed directly, as the
shell would, without paying for the shell. A list runs as is. Commands start
with ``os.posix_spawn`` (``vfork`` + ``exec``, a new session, the two output
pipes) and are waited for with one ``poll`` on the pipes and a pidfd: about
80 us of the caller's CPU per command, against ~130 us through
``subprocess.Popen`` (measured, 500 runs of ``true``). With ``cwd`` or
``input`` it goes through ``subprocess.Popen`` (``start_new_session``, no
``preexec_fn``, so still ``vfork``).

Groups started here are registered with a *guard* while they run: a small
process that outlives this one only long enough to kill every registered
group when this process dies, even by SIGKILL (see
:func:`fenfa._shell_result.start_guard`).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from ._shell_result import (
    ShellResult,
    TimedOut,
    drain,
    guard_add,
    guard_remove,
    kill_and_reap,
    kill_group,
    terminate,
)
from .worker import current_slot, current_worker

__all__ = ["shell"]

# How often a waiting shell() looks whether its task was given up.
CANCEL_POLL_SECONDS = 0.05


def shell(
    cmd: str | Sequence[str],
    *,
    timeout: float | None = None,
    check: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | str | None = None,
    termseq: Sequence[tuple[int, float]] = (),
) -> ShellResult:
    """Run ``cmd`` (a string for ``/bin/sh -c``, or a list of arguments) and wait for it.

    ``timeout``: seconds; on expiry the command's whole process group is
    killed and ``subprocess.TimeoutExpired`` is raised (with what it had
    printed, and ``signal``: the signal that ended it). ``termseq``: how to
    kill it then, as (signal, seconds to wait) steps, each sent only if the
    command is still running, SIGKILL after the last (GNU parallel's
    ``--termseq``; ``()``: SIGKILL at once). On the ``cwd``/``input`` path a
    timeout is always SIGKILL. ``check=True`` raises ``subprocess.CalledProcessError`` for a
    non-zero exit. In a fenfa task whose call is given up (Ctrl-C, ``break``),
    the group is killed too and the task ends.
    """
    _check_timeout(timeout)
    args: str | list[str] = cmd if isinstance(cmd, str) else list(cmd)
    data = input.encode() if isinstance(input, str) else input
    start = time.monotonic()
    argv = _direct(args)
    if argv is not None and cwd is None and data is None and _HAS_SPAWN:
        code, stdout, stderr = _spawned(args, argv, env, timeout, start, termseq)
        result = ShellResult(args, code, stdout, stderr, time.monotonic() - start)
        if check:
            result.check_returncode()
        return result
    process = subprocess.Popen(
        argv or args,
        shell=argv is None and isinstance(args, str),
        stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    pgid = process.pid  # a new session: its leader's pid is the group's id
    guard_add(pgid)
    try:
        stdout, stderr = _wait(process, data, timeout, start)
    except BaseException:
        kill_group(pgid)
        with contextlib.suppress(Exception):
            process.communicate(timeout=1)
        raise
    finally:
        guard_remove(pgid)
    # The leader is done; anything it left running in its group goes too.
    kill_group(pgid)
    result = ShellResult(args, process.returncode, stdout, stderr, time.monotonic() - start)
    if check:
        result.check_returncode()
    return result


def _check_timeout(timeout: object) -> None:
    """``timeout`` is a finite positive number of seconds, or None: else say so, by name."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"fenfa.shell: timeout must be a number of seconds or None, got {timeout!r}"
        )
    if not 0 < timeout < math.inf:
        raise ValueError(
            f"fenfa.shell: timeout must be a finite number of seconds > 0 (or None for no "
            f"limit), got {timeout!r}"
        )


_HAS_SPAWN = hasattr(os, "posix_spawn") and hasattr(os, "pidfd_open")
_SPECIAL = frozenset("|&;<>()$`\\*?[#~\n\t\r!{}")
_found: dict[tuple[str, str], str | None] = {}


def _which(word: str) -> str | None:
    key = (word, os.environ.get("PATH", ""))
    if key not in _found:
        _found[key] = shutil.which(word)
    return _found[key]


def _direct(args: str | list[str]) -> list[str] | None:
    """The argument list to exec without a shell, if that means the same; else None."""
    if isinstance(args, list):
        if not args:
            return None
        program = args[0] if os.sep in args[0] else _which(args[0])
        return None if program is None else [program, *args[1:]]
    if _SPECIAL.intersection(args):
        return None
    try:
        words = shlex.split(args)
    except ValueError:
        return None
    if not words or "=" in words[0] or os.sep in words[0]:
        return None
    program = _which(words[0])
    return None if program is None else [program, *words[1:]]


def _environment() -> Mapping[str, str] | Mapping[bytes, bytes]:
    """This process's environment, as posix_spawn takes it, copied in C.

    Handing ``os.environ`` itself costs ~0.1 ms a command: posix_spawn walks
    it through its Python-level mapping methods, item by item. A copy of the
    dict of bytes underneath (CPython's, on POSIX) is taken in a microsecond,
    and is always current.
    """
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else os.environ


def _spawned(
    args: str | list[str],
    argv: list[str],
    env: Mapping[str, str] | None,
    timeout: float | None,
    start: float,
    termseq: Sequence[tuple[int, float]] = (),
) -> tuple[int, bytes, bytes]:
    """Start ``argv`` in a new session and wait: (returncode, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            _environment() if env is None else dict(env),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            setsid=True,
        )
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    os.close(out_w)
    os.close(err_w)
    guard_add(pid)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    pidfd = -1
    status: int | None = None
    try:
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        for fd in (out_r, err_r, pidfd):
            poller.register(fd, select.POLLIN)
        open_pipes = 2
        slot = current_slot()
        # (A thread or serial task looks at its call's flag: current_worker().cancelled.)
        watch = slot if slot is not None and slot.backend in ("thread", "serial") else None
        while open_pipes or status is None:
            if timeout is not None and time.monotonic() - start >= timeout:
                if status is None:
                    status = terminate(pid, pidfd, termseq)
                    for fd in (out_r, err_r):  # what it printed while being stopped
                        chunks[fd].append(drain(fd))
                raise TimedOut(
                    args, timeout, b"".join(chunks[out_r]), b"".join(chunks[err_r]), status
                )
            if watch is not None and getattr(watch.job, "cancelled", False):
                raise KeyboardInterrupt("the call was given up")
            wait = None if timeout is None else timeout - (time.monotonic() - start)
            if watch is not None:
                wait = CANCEL_POLL_SECONDS if wait is None else min(wait, CANCEL_POLL_SECONDS)
            events = poller.poll(None if wait is None else max(wait, 0.0) * 1000)
            for fd, _event in events:
                if fd == pidfd:
                    poller.unregister(pidfd)
                    _, status = os.waitpid(pid, 0)
                    # Its group may hold the pipes open: it ends with its leader.
                    kill_group(pid)
                    continue
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    poller.unregister(fd)
                    open_pipes -= 1
    except BaseException:
        kill_and_reap(pid, status)
        raise
    finally:
        guard_remove(pid)
        for fd in (out_r, err_r, pidfd):
            if fd >= 0:
                os.close(fd)
    assert status is not None
    return os.waitstatus_to_exitcode(status), b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _wait(
    process: subprocess.Popen[bytes], data: bytes | None, timeout: float | None, start: float
) -> tuple[bytes, bytes]:
    """``communicate()``, in slices when the task may be cancelled meanwhile."""
    me = current_worker()
    if me.backend not in ("thread", "serial"):
        return process.communicate(data, timeout=timeout)
    # A thread cannot be interrupted: look at the call's flag now and then.
    first = True
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - start)
        step = CANCEL_POLL_SECONDS if left is None else max(0.0, min(left, CANCEL_POLL_SECONDS))
        try:
            return process.communicate(data if first else None, timeout=step)
        except subprocess.TimeoutExpired:
            first = False
            if left is not None and left <= step:
                raise subprocess.TimeoutExpired(process.args, timeout or 0.0) from None
            if current_worker().cancelled:
                raise KeyboardInterrupt("the call was given up") from None


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("fenfa.shell needs a POSIX system")
