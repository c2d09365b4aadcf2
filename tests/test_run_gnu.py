"""Issue 18: ``fenfa run`` against GNU parallel on its everyday options.

Each comparison runs the same command line through ``fenfa run`` and GNU
``parallel`` (both with ``PARALLEL_SHELL=/bin/sh``) and compares stdout and
the exit status, and stderr where both print the same words (GNU's
``parallel:`` prefix read as ``fenfa run:``). They are skipped when GNU
parallel is not installed (``apt-get install parallel``).
"""

from __future__ import annotations

import itertools
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
ENV = {**os.environ, "PARALLEL_SHELL": "/bin/sh", "LC_ALL": "C", "FENFA_TEST_VAR": "v"}


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
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("in sub\n")
    (tmp_path / "f30").write_text("".join(f"{n}\n" for n in range(1, 31)))
    (tmp_path / "f6").write_text("ab\ncd\nef\n")
    (tmp_path / "f5").write_text("111\n2\n33\n4\n5\n")


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
    # Output: tags, lines as they come, ungrouped.
    ["--tag", "echo", ":::", "a", "b", ":::", "x", "y"],
    ["--tag", "printf 'x\\ny'; echo e >&2", ":::", "a", "b"],  # a last line without \n
    ["--tag", "-N2", "echo", ":::", "a", "b", "c"],
    ["--tagstring", "<{}>-{#}", "echo", ":::", "a", "b"],
    ["--tagstring", "{2}:{1/}", "--tag", "echo", ":::", "d/a", ":::", "x"],
    ["--line-buffer", "echo", ":::", "a", "b", "c"],
    ["--line-buffer", "--tag", "printf '1\\n2\\n3'", ":::", "a", "b"],
    ["--line-buffer", "--timeout", "0.5", "printf 'a\\nb{}'; sleep 3", ":::", "x"],
    ["-j1", "-u", "printf '{}\\n'", ":::", "a", "b"],
    ["-j1", "-u", "--tag", "echo", ":::", "a"],  # (--tag does nothing with -u, as in GNU)
    # Quoting, pacing, where and how jobs start.
    ["-q", "echo", "a;b", "{}", ":::", "x"],
    ["-q", "sh", "-c", 'echo "$0-$1"', "{}", "y", ":::", "x"],
    ["-q", "echo", "p{}q", "$HOME", ":::", "x"],
    ["--delay", "0.1", "echo", ":::", "a", "b"],
    ["--wd", "sub", "cat f; echo", ":::", "a"],
    ["--env", "FENFA_TEST_VAR", "echo $FENFA_TEST_VAR", ":::", "a"],
    ["--memfree", "1k", "echo", ":::", "a", "b"],
    ["--load", "1000", "echo", ":::", "a", "b"],
    ["--load", "10000%", "echo", ":::", "a"],
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


PIPED = 'echo "[{#}]"; cat; echo "."'  # each job: its number, its block, a mark
SEQ30 = "".join(f"{n}\n" for n in range(1, 31))


