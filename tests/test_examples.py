"""The examples run as a user would run them, and say what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.timeout(120)
def test_producer_consumer_runs_every_task_once_per_section() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "producer_consumer.py")],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("A two-stage pipeline")
    lines = [line.strip() for line in first.splitlines() if "says that" in line]
    expected = {f"mul({i}, 7) = {i * 7}" for i in range(20)} | {
        f"plus({i}, 8) = {i + 8}" for i in range(10)
    }
    assert {line.split("says that ")[1] for line in lines} == expected
    assert len(lines) == 30
    shouted = [line.strip() for line in second.splitlines() if "SAYS THAT" in line]
    # The pipeline keeps the input order.
    assert [line.split("SAYS THAT ")[1] for line in shouted] == [
        *(f"MUL({i}, 7) = {i * 7}" for i in range(20)),
        *(f"PLUS({i}, 8) = {i + 8}" for i in range(10)),
    ]
