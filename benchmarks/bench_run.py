"""``fenfa run`` against GNU parallel, ``xargs -P`` and a thread pool of ``subprocess.run``.

Run from the repository root (GNU parallel from Debian: ``apt-get install parallel``)::

    python benchmarks/bench_run.py [--quick] [--reps N] [--scale K] [-j N] [--skip-timeouts]
                                   [--out FILE.json]

About 2.5 minutes in full on 2 cores, under 30 s with ``--quick``.

The goals of issue 9: ``fenfa run`` costs at most 0.6 ms per job on 2 cores with
the journal on (``--joblog``), and is at least 4x faster than GNU parallel;
``--timeout`` kills a job within 0.1 s of its limit.

Method (``shared/BENCHMARKING.md``): every contender is a command run as a
subprocess of this one process, in its own session, with stdout and stderr
going to temporary files; the time is the wall time of the whole command
(interpreter start-up included: that is what a user waits for). Repetitions
are interleaved round-robin, the order varied per repetition, and the table
shows the minimum with its ratio to GNU parallel at its default. Every run's
output is checked: for ``echo {}`` each input must appear exactly once in
stdout, for ``true`` stdout must be empty; every exit status must be 0, and
every journal must hold one line per job.

Sections:

1. ``2,000 x true`` and ``2,000 x echo {}`` (``--scale K`` multiplies): inputs
   as ``:::`` arguments for fenfa, parallel and the thread-pool script, on
   stdin for xargs. A one-input run of each contender gives its fixed cost;
   ``wait4`` gives the CPU time of the runner and all its jobs. GNU parallel's
   variants (``--joblog``, ``PARALLEL_SHELL=/bin/sh``) run with ``true`` only.
2. Timeout precision: ``sleep 5`` jobs with ``--timeout T``; the overshoot is
   each tool's own ``JobRuntime`` (joblog) minus ``T``, cross-checked by
   watching the ``sleep`` processes from outside (``/proc`` polled every 5 ms).
3. Orphans: ``sh -c 'sleep 100 & wait'`` killed on its timeout, and the runner
   itself SIGKILLed mid-run: which processes are left.

After every run, the processes that carry the run's marker in their
environment (every descendant inherits it) are listed as survivors, then
killed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import harness

CORES = harness.CORES
GOAL_PER_JOB_MS = 0.6
GOAL_SPEEDUP = 4.0
GOAL_OVERSHOOT = 0.1
MARK = "FENFA_BENCH_RUN"
POLL_SECONDS = 0.005
PARALLEL = shutil.which("parallel") or "/usr/bin/parallel"
XARGS = shutil.which("xargs") or "/usr/bin/xargs"
FENFA = str(Path(sys.executable).with_name("fenfa"))
INPUTS = "<INPUTS>"


def _fenfa_direct() -> str:
    try:
        module = importlib.import_module("fenfa._shell")
    except ImportError:
        return "?"
    direct = getattr(module, "_direct", None)
    if direct is not None and direct("true 1") is not None:
        return "execs a plain word list directly (no shell; `/bin/sh -c` for shell syntax)"
    return "`/bin/sh -c`"


FENFA_DIRECT = _fenfa_direct()  # stands for the inputs in the displayed command lines

WORKLOADS = {"true": "true", "echo": "echo {}"}

TPE_SCRIPT = '''\
"""Shell jobs on a ThreadPoolExecutor: /bin/sh -c per job, output captured, printed whole."""

import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed


def run(command):
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True)


def main():
    jobs, template, inputs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if "{}" not in template:
        template += " {}"
    failed = 0
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run, template.replace("{}", shlex.quote(x))) for x in inputs]
        for future in as_completed(futures):
            result = future.result()
            sys.stdout.buffer.write(result.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(result.stderr)
            failed += result.returncode != 0
    return min(failed, 101)


sys.exit(main())
'''


# -- running one command and looking at what it left ----------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    """The process's state letter ("" if gone): Z for a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return ""
    return stat[stat.rfind(b")") + 2 :][:1].decode()


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _marked(pid: int, token: str) -> bool:
    return b"\0%s=%s\0" % (MARK.encode(), token.encode()) in b"\0" + _read(f"/proc/{pid}/environ")


