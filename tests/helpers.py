"""Small helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

#: How long a "hung" task may wait before a watchdog releases it: a pool that
#: fails to interrupt a task then leaves a failing test, not a hung session.
WATCHDOG_SECONDS = 15.0

ENDLESS_LIMIT = 1_000_000


def endless(start: int = 0) -> Iterator[int]:
    """``itertools.count(start)`` for a lazy consumer; fails loudly for an eager one.

    A pool that drains its input would turn a bare ``count()`` into a list
    that grows until the machine runs out of memory, before any timeout fires.
    """
    for i in itertools.count(start):
        if i - start >= ENDLESS_LIMIT:
            raise RuntimeError(f"{ENDLESS_LIMIT} items pulled: the input is not pulled lazily")
        yield i


def hang(directory: str) -> None:
    """A stuck task: returns only when the test creates ``release`` (or after 60 s)."""
    release = Path(directory) / "release"
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll for a condition another process brings about; fail clearly if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.002)


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid``: a script started in a new session and its children."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


@contextlib.contextmanager
def script(tmp_path: Path, source: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``source`` as a script in its own session; kill what is left of it at the end."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(source))
    with (tmp_path / "stdout").open("wb") as out, (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(path), *args],
            stdout=out,
            stderr=err,
            cwd=tmp_path,
            start_new_session=True,
        )
    with reaped(proc):
        yield proc


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """At the end, kill ``proc`` (started in a new session) and what is left of its session."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for leftover in session_processes(proc.pid):  # only what this process started
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def script_output(tmp_path: Path) -> str:
    out = (tmp_path / "stdout").read_text(errors="replace")
    err = (tmp_path / "stderr").read_text(errors="replace")
    return f"stdout:\n{out}\nstderr:\n{err}"


def worker_pids(directory: Path) -> list[int]:
    return [int(p.name.removeprefix("pid-")) for p in directory.glob("pid-*")]
