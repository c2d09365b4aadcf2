"""The target of ``fenfa map`` and ``fenfa advise``: ``MODULE:FUNC``, imported as the user means it.

Both commands name a function the same way and must fail the same way when
it cannot be had (one line, exit status 2), so the import, the argument that
names it and the redirection of the function's own printing live here once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

TARGET_HELP = (
    "a module importable from here (or a .py file) and a function in it, "
    "e.g. work:fetch or work.py:Parser.parse"
)


def add_target(parser: argparse.ArgumentParser, what: str) -> None:
    """The MODULE:FUNC argument, said the same way by every command that takes one."""
    parser.add_argument("target", metavar="MODULE:FUNC", help=f"{TARGET_HELP}; {what}")


class BadTarget(Exception):
    """The target or the inputs are unusable: a one-line message, exit status 2."""


# -- the target ---------------------------------------------------------


def load_target(target: str) -> tuple[Callable[..., Any], str, str]:
    """The function named by ``MODULE:FUNC``, the module's import name, and the code name.

    MODULE is a dotted name importable from the current directory (which goes
    first on ``sys.path``, as with ``python -m``) or the path of a ``.py`` file.
    """
    module_name, colon, attributes = target.rpartition(":")
    if not colon or not module_name or not attributes:
        raise BadTarget(f"the target must be MODULE:FUNC, got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        module = _import_file(Path(module_name))
        module_name = module.__name__
    else:
        cwd = os.getcwd()
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        module = _import(module_name)
    found: Any = module
    walked = f"module {module_name!r}"
    for depth, attribute in enumerate(attributes.split(".")):
        if not hasattr(found, attribute):
            raise BadTarget(f"{walked} has no attribute {attribute!r}")
        found = getattr(found, attribute)
        walked = repr(f"{module_name}:{'.'.join(attributes.split('.')[: depth + 1])}")
    if not callable(found):
        raise BadTarget(f"{target!r} is not callable (it is {type(found).__name__})")
    return found, module_name, f"{module_name}.{attributes}"


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise BadTarget(f"no module named {name!r}") from exc
        raise BadTarget(f"importing {name!r} failed: {one_line(exc)}") from exc
    except Exception as exc:  # the module's own code failed: say so, in one line
        raise BadTarget(f"importing {name!r} failed: {one_line(exc)}") from exc


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise BadTarget(f"no file {str(path)!r}")
    name = path.stem
    if name in sys.modules:
        raise BadTarget(f"a module named {name!r} is already imported; rename {str(path)!r}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadTarget(f"cannot import {str(path)!r}")
    # As `python path/to/file.py` does: its folder goes first on sys.path, so
    # its own imports of neighbouring modules work (in workers too).
    sys.path.insert(0, str(path.resolve().parent))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise BadTarget(f"importing {str(path)!r} failed: {one_line(exc)}") from exc
    # A worker process started before sys.path changed could not import it
    # by name: send its functions by value instead.
    cloudpickle.register_pickle_by_value(module)
    return module


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def output_to_stderr() -> Iterator[None]:
    """The function's own prints go to stderr, so stdout holds only the advice."""
    saved: int | None = None
    # Worker processes write to file descriptor 1 itself; without a real file
    # behind sys.stdout (captured, as in tests) only this process's prints move.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd, err = sys.stdout.fileno(), sys.stderr.fileno()
        sys.stdout.flush()
        saved = os.dup(fd)
        os.dup2(err, fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, sys.stdout.fileno())
            os.close(saved)


__all__ = ["BadTarget", "add_target", "load_target", "one_line", "output_to_stderr"]