@needs_gnu
@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["-0", "echo", "[{}]"], "a\0b c\0"),
        (["-d", ":", "echo", "[{}]"], "a:b:c\n"),
        (["-L2", "echo", "[{}]"], "a\nb\nc\n"),
        (["-a", "-", "echo"], "x\ny\n"),
        (["--pipe", "--block", "20", PIPED], SEQ30),
        (["--pipe", "--block", "1", PIPED], "1\n2\n3\n"),  # (records longer than a block)
        (["--pipe", "-N3", PIPED], SEQ30),
        (["--pipe", "-N2", PIPED], "1\n2\n3"),  # (no newline at the end)
        (["--pipe", PIPED], ""),  # nothing to read: no job
        (["--pipe", "--tag", "wc", "-l"], SEQ30),
        # The block is stdin, nothing is appended. (A job that does not read its
        # block: GNU parallel's exit status is then 0 or 1 by a race; fenfa's, 0.)
        (["--pipe", "cat >/dev/null; echo hi"], SEQ30),
        (["--pipe", "--recstart", "a", "-N1", PIPED], "a1ba2\nxa3\n"),
        (["--pipe", "--recend", ";", "-N2", PIPED], "x;y;z;"),
        (["--pipe", "--recend", ";", "--recstart", "a", "-N1", PIPED], "a1;a2;b;a3"),
        (["--pipe", "--block", "1k", PIPED], "".join(f"line {n}\n" for n in range(2000))),
        (["--pipe-part", "-a", "f30", "--block", "20", PIPED], None),
        (["--pipe-part", "-a", "f6", "--block", "3", PIPED], None),
        (["--pipe-part", "-a", "f5", "--block", "3", PIPED], None),
        (["--pipe-part", "-a", "f30", "--block", "1M", PIPED], None),
    ],
)
def test_delimiters_and_stdin_as_gnu_parallel(
    args: list[str], stdin: str | None, tmp_path: Path
) -> None:
    files(tmp_path)
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
    options = ("--colsep", "--tag", "--line-buffer", "--pipe", "--block", "--results DIR/")
    for words in ("usage: fenfa run", "Options:", "Examples:", "Exit status:", *options):
        assert words in HELP
    assert ":mod:" not in HELP
    assert "``" not in HELP
    proc = subprocess.run([*FENFA, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: fenfa run")


# -- output as it comes, paced and gated starts, --results DIR --------------------------

# Job a writes half a line, lets b write a whole one, then ends its own: the
# files are the gates (each job waits for the other's mark).
INTERLEAVED = (
    "if [ {} = a ]; then printf AAAA; touch a-wrote; until [ -e b-wrote ]; do sleep 0.01; done;"
    " echo AAAA; else until [ -e a-wrote ]; do sleep 0.01; done; echo BBBB; touch b-wrote; fi"
)


@needs_gnu
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--line-buffer"], "BBBB\nAAAAAAAA\n"),  # lines as they come, none torn
        (["-k", "--line-buffer"], "AAAAAAAA\nBBBB\n"),  # -k: the oldest job's lines first
        (["-u"], "AAAABBBB\nAAAA\n"),  # as the jobs write it: torn
        (["-k"], "AAAAAAAA\nBBBB\n"),  # whole, as each job ends
    ],
)
def test_output_as_it_comes_as_gnu_parallel(args: list[str], want: str, tmp_path: Path) -> None:
    assert GNU is not None
    for program, where in ((FENFA, "ours"), ([GNU], "theirs")):
        cwd = tmp_path / where
        cwd.mkdir()
        proc = run([*program, "-j2", *args, INTERLEAVED, ":::", "a", "b"], cwd)
        assert (proc.stdout, proc.returncode) == (want, 0), where


@needs_gnu
@pytest.mark.parametrize("option", ["--eta", "--progress", "--bar"])
def test_progress_options_leave_stdout_as_gnu_parallel(option: str, tmp_path: Path) -> None:
    ours, theirs = both(["-k", option, "echo", ":::", "a", "b", "c"], tmp_path)
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    assert ours.stderr  # (the bar, on stderr)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@needs_gnu
@pytest.mark.parametrize(
    "args",
    [
        ["echo {}; echo err >&2; exit 2", ":::", "a", "b/c", "d\\e", ":::", "x", "y"],
        ["-N2", "echo", ":::", "a", "b", "c"],
        ["--tag", "echo", ":::", "a"],  # (the files hold the output untagged)
    ],
)
def test_results_dir_is_gnu_parallels_layout(args: list[str], tmp_path: Path) -> None:
    assert GNU is not None
    ours = run([*FENFA, "--results", "ours/", *args], tmp_path)
    theirs = run([GNU, "--results", "theirs/", *args], tmp_path)
    assert (ours.stdout, ours.returncode) == (theirs.stdout, theirs.returncode)
    assert ours.stdout == ""  # (the output is in the files only, as GNU does)
    assert tree(tmp_path / "ours") == tree(tmp_path / "theirs")
    (tmp_path / "existing").mkdir()  # an existing directory is the layout too, without "/"
    run([*FENFA, "--results", "existing", *args], tmp_path)
    assert tree(tmp_path / "existing") == tree(tmp_path / "theirs")


def test_results_dir_names_never_collide_or_escape(tmp_path: Path) -> None:
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    inputs = ["", ".", "..", long_a, long_b, "a/b", "a\\_b"]
    proc = run([*FENFA, "-k", "--results", "r/", "echo", ":::", *inputs], tmp_path)
    assert proc.returncode == 0
    outputs = sorted(p.read_text() for p in (tmp_path / "r").rglob("stdout"))
    assert outputs == sorted(f"{v}\n" for v in inputs)  # one directory each, none shared
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # nothing written outside r/
    assert all(len(p.name.encode()) <= 255 for p in (tmp_path / "r").rglob("*"))
    piped = subprocess.run([*FENFA, "--pipe", "-N1", "--results", "p/", "cat"], cwd=tmp_path,
                           input="1\n2\n", capture_output=True, text=True, timeout=60)  # fmt: skip
    assert piped.returncode == 0
    assert tree(tmp_path / "p") == {"1/seq": b"1", "1/stdout": b"1\n", "1/stderr": b"",
                                    "2/seq": b"2", "2/stdout": b"2\n", "2/stderr": b""}  # fmt: skip


