"""The command line: `fenfa bench` runs the guide's experiment and reports it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fenfa.cli import main


@pytest.mark.timeout(120)
def test_bench_quick_reports_every_backend_on_both_workloads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["workload"], r["backend"]) for r in rows] == [
        (workload, backend)
        for workload in ("io", "cpu")
        for backend in ("serial", "thread", "process", "auto")
    ]
    for row in rows:
        assert row["wall"] > 0
        if row["backend"] == "serial":
            assert row["workers_seen"] == 1
            assert row["speedup"] == 1.0
    auto = [r for r in rows if r["backend"] == "auto"]
    assert {r["resolved"] for r in auto} <= {"serial", "thread", "process"}


def test_bad_usage_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fenfa", "nonsense"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
