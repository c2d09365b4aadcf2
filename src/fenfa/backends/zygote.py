"""The forkserver, started by a fork of a still single-threaded caller: a "zygote".

``multiprocessing``'s forkserver is the safe start method: workers are forked
from a server that runs no threads, so no lock can be held by a thread that
does not exist in the child. Its price is its own start: a fresh interpreter
that imports fenfa's worker code and the user's main module again, after the
caller already paid for the same imports (~100-200 ms on 2 cores, most of a
short script's run).

While the caller itself is still single-threaded (no thread of Python's *or*
of a library's, e.g. OpenBLAS's: ``/proc/self/task`` lists them all), a fork
of it is as safe a server as a fresh interpreter, and starts in a
millisecond with every module already imported. So the forkserver is
started the usual way, except that the one call that would exec a new
interpreter forks instead, and the child runs the same server code with the
same descriptors, every other descriptor closed (as exec with ``close_fds``
would). Workers are then forked from it exactly as from any forkserver, now
and for every replacement later, whatever threads the caller starts meanwhile.
A caller that already runs threads gets the ordinary forkserver, and so does
one holding more than ``MAX_RSS_BYTES``: the zygote keeps a copy-on-write
snapshot of the caller's memory for as long as it lives, which for a small
script is nothing, and for one that has loaded gigabytes would keep them.
"""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import multiprocessing.util
import os
import sys
from collections.abc import Iterator
from typing import Any

# Above this much resident memory the caller gets the ordinary forkserver: a
# zygote would pin that much of the caller's memory (see the docstring). A
# script that has only imported its libraries holds 20-150 MiB.
MAX_RSS_BYTES = 512 * 2**20


def single_threaded() -> bool:
    """True when this process runs exactly one thread, native threads counted (Linux)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _serve(code: str, keep: set[int]) -> None:
    """In the forked child: close what exec would have, then run the server's code."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
        low = 3
        for fd in sorted(keep | {limit}):
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        exec(code, {"__name__": "__fenfa_zygote__"})
    except BaseException:  # (SystemExit when the caller is gone: the server's way out)
        pass
    finally:
        os._exit(0)  # never the caller's atexit handlers, nor its buffered output


def _fork_instead(path: str, args: list[str], passfds: Any) -> int:
    if args[-2:-1] != ["-c"]:  # pragma: no cover - not the call this is for
        return multiprocessing.util._real_spawnv_passfds(path, args, passfds)  # type: ignore[attr-defined, no-any-return]
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # (or the child would hold a copy of what is buffered)
    pid = os.fork()
    if pid == 0:
        _serve(args[-1], {int(fd) for fd in passfds} | {0, 1, 2})
    return pid


@contextlib.contextmanager
def _spawning_by_fork() -> Iterator[None]:
    util: Any = multiprocessing.util
    util._real_spawnv_passfds = real = util.spawnv_passfds
    util.spawnv_passfds = _fork_instead
    try:
        yield
    finally:
        util.spawnv_passfds = real


def ensure_running() -> bool:
    """Start the forkserver, as a fork of this process when that is safe; True if so.

    A server already running is kept (it may be a zygote of an earlier pool).
    """
    from .. import memory

    server: Any = multiprocessing.forkserver._forkserver
    if (
        server._forkserver_pid is not None
        or not single_threaded()
        or memory.rss_bytes() > MAX_RSS_BYTES
    ):
        multiprocessing.forkserver.ensure_running()
        return False
    with _spawning_by_fork():
        multiprocessing.forkserver.ensure_running()
    return True


__all__ = ["ensure_running", "single_threaded"]
