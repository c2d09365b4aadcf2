"""`fenfa advise MODULE:FUNC [ARG ...]`: the backend auto would choose, the evidence, the call.

Each test writes a small target module into ``tmp_path`` and runs the
command there, as a user would (``python -m fenfa advise ...``), or in
process through ``fenfa.cli.main`` where only the output is of interest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fenfa.auto import Decision
from fenfa.cli import main

TARGETS = """
import asyncio
import time


def wait(seconds):
    time.sleep(seconds)
    return seconds


def count(n):
    x = 0
    while x < n:
        x += 1
    return x


def identity(x):
    return x


def loud(x):
    print("output of the function itself", x)
    return x


async def fetch(seconds):
    await asyncio.sleep(seconds)
    return seconds


def fail(x):
    raise ValueError(f"no good: {x}")


class Box:
    @staticmethod
    def add(a, b):
        return a + b


VALUE = 3
"""

# Counting to this takes ~5-10 ms in CPython on the project machine: well
# above any dispatch cost, well below a test's time budget.
COUNT_TO = 300_000


def advise(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fenfa", "advise", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``work.py`` (and a module that fails to import) in the current directory.

    In process, the command puts the current directory on ``sys.path`` and
    imports ``work``: both are undone afterwards.
    """
    (tmp_path / "work.py").write_text(TARGETS)
    (tmp_path / "broken.py").write_text("import fenfa_no_such_dependency\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("work", "broken"):
        sys.modules.pop(name, None)


@pytest.mark.timeout(60)
def test_a_sleeping_function_goes_to_threads(work: Path) -> None:
    proc = advise(work, "work:wait", "0.02")
    assert proc.returncode == 0, proc.stderr
    assert "recommended backend: thread" in proc.stdout
    assert "mostly waits" in proc.stdout
    assert 'fenfa.map(work.wait, inputs, backend="thread")' in proc.stdout
    assert "import work" in proc.stdout


@pytest.mark.timeout(60)
def test_pure_python_counting_goes_to_processes_and_the_repeats_are_said(work: Path) -> None:
    proc = advise(work, "work:count", str(COUNT_TO))
    assert proc.returncode == 0, proc.stderr
    assert "recommended backend: process" in proc.stdout
    assert "pure Python" in proc.stdout
    assert 'fenfa.map(work.count, inputs, backend="process")' in proc.stdout
    # One sample cannot be measured ~20 ms long: it ran several times, and says so.
    assert "your 1 sample input, repeated" in proc.stdout
    runs = int(proc.stdout.split("ran work.count ")[1].split(" times")[0])
    assert runs >= 2


@pytest.mark.timeout(60)
def test_identity_is_tiny_work_and_runs_serially(work: Path) -> None:
    proc = advise(work, "--json", "work:identity", *map(str, range(100)))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "serial"
    assert report["call"] == 'fenfa.map(work.identity, inputs, backend="serial")'
    assert report["runs"] >= report["samples"] == 100
    assert report["task_seconds"] < 1e-5
    assert report["error"] is None
    assert {"reason", "cpu_ratio", "parallel_slowdown", "tasks_measured"} <= report.keys()


def test_identity_text_explains_tiny_work(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "work:identity", *map(str, range(100))]) == 0
    out = capsys.readouterr().out
    assert "recommended backend: serial" in out
    assert "takes only" in out
    assert "wall time per call" in out


def test_a_coroutine_function_goes_to_async(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "work:fetch", "0.001", "0.002"]) == 0
    out = capsys.readouterr().out
    assert "recommended backend: async" in out
    assert "coroutine function" in out
    assert 'fenfa.map(work.fetch, inputs, backend="async")' in out
    assert "await fenfa.amap(work.fetch, inputs)" in out
    # Not measured: nothing to repeat, and no evidence to print.
    assert "ran work.fetch 2 times" in out
    assert "evidence: not measured" in out


def test_json_has_every_decision_field(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "work:fetch", "0.001", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(Decision.__dataclass_fields__) <= report.keys()
    assert report["backend"] == "async"
    assert report["runs"] == 1
    assert report["target"] == "work:fetch"


def test_arrays_are_positional_arguments(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = work / "pairs.jsonl"
    inputs.write_text("[1, 2]\n\n[3, 4]\n")
    assert main(["advise", "work:Box.add", "--input", str(inputs), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["call"].startswith("fenfa.starmap(work.Box.add, inputs, ")
    assert report["samples"] == 2


def test_a_py_file_can_be_the_module(
    work: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "filetarget.py").write_text(TARGETS)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    proc = advise(elsewhere, f"{work / 'filetarget.py'}:identity", "1", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["call"].startswith("fenfa.map(filetarget.identity, ")


@pytest.mark.timeout(60)
def test_the_functions_own_output_stays_out_of_the_json(work: Path) -> None:
    proc = advise(work, "work:loud", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["runs"] >= 1
    assert "output of the function itself 1" in proc.stderr


def test_a_failing_task_is_reported_with_exit_1_and_advice(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["advise", "work:fail", "7"]) == 1
    captured = capsys.readouterr()
    assert "recommended backend:" in captured.out
    assert "ValueError: no good: 7" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuch:f", "no module named 'nosuch'"),
        ("work:nope", "module 'work' has no attribute 'nope'"),
        ("work:Box.nope", "'work:Box' has no attribute 'nope'"),
        ("work:VALUE", "'work:VALUE' is not callable (it is int)"),
        ("work", "the target must be MODULE:FUNC"),
        ("missing.py:f", "no file 'missing.py'"),
        ("broken:f", "importing 'broken' failed: ModuleNotFoundError"),
    ],
)
def test_a_bad_target_is_a_one_line_error(
    work: Path, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert main(["advise", target, "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fenfa advise: ")
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("1\n{not json\n", "line 2 is not JSON"),
        ("\n", "sample inputs are needed"),
    ],
)
def test_a_bad_input_file_is_a_one_line_error(
    work: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = work / "inputs.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["advise", "work:identity", "--input", str(path)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1


def test_no_inputs_is_an_error(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "work:identity"]) == 2
    assert "sample inputs are needed" in capsys.readouterr().err


def test_the_exit_status_of_the_real_command(work: Path) -> None:
    proc = advise(work, "nosuch:f", "1")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "fenfa advise: no module named 'nosuch'\n"
    usage = advise(work)
    assert usage.returncode == 2
    assert "required: MODULE:FUNC" in usage.stderr


def test_args_are_json_when_they_parse() -> None:
    from fenfa.cli.advise import parse_value

    assert parse_value("1.5") == 1.5
    assert parse_value('{"a": [1]}') == {"a": [1]}
    assert parse_value("hello") == "hello"
    assert parse_value('"hello"') == "hello"
