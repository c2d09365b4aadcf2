"""One worker process as the parent sees it: its handle, and the words for its end.

A ``WorkerHandle`` holds what the parent keeps per worker: the process, its
pipe (and the same socket for raw result buffers), the batches it holds in
the order it runs them, a mirror of its function cache, its crash marks, and
the sender thread that alone writes to its pipe (see ``process.py``'s
diagram). ``_lifecycle.py`` starts, replaces and stops handles;
``process.py``'s manager reads from them. Also here: how a worker's exit or
crash is told to the user, and the main-script hints for start methods that
re-import it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from .. import memory
from ..errors import FenfaError, TaskTimeout, WorkerCrashed
from ..tasks import Batch
from ._protocol import FUNC, FUNCTION_CACHE_SIZE, MARKED_MODE, Marks, frame, mode

# A task with a timeout is timed from the worker's STARTED; until then (its
# function unpickling, say) it gets this much more before it is given up on.
START_GRACE_SECONDS = 60.0

# The two-line fix, as the user would type it.
MAIN_GUARD_FIX = (
    " Put the code that starts work under the main guard:\n\n"
    '    if __name__ == "__main__":\n'
    "        main()   # or the calls themselves, indented\n"
)


class WorkerHandle:
    __slots__ = (
        "batches",
        "blame",
        "conn",
        "functions",
        "id",
        "marks",
        "oom_kills",
        "outbox",
        "process",
        "ready",
        "retiring",
        "running",
        "sender",
        "sock",
        "task_started",
    )

    def __init__(self, worker_id: int, process: Any, conn: Any, marks: Marks) -> None:
        self.id = worker_id
        # Shared with the worker: (batch id, index of the task it runs), for MARKED batches.
        self.marks = marks
        # The kernel's OOM-kill count when it started: a SIGKILL after a rise names the cause.
        self.oom_kills = memory.oom_kills()
        self.process = process
        self.conn = conn
        # The same socket as ``conn``, for the raw out-of-band result buffers.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.batches: deque[Batch] = deque()
        # Mirror of the worker's function cache: same size, same order of use.
        self.functions: OrderedDict[bytes, None] = OrderedDict()
        self.ready = False
        self.retiring = False
        # Set when fenfa kills the worker on purpose: the error its running task gets.
        self.blame: BaseException | None = None
        # When the task now running started (or was sent), for timeouts.
        self.task_started = 0.0
        # Whether the worker said STARTED for its current timed task.
        self.running = False
        self.sender = threading.Thread(
            target=self._send_loop, daemon=True, name=f"fenfa-send-{worker_id}"
        )

    def _send_loop(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the worker is gone; the manager reaps it and requeues
            except Exception as exc:  # a bug of fenfa's: never a silent, starved worker
                self.kill(FenfaError(f"fenfa could not send a batch to worker {self.id}: {exc!r}"))
                return

    def send_function(self, key: bytes, data: bytes) -> None:
        """Send the function ``key`` unless the worker holds it (its cache, mirrored here)."""
        if key in self.functions:
            self.functions.move_to_end(key)
        else:
            # The worker keeps exactly what this mirror says: it evicts only
            # the key named here, never by its own count. Its cache and this
            # mirror could otherwise drift apart (a segment released by a
            # finalizer that runs in the middle of this, while the lock is
            # held, drops keys before the FUNC goes out), and the worker
            # would be asked for a function it had evicted (the soak saw a
            # KeyError kill a worker that way).
            self.functions[key] = None
            evicted = None
            if len(self.functions) > FUNCTION_CACHE_SIZE:
                evicted, _ = self.functions.popitem(last=False)
            self.outbox.put(frame(FUNC, (key, evicted), data))

    def deadline(self) -> float | None:
        """When the running task's timeout expires; before it has started, a grace."""
        if not self.batches or self.blame is not None:
            return None
        limit = self.batches[0].job.timeout
        if limit is None:
            return None
        if not self.running:
            # Sent, not started yet (its function unpickling, a worker
            # starting): not the task's time, but not forever either.
            return self.task_started + limit + START_GRACE_SECONDS
        return self.task_started + limit

    def kill(self, blame: BaseException | None) -> None:
        if self.blame is None:
            self.blame = blame
        if self.process.exitcode is None:
            self.process.kill()

    def timed_out(self) -> TaskTimeout:
        """The error of the running task, whose deadline has passed."""
        batch = self.batches[0]
        index = batch.start + batch.done
        limit = batch.job.timeout
        what = (
            f"ran longer than its timeout of {limit:g} s"
            if self.running
            else f"did not start within {START_GRACE_SECONDS:g} s of being due "
            f"(with its timeout of {limit:g} s)"
        )
        return TaskTimeout(
            f"task {index} {what}; its worker (pid {self.process.pid}) was killed",
            index=index,
            limit=limit,
        )

    def marked_task(self, batch: Batch) -> int | None:
        """The task this dead worker's marks say it ran, if they speak of ``batch``."""
        if mode(batch) != MARKED_MODE or self.marks.view[0] != batch.id:
            return None
        index = int(self.marks.view[1])
        first = batch.start + batch.done
        return index if first <= index < batch.start + len(batch.items) else None

    def crashed(self, code: int | None, index: int) -> WorkerCrashed:
        cause = ""
        if code == -signal.SIGKILL and memory.oom_kills() > self.oom_kills:
            cause = (
                " (most likely by the kernel's OOM killer: the machine ran out of memory; "
                "see the Pool options memory_floor and max_worker_memory)"
            )
        return WorkerCrashed(
            f"worker {self.id} (pid {self.process.pid}) "
            f"{exit_description(code)}{cause} while running task {index}",
            index=index,
            exitcode=code,
        )


def exit_description(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def main_guard_hint(method: str) -> str:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if method == "fork" or path is None:
        return ""
    return (
        f" Under the '{method}' start method each worker first re-imports your main "
        f"script ({path}); if that script starts work at import time, every worker fails "
        "this way." + MAIN_GUARD_FIX
    )


@contextlib.contextmanager
def main_path_hidden_unless_a_file() -> Iterator[None]:
    """A main script that is no file (``python - <<EOF``: "<stdin>") is not re-imported.

    Under forkserver and spawn a worker runs the main script's file again
    before anything else; "<stdin>" is no file, so every worker died of
    FileNotFoundError and the user was told to add the main guard they had.
    Functions of such a script travel by value, so the workers need none of it.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or os.path.isfile(path):
        yield
        return
    del main.__file__  # type: ignore[union-attr]
    try:
        yield
    finally:
        main.__file__ = path  # type: ignore[union-attr]


__all__ = ["WorkerHandle", "exit_description", "main_guard_hint", "main_path_hidden_unless_a_file"]
