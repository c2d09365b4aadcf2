"""Issue 18: ``fenfa run`` against GNU parallel on its everyday options.

Each comparison runs the same command line through ``fenfa run`` and GNU
``parallel`` (both with ``PARALLEL_SHELL=/bin/sh``) and compares stdout and
the exit status, and stderr where both print the same words (GNU's
``parallel:`` prefix read as ``fenfa run:``). They are skipped when GNU
parallel is not installed (``apt-get install parallel``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fenfa.cli.run_args import UsageError, jobs_from, parse
from fenfa.cli.run_help import HELP

FENFA = [sys.executable, "-m", "fenfa", "run"]
GNU = shutil.which("parallel")
needs_gnu = pytest.mark.skipif(GNU is None, reason="GNU parallel is not installed")
ENV = {**os.environ, "PARALLEL_SHELL": "/bin/sh", "LC_ALL": "C"}


def run(argv: list[str], cwd: Path, stdin: str | None = None) -> Any:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, input=stdin, timeout=60, env=ENV
    )


def both(args: list[str], cwd: Path, stdin: str | None = None) -> tuple[Any, Any]:
    assert GNU is not None
    ours = run([*FENFA, *args], cwd, stdin)
    theirs = run([GNU, *args], cwd, stdin)
    return ours, theirs


def files(tmp_path: Path) -> None:
    (tmp_path / "cols").write_text("a b\nc d\n")
    (tmp_path / "h.csv").write_text("n1,n2\nv1,v2\nw1,w2\n")


CASES = [
    ["echo", ":::", "a", "b", ":::+", "x", "y"],
    ["echo", ":::", "a", "b", "c", ":::+", "x", "y"],
    ["echo", ":::", "a", "b", ":::", "1", "2", ":::+", "x", "y"],
    ["-kj2", "echo", ":::", "a", "b"],
    ["-j1", "echo", "{%}", ":::", "a", "b", "c"],
    ["-j", "50%", "echo", "{%}", ":::", "a", "b", "c"],
    ["-j", "-1", "echo", "{%}", ":::", "a", "b", "c"],
    ["-j0", "echo", ":::", "a", "b"],
    ["-n2", "echo", "{2}+{1}", ":::", "a", "b", "c"],
    ["-n2", "echo", "[{}]", ":::", "a", "b", "c"],
    ["-N2", "echo", "{1}-{2}", ":::", "a", "b", "c"],
    ["-n2", "echo", "{1}/{2}/{3}/{4}", ":::", "a", "b", ":::", "x", "y"],
    ["-n2", "echo", ":::", "a", "b", ":::", "x", "y"],
    ["-N0", "echo", "hi", ":::", "a", "b"],
    ["-j2", "-X", "echo", ":::", "1", "2", "3", "4", "5"],
    ["-j3", "-X", "echo", ":::", *"1234567"],
    ["-j1", "-X", "echo", "p{}q", ":::", "1", "2", "3"],
    ["-j1", "-X", "echo", "{#}", "{.}", ":::", "a.x", "b.y"],
    ["-j1", "-m", "echo", "p{}q", ":::", "1", "2", "3"],
    ["-j2", "-m", "echo", ":::", "1", "2", "3", "4", "5"],
    ["-L2", "echo", "[{}]", "{2}", ":::", "a", "b", "c"],
    ["--colsep", " ", "echo", "{2}={1}", "::::", "cols"],
    ["--colsep", " ", "echo", "[{}]", "::::", "cols"],
    ["--colsep", ",", "--header", ":", "echo", "{n2}-{n1}-{1}", "::::", "h.csv"],
    ["--colsep", ",", "--header", ":", "echo", "{n1/}", "{n2.}", "::::", "h.csv"],
    ["--header", ":", "echo", "{f}{g}", ":::", "f", "a", "b", ":::", "g", "x"],
    ["echo", "::::", "cols", "::::+", "h.csv"],
    ["-a", "cols", "-a", "h.csv", "echo"],
    ["echo", ":::", "a", "--resume"],  # after ::: everything is input, as in GNU parallel
    ["--retries", "2", "echo x >> count-{}; false", ":::", "a"],
    ["--halt", "now,fail=1", "-j1", "echo {}; exit {}", ":::", "0", "3", "0"],
    ["--halt", "now,fail=2", "-j1", "exit {}", ":::", "0", "3", "0", "5", "0"],
    ["--halt", "soon,fail=1", "-j1", "echo {}; exit {}", ":::", "0", "2", "0"],
    ["--halt", "now,success=1", "-j1", "echo {}; test {} = 2", ":::", "1", "2", "3"],
    ["--halt", "now,done=2", "-j1", "exit {}", ":::", "3", "0", "3"],
    ["--timeout", "0.3", "echo hi; echo err >&2; sleep 3", ":::", "1"],
]


@needs_gnu
@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_same_output_and_exit_status_as_gnu_parallel(args: list[str], tmp_path: Path) -> None:
    files(tmp_path)
    ours, theirs = both(["-k", *args], tmp_path)
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    assert ours.stderr == theirs.stderr.replace("parallel:", "fenfa run:")
    if "--retries" in args:
        # N attempts in all, in each of the two runs
        assert (tmp_path / "count-a").read_text() == "x\n" * 4


@needs_gnu
@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["-0", "echo", "[{}]"], "a\0b c\0"),
        (["-d", ":", "echo", "[{}]"], "a:b:c\n"),
        (["-L2", "echo", "[{}]"], "a\nb\nc\n"),
        (["-a", "-", "echo"], "x\ny\n"),
    ],
)
def test_delimiters_and_stdin_as_gnu_parallel(args: list[str], stdin: str, tmp_path: Path) -> None:
    ours, theirs = both(["-k", *args], tmp_path, stdin)
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)


@needs_gnu
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        ["echo {}; echo err >&2; exit {}", ":::", "0", "3"],
        ["--timeout", "0.3", "sleep {}", ":::", "3"],
        ["--timeout", "0.3", "trap '' TERM; sleep {}", ":::", "3"],
    ],
)
def test_joblog_columns_as_gnu_parallel(args: list[str], tmp_path: Path) -> None:
    assert GNU is not None
    ours = run([*FENFA, "-k", "-j1", "--joblog", "ours", *args], tmp_path)
    theirs = run([GNU, "-k", "-j1", "--joblog", "theirs", *args], tmp_path)
    assert ours.returncode == theirs.returncode
    assert ours.stderr == theirs.stderr.replace("parallel:", "fenfa run:")
    ours_rows = (tmp_path / "ours").read_text().splitlines()
    theirs_rows = (tmp_path / "theirs").read_text().splitlines()
    assert ours_rows[0].split("\t")[:9] == theirs_rows[0].split("\t")
    assert len(ours_rows) == len(theirs_rows)
    for our_row, their_row in zip(ours_rows[1:], theirs_rows[1:], strict=True):
        o, t = our_row.split("\t"), their_row.split("\t")
        # Seq, Host, the JobRuntime column's width, Send, Receive, Exitval, Signal, Command
        assert (o[0], o[1], len(o[3]), *o[4:9]) == (t[0], t[1], len(t[3]), *t[4:9])


@pytest.mark.parametrize(
    "args",
    [
        ["echo", ":::", "a", ":::::", "b"],
        ["echo", ":::", "a", "::+", "b"],
        ["echo", ":::", "a", ":::++", "b"],
        ["-j", "x", "echo"],
        ["-j", "1.5", "echo"],
        ["-kz", "echo"],
        ["--shell", "/nonexistent/sh", "echo", ":::", "a"],
        ["--header", "x", "echo", ":::", "a"],
        ["-X", "-m", "echo", ":::", "a"],
        ["-n", "0", "echo", ":::", "a"],
        ["--termseq", "BOGUS,10", "echo", ":::", "a"],
    ],
)
def test_refused_in_one_line_before_any_job(args: list[str], tmp_path: Path) -> None:
    proc = run([*FENFA, *args], tmp_path)
    assert proc.returncode == 255
    assert proc.stdout == ""
    assert proc.stderr.startswith("fenfa run: ")
    assert len(proc.stderr.splitlines()) == 2  # the error and the usage line


def test_a_file_after_the_command_that_is_an_option_says_where_options_go(tmp_path: Path) -> None:
    proc = run([*FENFA, "echo", "::::", "--resume"], tmp_path)
    assert proc.returncode == 255
    assert "cannot read --resume" in proc.stderr
    assert "options go before the command" in proc.stderr


def test_bundled_short_options_and_job_counts() -> None:
    options = parse(["-kj2", "-n3", "echo", ":::", "a"])
    assert (options.keep_order, options.jobs, options.max_args) == (True, 2, 3)
    assert parse(["-j1", "echo"]).jobs == 1
    assert parse(["-j0", "echo"]).jobs == 0
    assert parse(["--retries", "2", "echo"]).attempts == 2
    assert [jobs_from(v, 4) for v in ("+1", "-1", "50%", "200%", "-9", "3")] == [5, 3, 2, 8, 1, 3]
    with pytest.raises(UsageError, match="unknown option -z"):
        parse(["-kz", "echo"])


@pytest.mark.parametrize(
    ("environ", "asked", "want"),
    [
        ({"PARALLEL_SHELL": "/bin/bash"}, None, "bash"),
        ({"PARALLEL_SHELL": "/bin/bash"}, "/bin/sh", "sh"),
        ({"SHELL": "/bin/bash"}, None, "bash"),
        ({"SHELL": "/usr/bin/fish"}, None, "sh"),  # found, not asked for: /bin/sh
        ({}, None, "sh"),
    ],
)
def test_the_shell_is_chosen_as_gnu_parallel_chooses_it(
    environ: dict[str, str], asked: str | None, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.path.exists("/bin/bash"):
        pytest.skip("no bash")
    from fenfa.cli import run_template

    monkeypatch.setattr(run_template, "_parent_shell", lambda: None)
    assert os.path.basename(run_template.choose_shell(asked, environ)) == want


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="no bash")
def test_jobs_with_shell_syntax_run_under_the_chosen_shell(tmp_path: Path) -> None:
    env = {**ENV, "PARALLEL_SHELL": "/bin/bash"}
    job = 'echo "${BASH_VERSION:+bash}" {}'
    proc = subprocess.run([*FENFA, job, ":::", "$(touch X)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.stdout == "bash $(touch X)\n"
    assert not (tmp_path / "X").exists()  # still an argument, under bash too
    fish = subprocess.run([*FENFA, "--shell", "sh", "-X", "echo", ":::", "a"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert fish.stdout == "a\n"


@pytest.mark.timeout(30)
def test_a_timeout_sends_term_then_kill(tmp_path: Path) -> None:
    proc = run([*FENFA, "--results", "r.jsonl", "--timeout", "0.2", "--termseq", "TERM,100",
                "trap 'echo got TERM' TERM; sleep 5 & wait; sleep 5", ":::", "a"],
               tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "got TERM" in proc.stdout  # TERM came first, the job could say so
    assert "This job was killed because it timed out" in proc.stderr
    assert '"signal": 9' in (tmp_path / "r.jsonl").read_text()  # ... then KILL


def test_help_is_for_users() -> None:
    for words in ("usage: fenfa run", "Options:", "Examples:", "Exit status:", "--colsep"):
        assert words in HELP
    assert ":mod:" not in HELP
    assert "``" not in HELP
    proc = subprocess.run([*FENFA, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: fenfa run")
