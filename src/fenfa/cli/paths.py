"""Output paths checked before a command does any work (``fenfa bench --html``)."""

from __future__ import annotations

import os


def unwritable(path: str) -> str | None:
    """Why no file can be written at ``path``, or None: checked before a command's work."""
    if os.path.isdir(path):
        return f"{path!r} is a directory"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"cannot write {path!r}: permission denied"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"cannot write {path!r}: no directory {parent!r}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path!r}: the directory {parent!r} is not writable"
    return None


__all__ = ["unwritable"]
