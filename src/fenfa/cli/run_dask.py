"""``fenfa run --backend dask``: each job's command runs on a Dask worker.

GNU parallel's answer for more than one machine is ``--sshlogin``; ours is
an existing distributed engine. Nothing of the local runner changes
(:mod:`.run`): its ``-j`` threads take the jobs, journal every attempt,
resume, retry and keep the order as on one machine. Only the one call that
runs a command goes elsewhere: instead of :func:`fenfa.shell` here, the
thread hands the same call to the cluster as one dask task
(:func:`run_on_worker`: ``fenfa.shell`` on the worker) and waits for its
:class:`~fenfa.shell.ShellResult`, or for the exception it raised there.
So ``-j`` is the jobs in flight across the cluster (by default, the
cluster's worker threads at the start); a worker runs as many at once as it
has threads, each in the worker's working directory.

- ``--timeout``: kept by ``shell()`` on the worker, which kills the job's
  process group there, with ``--termseq``.
- A worker that dies: the scheduler runs its jobs again on other workers
  (up to ``distributed.scheduler.allowed-failures``, 3 by default); when it
  gives up, or the job's task is lost otherwise, the attempt fails (exit -1,
  a one-line reason) and ``--retries`` runs it again. The jobs a dead worker
  was running are killed by the guard of that worker (:func:`start_guard`),
  even when the worker was SIGKILLed.
- Giving up (``--halt now``, Ctrl-C, ``fenfa run`` killed): the job's task is
  let go, so a job not yet started never starts, and one running is killed
  on its worker (its process group), as a local job would be.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from typing import Any

from .._shell import shell
from .._shell_result import ShellResult, TimedOut, start_guard
from ..worker import current_slot, restore_slot, running, set_slot
from .run_args import Options, UsageError

# How often a thread waiting for its job looks whether the run was given up
# (as fenfa.shell does for a local job).
CANCEL_POLL_SECONDS = 0.05


class JobLost(OSError):
    """The job's dask task ended without a result: its workers died, or it was lost."""


class _Task:
    """A job's dask task, as ``shell()`` watches a thread's job: ``cancelled`` once let go.

    The client lets a task go when the run gives it up (``--halt now``,
    Ctrl-C) or when the client itself is gone (``fenfa run`` killed, even by
    SIGKILL: the scheduler sees the connection close); the worker then marks
    the running task cancelled, which this reads on the worker's own state.
    """

    __slots__ = ("_key", "_tasks")

    def __init__(self) -> None:
        from distributed import get_worker

        worker = get_worker()
        self._key = worker.get_current_task()
        self._tasks = worker.state.tasks

    @property
    def cancelled(self) -> bool:
        task = self._tasks.get(self._key)
        return task is None or task.state in ("cancelled", "released", "forgotten")


def run_on_worker(cmd: str | list[str], options: dict[str, Any]) -> ShellResult | Exception | None:
    """One attempt of a job, in a dask worker: ``shell(cmd, **options)``, or what it raised.

    What ``shell()`` raises for the job (a timeout, a command that cannot
    start) is returned, not raised, so that it reaches the caller as the
    same exception, not as a failed dask task. The command runs as on a
    thread of the local runner, whose ``shell()`` kills the job's process
    group when its task is given up; None then (nobody waits for it).
    """
    start_guard()  # (once per worker process: its jobs die with it)
    previous = set_slot(None, "thread", {})
    running(_Task())
    try:
        return shell(cmd, **options)
    except (TimedOut, OSError, ValueError) as exc:
        return exc
    except KeyboardInterrupt:  # (shell()'s word for "given up": never a dask task's)
        return None
    finally:
        restore_slot(previous)


class DaskShell:
    """``fenfa.shell()`` with the command run on a dask worker: the runner's ``shell``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    @property
    def threads(self) -> int:
        """The cluster's worker threads, now (at least 1)."""
        return max(1, int(sum(self._client.nthreads().values())))

    def __call__(self, cmd: Sequence[str], **options: Any) -> ShellResult:
        future = self._client.submit(run_on_worker, list(cmd), options, pure=False)
        ended = threading.Event()
        future.add_done_callback(lambda _: ended.set())
        slot = current_slot()
        try:
            while not ended.wait(CANCEL_POLL_SECONDS):
                if slot is not None and getattr(slot.job, "cancelled", False):
                    raise KeyboardInterrupt("the call was given up")
            outcome = future.result()
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                future.cancel()
                raise
            # (distributed's cancel is an asyncio.CancelledError: a BaseException)
            raise JobLost(errno.EHOSTDOWN, _lost(exc)) from exc
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:  # (its worker let the task go while it ran: closing, say)
            raise JobLost(errno.EHOSTDOWN, "its dask task was stopped on its worker")
        assert isinstance(outcome, ShellResult)
        return outcome

    def close(self) -> None:
        from ..backends.dask.cluster import CLOSE_TIMEOUT_SECONDS

        self._client.close(timeout=CLOSE_TIMEOUT_SECONDS)


def _lost(exc: BaseException) -> str:
    import distributed

    if isinstance(exc, distributed.KilledWorker):
        return f"the dask workers running it died (dask gave up after retrying elsewhere: {exc})"
    return f"its dask task failed: {type(exc).__name__}: {exc}"


def connect(options: Options) -> DaskShell:
    """The cluster at ``--address`` (else DASK_SCHEDULER_ADDRESS); UsageError if none answers."""
    if options.backend != "dask":
        raise UsageError("--address is a dask scheduler's: it needs --backend dask")
    try:
        from ..backends.dask.cluster import configured_address
        from ..backends.dask.cluster import connect as client_of
    except ImportError as exc:
        raise UsageError(
            f"--backend dask needs the dask extra ({exc.name} is not installed): "
            "pip install fenfa[dask]"
        ) from None
    from ..errors import BackendUnavailable

    address = options.address or configured_address()
    if address is None:
        raise UsageError(
            "--backend dask needs the scheduler's address: --address tcp://HOST:PORT, "
            "or DASK_SCHEDULER_ADDRESS"
        )
    try:
        return DaskShell(client_of(address))
    except BackendUnavailable as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # (a malformed address: distributed's words)
        raise UsageError(f"bad dask scheduler address {address!r}: {exc}") from None
