"""Issue 9: ``fenfa.shell()`` and ``fenfa run`` (GNU parallel class, crash-safe resume).

``fenfa run`` is run as a user runs it, in a subprocess; the kill tests send
real signals to it and check, through the journals and the jobs' own pid
files, that every job ran to completion exactly once as recorded and that
no job process outlived the kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

import fenfa
from fenfa.cli.run import parse, render
from helpers import gone, wait_for

FENFA = [sys.executable, "-m", "fenfa", "run"]


def run(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 60) -> Any:
    return subprocess.run(
        [*FENFA, *args], cwd=cwd, capture_output=True, text=True, input=stdin, timeout=timeout
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# -- fenfa.shell() -------------------------------------------------------------------


def test_shell_runs_a_command_and_reports_it() -> None:
    result = fenfa.shell("echo out; echo err >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert result.text == "out\n"
    assert result.stderr == b"err\n"
    assert result.duration > 0
    assert fenfa.shell(["printf", "%s", "a b"]).text == "a b"
    assert fenfa.shell("cat", input="fed").text == "fed"
    assert fenfa.shell("pwd", cwd="/").text == "/\n"
    assert fenfa.shell("echo $X", env={"X": "42", "PATH": os.environ["PATH"]}).text == "42\n"
    with pytest.raises(subprocess.CalledProcessError):
        fenfa.shell("false", check=True)
    assert fenfa.map(fenfa.shell, ["echo 1", "echo 2"], backend="thread")[1].text == "2\n"


def test_commands_see_the_environment_as_it_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both paths: a word list exec'd directly, and shell syntax through /bin/sh.
    monkeypatch.setenv("FENFA_TEST_VALUE", "one")
    assert fenfa.shell("printenv FENFA_TEST_VALUE").text == "one\n"
    monkeypatch.setenv("FENFA_TEST_VALUE", "two")
    assert fenfa.shell("printenv FENFA_TEST_VALUE").text == "two\n"
    assert fenfa.shell("echo $FENFA_TEST_VALUE;").text == "two\n"
    monkeypatch.delenv("FENFA_TEST_VALUE")
    assert fenfa.shell("printenv FENFA_TEST_VALUE").returncode == 1


@pytest.mark.timeout(30)
def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    with pytest.raises(subprocess.TimeoutExpired):
        fenfa.shell(f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.3)
    grandchild = int(pidfile.read_text())
    wait_for(lambda: gone(grandchild), "the grandchild to be killed", 2)


@pytest.mark.timeout(30)
def test_a_given_up_call_kills_its_running_commands(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    results = fenfa.imap(
        fenfa.shell, ["true", f"echo $$ > {pidfile}; sleep 30"], backend="thread", chunksize=1
    )
    assert next(results).returncode == 0
    wait_for(pidfile.exists, "the long command to start", 10)
    wait_for(lambda: pidfile.read_text().strip().isdigit(), "its pid", 10)
    results.close()  # type: ignore[attr-defined]
    wait_for(lambda: gone(int(pidfile.read_text())), "the command to be killed", 2)


# -- templates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "values", "want"),
    [
        ("echo {}", ("a b.txt",), "echo 'a b.txt'"),
        ("echo {.}", ("/x/y.tar.gz",), "echo /x/y.tar"),
        ("echo {/}", ("/x/y.txt",), "echo y.txt"),
        ("echo {//}", ("/x/y.txt",), "echo /x"),
        ("echo {/.}", ("/x/y.txt",), "echo y"),
        ("echo {#} {%}", ("v",), "echo 7 2"),
        ("cp {1} {2}", ("a", "b c"), "cp a 'b c'"),
        ("echo {2/.}", ("a", "/d/e.f"), "echo e"),
        ("echo {}", ("x; touch BAD",), "echo 'x; touch BAD'"),
    ],
)
def test_replacement_strings(template: str, values: tuple[str, ...], want: str) -> None:
    assert render(template, values, seq=7, slot=2) == want


def test_options_are_parsed_and_bad_ones_refused() -> None:
    options = parse(["-j", "3", "-k", "--timeout=1.5", "echo", "-n", ":::", "a", ":::", "b"])
    assert (options.jobs, options.keep_order, options.timeout) == (3, True, 1.5)
    assert options.command == ["echo", "-n"]
    assert [(s.kind, s.items, s.linked) for s in options.sources] == [
        (":::", ["a"], False), (":::", ["b"], False),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus", "echo"],
        ["-j", "x", "echo"],
        ["--timeout", "-1", "echo"],
        ["--halt", "later", "echo"],
        [":::", "a"],
        ["echo", ":::"],
        ["--resume", "echo", ":::", "a"],
        ["--timeout", "inf", "echo"],
        ["echo {3}", ":::", "a", ":::", "b"],
    ],
)
def test_bad_usage_is_one_line_and_exit_255(args: list[str], tmp_path: Path) -> None:
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 255
    assert proc.stderr.startswith("fenfa run: ")
    assert proc.stdout == ""


# -- running -------------------------------------------------------------------------


def test_inputs_from_lists_products_files_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "list").write_text("f1\nf2\n")
    product = run("-k", "echo {1}-{2}", ":::", "a", "b", ":::", "x", "y", cwd=tmp_path)
    assert product.stdout.split() == ["a-x", "a-y", "b-x", "b-y"]
    from_file = run("-k", "echo", "::::", "list", cwd=tmp_path)
    assert from_file.stdout.split() == ["f1", "f2"]  # no field: the input is appended
    from_stdin = run("-k", "echo got {}", cwd=tmp_path, stdin="s1\ns2\n")
    assert from_stdin.stdout.splitlines() == ["got s1", "got s2"]


def test_an_input_cannot_inject_a_command(tmp_path: Path) -> None:
    proc = run("echo", ":::", "x; touch INJECTED", "$(touch INJECTED2)", cwd=tmp_path)
    assert proc.returncode == 0
    assert not (tmp_path / "INJECTED").exists()
    assert not (tmp_path / "INJECTED2").exists()
    assert "x; touch INJECTED" in proc.stdout


PAYLOADS = ["$(touch P1)", "`touch P2`", "'; touch P3; '", '"; touch P4; "', "x\\", "a  b"]


@pytest.mark.parametrize(
    "template",
    [
        "echo {}", 'echo "{}"', "echo '{}'", "echo x{}y", "echo \"<{}>\" '<{}>' ={}=",
        'echo "{.}" \'{/}\' {//}', 'echo "{1}"', "echo \"$(echo '{}')\"", "echo `echo \"{}\"`",
        "printf '%s\\n' {} | cat",
    ],
)  # fmt: skip
def test_an_input_is_never_shell_syntax_whatever_the_quoting(template: str, tmp_path: Path) -> None:
    proc = run("-k", template, ":::", *PAYLOADS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing touched
    assert proc.stdout.count("touch P") >= 4  # ... each payload was an argument instead


@pytest.mark.parametrize(
    ("template", "value", "want"),
    [
        ('echo "{}"', "my file.jpg", "my file.jpg"),
        ("echo '{}'", "it's  here", "it's  here"),
        ('echo "{.}"', "my  file.jpg", "my  file"),
        ("printf '[%s]' {} '{/}'", "/d/a b", "[/d/a b][a b]"),
        ("test {} = 'a b' && echo same", "a b", "same"),
        ("echo $(( {} % 10 ))", "17", "7"),
    ],
)
def test_a_quoted_field_is_the_input_itself(
    template: str, value: str, want: str, tmp_path: Path
) -> None:
    proc = run(template, ":::", value, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == want


@pytest.mark.parametrize(
    ("template", "values", "want"),
    [
        ('echo "{}"', ("$x `y`",), 'echo "\\$x \\`y\\`"'),
        ("echo '{}'", ("it's",), "echo 'it'\\''s'"),
        ('echo "{1}-{2}"', ("a", 'b"'), 'echo "a-b\\""'),
    ],
)
def test_a_shown_command_quotes_each_input_for_where_it_stands(
    template: str, values: tuple[str, ...], want: str
) -> None:
    shown = render(template, values, seq=1, slot=1)
    assert shown == want
    assert fenfa.shell(shown).stdout == fenfa.shell(["echo", *values[:1]]).stdout or len(values) > 1


def test_a_nul_byte_fails_only_its_job(tmp_path: Path) -> None:
    proc = run("-k", "--results", "res.jsonl", "--joblog", "log", "echo", cwd=tmp_path,
               stdin="a\nb\0c\nd\n")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout.split() == ["a", "d"]
    assert "Traceback" not in proc.stderr
    assert "an input holds a NUL byte" in proc.stderr
    by_seq = {r["seq"]: r for r in records(tmp_path / "res.jsonl")}
    assert sorted(by_seq) == [1, 2, 3]
    assert (by_seq[2]["input"], by_seq[2]["exit"]) == (["b\0c"], -1)
    assert "NUL byte" in by_seq[2]["stderr"]
    assert len((tmp_path / "log").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--joblog", "nodir/log"], "cannot write 'nodir/log': No such file or directory"),
        (["--results", "nodir/res.jsonl"], "cannot write 'nodir/res.jsonl'"),
        (["--joblog", "adir"], "'adir' is a directory"),  # (--results adir: GNU's layout)
        (["--joblog", "notes.txt"], "'notes.txt' exists and is not a fenfa run --joblog"),
        (["--results", "notes.txt"], "'notes.txt' exists and is not a fenfa run --results"),
        (["--results", "log"], "'log' exists and is not a fenfa run --results"),
        (["--joblog", "res.jsonl"], "'res.jsonl' exists and is not a fenfa run --joblog"),
        (["--resume", "--joblog", "adir", "--results", "adir"], "'adir' is a directory"),
    ],
)
def test_an_unusable_journal_is_one_line_and_exit_255_before_any_job(
    args: list[str], message: str, tmp_path: Path
) -> None:
    assert run("--joblog", "log", "--results", "res.jsonl", "true", ":::", "a",
               cwd=tmp_path).returncode == 0  # fmt: skip
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("precious\n")
    proc = run(*args, "touch", "RAN", ":::", "a", cwd=tmp_path)
    assert proc.returncode == 255
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"fenfa run: {message}")
    assert not (tmp_path / "RAN").exists()
    assert (tmp_path / "notes.txt").read_text() == "precious\n"


def test_journals_are_created_private_and_appended_to_when_of_their_kind(tmp_path: Path) -> None:
    for _ in range(2):
        proc = run("--joblog", "log", "--results", "res.jsonl", "echo", ":::", "a", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "res.jsonl").stat().st_mode & 0o777 == 0o600
    assert len(records(tmp_path / "res.jsonl")) == 2
    assert len((tmp_path / "log").read_text().splitlines()) == 1 + 2  # one header


@pytest.mark.parametrize(
    ("timeout", "error"),
    [("x", TypeError), (True, TypeError), (float("inf"), ValueError), (0, ValueError),
     (-1.0, ValueError), (float("nan"), ValueError)],
)  # fmt: skip
def test_shell_names_a_bad_timeout(timeout: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"fenfa\.shell: timeout must be"):
        fenfa.shell("true", timeout=timeout)


def test_keep_order_and_whole_outputs(tmp_path: Path) -> None:
    # Later inputs finish first; each job prints three lines with pauses between.
    job = "for i in 1 2 3; do echo {}-$i; sleep 0.0{}; done"
    proc = run("-j", "4", "-k", job, ":::", "4", "3", "2", "1", cwd=tmp_path)
    assert proc.stdout.splitlines() == [f"{n}-{i}" for n in "4321" for i in "123"]
    loose = run("-j", "4", job, ":::", "4", "3", "2", "1", cwd=tmp_path).stdout.splitlines()
    blocks = [loose[i : i + 3] for i in range(0, 12, 3)]
    assert all(len({line.split("-")[0] for line in block}) == 1 for block in blocks)


def test_exit_status_counts_failures_up_to_101(tmp_path: Path) -> None:
    assert run("exit {}", ":::", "0", "1", "2", "0", cwd=tmp_path).returncode == 2
    many = run("-j", "8", "false", ":::", *map(str, range(105)), cwd=tmp_path)
    assert many.returncode == 101


@pytest.mark.timeout(60)
def test_timeouts_retries_joblog_and_results(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    flaky = f"echo x >> {counter}-{{}}; test $(wc -l < {counter}-{{}}) -ge 2"
    proc = run(
        "--retries", "3", "--joblog", "log", "--results", "res.jsonl", flaky, ":::", "a",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines[0].split("\t") == [
        "Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal",
        "Command", "Attempt", "Key",
    ]  # fmt: skip
    attempts = [line.split("\t") for line in lines[1:]]
    assert [(a[6], a[9]) for a in attempts] == [("1", "1"), ("0", "2")]  # every attempt
    (result,) = records(tmp_path / "res.jsonl")
    assert (result["exit"], result["attempt"], result["input"]) == (0, 2, ["a"])
    assert set(result) >= {"input", "command", "exit", "signal", "stdout", "stderr", "start"}
    slow = run("--timeout", "0.3", "--results", "slow.jsonl", "sleep", ":::", "10", cwd=tmp_path)
    assert slow.returncode == 1
    (timed_out,) = records(tmp_path / "slow.jsonl")
    assert timed_out["timed_out"] is True
    assert timed_out["signal"] == 15  # GNU parallel's --termseq: TERM first


def test_halt_now_stops_at_the_first_failure(tmp_path: Path) -> None:
    proc = run(
        "-j", "1", "-k", "--halt", "now,fail=1", "--joblog", "log", "echo {}; test {} != 3",
        ":::", *map(str, range(1, 9)), cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdout.split() == ["1", "2", "3"]
    assert proc.returncode == 1
    done = (tmp_path / "log").read_text().splitlines()[1:]
    assert len(done) <= 4  # the failing job, and at most the one that had started


def test_dry_run_runs_nothing(tmp_path: Path) -> None:
    proc = run("--dry-run", "touch {}", ":::", "a", "b c", cwd=tmp_path)
    assert proc.stdout.splitlines() == ["touch a", "touch 'b c'"]
    assert not (tmp_path / "a").exists()


# -- crash-safe resume -----------------------------------------------------------------

# Each job notes its shell's pid; while the "slow" marker exists, every tenth
# job sleeps long (so some are running at the kill), afterwards none does.
JOB = (
    "echo $$ > pids/{}; "
    "if [ -e slow ] && [ $(( {} % 10 )) -eq 0 ]; then sleep 30; fi; "
    "sleep 0.0$(( {} % 3 )); echo done {}"
)


def _start(tmp_path: Path) -> subprocess.Popen[bytes]:
    (tmp_path / "pids").mkdir(exist_ok=True)
    (tmp_path / "slow").touch()
    return subprocess.Popen(
        [*FENFA, "-j", "8", "--results", "res.jsonl", "--joblog", "log", JOB, ":::",
         *map(str, range(200))],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_killed_then_resumed_every_job_runs_exactly_once(
    how: signal.Signals, tmp_path: Path
) -> None:
    proc = _start(tmp_path)
    results = tmp_path / "res.jsonl"
    wait_for(lambda: _complete_lines(results) >= 50, "50 jobs to finish", 60)
    started = {int(p.name): int(p.read_text()) for p in (tmp_path / "pids").iterdir()
               if p.read_text().strip().isdigit()}  # fmt: skip
    proc.send_signal(how)
    proc.wait(timeout=20)
    # No job outlives the run: the guard kills their process groups.
    wait_for(lambda: all(gone(pid) for pid in started.values()), "every job to be gone", 5)
    size_after_kill = results.stat().st_size
    (tmp_path / "slow").unlink()
    resumed = run(
        "-j",
        "8",
        "--results",
        "res.jsonl",
        "--joblog",
        "log",
        "--resume",
        JOB,
        ":::",
        *map(str, reversed(range(200))),
        cwd=tmp_path,
    )  # fmt: skip  (the inputs in another order: keys, not positions)
    assert resumed.returncode == 0, resumed.stderr
    assert results.stat().st_size >= size_after_kill  # appended, never truncated
    done = records(results)
    assert sorted(r["input"][0] for r in done) == sorted(map(str, range(200)))
    assert Counter(r["key"] for r in done).most_common(1)[0][1] == 1
    assert all(r["exit"] == 0 for r in done)


@pytest.mark.timeout(60)
def test_a_torn_last_line_is_ignored_and_not_glued_to(tmp_path: Path) -> None:
    first = run("--results", "res.jsonl", "echo", ":::", "a", "b", cwd=tmp_path)
    assert first.returncode == 0
    with (tmp_path / "res.jsonl").open("a") as results:
        results.write('{"key": "torn", "inp')  # a writer killed mid-line
    again = run("--results", "res.jsonl", "--resume", "echo", ":::", "a", "b", "c", cwd=tmp_path)
    assert again.stdout.split() == ["c"]  # a and b were done
    assert sorted(r["input"][0] for r in records(tmp_path / "res.jsonl")) == ["a", "b", "c"]
    lines = (tmp_path / "res.jsonl").read_text().splitlines()
    assert lines[-2] == '{"key": "torn", "inp'  # left in place, on a line of its own


def test_resume_failed_runs_only_the_failures_again(tmp_path: Path) -> None:
    (tmp_path / "bad").touch()
    job = "test ! -e {}"
    first = run("--joblog", "log", job, ":::", "good", "bad", cwd=tmp_path)
    assert first.returncode == 1
    (tmp_path / "bad").unlink()
    again = run("--joblog", "log", "--resume-failed", "echo ran {}; " + job, ":::", "good",
                "bad", cwd=tmp_path)  # fmt: skip
    # (A new template is a new job: keys are of the template and the input.)
    assert again.stdout.split().count("ran") == 2
    same = run("--joblog", "log", "--resume-failed", job, ":::", "good", "bad", cwd=tmp_path)
    assert same.returncode == 0
    assert len((tmp_path / "log").read_text().splitlines()) == 1 + 2 + 2 + 1


def test_the_guard_ends_with_the_run(tmp_path: Path) -> None:
    marker = f"fenfa-guard-test-{os.getpid()}-{tmp_path.name}"
    proc = run("true", ":::", marker, cwd=tmp_path)
    assert proc.returncode == 0

    def leftovers() -> list[int]:
        found = []
        for process in psutil.process_iter(["cmdline"]):
            if marker in " ".join(process.info["cmdline"] or []):
                found.append(process.pid)
        return found

    wait_for(lambda: not leftovers(), "the run's guard process to exit", 5)
