"""Worker output relay: what process workers print and log reaches the caller.

In a process worker, ``sys.stdout`` and ``sys.stderr`` are replaced by
:class:`RelayStream`, and the root logger gets a :class:`RelayHandler`. Both
send frames to the parent over the worker's pipe, in order with its results:

    OUTPUT  header (stream, text)   stream 1 = stdout, 2 = stderr
    LOG     header (record dict)    a LogRecord's attributes, message formatted

A complete line is sent at once (so a line printed just before a crash is
not lost); a partial line waits for its newline, or for the end of the task's
batch. The parent writes each frame's text in one call under one lock, so
lines of different workers never mix mid-line, and clears any progress bar
first (``tqdm.external_write_mode``) so the bar is redrawn below the text.
Log records are handled by the parent's logger of the same name, if that
logger is enabled for the record's level, with ``fenfa_worker`` and
``fenfa_task`` set on the record. The pipe is the buffer: a worker that
prints faster than the parent can write blocks on its send, so a worker
printing 100 MB holds the parent's memory to a frame at a time.

Writes that bypass ``sys.stdout`` (C code writing to file descriptor 1, a
subprocess inheriting it) go where the worker's descriptors go: the
terminal the parent was started from. ``worker_output="inherit"`` turns
the relay off.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .batchloop import current_task_index

__all__ = ["RelayHandler", "RelayStream", "deliver_log", "deliver_output", "install", "levels"]

# Text frames are cut to at most this many characters: a task printing
# 100 MB in one write() still crosses in pieces the pipe can carry.
MAX_FRAME_CHARS = 64 * 1024
STDOUT, STDERR = 1, 2

Send = Callable[[int, str], None]


class RelayStream(io.TextIOBase):
    """A text stream whose complete lines are sent to the parent as they are written."""

    def __init__(self, stream: int, send: Send, original: Any) -> None:
        super().__init__()
        self._stream = stream
        self._send = send
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._original = original

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # Code that asks for the descriptor writes to it directly (faulthandler,
        # subprocess): give it the worker's real one.
        return int(self._original.fileno())

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            cut = text.rfind("\n")
            if cut < 0:
                self._pending.append(text)
                return len(text)
            self._pending.append(text[: cut + 1])
            ready = "".join(self._pending)
            self._pending = [text[cut + 1 :]] if cut + 1 < len(text) else []
            self._emit(ready)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                ready = "".join(self._pending)
                self._pending = []
                self._emit(ready)

    def _emit(self, text: str) -> None:
        for start in range(0, len(text), MAX_FRAME_CHARS):
            self._send(self._stream, text[start : start + MAX_FRAME_CHARS])


class RelayHandler(logging.Handler):
    """Sends each record to the parent, whose handlers format and write it."""

    def __init__(self, send: Callable[[dict[str, Any]], None], worker_id: int) -> None:
        super().__init__(logging.NOTSET)
        self._send_record = send
        self._worker = worker_id

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"] = record.getMessage()  # args may not pickle; the text does
            data["args"] = None
            if record.exc_info:
                data["exc_text"] = record.exc_text or "".join(
                    traceback.format_exception(*record.exc_info)
                ).rstrip("\n")
            data["exc_info"] = None
            data["fenfa_worker"] = self._worker
            data["fenfa_task"] = current_task_index()
            for key, value in list(data.items()):
                if not isinstance(value, str | int | float | bool | type(None)):
                    data[key] = repr(value)
            self._send_record(data)
        except Exception:
            self.handleError(record)


def levels() -> dict[str, int]:
    """The caller's logging levels, for workers to start with: root's and every set one."""
    found = {"": logging.getLogger().getEffectiveLevel()}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            found[name] = logger.level
    return found


def install(
    send_output: Send,
    send_log: Callable[[dict[str, Any]], None],
    worker_id: int,
    log_levels: dict[str, int],
) -> tuple[RelayStream, RelayStream]:
    """In a process worker: relay sys.stdout, sys.stderr and logging to the parent."""
    out = RelayStream(STDOUT, send_output, sys.stdout)
    err = RelayStream(STDERR, send_output, sys.stderr)
    sys.stdout, sys.stderr = out, err
    root = logging.getLogger()
    for handler in list(root.handlers):  # (inherited through fork: the parent's own)
        root.removeHandler(handler)
    root.addHandler(RelayHandler(send_log, worker_id))
    for name, level in log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    return out, err


# -- the parent side -----------------------------------------------------------

_write_lock = threading.Lock()


def deliver_output(stream: int, text: str) -> None:
    """Write a worker's text to the caller's stream, in one piece, above any progress bar."""
    target = sys.stdout if stream == STDOUT else sys.stderr
    if target is None:
        return
    with _write_lock:
        bars = _tqdm_bars()
        if bars is not None:
            with bars.external_write_mode(file=target):
                target.write(text)
                target.flush()
        else:
            target.write(text)
            target.flush()


def _tqdm_bars() -> Any:
    """The tqdm class when a bar is alive (it must be cleared around our text), else None."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return None
    tqdm = tqdm_module.tqdm
    return tqdm if getattr(tqdm, "_instances", None) else None


def deliver_log(data: dict[str, Any]) -> None:
    """Hand a worker's record to the caller's logger of the same name."""
    record = logging.makeLogRecord(data)
    logger = logging.getLogger(record.name if record.name != "root" else None)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