def survivors(token: str) -> list[dict[str, Any]]:
    """Live processes (not zombies) that inherited this run's marker."""
    found = []
    for pid in _pids():
        if pid == os.getpid() or not _marked(pid, token):
            continue
        state = _state(pid)
        if state and state != "Z":
            cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").strip()
            found.append({"pid": pid, "cmd": cmdline.decode(errors="replace")})
    return found


def kill_all(found: list[dict[str, Any]]) -> None:
    for process in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process["pid"], signal.SIGKILL)


@dataclass
class Invocation:
    argv: list[str]
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    joblog: Path | None = None
    results: Path | None = None


@dataclass
class Outcome:
    seconds: float
    returncode: int
    stdout: bytes
    stderr: bytes
    token: str
    survivors: list[dict[str, Any]]  # job processes alive when the runner had exited
    late_survivors: list[dict[str, Any]] | None = None  # ... and ``grace`` seconds later
    # A copy of the runner (fenfa's guard: a fork of it) still alive at exit: how long it
    # lasted after the runner (None: none was).
    lingered: float | None = None
    # With ``grace``: when no job process was left any more (None: not within ``grace``).
    cleared: float | None = None
    cpu: float = 0.0  # user + system seconds of the runner and the jobs it reaped


def _is_runner(process: dict[str, Any], argv: list[str]) -> bool:
    return bool(process["cmd"].endswith(" ".join(argv)))


