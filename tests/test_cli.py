"""The command line: `fenfa bench` runs the guide's experiment and reports it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fenfa.cli import main

EXPECTED_RUNS = [
    *(("io", backend) for backend in ("serial", "thread", "process", "async", "auto")),
    *(("cpu", backend) for backend in ("serial", "thread", "process", "auto")),
]


@pytest.mark.timeout(120)
def test_bench_quick_reports_every_backend_on_both_workloads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page = tmp_path / "bench.html"
    assert main(["bench", "--quick", "--json", "--html", str(page)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["workload"], r["backend"]) for r in rows] == EXPECTED_RUNS
    for row in rows:
        assert row["wall"] > 0
        if row["backend"] == "serial":
            assert row["workers_seen"] == 1
            assert row["speedup"] == 1.0
    auto = [r for r in rows if r["backend"] == "auto"]
    assert {r["resolved"] for r in auto} <= {"serial", "thread", "process"}
    assert all(r["reason"] for r in auto)
    # One section per run, in order, each with its timeline.
    html = page.read_text()
    titles = re.findall(r"<h2>(\w+) on (\w+)", html)
    assert titles == EXPECTED_RUNS
    assert html.count("<svg") == len(EXPECTED_RUNS)


def test_bench_prints_the_lesson_and_auto_s_reasons() -> None:
    from fenfa.cli.bench import Row, format_table

    rows = [
        Row("io", "serial", "serial", 1.0, 1.0, 0.0, 1),
        Row("io", "auto", "thread", 0.2, 5.0, 0.0, 6, "the task spends 99% of its time waiting"),
    ]
    text = format_table(rows, quick=True)
    assert "auto->thread" in text
    assert "io: the task spends 99% of its time waiting." in text
    assert "threads take turns" in text


def test_bad_usage_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fenfa", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_version_is_printed() -> None:
    from importlib import metadata

    proc = subprocess.run(
        [sys.executable, "-m", "fenfa", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout == f"fenfa {metadata.version('fenfa')}\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("html", ["nodir/b.html", "adir"])
def test_bench_refuses_an_unusable_html_path_before_any_work(
    html: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fenfa.cli.bench

    def must_not_run(*args: object) -> None:
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(fenfa.cli.bench, "run_bench", must_not_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    assert main(["bench", "--quick", "--html", html]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fenfa bench: ")
    assert html in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("map", ["usage: fenfa map", "MODULE:FUNC", "--resume", "--on-error", "examples:",
                 "exit status:", "130"]),
        ("advise", ["usage: fenfa advise", "MODULE:FUNC", "--input", "examples:",
                    "exit status:", "130"]),
    ],
)  # fmt: skip
def test_map_and_advise_help_is_for_users(
    command: str, words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text
    examples = text.split("examples:")[1].split("exit status:")[0]
    assert examples.count(f"fenfa {command} ") == 3
    for markup in (":mod:", ":class:", "``", ":func:"):
        assert markup not in text
