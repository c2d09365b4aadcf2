"""``fenfa map MODULE:FUNC INPUT.jsonl -o OUTPUT.jsonl``: a function over a file of records.

``fenfa map`` is run as a user runs it, in a subprocess, on a task module
written to the test's directory (importable from there, as the current
directory is). The tasks coordinate with the test through marker files:
a task that must finish last waits for another's marker, a task that must
hang waits for ``release`` (which the ``release`` fixture creates at the end,
or after a watchdog's delay). The kill tests send real signals mid-run and
check, through the output and the workers' own pid files, that after
``--resume`` every record has exactly one complete line, that the output was
only ever appended to, and that no worker outlived the kill.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import gone, reaped, session_processes, wait_for, worker_pids

FENFA = [sys.executable, "-m", "fenfa", "map"]

TASKS = '''
import asyncio
import os
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_CALLABLE = 42


class Refused(Exception):
    """The user's own exception type: its name must reach the error line."""


def _wait(ready, what, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:g} s for {what}")
        time.sleep(0.005)


def _hang():
    """Returns only when the test creates `release` (or after 60 s)."""
    deadline = time.monotonic() + 60
    while not (HERE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def double(x):
    return x * 2


def chatty(x):
    print("chatter", x)
    return x * 2


async def adouble(x):
    await asyncio.sleep(0)
    return x * 2


def describe(x):
    return {"type": type(x).__name__, "x": x}


def where(x):
    return {"pid": os.getpid(), "thread": threading.current_thread().name, "y": x * 2}


def logged(x):
    with open(HERE / "calls", "a") as calls:
        calls.write(f"{x}\\n")
    return x * 2


def gather(x):
    """Returns once three records run at once: it needs three workers."""
    (HERE / f"started-{x}").touch()
    _wait(lambda: len(list(HERE.glob("started-*"))) >= 3, "three records at once", 10)
    return x


def zero_after_three(x):
    """Record 0 returns only after record 3 has: it finishes last."""
    if x == 0:
        _wait((HERE / "done-3").exists, "record 3")
    (HERE / f"done-{x}").touch()
    return x * 10


def zero_after_lines(x):
    """Record 0 returns only once the three others have their lines in out.jsonl."""
    if x == 0:
        out = HERE / "out.jsonl"
        _wait(lambda: out.exists() and out.read_bytes().count(b"\\n") >= 3, "3 lines")
    return x * 10


def refuse_3(x):
    if x == 3:
        raise Refused(f"no {x}")
    return x * 2


def broken_odd(x):
    logged(x)
    if (HERE / "broken").exists() and x % 2:
        raise Refused(f"odd {x}")
    return x * 2


def hang_on_2(x):
    if x == 2:
        _hang()
    return x


def flaky(x):
    """Fails its first try at each record."""
    with open(HERE / f"tries-{x}", "a") as tries:
        tries.write("try\\n")
    if (HERE / f"tries-{x}").read_text().count("try") == 1:
        raise Refused(f"first try at {x}")
    return x


def unjsonable(x):
    if x == 1:
        return {1, 2}  # a set
    if x == 2:
        loop = []
        loop.append(loop)
        return loop
    return x


def gated(x):
    """Notes its worker's pid; from record 100 on, hangs while `slow` exists."""
    (HERE / "pids" / f"pid-{os.getpid()}").touch()
    if x >= 100 and (HERE / "slow").exists():
        (HERE / f"blocked-{x}").touch()
        _hang()
    return x * x
'''


@pytest.fixture(autouse=True)
def tasks(tmp_path: Path) -> Path:
    path = tmp_path / "maptasks.py"
    path.write_text(TASKS)
    return path


@dataclass
class Ran:
    returncode: int
    stderr: str
    pid: int

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def run(*args: str, cwd: Path, stdin: bytes | None = None, timeout: float = 30) -> Ran:
    proc = subprocess.Popen(
        [*FENFA, *args],
        cwd=cwd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = proc.communicate(stdin, timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Ran(proc.returncode, err.decode(), proc.pid)


def write_input(path: Path, *values: Any) -> Path:
    path.write_text("".join(json.dumps(v) + "\n" for v in values))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    """The output's complete records, in file order (a torn line is left out)."""
    found = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def by_input(path: Path) -> dict[str, dict[str, Any]]:
    """The records by their input's JSON text."""
    return {json.dumps(r["input"]): r for r in records(path)}


def summary(done: int, skipped: int, failed: int) -> str:
    return f"fenfa map: {done} done, {skipped} skipped (already done), {failed} failed"


# -- records in, records out ---------------------------------------------------------


def test_one_line_per_record_and_blank_lines_take_no_index(tmp_path: Path) -> None:
    values: list[Any] = [3, "ab", [1, 2], {"a": None}, None, 2.5, True]
    text = "".join(json.dumps(v) + "\n\n  \n" for v in values).rstrip("\n")  # no final newline
    (tmp_path / "in.jsonl").write_text("\n" + text)
    ran = run("maptasks:describe", "in.jsonl", "-o", "out.jsonl", "-k", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.lines == [summary(len(values), 0, 0)]
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == len(values)
    out = [json.loads(line) for line in lines]
    assert [list(r) for r in out] == [["index", "key", "input", "output"]] * len(values)
    assert [r["index"] for r in out] == list(range(len(values)))
    assert [r["input"] for r in out] == values
    assert [r["output"] for r in out] == [{"type": type(v).__name__, "x": v} for v in values]
    keys = [r["key"] for r in out]
    assert len(set(keys)) == len(values)
    assert all(re.fullmatch("[0-9a-f]{16}", k) for k in keys)


def test_keep_order_writes_in_input_order(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 0, 1, 2, 3)
    # Record 0 finishes after record 3; -k still writes it first.
    args = ("--backend", "thread", "-j", "4", "--chunksize", "1", "-k")
    ran = run("maptasks:zero_after_three", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert [(r["index"], r["output"]) for r in records(tmp_path / "out.jsonl")] == [
        (0, 0), (1, 10), (2, 20), (3, 30),
    ]  # fmt: skip


def test_by_default_lines_come_as_records_finish(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 0, 1, 2, 3)
    # Record 0 waits for the others' lines: only completion order lets it finish.
    args = ("--backend", "thread", "-j", "4", "--chunksize", "1")
    ran = run("maptasks:zero_after_lines", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    out = records(tmp_path / "out.jsonl")
    assert out[-1]["index"] == 0
    assert sorted((r["index"], r["input"], r["output"]) for r in out) == [
        (i, i, i * 10) for i in range(4)
    ]


@pytest.mark.parametrize("backend", ["serial", "thread", "process", "dask"])
def test_each_backend_runs_the_records_where_it_should(backend: str, tmp_path: Path) -> None:
    if backend == "dask":
        pytest.importorskip("distributed")  # (the run starts a LocalCluster of its own)
    write_input(tmp_path / "in.jsonl", *range(20))
    ran = run("maptasks:where", "in.jsonl", "-o", "out.jsonl", "--backend", backend, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    out = records(tmp_path / "out.jsonl")
    assert sorted((r["input"], r["output"]["y"]) for r in out) == [(i, 2 * i) for i in range(20)]
    pids = {r["output"]["pid"] for r in out}
    threads = {r["output"]["thread"] for r in out}
    if backend == "serial":
        assert (pids, threads) == ({ran.pid}, {"MainThread"})
    elif backend == "thread":
        assert pids == {ran.pid}
        assert "MainThread" not in threads
    else:
        assert ran.pid not in pids


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_jobs_sets_how_many_records_run_at_once(backend: str, tmp_path: Path) -> None:
    # Each record waits until three run at once: 3 workers, more than the
    # process backend's default on 2 cores.
    write_input(tmp_path / "in.jsonl", 0, 1, 2)
    args = ("--backend", backend, "-j", "3", "--chunksize", "1", "--on-error", "return")
    ran = run("maptasks:gather", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    assert ran.returncode == 0, (tmp_path / "out.jsonl").read_text()
    assert sorted(r["output"] for r in records(tmp_path / "out.jsonl")) == [0, 1, 2]


@pytest.mark.parametrize("backend", ["auto", "async"])
def test_an_async_function_is_awaited(backend: str, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", *range(10))
    ran = run("maptasks:adouble", "in.jsonl", "-o", "out.jsonl", "--backend", backend, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert sorted(r["output"] for r in records(tmp_path / "out.jsonl")) == list(range(0, 20, 2))


@pytest.mark.parametrize(
    ("target", "backend", "message"),
    [
        ("maptasks:adouble", "process", "is a coroutine function: use --backend async"),
        ("maptasks:double", "async", "is not a coroutine function"),
    ],
)
def test_a_function_of_the_wrong_kind_for_the_backend_is_refused(
    target: str, backend: str, message: str, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", 1)
    ran = run(target, "in.jsonl", "-o", "out.jsonl", "--backend", backend, cwd=tmp_path)
    assert ran.returncode == 2
    (line,) = ran.lines
    assert line.startswith("fenfa map: ")
    assert message in line
    assert not (tmp_path / "out.jsonl").exists()


def test_a_file_path_target_works_from_anywhere(tasks: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_input(elsewhere / "in.jsonl", 1, 2, 3)
    target = f"{tasks}:double"
    ran = run(target, "in.jsonl", "-o", "out.jsonl", "--backend", "process", cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr
    assert sorted(r["output"] for r in records(elsewhere / "out.jsonl")) == [2, 4, 6]


def test_stdin_is_read_with_a_dash(tmp_path: Path) -> None:
    ran = run("maptasks:double", "-", "-o", "out.jsonl", "-k", cwd=tmp_path, stdin=b'1\n\n"a"\n')
    assert ran.returncode == 0, ran.stderr
    assert [(r["index"], r["output"]) for r in records(tmp_path / "out.jsonl")] == [
        (0, 2), (1, "aa"),
    ]  # fmt: skip
    failed = run("maptasks:refuse_3", "-", "-o", "out2.jsonl", cwd=tmp_path, stdin=b"1\n\n3\n")
    assert failed.returncode == 1
    assert failed.lines[0] == "fenfa map: record 1 (line 3) failed: Refused: no 3"


# -- failures ------------------------------------------------------------------------

# Record 3 is on line 5: a blank line before it takes no index.
FAILING_INPUT = "0\n1\n\n2\n3\n4\n5\n6\n7\n"


@pytest.mark.parametrize(
    "args",
    [("--backend", "serial"), ("--backend", "thread", "-j", "2", "-k")],
    ids=["serial", "thread-keep-order"],
)
def test_on_error_raise_stops_at_the_first_failure(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(FAILING_INPUT)
    ran = run("maptasks:refuse_3", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.lines == [
        "fenfa map: record 3 (in.jsonl line 5) failed: Refused: no 3",
        summary(3, 0, 1),
    ]
    # In input order up to the failure: everything before it is written, nothing after.
    assert [(r["input"], r["output"]) for r in records(tmp_path / "out.jsonl")] == [
        (0, 0), (1, 2), (2, 4),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_on_error_return_writes_an_error_line_and_goes_on(backend: str, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(FAILING_INPUT)
    args = ("--on-error", "return", "--backend", backend)
    ran = run("maptasks:refuse_3", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.lines == [summary(7, 0, 1)]
    out = by_input(tmp_path / "out.jsonl")
    assert len(records(tmp_path / "out.jsonl")) == len(out) == 8
    failed = out.pop("3")
    assert list(failed) == ["index", "key", "input", "error"]
    assert failed["index"] == 3
    assert failed["error"] == {"type": "Refused", "message": "no 3"}
    assert {k: r["output"] for k, r in out.items()} == {str(i): 2 * i for i in range(8) if i != 3}


def test_on_error_skip_writes_nothing_for_it_and_resume_tries_again(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", *range(6))
    (tmp_path / "broken").touch()
    args = ("in.jsonl", "-o", "out.jsonl", "--on-error", "skip")
    ran = run("maptasks:broken_odd", *args, cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.lines == [summary(3, 0, 3)]
    assert sorted(by_input(tmp_path / "out.jsonl")) == ["0", "2", "4"]
    (tmp_path / "broken").unlink()
    (tmp_path / "calls").unlink()
    again = run("maptasks:broken_odd", *args, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted((tmp_path / "calls").read_text().split()) == ["1", "3", "5"]
    assert sorted(r["input"] for r in records(tmp_path / "out.jsonl")) == list(range(6))


def test_a_malformed_line_with_raise_ends_the_input_there(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("0\n1\n\n2\n{oops\n4\n")
    ran = run("maptasks:double", "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.lines[0].startswith("fenfa map: in.jsonl line 5: not JSON: ")
    assert ran.lines[1:] == [summary(3, 0, 1)]
    assert sorted(r["output"] for r in records(tmp_path / "out.jsonl")) == [0, 2, 4]


def test_a_malformed_line_with_return_is_an_error_record(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'0\n{oops\n2\n"\xff"\n4\n')
    args = ("in.jsonl", "-o", "out.jsonl", "--on-error", "return", "-k")
    ran = run("maptasks:double", *args, cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.lines == [summary(3, 0, 2)]
    out = records(tmp_path / "out.jsonl")
    assert [(r["index"], r.get("output")) for r in out] == [
        (0, 0), (1, None), (2, 4), (3, None), (4, 8),
    ]  # fmt: skip
    assert out[1]["input"] == "{oops"  # the line's text, as a JSON string
    assert out[1]["error"]["type"] == "MalformedInput"
    assert out[1]["error"]["message"].startswith("line 2: not JSON: ")
    assert out[3]["error"]["type"] == "MalformedInput"
    assert out[3]["error"]["message"].startswith("line 4: not UTF-8: ")


def test_a_result_that_is_not_json_is_a_serialization_error(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 0, 1, 2, 3)
    args = ("in.jsonl", "-o", "out.jsonl", "--on-error", "return")
    ran = run("maptasks:unjsonable", *args, cwd=tmp_path)
    assert ran.returncode == 1
    out = by_input(tmp_path / "out.jsonl")
    assert out["0"]["output"] == 0
    assert out["3"]["output"] == 3
    for bad in ("1", "2"):
        assert "output" not in out[bad]
        assert out[bad]["error"]["type"] == "SerializationError"
        assert out[bad]["error"]["message"].startswith("the result is not JSON: ")


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_hung_record_times_out_and_the_run_ends(
    backend: str, release: Path, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", 0, 1, 2, 3)
    args = ("--timeout", "0.5", "--on-error", "return", "--backend", backend)
    ran = run("maptasks:hang_on_2", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
    # The run ended while record 2 still hung: a thread that cannot be
    # stopped is abandoned, not waited for.
    assert not release.exists()
    assert ran.returncode == 1
    assert ran.lines == [summary(3, 0, 1)]
    out = by_input(tmp_path / "out.jsonl")
    assert out["2"]["error"]["type"] == "TaskTimeout"
    assert [out[k]["output"] for k in ("0", "1", "3")] == [0, 1, 3]


def test_retries_run_a_failed_record_again(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 0, 1, 2, 3)
    ran = run("maptasks:flaky", "in.jsonl", "-o", "out.jsonl", "--retries", "1", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert sorted(r["output"] for r in records(tmp_path / "out.jsonl")) == [0, 1, 2, 3]
    assert [(tmp_path / f"tries-{i}").read_text() for i in range(4)] == ["try\ntry\n"] * 4
    # Without --retries, the same first failures are final.
    write_input(tmp_path / "in2.jsonl", 10, 11)
    args = ("in2.jsonl", "-o", "out2.jsonl", "--on-error", "return")
    once = run("maptasks:flaky", *args, cwd=tmp_path)
    assert once.returncode == 1
    assert [r["error"]["type"] for r in records(tmp_path / "out2.jsonl")] == ["Refused"] * 2


# -- bad usage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("maptasks", "the target must be MODULE:FUNC, got 'maptasks'"),
        ("no_such_module_here:f", "no module named 'no_such_module_here'"),
        ("maptasks:nope", "module 'maptasks' has no attribute 'nope'"),
        ("maptasks:NOT_CALLABLE", "'maptasks:NOT_CALLABLE' is not callable (it is int)"),
        ("missing.py:f", "no file 'missing.py'"),
    ],
)
def test_a_bad_target_is_one_line_and_exit_2(target: str, message: str, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 1)
    ran = run(target, "in.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.lines == [f"fenfa map: {message}"]
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_files_and_options_are_refused_with_exit_2(tmp_path: Path) -> None:
    missing = run("maptasks:double", "missing.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.lines == ["fenfa map: cannot read 'missing.jsonl': No such file or directory"]
    assert not (tmp_path / "out.jsonl").exists()

    write_input(tmp_path / "in.jsonl", 1)
    precious = tmp_path / "out.jsonl"
    precious.write_text("precious\n")
    for args in (
        [],  # an output that exists, without --resume
        ["--resume-failed"],  # without --resume
        ["--resume", "-o", "in.jsonl"],  # INPUT as OUTPUT
    ):
        ran = run("maptasks:double", "in.jsonl", "-o", "out.jsonl", *args, cwd=tmp_path)
        assert ran.returncode == 2
        (line,) = ran.lines
        assert line.startswith("fenfa map: ")
        assert precious.read_text() == "precious\n"
        assert (tmp_path / "in.jsonl").read_text() == "1\n"

    precious.write_text("")  # an empty output is no one's work: it is used
    assert run("maptasks:double", "in.jsonl", "-o", "out.jsonl", cwd=tmp_path).returncode == 0
    assert [r["output"] for r in records(precious)] == [2]


# -- resume --------------------------------------------------------------------------


def test_resume_skips_what_is_done_whatever_the_order_and_ignores_a_torn_line(
    tmp_path: Path,
) -> None:
    values = [*range(10), 7]  # 7 twice: each of its lines covers one of them
    write_input(tmp_path / "in.jsonl", *values)
    first = run("maptasks:logged", "in.jsonl", "-o", "full.jsonl", "-k", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    full = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    # What a run killed after records 0-3 and one 7 leaves, its next line torn:
    kept = "".join([*full[:4], full[7]]) + full[4][:30]
    out = tmp_path / "out.jsonl"
    out.write_text(kept)
    (tmp_path / "calls").unlink()
    write_input(tmp_path / "in.jsonl", *reversed(values), 10)  # reordered, and grown
    again = run("maptasks:logged", "in.jsonl", "-o", "out.jsonl", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.lines == [summary(7, 5, 0)]
    assert sorted(map(int, (tmp_path / "calls").read_text().split())) == [4, 5, 6, 7, 8, 9, 10]
    text = out.read_text()
    assert text.startswith(kept + "\n")  # appended to, the torn line ended and left
    done = records(out)
    assert len(done) == len(text.splitlines()) - 1  # only the torn line does not parse
    assert Counter(r["input"] for r in done) == Counter([*values, 10])
    assert all(r["output"] == 2 * r["input"] for r in done)


def test_resume_failed_runs_the_error_records_again(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", *range(6))
    (tmp_path / "broken").touch()
    args = ("maptasks:broken_odd", "in.jsonl", "-o", "out.jsonl", "--on-error", "return")
    assert run(*args, cwd=tmp_path).returncode == 1
    (tmp_path / "broken").unlink()
    (tmp_path / "calls").unlink()
    before = (tmp_path / "out.jsonl").read_text()

    resumed = run(*args, "--resume", cwd=tmp_path)  # error lines count as done
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.lines == [summary(0, 6, 0)]
    assert (tmp_path / "out.jsonl").read_text() == before
    assert not (tmp_path / "calls").exists()

    failed_again = run(*args, "--resume", "--resume-failed", cwd=tmp_path)
    assert failed_again.returncode == 0, failed_again.stderr
    assert failed_again.lines == [summary(3, 3, 0)]
    assert sorted((tmp_path / "calls").read_text().split()) == ["1", "3", "5"]
    text = (tmp_path / "out.jsonl").read_text()
    assert text.startswith(before)
    new = [json.loads(line) for line in text[len(before) :].splitlines()]
    assert sorted((r["input"], r["output"]) for r in new) == [(1, 2), (3, 6), (5, 10)]

    nothing_left = run(*args, "--resume", "--resume-failed", cwd=tmp_path)
    assert nothing_left.lines == [summary(0, 6, 0)]


# -- killed mid-run ------------------------------------------------------------------

KILL_RECORDS = 200


@contextlib.contextmanager
def started(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``fenfa map`` in its own session; whatever is left of the session is killed at the end."""
    proc = subprocess.Popen(
        [*FENFA, *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with reaped(proc):
        yield proc


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_then_resumed_every_record_has_exactly_one_line(
    how: signal.Signals, release: Path, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", *range(KILL_RECORDS))
    (tmp_path / "pids").mkdir()
    (tmp_path / "slow").touch()
    out = tmp_path / "out.jsonl"
    args = ("maptasks:gated", "in.jsonl", "-o", "out.jsonl", "--backend", "process", "-j", "2")
    with started(tmp_path, *args, "--chunksize", "4") as proc:
        wait_for(lambda: complete_lines(out) >= 20, "20 records to be written", 30)
        wait_for(lambda: any(tmp_path.glob("blocked-*")), "a record to be running", 30)
        workers = worker_pids(tmp_path / "pids")
        assert workers
        proc.send_signal(how)
        assert proc.wait(timeout=20) == (-signal.SIGKILL if how == signal.SIGKILL else 130)
        # No worker outlives the run, nor anything else it started.
        wait_for(lambda: all(gone(pid) for pid in workers), "every worker to be gone", 10)
        wait_for(lambda: not session_processes(proc.pid), "the run's session to end", 10)
    assert not release.exists()  # the hung records were killed, not released
    after_kill = out.read_bytes()
    assert 20 <= after_kill.count(b"\n") < KILL_RECORDS

    (tmp_path / "slow").unlink()
    resumed = run(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    text = out.read_bytes()
    assert text.startswith(after_kill)  # appended to, never truncated
    assert text.endswith(b"\n")
    # A line torn by the kill stays where it was, and is the only one that does not parse.
    torn = after_kill.rsplit(b"\n", 1)[-1]
    lines = text.split(b"\n")[:-1]
    done = records(out)
    assert len(lines) - len(done) == (1 if torn else 0)
    assert sorted(r["index"] for r in done) == list(range(KILL_RECORDS))
    assert all(r["input"] == r["index"] and r["output"] == r["index"] ** 2 for r in done)


@pytest.mark.timeout(40)
def test_ctrl_c_does_not_wait_for_a_hung_thread(release: Path, tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 0, 100)
    (tmp_path / "pids").mkdir()
    (tmp_path / "slow").touch()
    args = ("maptasks:gated", "in.jsonl", "-o", "out.jsonl", "--backend", "thread")
    with started(tmp_path, *args) as proc:
        wait_for(lambda: complete_lines(tmp_path / "out.jsonl") >= 1, "record 0", 20)
        wait_for((tmp_path / "blocked-100").exists, "record 100 to hang", 20)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    assert not release.exists()


# -- the progress bar ----------------------------------------------------------------


def test_bar_draws_a_progress_bar_on_stderr(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", *range(7))
    with_bar = run("maptasks:double", "in.jsonl", "-o", "out.jsonl", "--bar", cwd=tmp_path)
    assert with_bar.returncode == 0, with_bar.stderr
    assert "maptasks.double: 7record" in with_bar.stderr
    assert with_bar.lines[-1] == summary(7, 0, 0)
    plain = run("maptasks:double", "in.jsonl", "-o", "out2.jsonl", cwd=tmp_path)
    assert plain.lines == [summary(7, 0, 0)]  # stderr is not a terminal: no bar


def test_the_bar_is_on_by_default_on_a_terminal(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", *range(7))

    def on_a_terminal(*args: str) -> str:
        leader, follower = pty.openpty()
        # A new pseudo-terminal is 0 columns wide, a real one is not (tqdm draws nothing in 0).
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        try:
            proc = subprocess.Popen(
                [*FENFA, "maptasks:double", "in.jsonl", *args],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=follower,
            )
        finally:
            os.close(follower)
        chunks = []
        try:
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal's last writer closed it
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(leader)
            assert proc.wait(timeout=30) == 0
        return b"".join(chunks).decode()

    assert "maptasks.double: 7record" in on_a_terminal("-o", "out.jsonl")
    assert on_a_terminal("-o", "out2.jsonl", "--no-bar").splitlines() == [summary(7, 0, 0)]


# -- hostile input (issue 15) ----------------------------------------------------------


@pytest.mark.parametrize("on_error", ["raise", "return"])
def test_a_line_nested_too_deeply_is_malformed_input(on_error: str, tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "in.jsonl").write_text(f"1\n{deep}\n3\n")
    ran = run("maptasks:double", "in.jsonl", "-o", "out.jsonl", "-k", "--on-error", on_error,
              cwd=tmp_path)  # fmt: skip
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    out = records(tmp_path / "out.jsonl")
    if on_error == "raise":  # the input ends there: what came before it is done
        assert ran.lines[0] == "fenfa map: in.jsonl line 2: not JSON that Python can read: " \
            "nested too deeply"  # fmt: skip
        assert [r["output"] for r in out] == [2]
        return
    assert [r.get("output") for r in out] == [2, None, 6]  # the rest run
    assert out[1]["error"]["type"] == "MalformedInput"
    assert out[1]["error"]["message"].startswith("line 2: ")


@pytest.mark.parametrize(
    ("output", "args", "message"),
    [
        ("nodir/out.jsonl", [], "cannot write 'nodir/out.jsonl': no directory 'nodir'"),
        ("adir", [], "'adir' is a directory"),
        ("adir", ["--resume"], "'adir' is a directory"),
        ("other.txt", ["--resume"], "'other.txt' exists and is not a fenfa map OUTPUT"),
        ("res.jsonl", ["--resume"], "'res.jsonl' exists and is not a fenfa map OUTPUT"),
        ("-", ["--resume"], "--resume reads what is done from OUTPUT: it needs a file, not -"),
    ],
)
def test_an_unusable_output_is_one_line_and_exit_2_before_any_work(
    output: str, args: list[str], message: str, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", 1)
    (tmp_path / "adir").mkdir()
    (tmp_path / "other.txt").write_text("my notes\n")
    # A fenfa run --results journal is a journal, but not of this kind.
    (tmp_path / "res.jsonl").write_text('{"key": "k", "seq": 1, "command": "c", "exit": 0}\n')
    ran = run("maptasks:chatty", "in.jsonl", "-o", output, *args, cwd=tmp_path)
    assert ran.returncode == 2
    (line,) = ran.lines
    assert line.startswith(f"fenfa map: {message}")
    assert (tmp_path / "other.txt").read_text() == "my notes\n"
    assert not (tmp_path / "nodir").exists()


def test_output_is_created_private(tmp_path: Path) -> None:
    write_input(tmp_path / "in.jsonl", 1)
    assert run("maptasks:double", "in.jsonl", "-o", "out.jsonl", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_dash_as_output_is_stdout_and_the_function_prints_to_stderr(
    backend: str, tmp_path: Path
) -> None:
    write_input(tmp_path / "in.jsonl", 1, 2)
    proc = subprocess.run(
        [*FENFA, "maptasks:chatty", "in.jsonl", "-o", "-", "-k", "--backend", backend],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["output"] for line in proc.stdout.splitlines()] == [2, 4]
    assert proc.stderr.count("chatter") == 2  # (two threads' prints may interleave)
    assert not (tmp_path / "-").exists()


def test_a_package_named_like_a_standard_module_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "logging").mkdir()
    (tmp_path / "logging" / "__init__.py").write_text("x = 1\n")
    write_input(tmp_path / "in.jsonl", 1, 2)
    # The installed command, as the user runs it: its sys.path starts at its own
    # directory, so only the target's import puts this one on it (for the workers).
    command = Path(sys.executable).with_name("fenfa")
    proc = subprocess.run(
        [str(command), "map", "maptasks:double", "in.jsonl", "-o", "out.jsonl", "--backend",
         "process"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"fenfa map: {tmp_path / 'logging'} has the name of a standard")
    assert not (tmp_path / "out.jsonl").exists()
