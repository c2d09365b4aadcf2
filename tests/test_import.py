"""``import fenfa`` is cheap (issue 17): it imports nothing a plain script does not use.

Every public name is loaded on first use (``fenfa.__getattr__``); these tests
run a fresh interpreter, since this one has long imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fenfa

#: What `import fenfa` alone must not bring in: a progress bar, logging's
#: handlers, inspect and dataclasses (whose import alone costs milliseconds),
#: the shared-memory and insights machinery, asyncio, multiprocessing.
DENIED = [
    "tqdm",
    "logging.handlers",
    "inspect",
    "dataclasses",
    "fenfa.sharing",
    "fenfa.segments",
    "fenfa.autoshare",
    "fenfa.insights",
    "fenfa.pool",
    "fenfa.pool_base",
    "asyncio",
    "multiprocessing",
    "cloudpickle",
    "concurrent.futures",
]


def modules_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.timeout(60)
def test_import_fenfa_pulls_in_nothing_from_the_deny_list() -> None:
    loaded = modules_after("import fenfa")
    assert not loaded & set(DENIED), sorted(loaded & set(DENIED))


@pytest.mark.timeout(60)
def test_every_public_name_resolves_and_is_listed() -> None:
    for name in fenfa.__all__:
        assert getattr(fenfa, name) is not None, name
    assert set(fenfa.__all__) <= set(dir(fenfa))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fenfa.nope  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.timeout(60)
def test_a_plain_thread_map_does_not_start_asyncio_or_tqdm() -> None:
    loaded = modules_after("import fenfa\nassert fenfa.map(abs, [-1], backend='thread') == [1]")
    assert not loaded & {"tqdm", "asyncio", "logging.handlers"}, sorted(
        loaded & {"tqdm", "asyncio", "logging.handlers"}
    )


@pytest.mark.timeout(60)
def test_a_thread_pool_needs_neither_cloudpickle_nor_the_insights_records() -> None:
    code = "import fenfa\nwith fenfa.Pool('thread', 2) as p:\n    assert p.map(abs, [-1]) == [1]"
    loaded = modules_after(code)
    assert not loaded & {"cloudpickle", "fenfa.summary"}, sorted(loaded)
    # (still importable from where they were)
    assert modules_after("from fenfa.insights import Summary, TaskRecord") >= {"fenfa.summary"}


def test_the_package_pickles_by_name() -> None:
    """A __main__ function sent by value refers to fenfa: the package must pickle."""
    import pickle

    import cloudpickle

    assert pickle.loads(pickle.dumps(fenfa)) is fenfa
    assert pickle.loads(cloudpickle.dumps(fenfa)) is fenfa


@pytest.mark.timeout(60)
def test_fenfa_shell_stays_the_function_once_fenfa_run_is_imported() -> None:
    """``fenfa run`` imports the module behind ``fenfa.shell``: that must not replace it."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fenfa, fenfa.cli.run, fenfa._shell, types\n"
            "assert type(fenfa) is types.ModuleType, type(fenfa)\n"
            "assert callable(fenfa.shell) and fenfa.shell.__name__ == 'shell', fenfa.shell\n"
            "print(fenfa.shell('echo ok').text, end='')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == "ok\n"
