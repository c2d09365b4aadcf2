"""A file next to the user's script named like a standard-library module.

``queue.py``, ``signal.py`` or ``select.py`` beside a script is imported in
place of the standard module by everything that runs later: by
multiprocessing in the caller (an ``AttributeError`` deep inside the
standard library) and by every worker a spawn or forkserver start re-imports
(a worker dead before it started). fenfa names the file instead.
"""

from __future__ import annotations

import os
import sys

__all__ = ["check", "check_directory", "shadowing_files"]


def _user_dirs() -> list[str]:
    """Where the user's own modules come first on sys.path: the script's directory, or cwd."""
    dirs = []
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        dirs.append(os.path.dirname(os.path.abspath(main_file)))
    if sys.path and sys.path[0] in ("", os.getcwd()):
        dirs.append(os.getcwd())
    return list(dict.fromkeys(dirs))


def _shadowing_in(directory: str) -> list[tuple[str, str]]:
    """(module name, path) of each module or package in ``directory`` named like a standard one.

    A module is ``NAME.py`` or a compiled ``NAME.*.so``; a package a directory
    with an ``__init__.py`` (a directory without one is a namespace package,
    which loses to the standard module wherever that is on ``sys.path``).
    """
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    found = []
    for entry in sorted(entries):
        path = os.path.join(directory, entry)
        if entry.endswith(".py"):
            name = entry[:-3]
        elif entry.endswith(".so"):
            name = entry.split(".", 1)[0]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            name = entry
        else:
            continue
        if name in sys.stdlib_module_names and name != "__main__" and _on_this_platform(name):
            found.append((name, path))
    return found


def _on_this_platform(name: str) -> bool:
    """A standard module this Python has (not Windows' ``nt`` or ``msvcrt`` on Linux)."""
    if name in sys.modules or name in sys.builtin_module_names:
        return True
    import sysconfig  # (only when a file beside the script has a standard name)

    stdlib = sysconfig.get_paths()["stdlib"]
    if os.path.exists(os.path.join(stdlib, name + ".py")) or os.path.isdir(
        os.path.join(stdlib, name)
    ):
        return True
    dynload = os.path.join(stdlib, "lib-dynload")
    try:
        return any(entry.split(".", 1)[0] == name for entry in os.listdir(dynload))
    except OSError:
        return False


def shadowing_files() -> list[str]:
    """Files or packages beside the script that hide a standard-library module."""
    return [path for directory in _user_dirs() for _name, path in _shadowing_in(directory)]


def check_directory(directory: str) -> None:
    """Raise if ``directory``, put first on ``sys.path``, hides a module this process uses.

    For a directory added to ``sys.path`` after the standard modules were
    imported (``fenfa map`` adds the current one, to import MODULE): they
    stay right here, but every worker started from now on gets that path
    and imports the file in their place, and dies before it starts.
    """
    wrong = [path for name, path in _shadowing_in(directory) if name in sys.modules]
    if wrong:
        raise ImportError(_describe(wrong))


def _describe(paths: list[str]) -> str:
    files = ", ".join(paths)
    names = ", ".join(f"'{os.path.basename(p).removesuffix('.py')}'" for p in paths)
    return (
        f"{files} has the name of a standard-library module ({names}): Python imports it "
        "in place of that module, in this process and in every worker process. "
        "Rename it (for example my_" + os.path.basename(paths[0]) + ")."
    )


def check() -> None:
    """Raise if a module the standard library should provide came from the user's directory."""
    dirs = _user_dirs()
    if not dirs:
        return
    wrong = []
    for name, module in list(sys.modules.items()):
        if "." in name or name not in sys.stdlib_module_names:
            continue
        path = getattr(module, "__file__", None)
        if path and os.path.dirname(os.path.abspath(path)) in dirs:
            wrong.append(os.path.abspath(path))
        elif path and os.path.basename(path) == "__init__.py":
            package_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if package_dir in dirs:
                wrong.append(os.path.dirname(os.path.abspath(path)))
    if wrong:
        raise ImportError(_describe(sorted(set(wrong))))


def hint() -> str:
    """A sentence for errors about workers that die at start, when a file may be the cause."""
    paths = shadowing_files()
    return " " + _describe(paths) if paths else ""
