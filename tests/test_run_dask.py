"""Issue 18, past one machine: ``fenfa run --backend dask`` on a real cluster.

Each cluster is what a user deploys: ``dask scheduler`` and two ``dask
worker`` processes (the CLI, on 127.0.0.1), started by a fixture, each
worker in its own directory and named in its environment
(``FENFA_TEST_WORKER``), so a job can say where it ran. ``fenfa run`` runs
as a user runs it, in a subprocess. Gates are files: a job blocks until the
test creates ``release``; the test waits for the jobs' marker files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import gone, wait_for

pytest.importorskip("distributed")

FENFA = [sys.executable, "-m", "fenfa", "run"]
DASK = str(Path(sys.executable).parent / "dask")
# Starting a scheduler and two workers takes a few seconds on a busy machine.
START_SECONDS = 60.0
LOCAL = ["--host", "127.0.0.1", "--no-dashboard"]


@dataclass
class Cluster:
    root: Path
    address: str
    workers: dict[str, subprocess.Popen[bytes]]


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A ``dask scheduler`` and workers w1, w2 (two threads each), torn down after."""
    processes: list[subprocess.Popen[bytes]] = []
    scheduler_file = tmp_path / "scheduler.json"
    try:
        with open(tmp_path / "scheduler.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        DASK,
                        "scheduler",
                        *LOCAL,
                        "--port",
                        "0",
                        "--scheduler-file",
                        str(scheduler_file),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        wait_for(scheduler_file.exists, "the dask scheduler's file", START_SECONDS)
        wait_for(lambda: "address" in scheduler_file.read_text(), "its address", START_SECONDS)
        address = json.loads(scheduler_file.read_text())["address"]
        workers = {}
        for name in ("w1", "w2"):
            home = tmp_path / name
            home.mkdir()
            with open(tmp_path / f"{name}.log", "wb") as log:
                workers[name] = subprocess.Popen(
                    [
                        DASK,
                        "worker",
                        address,
                        *LOCAL,
                        "--name",
                        name,
                        "--nthreads",
                        "2",
                        "--no-nanny",
                    ],
                    cwd=home,
                    env={**os.environ, "FENFA_TEST_WORKER": name},
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            processes.append(workers[name])
        for name in workers:
            log_path = tmp_path / f"{name}.log"
            wait_for(
                lambda p=log_path: "Registered to" in p.read_text(),
                f"dask worker {name} to register",
                START_SECONDS,
            )
        yield Cluster(tmp_path, address, workers)
    finally:
        for process in reversed(processes):
            _stop(process)


def fenfa_run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [*FENFA, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def joblog_seqs(path: Path) -> list[int]:
    lines = path.read_text().splitlines()[1:]
    return [int(line.split("\t")[0]) for line in lines if line]


# -- on a cluster ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_run_loses_no_job_and_records_none_twice(cluster: Cluster) -> None:
    root = cluster.root
    (root / "marks").mkdir()
    job = root / "job.sh"
    job.write_text(
        f'echo "$FENFA_TEST_WORKER" >> {root}/marks/$1\n'
        f"while [ ! -e {root}/release ]; do sleep 0.01; done\n"
        'echo "job $1 done"\n'
    )
    inputs = [str(n) for n in range(1, 41)]
    journal = ["--results", str(root / "results.jsonl"), "--joblog", str(root / "joblog")]
    command = ["--backend", "dask", "--address", cluster.address, "-j", "4", *journal]
    with open(root / "out", "wb") as out, open(root / "err", "wb") as err:
        fenfa = subprocess.Popen(
            [*FENFA, *command, "sh", str(job), ":::", *inputs], cwd=root, stdout=out, stderr=err
        )
    try:

        def on_w1() -> list[str]:
            return [p.name for p in (root / "marks").iterdir() if p.read_text() == "w1\n"]

        wait_for(lambda: len(on_w1()) >= 2, "two jobs running on w1", START_SECONDS)
        killed = on_w1()
        cluster.workers["w1"].send_signal(signal.SIGKILL)
        cluster.workers["w1"].wait()
        (root / "release").touch()
        assert fenfa.wait(timeout=120) == 0, (root / "err").read_text()
    finally:
        if fenfa.poll() is None:
            fenfa.kill()
            fenfa.wait()
    # Every job's output once, in the journals and on stdout; none recorded twice.
    done = records(root / "results.jsonl")
    assert sorted(r["seq"] for r in done) == list(range(1, 41))
    assert len({r["key"] for r in done}) == 40
    assert all(r["stdout"] == f"job {r['input'][0]} done\n" and r["exit"] == 0 for r in done)
    assert sorted(joblog_seqs(root / "joblog")) == list(range(1, 41))
    printed = Counter((root / "out").read_text().splitlines())
    assert printed == Counter(f"job {n} done" for n in inputs)
    # The jobs that were running on w1 when it died ran again on w2.
    for name in killed:
        assert (root / "marks" / name).read_text() == "w1\nw2\n", name
    assert all("w2" in p.read_text() for p in (root / "marks").iterdir() if p.name not in killed)
    # --resume: nothing runs again, nothing is added.
    marks = {p.name: p.read_text() for p in (root / "marks").iterdir()}
    journals = (root / "results.jsonl").read_text(), (root / "joblog").read_text()
    again = fenfa_run(*command, "--resume", "sh", str(job), ":::", *inputs, cwd=root)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert {p.name: p.read_text() for p in (root / "marks").iterdir()} == marks
    assert ((root / "results.jsonl").read_text(), (root / "joblog").read_text()) == journals


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_timeout_kills_the_jobs_process_group_on_the_worker(cluster: Cluster) -> None:
    root = cluster.root
    job = root / "job.sh"
    job.write_text(
        f'echo "$FENFA_TEST_WORKER" > {root}/where-$1\n'
        f"sleep 300 &\necho $! > {root}/child-$1\nwait\n"
    )
    results = root / "results.jsonl"
    begin = time.monotonic()
    done = fenfa_run(
        *("--backend", "dask", "--address", cluster.address, "--timeout", "1"),
        *("--results", str(results), "sh", str(job), ":::", "1", "2", "3"),
        cwd=root,
    )
    assert done.returncode == 3, done.stderr
    assert time.monotonic() - begin < 60
    assert done.stderr.count("This job was killed because it timed out") == 3
    assert all(r["timed_out"] and r["exit"] == -1 for r in records(results))
    for n in "123":
        assert (root / f"where-{n}").read_text().strip() in cluster.workers
        child = int((root / f"child-{n}").read_text())
        wait_for(lambda c=child: gone(c), f"job {n}'s child sleep {child} to be gone", 5)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_jobs_run_in_the_workers_directory_and_keep_order(cluster: Cluster) -> None:
    root = cluster.root
    job = root / "where.sh"
    job.write_text('echo "$1 $FENFA_TEST_WORKER $(pwd)"\n')
    inputs = [str(n) for n in range(1, 31)]
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": cluster.address}
    done = fenfa_run(
        "--backend", "dask", "-k", "sh", str(job), ":::", *inputs, cwd=root, env=env
    )  # (the address from DASK_SCHEDULER_ADDRESS)
    assert done.returncode == 0, done.stderr
    lines = [line.split(" ") for line in done.stdout.splitlines()]
    assert [n for n, _, _ in lines] == inputs
    assert all(Path(where) == root / name for _, name, where in lines)


# -- no cluster --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:1",  # refused at once
        pytest.param("tcp://10.255.255.1:8786", marks=pytest.mark.slow),  # the connect timeout
    ],
)
def test_an_unreachable_scheduler_is_one_line_and_exit_255(tmp_path: Path, address: str) -> None:
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    log = tmp_path / "joblog"
    begin = time.monotonic()
    done = fenfa_run(
        "--backend", "dask", "--address", address, "--joblog", str(log), "echo",
        ":::", "a", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert time.monotonic() - begin < 30
    assert done.returncode == 255
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"fenfa run: no dask scheduler answered at '{address}'")
    assert not log.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--backend", "dask"], {}, "--backend dask needs the scheduler's address"),
        (["--address", "tcp://127.0.0.1:1"], {}, "it needs --backend dask"),
        (["--backend", "cloud"], {}, "unknown --backend 'cloud' (choose local or dask)"),
        (["--backend", "dask"], {"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1"}, "answered at"),
    ],
)
def test_bad_dask_options_are_one_line_and_exit_255(
    tmp_path: Path, args: list[str], env: dict[str, str], says: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    done = fenfa_run(*args, "echo", ":::", "a", cwd=tmp_path, env={**clean, **env})
    assert done.returncode == 255
    assert done.stdout == ""
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