def test_a_results_file_is_still_our_jsonl_journal(tmp_path: Path) -> None:
    proc = run([*FENFA, "--results", "r.jsonl", "echo", ":::", "a"], tmp_path)
    assert (proc.stdout, proc.returncode) == ("a\n", 0)
    assert '"stdout": "a\\n"' in (tmp_path / "r.jsonl").read_text()


def test_delay_spaces_the_starts(tmp_path: Path) -> None:
    proc = run([*FENFA, "-j3", "--delay", "0.3", "--joblog", "log", "true", ":::", "a", "b", "c"],
               tmp_path)  # fmt: skip
    assert proc.returncode == 0
    rows = (tmp_path / "log").read_text().splitlines()[1:]
    starts = sorted(float(row.split("\t")[2]) for row in rows)
    assert all(b - a >= 0.299 for a, b in itertools.pairwise(starts))


# In-process stand-ins for the machine's memory and load, run as `fenfa run`.
GATED = """
import os, sys
from fenfa.cli import run, run_exec

def memory():  # plenty, until both jobs run; then short once (job evicted); then plenty
    if os.path.exists("short"):
        open("release", "w").close()
        return 1 << 50
    if os.path.exists("a.started") and os.path.exists("b.started"):
        open("short", "w").close()
        return 0
    return 1 << 50

calls = 0

def load():  # high for the first two looks
    global calls
    calls += 1
    with open("looks", "w") as looks:
        looks.write(str(calls))
    return 99.0 if calls < 3 else 0.0

run_exec.available_memory, run_exec.load_average = memory, load
sys.exit(run.main(sys.argv[1:]))
"""


def gated(args: list[str], cwd: Path) -> Any:
    return run([sys.executable, "-c", GATED, *args], cwd)


def test_memfree_stops_the_youngest_job_and_runs_it_again_not_as_a_retry(tmp_path: Path) -> None:
    job = ("echo {} >> tries; touch {}.started; until [ -e release ]; do sleep 0.01; done;"
           " echo {} ok")  # fmt: skip
    proc = gated(["-k", "-j2", "--retries", "1", "--memfree", "1G", job, ":::", "a", "b"], tmp_path)
    assert (proc.stdout, proc.returncode) == ("a ok\nb ok\n", 0)
    tries = (tmp_path / "tries").read_text().split()
    assert sorted(tries) in (["a", "a", "b"], ["a", "b", "b"])  # one of them started twice


def test_load_holds_job_starts_until_the_load_is_under_it(tmp_path: Path) -> None:
    proc = gated(["-j1", "--load", "1", "cat", ":::", "looks"], tmp_path)
    assert (proc.stdout, proc.returncode) == ("3", 0)  # started on the third look, not before


@pytest.mark.parametrize(
    "args",
    [
        ["-u", "--line-buffer", "echo", ":::", "a"],
        ["--wd", "/nonexistent/dir", "echo", ":::", "a"],
        ["--memfree", "lots", "echo", ":::", "a"],
        ["--block", "0", "--pipe", "cat"],
        ["--delay", "soon", "echo", ":::", "a"],
        ["--env", "A-B", "echo", ":::", "a"],
        ["--pipe", "cat", ":::", "a"],
        ["--pipe", "-a", "in", "cat"],  # (GNU reads stdin then, ignoring the file)
        ["--pipe-part", "cat"],
        ["--pipe", "-N0", "cat"],
        ["--pipe", "--recend", "", "cat"],
        ["--results", "dir/", "--resume", "echo", ":::", "a"],
    ],
)
def test_new_options_refuse_bad_values_in_one_line(args: list[str], tmp_path: Path) -> None:
    proc = run([*FENFA, *args], tmp_path)
    assert (proc.returncode, proc.stdout) == (255, "")
    assert proc.stderr.startswith("fenfa run: ")
    assert len(proc.stderr.splitlines()) <= 2


def test_sizes_durations_and_loads_read_as_gnu_parallel() -> None:
    from fenfa.cli.run_args import duration_from, load_from, size_from

    assert [size_from(v) for v in ("10", "1k", "1K", "2M", "1.5m", "1G")] == [
        10, 1000, 1024, 2 << 20, 1_500_000, 1 << 30]  # fmt: skip
    assert [duration_from(v) for v in ("0.5", "3s", "2m", "1h")] == [0.5, 3, 120, 3600]
    assert [load_from(v, 4) for v in ("2", "100%", "50%", "+1", "-1")] == [2, 4, 2, 5, 3]
    options = parse(["-q", "--tag", "--tagstring", "x", "--lb", "--pipe", "cat"])
    assert (options.quote, options.tag, options.tagstring, options.line_buffer) == (
        True, True, "x", True)  # fmt: skip