def execute(
    inv: Invocation,
    *,
    kill_after: float | None = None,
    on_start: Callable[[], None] | None = None,
    grace: float | None = None,
    token: str | None = None,
) -> Outcome:
    """Run one command to its end; ``kill_after``: SIGKILL the runner itself then.

    Survivors are looked for at once after the runner is reaped, and with
    ``grace``, that much later again; then every one is killed.
    """
    token = token or uuid.uuid4().hex
    env = {**os.environ, **inv.env, MARK: token}
    with (
        tempfile.TemporaryFile() as stdin,
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
    ):
        if inv.stdin is not None:
            stdin.write(inv.stdin)
            stdin.seek(0)
        if on_start is not None:
            on_start()
        start = time.perf_counter()
        process = subprocess.Popen(
            inv.argv,
            stdin=stdin if inv.stdin is not None else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        killer = None
        if kill_after is not None:
            killer = threading.Timer(kill_after, os.kill, (process.pid, signal.SIGKILL))
            killer.start()
        # wait4: the wall time, and the CPU time of the runner and every job it reaped
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if killer is not None:
            killer.cancel()
        process.returncode = returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        ended = time.perf_counter()
        found = survivors(token)
        left = [p for p in found if not _is_runner(p, inv.argv)]
        lingered = None
        if len(left) < len(found):  # wait (up to 2 s) for the runner's copy to go
            while time.perf_counter() - ended < 2 and any(
                _is_runner(p, inv.argv) for p in survivors(token)
            ):
                time.sleep(0.001)
            lingered = time.perf_counter() - ended
        late = None
        cleared = 0.0 if not left else None
        if grace is not None:
            while time.perf_counter() - ended < grace:
                time.sleep(0.002)
                if cleared is None and not [
                    p for p in survivors(token) if not _is_runner(p, inv.argv)
                ]:
                    cleared = time.perf_counter() - ended
            late = survivors(token)
        kill_all(survivors(token))
        stdout.seek(0)
        stderr.seek(0)
        return Outcome(
            seconds,
            returncode,
            stdout.read(),
            stderr.read(),
            token,
            left,
            late,
            lingered,
            cleared,
            cpu,
        )


# -- section 1: many tiny jobs --------------------------------------------------------


@dataclass
class Contender:
    name: str
    build: Callable[[str, list[str], Path], Invocation]
    note: str = ""
    first_only: bool = False  # a variant: with the first workload only (the time budget)


def full_template(template: str) -> str:
    return template if "{}" in template else template + " {}"


def contenders(jobs: int, tpe_script: Path) -> list[Contender]:
    j = str(jobs)

    def fenfa(*options: str, shell: bool = False) -> Callable[[str, list[str], Path], Invocation]:
        def build(template: str, inputs: list[str], tmp: Path) -> Invocation:
            if shell:  # a `;` makes it shell syntax: it runs under /bin/sh -c
                template = full_template(template) + ";"
            inv = Invocation([])
            extra: list[str] = []
            if "--joblog" in options:
                inv.joblog = tmp / "fenfa-joblog.tsv"
                extra += ["--joblog", str(inv.joblog)]
            if "--results" in options:
                inv.results = tmp / "fenfa-results.jsonl"
                extra += ["--results", str(inv.results)]
            inv.argv = [FENFA, "run", "-j", j, *extra, template, ":::", *inputs]
            return inv

        return build

    def parallel(*options: str, shell: str | None = None) -> Callable[..., Invocation]:
        def build(template: str, inputs: list[str], tmp: Path) -> Invocation:
            inv = Invocation([])
            extra: list[str] = []
            if "--joblog" in options:
                inv.joblog = tmp / "parallel-joblog.tsv"
                extra += ["--joblog", str(inv.joblog)]
            if shell:
                inv.env["PARALLEL_SHELL"] = shell
            inv.argv = [PARALLEL, "--will-cite", "-j", j, *extra, template, ":::", *inputs]
            return inv

        return build

    def xargs(template: str, inputs: list[str], tmp: Path) -> Invocation:
        words = shlex.split(template)
        how = ["-I{}"] if "{}" in template else ["-n", "1"]
        return Invocation([XARGS, "-P", j, *how, *words], stdin=_lines(inputs))

    def xargs_sh(template: str, inputs: list[str], tmp: Path) -> Invocation:
        argv = [XARGS, "-P", j, "-I{}", "/bin/sh", "-c", full_template(template)]
        return Invocation(argv, stdin=_lines(inputs))

    def tpe(template: str, inputs: list[str], tmp: Path) -> Invocation:
        return Invocation([sys.executable, str(tpe_script), j, template, *inputs])

    rows = [
        Contender("fenfa run", fenfa()),
        Contender("fenfa run --joblog", fenfa("--joblog"), "the goal's row: journal on"),
        Contender("fenfa run --results", fenfa("--results")),
        Contender(
            "fenfa run --joblog, through /bin/sh",
            fenfa("--joblog", shell=True),
            "`CMD;`: shell syntax, so a /bin/sh per job, as the others",
        ),
    ]
    if os.path.exists(PARALLEL):
        rows += [
            Contender("GNU parallel", parallel(), "the reference: its defaults"),
            Contender("GNU parallel --joblog", parallel("--joblog"), first_only=True),
            Contender(
                "GNU parallel, PARALLEL_SHELL=/bin/sh",
                parallel(shell="/bin/sh"),
                "jobs under dash, as fenfa's, not $SHELL",
                first_only=True,
            ),
        ]
    rows += [
        Contender("xargs -P", xargs, "no shell, output not captured"),
        Contender("xargs -P + /bin/sh -c", xargs_sh, "a shell per job, output not captured"),
        Contender("ThreadPoolExecutor + subprocess.run", tpe, "sh -c per job, output captured"),
    ]
    return rows


def _lines(inputs: list[str]) -> bytes:
    return "".join(f"{x}\n" for x in inputs).encode()


def display(contender: Contender, template: str, count: int) -> str:
    inv = contender.build(template, [INPUTS], Path("$TMP"))
    argv = [Path(a).name if a in (FENFA, PARALLEL, XARGS) else a for a in inv.argv]
    if inv.argv[0] == sys.executable:
        argv[:2] = ["python", "tpe_jobs.py"]
    text = shlex.join(argv)
    text = text.replace(shlex.quote(INPUTS), f"$(seq {count})").replace(
        shlex.quote("$TMP") + "/", "$TMP/"
    )
    text = text.replace("'$TMP/", "$TMP/").replace(".tsv'", ".tsv").replace(".jsonl'", ".jsonl")
    if inv.stdin is not None:
        text = f"seq {count} | {text}"
    if inv.env:
        text = " ".join(f"{k}={v}" for k, v in inv.env.items()) + " " + text
    return text


def check(outcome: Outcome, inv: Invocation, template: str, inputs: list[str]) -> list[str]:
    """What is wrong with this run's output (nothing: an empty list)."""
    problems = []
    if outcome.returncode != 0:
        problems.append(f"exit {outcome.returncode}")
    lines = outcome.stdout.decode(errors="replace").splitlines()
    if template.startswith("echo"):
        if sorted(lines, key=_num) != sorted(inputs, key=_num):
            missing = len(set(inputs) - set(lines))
            problems.append(f"stdout: {len(lines)} lines, {missing} inputs missing")
    elif lines:
        problems.append(f"stdout: {len(lines)} unexpected lines")
    if outcome.stderr.strip():
        problems.append("stderr: " + outcome.stderr.decode(errors="replace").strip()[:80])
    for name, path, extra in (("joblog", inv.joblog, 1), ("results", inv.results, 0)):
        if path is not None:
            count = len(path.read_text().splitlines()) if path.exists() else 0
            if count != len(inputs) + extra:
                problems.append(f"{name}: {count} lines, want {len(inputs) + extra}")
            path.unlink(missing_ok=True)
    if outcome.survivors:
        named = "; ".join(p["cmd"][:60] or "(no cmdline: exiting)" for p in outcome.survivors)
        problems.append(f"{len(outcome.survivors)} processes left ({named})")
    return problems


def _num(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (-1, text)


def throughput(jobs: int, count: int, reps: int, tpe_script: Path) -> dict[str, Any]:
    rows = contenders(jobs, tpe_script)
    inputs = [str(i) for i in range(1, count + 1)]
    first = next(iter(WORKLOADS))
    runs: list[tuple[str, str, list[str]]] = [
        (w, r.name, inputs) for w in WORKLOADS for r in rows if w == first or not r.first_only
    ] + [(first, r.name, ["1"]) for r in rows]  # the fixed cost: one job
    by_name = {r.name: r for r in rows}
    times: dict[tuple[str, str, int], list[float]] = {(w, n, len(x)): [] for w, n, x in runs}
    problems: dict[tuple[str, str, int], list[str]] = {key: [] for key in times}
    lines: dict[tuple[str, str, int], int] = {}
    lingered: dict[str, list[float | None]] = {r.name: [] for r in rows}
    cpu: dict[tuple[str, str, int], list[float]] = {key: [] for key in times}
    with tempfile.TemporaryDirectory(prefix="bench_run-") as tmp:
        for workload, name, xs in harness.interleave(runs, reps, stride=7):
            template = WORKLOADS[workload]
            inv = by_name[name].build(template, xs, Path(tmp))
            outcome = execute(inv)
            key = (workload, name, len(xs))
            times[key].append(outcome.seconds)
            lines[key] = len(outcome.stdout.splitlines())
            lingered[name].append(outcome.lingered)
            cpu[key].append(outcome.cpu)
            for problem in check(outcome, inv, template, xs):
                if problem not in problems[key]:
                    problems[key].append(problem)
    result: dict[str, Any] = {"count": count, "workloads": {}, "runner_lingered": lingered}
    for workload, template in WORKLOADS.items():
        table = []
        for row in rows:
            key = (workload, row.name, count)
            if key not in times:
                continue
            one = times.get((first, row.name, 1), [])
            table.append(
                {
                    "name": row.name,
                    "note": row.note,
                    "command": display(row, template, count),
                    "times": times[key],
                    "min": min(times[key]),
                    "median": statistics.median(times[key]),
                    "one_job_min": min(one) if one else None,
                    "cpu": cpu[key],
                    "stdout_lines": lines[key],
                    "problems": problems[key] + problems.get((first, row.name, 1), []),
                }
            )
        result["workloads"][workload] = {
            "template": template,
            "rows": table,
            "left_out": [r.name for r in rows if r.first_only and workload != first],
        }
    return result


def throughput_report(result: dict[str, Any]) -> list[dict[str, Any]]:
    count = result["count"]
    first_template = next(iter(result["workloads"].values()))["template"]
    verdicts = []
    for workload, data in result["workloads"].items():
        rows = data["rows"]
        ref = next((r for r in rows if r["name"] == "GNU parallel"), None)
        print(f"## {count:,} jobs of `{data['template']}`\n")
        print(
            "Wall time of the whole command, min of the repetitions (median beside it); per job "
            "= wall / jobs; marginal = (wall - one-job wall) / (jobs - 1), the cost of a job "
            f"once the runner is up. What runs per job: `fenfa run` {FENFA_DIRECT}, "
            "GNU parallel `$SHELL -c` (bash here), "
            "the thread-pool script `/bin/sh -c`, xargs the program itself. Floors: `xargs -P` "
            "(a fork+exec per job, nothing else) and `xargs -P + /bin/sh -c` (plus a shell). "
            "CPU per job: user + system time of the runner and all its jobs (`wait4`), min "
            f"of the repetitions, / jobs; with {CORES} cores, wall >= CPU / {CORES}.\n"
        )
        table = []
        for r in rows:
            per_job = r["min"] / count * 1e3
            one = r["one_job_min"]
            marginal = f"{(r['min'] - one) / max(1, count - 1) * 1e3:.3f} ms" if one else "-"
            ratio = f"{ref['min'] / r['min']:.2f}x faster" if ref else "-"
            if ref and r["min"] > ref["min"]:
                ratio = f"{r['min'] / ref['min']:.2f}x slower"
            if ref is r:
                ratio = "1 (reference)"
            table.append(
                [
                    r["name"],
                    f"{r['min']:.3f} s",
                    f"{r['median']:.3f} s",
                    f"{per_job:.3f} ms",
                    marginal,
                    f"{one * 1e3:.0f} ms" if one else "-",
                    f"{min(r['cpu']) / count * 1e3:.3f} ms",
                    ratio,
                    f"{r['stdout_lines']:,}",
                    "; ".join(r["problems"]) or "ok",
                ]
            )
        headers = (
            "contender | wall (min) | median | per job | marginal per job | 1-job run | "
            "CPU per job | vs GNU parallel | stdout lines | check"
        )
        print(harness.markdown_table(headers, table, pad=False, align="lrrrrrrrrl"))
        if data["left_out"]:
            print(
                f"\n({', '.join(data['left_out'])}: variants, timed with the `{first_template}` "
                "jobs only, to keep the whole run under 3 minutes.)"
            )
        print("\nCommands (`$TMP`: a temporary directory; journals removed after each run):\n")
        for r in rows:
            note = f" ({r['note']})" if r["note"] else ""
            print(f"- {r['name']}{note}: `{r['command']}`")
        print()
        fenfa = next(r for r in rows if r["name"] == "fenfa run --joblog")
        per_job = fenfa["min"] / count * 1e3
        verdicts.append(
            {
                "workload": workload,
                "goal": f"fenfa run --joblog <= {GOAL_PER_JOB_MS} ms per job",
                "value": f"{per_job:.3f} ms",
                "met": per_job <= GOAL_PER_JOB_MS,
            }
        )
        for name in ("GNU parallel", "GNU parallel --joblog"):
            other = next((r for r in rows if r["name"] == name), None)
            if other is not None:
                speedup = other["min"] / fenfa["min"]
                verdicts.append(
                    {
                        "workload": workload,
                        "goal": f"fenfa run --joblog >= {GOAL_SPEEDUP:g}x faster than {name}",
                        "value": f"{speedup:.2f}x",
                        "met": speedup >= GOAL_SPEEDUP,
                    }
                )
    late = [
        v for name, values in result["runner_lingered"].items() if "fenfa" in name for v in values
    ]
    alive = [v for v in late if v is not None]
    if alive:
        print(
            f"Note: fenfa's guard (a fork of the runner) was still alive when the runner had "
            f"exited in {len(alive)} of {len(late)} fenfa runs, and gone {max(alive) * 1e3:.1f} ms "
            "later at most (not counted as a process left).\n"
        )
    return verdicts


# -- section 2: timeouts --------------------------------------------------------------


class SleepWatcher(threading.Thread):
    """Sees the ``sleep`` processes of one run (by its marker) start and end, from /proc."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.token = ""
        self.stop = threading.Event()
        self.seen: dict[int, dict[str, float]] = {}
        self.not_ours: set[int] = set()

    def run(self) -> None:
        previous = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            pids = _pids()
            for pid in pids:
                if pid in self.not_ours:
                    continue
                if pid not in self.seen:
                    if _read(f"/proc/{pid}/comm") != b"sleep\n":
                        continue  # (a forked shell becomes sleep later: look again)
                    words = _read(f"/proc/{pid}/cmdline").split(b"\0")
                    if not (
                        len(words) > 1
                        and os.path.basename(words[0]) == b"sleep"
                        and words[1] == b"5"
                        and _marked(pid, self.token)
                    ):
                        self.not_ours.add(pid)  # not ours, or GNU parallel's `sleep 10101`
                        continue
                    self.seen[pid] = {"after": previous, "seen": now}
            for pid, times in self.seen.items():
                if "dead" in times:
                    continue
                state = _state(pid)
                if state and state != "Z":
                    times["alive"] = now
                else:
                    times["dead"] = now
            previous = now
            time.sleep(POLL_SECONDS)

    def lifetimes(self) -> list[float]:
        """Midpoint estimates: born between two polls, died between two polls."""
        out = []
        for times in self.seen.values():
            if "dead" in times and "alive" in times:
                born = (times["after"] + times["seen"]) / 2
                died = (times["alive"] + times["dead"]) / 2
                out.append(died - born)
        return out


def _joblog_runtimes(path: Path) -> list[tuple[float, str, str]]:
    """(JobRuntime, Exitval, Signal) of each row of a GNU-parallel-style joblog."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        columns = line.split("\t")
        rows.append((float(columns[3]), columns[6], columns[7]))
    return rows


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timeouts(jobs: int, limits: Sequence[float], count: int) -> list[dict[str, Any]]:
    results = []
    inputs = [str(i) for i in range(1, count + 1)]
    tools = ["fenfa"] + (["parallel"] if os.path.exists(PARALLEL) else [])
    with tempfile.TemporaryDirectory(prefix="bench_run-") as tmp:
        for n, limit in enumerate(limits):
            for tool in tools if n % 2 == 0 else tools[::-1]:
                joblog = Path(tmp) / f"{tool}-timeout.tsv"
                joblog.unlink(missing_ok=True)
                t = f"{limit:g}"
                if tool == "fenfa":
                    results_file = Path(tmp) / "fenfa-timeout.jsonl"
                    results_file.unlink(missing_ok=True)
                    argv = [FENFA, "run", "-j", str(jobs), "--timeout", t, "--joblog"]
                    argv += [str(joblog), "--results", str(results_file)]
                else:
                    argv = [PARALLEL, "--will-cite", "-j", str(jobs), "--timeout", t]
                    argv += ["--joblog", str(joblog)]
                argv += ["sleep 5", ":::", *inputs]
                watcher = SleepWatcher()
                outcome = _execute_watched(Invocation(argv), watcher)
                rows = _joblog_runtimes(joblog) if joblog.exists() else []
                durations = []
                if tool == "fenfa" and results_file.exists():
                    durations = [
                        json.loads(line).get("duration")
                        for line in results_file.read_text().splitlines()
                    ]
                over = [r[0] - limit for r in rows]
                seen = [x - limit for x in watcher.lifetimes()]
                ideal = -(-count // jobs) * limit
                results.append(
                    {
                        "limit": limit,
                        "tool": tool,
                        "command": _display_argv(argv, count).replace(tmp, "$TMP"),
                        "wall": outcome.seconds,
                        "ideal_wall": ideal,
                        "overshoot": over,
                        "overshoot_spread": _spread(over),
                        "observed_overshoot": seen,
                        "observed_spread": _spread(seen),
                        "exit_and_signal": sorted({(r[1], r[2]) for r in rows}),
                        "results_durations": durations,
                        "jobs_logged": len(rows),
                        "sleeps_seen": len(watcher.seen),
                        "returncode": outcome.returncode,
                        "survivors": outcome.survivors,
                    }
                )
    return results


def _execute_watched(inv: Invocation, watcher: SleepWatcher) -> Outcome:
    watcher.token = uuid.uuid4().hex
    try:
        return execute(inv, on_start=watcher.start, token=watcher.token)
    finally:
        watcher.stop.set()
        if watcher.is_alive():
            watcher.join()


def _display_argv(argv: list[str], count: int) -> str:
    shown = [Path(a).name if a in (FENFA, PARALLEL) else a for a in argv]
    cut = shown.index(":::")
    return shlex.join(shown[: cut + 1]) + f" $(seq {count})"


def _fmt(spread: dict[str, float] | None) -> str:
    if spread is None:
        return "-"
    return " / ".join(f"{spread[k] * 1e3:+.0f}" for k in ("min", "median", "max")) + " ms"


def timeout_report(rows: list[dict[str, Any]], jobs: int, count: int) -> list[dict[str, Any]]:
    print("## Timeout precision\n")
    print(
        f"{count} jobs of `sleep 5` (the input appended: `sleep 5 1` ...) at `-j {jobs}`, each "
        "killed at its limit. Overshoot = runtime - limit, min / median / max over the jobs: "
        "*by the joblog* is the tool's own JobRuntime column (fenfa: from before the spawn to "
        "after the group is reaped; 3 decimals); *seen* is the `sleep` process's lifetime as "
        f"seen from outside, /proc polled every {POLL_SECONDS * 1e3:.0f} ms (+/- that; the "
        "sleep starts a few ms after its job's shell). Wall: the whole command; ideal = "
        "waves x limit. Left: live processes of the run after the runner exited.\n"
    )
    table = [
        [
            f"{r['limit']:g} s",
            r["tool"],
            _fmt(r["overshoot_spread"]),
            _fmt(r["observed_spread"]),
            f"{r['wall']:.2f} s ({r['ideal_wall']:.1f} s)",
            ", ".join(f"{e}/{s}" for e, s in r["exit_and_signal"]) or "-",
            len(r["survivors"]),
        ]
        for r in rows
    ]
    headers = (
        "limit | tool | overshoot by the joblog | seen from outside | wall (ideal) | "
        "exit, signal | left"
    )
    print(harness.markdown_table(headers, table, pad=False, align="rlrrrlr"))
    print("\nCommands:\n")
    for r in rows:
        if r["limit"] == rows[0]["limit"]:
            print(f"- {r['tool']}: `{r['command']}`")
    print()
    fenfa = [r for r in rows if r["tool"] == "fenfa"]
    worst = max((max(r["overshoot"], default=0.0) for r in fenfa), default=0.0)
    seen = max((max(r["observed_overshoot"], default=0.0) for r in fenfa), default=0.0)
    left = sum(len(r["survivors"]) for r in fenfa)
    return [
        {
            "workload": "timeout",
            "goal": f"fenfa kills within {GOAL_OVERSHOOT} s of the limit (worst job, joblog)",
            "value": f"{worst * 1e3:+.0f} ms (seen from outside: {seen * 1e3:+.0f} ms)",
            "met": worst <= GOAL_OVERSHOOT and seen <= GOAL_OVERSHOOT,
        },
        {
            "workload": "timeout",
            "goal": "no process of a fenfa run left after it exits",
            "value": f"{left} left",
            "met": left == 0,
        },
    ]


# -- section 3: orphans ---------------------------------------------------------------


def orphans(jobs: int) -> list[dict[str, Any]]:
    cases: list[tuple[str, str, float | None, float | None]] = [
        ("grandchild, killed on --timeout 0.5", "sh -c 'sleep 100 & wait'", 0.5, None),
        ("runner SIGKILLed 1 s into the run", "sleep 100", None, 1.0),
    ]
    rows = []
    for case, command, limit, kill_after in cases:
        for tool in ("fenfa", "parallel"):
            if tool == "parallel" and not os.path.exists(PARALLEL):
                continue
            timeout = ["--timeout", f"{limit:g}"] if limit else []
            head = [FENFA, "run"] if tool == "fenfa" else [PARALLEL, "--will-cite"]
            argv = [*head, "-j", str(jobs), *timeout, command, ":::", *map(str, range(1, jobs + 1))]
            outcome = execute(Invocation(argv), kill_after=kill_after, grace=0.5)
            rows.append(
                {
                    "case": case,
                    "tool": tool,
                    "command": _display_argv(argv, jobs),
                    "wall": outcome.seconds,
                    "returncode": outcome.returncode,
                    "left_at_exit": outcome.survivors,
                    "left_after_half_a_second": outcome.late_survivors,
                    "runner_copy_lingered": outcome.lingered,
                    "jobs_gone_after": outcome.cleared,
                }
            )
    return rows


def orphans_report(rows: list[dict[str, Any]]) -> None:
    print("## Orphans\n")
    print(
        "Live processes of the run (by the marker every descendant inherits) right after "
        "the runner exited (or was SIGKILLed and reaped), and 0.5 s later; then killed. "
        "(A copy of the runner still exiting, fenfa's guard, is not counted at exit.)\n"
    )
    table = []
    for r in rows:
        gone = r["jobs_gone_after"]
        table.append(
            [
                r["case"],
                r["tool"],
                f"{r['wall']:.2f} s",
                _names(r["left_at_exit"]),
                "never" if gone is None else f"{gone * 1e3:.0f} ms",
                _names(r["left_after_half_a_second"] or []),
                f"`{r['command']}`",
            ]
        )
    headers = "case | tool | wall | left at exit | all gone after | left 0.5 s later | command"
    print(harness.markdown_table(headers, table, pad=False, align="llrlrll"))
    print()


def _names(found: list[dict[str, Any]]) -> str:
    if not found:
        return "none"
    return "; ".join(f"`{p['cmd'][:60]}`" for p in found)


# -- the machine ----------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine_info(jobs: int) -> dict[str, Any]:
    commit = _first_line(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "status", "--porcelain", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "usable_cores": CORES,
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fenfa": version("fenfa"),
        "commit": commit[:10] + (" (src/ modified)" if dirty else ""),
        "parallel": _first_line([PARALLEL, "--version"]) + f" ({PARALLEL})",
        "parallel_shell": "$SHELL=" + os.environ.get("SHELL", "(unset)"),
        "xargs": _first_line([XARGS, "--version"]),
        "sh": os.path.realpath("/bin/sh"),
        "fenfa_run_per_job": FENFA_DIRECT,
        "bytecode": harness.compile_fenfa(),
        "command": harness.command(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="200 jobs, 2 repetitions, one wave of timeouts"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (min reported)")
    parser.add_argument("--scale", type=int, default=1, help="multiply the 2,000 jobs")
    parser.add_argument(
        "-j", "--jobs", type=int, default=CORES, help="jobs at once (default: usable cores)"
    )
    parser.add_argument("--skip-timeouts", action="store_true", help="sections 2 and 3 off")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    count = (200 if args.quick else 2000) * max(1, args.scale)
    reps = 2 if args.quick else max(1, args.reps)
    limits = (0.2, 0.5) if args.quick else (0.2, 0.5, 1.0)
    timeout_jobs = args.jobs if args.quick else 3 * args.jobs
    machine = machine_info(args.jobs)
    load_before = harness.load()
    print("# fenfa run vs GNU parallel, xargs -P, ThreadPoolExecutor\n")
    print(f"Command: `{machine['command']}`\n")
    for key, value in machine.items():
        if key != "command":
            print(f"- {key}: {value}")
    print(f"- repetitions: {reps} (min reported), interleaved, order varied per repetition")
    print(f"- load average before: {harness.fmt_load(load_before)}")
    if warning := harness.busy_warning(load_before):
        print(f"- {warning}")
    print(flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_run-") as tmp:
        script = Path(tmp) / "tpe_jobs.py"
        script.write_text(TPE_SCRIPT)
        result = throughput(args.jobs, count, reps, script)
    verdicts = throughput_report(result)
    payload: dict[str, Any] = {"machine": machine, "reps": reps, "throughput": result}
    if not args.skip_timeouts:
        timeout_rows = timeouts(args.jobs, limits, timeout_jobs)
        verdicts += timeout_report(timeout_rows, args.jobs, timeout_jobs)
        orphan_rows = orphans(args.jobs)
        orphans_report(orphan_rows)
        payload["timeouts"] = timeout_rows
        payload["orphans"] = orphan_rows
    load_after = harness.load()
    print(
        f"Load average after: {harness.fmt_load(load_after)} (this benchmark "
        f"keeps {args.jobs} jobs running: a 1-minute load near {args.jobs} is its own)\n"
    )
    print("## Goals (issue 9)\n")
    for v in verdicts:
        print(f"- {harness.verdict(v['met'])}: {v['goal']} ({v['workload']}): {v['value']}")
    payload["verdicts"] = verdicts
    payload["load"] = {"before": load_before, "after": load_after}
    if args.out:
        harness.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
