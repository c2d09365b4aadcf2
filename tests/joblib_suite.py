"""A pytest plugin that runs joblib's own test suite with the backend "fenfa" registered.

joblib's ``test_parallel.py`` builds its backend lists (``BACKENDS``,
``ALL_VALID_BACKENDS``, ``RETURN_GENERATOR_BACKENDS``) from joblib's registry
when it is imported; a plugin is imported before that, so importing
``fenfa.joblib`` here puts "fenfa" (the name, and an instance) in every test
parametrised over all registered backends. Run it from the installed package,
outside this repository (its pytest settings are fenfa's, not joblib's)::

    cd "$(mktemp -d)" && PYTHONPATH=/path/to/fenfa/tests \\
        python -m pytest -p joblib_suite --pyargs joblib.test.test_parallel [--fenfa-only]

``--fenfa-only`` keeps the tests whose parameters name the fenfa backend.

joblib's registry is per process: a backend registered in the test process
is unknown in a loky worker, which starts a fresh interpreter and never
imports this plugin (``test_nested_loop[loky-fenfa]`` names "fenfa" there).
A user does what such a worker needs, ``import fenfa.joblib`` in the module
of the task; here, a ``sitecustomize`` on the children's ``PYTHONPATH``
does it for every interpreter the run starts. (fenfa's own process workers
need neither: each batch's function is in ``fenfa.joblib``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

import fenfa.joblib


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fenfa-only",
        action="store_true",
        help="run only the tests parametrised with the fenfa backend",
    )


_site: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    directory = Path(tempfile.mkdtemp(prefix="fenfa-joblib-suite-"))
    _site.append(directory)
    (directory / "sitecustomize.py").write_text("import fenfa.joblib\n")
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{directory}{os.pathsep}{path}" if path else str(directory)
    config.addinivalue_line("markers", "thread_unsafe: joblib's own marker")
    config.addinivalue_line("markers", "no_cover: joblib's own marker")


def _names_fenfa(value: Any) -> bool:
    if value == "fenfa" or isinstance(value, fenfa.joblib.Backend):
        return True
    return isinstance(value, tuple | list) and any(_names_fenfa(v) for v in value)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fenfa-only"):
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        (keep if any(_names_fenfa(v) for v in params) else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


def pytest_sessionfinish(session: pytest.Session) -> None:
    fenfa.joblib.shutdown()


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _site:
        shutil.rmtree(directory, ignore_errors=True)
