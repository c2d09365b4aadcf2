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
DASK_RUN = ["--backend", "dask", "--address"]


def journal_options(root: Path) -> list[str]:
    return ["--results", str(root / "results.jsonl"), "--joblog", str(root / "joblog")]


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
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A ``dask scheduler`` and workers w1, w2 (two threads each), torn down after.

    Parametrized indirectly, the parameter is the scheduler's extra environment.
    """
    scheduler_env = {**os.environ, **getattr(request, "param", {})}
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
                    env=scheduler_env,
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


def child_job(root: Path, before: str = "") -> Path:
    """A job script: ``before``, then a child ``sleep 300`` named in ``child-INPUT``, waited for."""
    job = root / "job.sh"
    job.write_text(
        f"{before}sleep 300 &\necho $! > {root}/child-$1.tmp\n"
        f"mv {root}/child-$1.tmp {root}/child-$1\nwait\n"
    )
    return job


def assert_children_gone(root: Path, inputs: str) -> None:
    for n in inputs:
        child = int((root / f"child-{n}").read_text())
        wait_for(lambda c=child: gone(c), f"job {n}'s child sleep {child} to be gone", 15)


# -- on a cluster ----------------------------------------------------------------------


def _kill_w1_mid_run(cluster: Cluster, inputs: list[str], *options: str) -> tuple[int, list[str]]:
    """Run gated jobs, SIGKILL w1 while it runs two, release: fenfa's status, w1's jobs.

    Each job appends its worker's name to ``marks/INPUT``, then waits for ``release``.
    """
    root = cluster.root
    (root / "marks").mkdir()
    job = root / "job.sh"
    job.write_text(
        f'echo "$FENFA_TEST_WORKER" >> {root}/marks/$1\n'
        f"while [ ! -e {root}/release ]; do sleep 0.01; done\n"
        'echo "job $1 done"\n'
    )
    command = [*DASK_RUN, cluster.address, "-j", "4", *journal_options(root), *options]
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
        return fenfa.wait(timeout=120), killed
    finally:
        if fenfa.poll() is None:
            fenfa.kill()
            fenfa.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_killed_mid_run_loses_no_job_and_records_none_twice(cluster: Cluster) -> None:
    root = cluster.root
    inputs = [str(n) for n in range(1, 41)]
    status, killed = _kill_w1_mid_run(cluster, inputs)
    assert status == 0, (root / "err").read_text()
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
    command = [*DASK_RUN, cluster.address, *journal_options(root), "--resume"]
    again = fenfa_run(*command, "sh", str(root / "job.sh"), ":::", *inputs, cwd=root)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    assert {p.name: p.read_text() for p in (root / "marks").iterdir()} == marks
    assert ((root / "results.jsonl").read_text(), (root / "joblog").read_text()) == journals


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "cluster", [{"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}], indirect=True
)
def test_when_dask_gives_up_on_a_dead_worker_retries_run_the_job_elsewhere(
    cluster: Cluster,
) -> None:
    """With allowed-failures 0 the scheduler gives up at once: the attempt fails, and
    --retries 2 (two attempts in all) runs it again, on the worker left."""
    root = cluster.root
    inputs = [str(n) for n in range(1, 9)]
    status, killed = _kill_w1_mid_run(cluster, inputs, "--retries", "2")
    assert status == 0, (root / "err").read_text()
    done = records(root / "results.jsonl")
    assert sorted(r["seq"] for r in done) == list(range(1, 9))
    assert all(r["stdout"] == f"job {r['input'][0]} done\n" and r["exit"] == 0 for r in done)
    assert {r["input"][0] for r in done if r["attempt"] == 2} == set(killed)
    attempts = Counter(joblog_seqs(root / "joblog"))
    assert {str(seq) for seq, n in attempts.items() if n == 2} == set(killed)
    assert sum(attempts.values()) == 8 + len(killed)
    for name in killed:
        assert (root / "marks" / name).read_text() == "w1\nw2\n", name


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_timeout_kills_the_jobs_process_group_on_the_worker(cluster: Cluster) -> None:
    root = cluster.root
    job = child_job(root, before=f'echo "$FENFA_TEST_WORKER" > {root}/where-$1\n')
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
    assert all((root / f"where-{n}").read_text().strip() in cluster.workers for n in "123")
    assert_children_gone(root, "123")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_fenfa_run_leaves_no_job_running_on_the_workers(cluster: Cluster) -> None:
    """SIGKILL: no cleanup here; the scheduler sees the client gone and lets its
    tasks go, and each worker kills the process group of the job it was running."""
    root = cluster.root
    job = child_job(root)
    fenfa = subprocess.Popen(
        [*FENFA, *DASK_RUN, cluster.address, "-j", "4", "sh", str(job), ":::", "1", "2", "3"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        children = [root / f"child-{n}" for n in "123"]
        wait_for(lambda: all(p.exists() for p in children), "the jobs' children", START_SECONDS)
    finally:
        fenfa.send_signal(signal.SIGKILL)
        fenfa.wait()
    assert_children_gone(root, "123")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_halt_now_kills_the_jobs_running_on_the_workers(cluster: Cluster) -> None:
    root = cluster.root
    job = child_job(
        root,
        before=f'if [ "$1" = fail ]; then\n'
        f"  while [ ! -e {root}/child-a ] || [ ! -e {root}/child-b ]; do sleep 0.01; done\n"
        "  exit 3\nfi\n",
    )
    done = fenfa_run(
        *(*DASK_RUN, cluster.address, "-j", "3", "--halt", "now,fail=1"),
        *("sh", str(job), ":::", "a", "b", "fail"),
        cwd=root,
    )
    assert done.returncode == 3, done.stderr  # (the failing job's own status)
    assert_children_gone(root, "ab")


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
    # --wd: the directory travels with each job to its worker.
    (root / "elsewhere").mkdir()
    done = fenfa_run(
        "--backend",
        "dask",
        "--wd",
        str(root / "elsewhere"),
        "-k",
        "sh",
        str(job),
        ":::",
        "1",
        cwd=root,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.split()[2]) == root / "elsewhere"
    # An option the remote call cannot honour is refused, naming it; nothing runs.
    done = fenfa_run("--backend", "dask", "--pipe", "cat", cwd=root, env=env)
    assert done.returncode == 255
    assert "--pipe: not available with --backend dask" in done.stderr


# -- no cluster --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:1",  # refused at once (tests reach no address but 127.0.0.1)
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
