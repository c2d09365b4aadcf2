"""The fault soak (benchmarks/soak.py) for one minute, with a fixed seed.

A minute of randomized calls on process and thread pools under the soak's
fault mix (raise, SIGKILL, ``os._exit``, segfault, timeouts, unpicklable
arguments and results, 10 MB results, shared arrays, early breaks, retries,
every ``on_error``): nothing wrong, lost, run twice, hung or leaked. The tool
runs in its own interpreter, as a user runs it, so that its crashes and its
leak check (child processes, threads, descriptors, shared segments) are its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_minute_of_faults_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "1", "--seed", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    report = f"stdout:\n{done.stdout}\nstderr (end):\n{done.stderr[-4000:]}"
    assert out.exists(), report
    table = json.loads(out.read_text())
    zeros = table["must_be_zero"]
    assert {"wrong", "lost", "ran_twice", "hangs", "leaked_processes"} <= set(zeros), zeros
    assert zeros == dict.fromkeys(zeros, 0), report
    assert done.returncode == 0, report
    # It did soak: calls ran, and faults of every kind were injected.
    assert table["calls"] >= 10, report
    assert table["executions"] >= table["tasks"] // 2, report
    kinds = {name.split(" ")[0] for name in table["faults"]}
    assert {"raise", "kill", "exit", "segv", "sleep", "lock_arg", "big"} <= kinds, report
