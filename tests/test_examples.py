"""The examples run as a user would run them, and say what they promise."""

from __future__ import annotations

import ast
import re
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


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    """Run an example as a user would; its stdout, after checking it exited 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def grab(pattern: str, text: str) -> str:
    """The first group of ``pattern``'s first match in ``text`` (which must match)."""
    match = re.search(pattern, text, flags=re.M)
    assert match is not None, f"{pattern!r} not in:\n{text}"
    return match[1]


@pytest.mark.timeout(60)
def test_guide_mocks_every_task_says_who_ran_it() -> None:
    out = run_example("guide_mocks.py", "--tasks", "3", "--n", "20000", "--sleep", "0.05")
    caller = int(grab(r"caller: PID (\d+)", out))
    sections = re.split(r"^-- ", out, flags=re.M)[1:]
    assert len(sections) == 8  # two tasks, four backends
    for section in sections:
        backend = grab(r"^\w+ on (\w+)", section)
        lines = re.findall(
            r"PID: (\d+), Process Name: (\S+), Thread Name: (\S+), worker id (\S+) \((\w+)\)",
            section,
        )
        assert len(lines) == 3, section  # every task printed its worker
        pids = {int(pid) for pid, *_ in lines}
        if backend == "process":
            assert caller not in pids
            assert all(name.startswith("fenfa-process-") for _, name, *_ in lines)
        elif backend != "auto":  # (auto runs the first tasks in the caller to measure them)
            assert pids == {caller}, section
        if backend == "thread":
            assert all(thread.startswith("fenfa-thread-") for _, _, thread, _, _ in lines)
        if backend == "serial":
            assert {line[1:] for line in lines} == {("MainProcess", "MainThread", "0", "serial")}
        assert re.search(rf"{backend} time = [\d.]+ s", section)
    assert "auto chose thread" in sections[3]  # the io task waits
    assert re.search(r"io_task( +[\d.]+){4}\ncpu_task( +[\d.]+){4}", out)


@pytest.mark.timeout(60)
def test_pool_tour_shows_every_method() -> None:
    out = run_example("pool_tour.py", "--workers", "2", "--window", "4")
    rows = {line[:15].strip(): line[15:].strip() for line in out.splitlines()}
    squares = str([i * i for i in range(8)])
    assert rows["map"].startswith(squares)
    assert rows["imap"].startswith("[0, 1, 4, 9, 16]")
    pulled = int(grab(r"(\d+) pulled of an endless generator", out))
    assert 5 <= pulled <= 5 + 4  # lazy: at most the window ahead of the consumer
    unordered = ast.literal_eval(grab(r"imap_unordered +(\[.*?\])", out))
    assert sorted(unordered) == [0.0, 0.1, 0.2, 0.4]
    assert unordered[-1] == 0.4  # the slow first input finished last
    assert rows["map_async"].startswith("a concurrent.futures.Future")
    assert rows[""].startswith(squares)  # the map_async future's result
    assert rows["starmap"].startswith("[8, 9, 100]")
    assert rows["apply"].startswith("1024")
    assert rows["apply_async"].startswith("(3, 2)")
    assert rows["submit"].startswith("[3, 2, 1]")
    # fenfa.multiprocessing.Pool: the standard library's API, the input still lazy
    assert rows["mp map"].startswith(squares)
    assert rows["mp apply_async"].startswith("(3, 2)")
    assert "callback saw [(3, 2)]" in rows["mp apply_async"]
    assert rows["mp imap"].startswith("[0, 1, 4, 9, 16]")
    mp_pulled = int(grab(r"^mp imap .*?(\d+) pulled of an endless", out))
    assert 5 <= mp_pulled <= 40  # the stdlib's imap would read the generator for ever


@pytest.mark.timeout(60)
def test_shared_state_shares_fills_and_keeps_worker_state() -> None:
    out = run_example("shared_state.py", "--mb", "2", "--parts", "8", "--workers", "2")
    expected = grab(r"\(expected ([\d.]+)\)", out)
    assert f"plain partial: sum {expected} " in out
    assert "a task received: ndarray float64[262144], writeable=False" in out
    assert f"handle, call 2: sum {expected} " in out
    assert f"writable: 8/8 slots filled by the workers, sum {expected}, " in out
    assert "equal to the tasks' results: True" in out
    assert re.search(r"after the block: <fenfa.Shared .*, closed>", out)
    assert "8 predictions (right: True)" in out
    loads = ast.literal_eval(grab(r"model loads per worker (\{.*?\})", out))
    tasks = ast.literal_eval(grab(r"tasks per worker (\{.*?\})", out))
    assert set(loads.values()) == {1}  # once per worker, not per task
    assert sum(tasks.values()) == 8


@pytest.mark.timeout(60)
def test_scrape_pipeline_parses_every_page_once_and_stays_bounded() -> None:
    out = run_example("scrape_pipeline.py", "--pages", "60", "--window", "4")
    assert "parsed 60 pages, each exactly once: True" in out
    # Page n's numbers are n * k % 97 for k < 10 (the server's formula).
    total = sum(n * k % 97 for n in range(60) for k in range(10))
    assert f"sum of all numbers: {total}" in out
    ahead = int(grab(r"at most (\d+) pages ahead", out))
    assert ahead <= 2 * 4 + 2  # two stages' windows, not the whole input


@pytest.mark.timeout(60)
def test_cpu_pipeline_factorizes_and_writes_the_timeline(tmp_path: Path) -> None:
    html = tmp_path / "timeline.html"
    args = ["--start", "1000000", "--count", "50", "--workers", "2", "--html"]
    out = run_example("cpu_pipeline.py", *args, str(html))
    assert "1000000 = 2^6 * 5^6" in out
    assert "1000003 = 1000003  (prime)" in out
    primes = [n for n in range(1_000_000, 1_000_050) if all(n % d for d in range(2, 1001))]
    assert f"{len(primes)} primes, the first {primes[:3]}" in out
    assert re.search(r"^50 tasks, 0 failed", out, flags=re.M)  # the insights summary
    assert re.search(r"^process [01] \(pid \d+\) +\d+", out, flags=re.M)
    assert f"timeline written to {html}" in out
    assert html.read_text().lstrip().lower().startswith("<!doctype html")
