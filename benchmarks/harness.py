"""What every benchmark here shares: the order of runs, the clock, the tables, the machine.

A benchmark file holds its workloads and its contenders; it imports this module
(``python benchmarks/bench_X.py`` puts ``benchmarks/`` first on ``sys.path``, so
``import harness`` works without installing anything, in the workers too).

The method is ``shared/BENCHMARKING.md``'s:

- ``orders`` / ``interleave``: repetitions interleaved round-robin, the order
  varied per repetition (forwards, backwards, rotated), so that a noisy spell,
  or the BLAS threads the previous contender left spinning, hits every
  contender alike and nobody always runs after the same neighbour;
- ``timed`` / ``timed_cpu``: garbage is collected before the clock starts, not
  during the timed call;
- ``repeat``: every contender warmed once (its output checked), then timed in
  interleaved repetitions, every output checked; ``Samples``: the minimum (the
  least-disturbed run) and the median of a contender's runs;
- ``load`` / ``busy_warning``: the load average against the usable cores. On a
  shared 2-core machine other work inflates times 2-3x; a run that started or
  ended busy says so in its output, and then only its ratios count;
- ``markdown_table``, ``machine_line`` (cores, Python), ``load_line``,
  ``run_workloads`` (named workloads, each printed as it ends) and
  ``write_json`` (the raw results).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# BENCHMARKING.md rule 6: the cores this process may run on, not os.cpu_count().
CORES = len(os.sched_getaffinity(0))
# A 1-minute load above this share of the usable cores means other work held at least
# one core for most of the last minute (1.5 on 2 cores: bench_run's first threshold).
BUSY_SHARE = 0.75


# --- the order of runs and the clock ----------------------------------------------------


def orders(
    n: int, reps: int, *, stride: int | None = None, turn: bool = True
) -> Iterator[list[int]]:
    """Indexes 0..n-1 once per repetition: forwards, backwards (``turn``), rotated.

    The rotation is by ``rep // 2`` (each direction meets each start once), or by
    ``rep * stride`` where a benchmark's figures were measured that way (``stride=0``:
    plain alternation, forwards and backwards).
    """
    for rep in range(reps):
        order = list(range(n))[::-1] if turn and rep % 2 else list(range(n))
        shift = (rep * stride if stride is not None else rep // 2) % max(n, 1)
        yield order[shift:] + order[:shift]


def interleave(
    items: Sequence[T], reps: int, *, stride: int | None = None, turn: bool = True
) -> Iterator[T]:
    """Every item once per repetition, in ``orders``' varied order."""
    for order in orders(len(items), reps, stride=stride, turn=turn):
        for i in order:
            yield items[i]


def timed_cpu(call: Callable[[], T]) -> tuple[float, float, T]:
    """Wall time, this process's CPU time (all its threads) and the result of ``call()``.

    Garbage is collected first, so that no contender pays for another's garbage.
    """
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, time.process_time() - cpu, out


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Wall time of ``call()`` and its result; garbage is collected first, not during."""
    gc.collect()
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def repeat(
    contenders: Mapping[K, Callable[[], Any]],
    reps: int,
    check: Callable[[K, Any], None] | None = None,
    *,
    stride: int | None = None,
) -> dict[K, list[float]]:
    """Wall times of ``reps`` interleaved runs of each contender, by name.

    Each contender runs once untimed first (warm: pools started, the function on every
    worker); ``stride`` is ``orders``'. ``check(name, output)`` sees every output, the
    warm-up's too, and raises on a wrong one.
    """
    names = list(contenders)
    for name in names:
        out = contenders[name]()
        if check is not None:
            check(name, out)
    times: dict[K, list[float]] = {name: [] for name in names}
    for name in interleave(names, reps, stride=stride):
        seconds, out = timed(contenders[name])
        times[name].append(seconds)
        if check is not None:
            check(name, out)
    return times


def equal_to(want: Any) -> Callable[[Any, Any], None]:
    """A ``check`` for ``repeat``: every output equals ``want``."""

    def check(name: Any, out: Any) -> None:
        assert out == want, name

    return check


def same_as_first() -> Callable[[Any, Any], None]:
    """A ``check`` for ``repeat``: every output equals the first (the first warm-up's)."""
    first: list[Any] = []

    def check(name: Any, out: Any) -> None:
        if not first:
            first.append(out)
        assert out == first[0], name

    return check


@dataclass(kw_only=True)
class Samples:
    """The timed runs of one contender; a benchmark's result records extend it."""

    samples: list[float] = field(default_factory=list)
    error: str | None = None  # a contender that fails is reported, not fatal

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def times_json(self) -> dict[str, Any]:
        return {
            "min_s": self.best if self.samples else None,
            "median_s": self.median if self.samples else None,
            "samples_s": self.samples,
        }


def spin_loops(seconds: float, *, enough: float, env: str = "FENFA_BENCH_SPIN_LOOPS") -> int:
    """How many rounds of ``total += i ^ x`` last ``seconds`` here (calibrated once).

    The loop count grows 4x until one timing lasts ``enough`` seconds, then scales.
    Workers import a benchmark afresh: the environment carries the figure to them, so
    that every process spins the same count.
    """
    loops = int(os.environ.get(env, "0"))
    if not loops:
        loops = 100_000
        while True:
            start = time.perf_counter()
            total = 0
            for i in range(loops):
                total += i ^ 1
            took = time.perf_counter() - start
            if took > enough:
                loops = int(loops * seconds / took)
                break
            loops *= 4
    os.environ[env] = str(loops)
    return loops


# --- formatting -------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    """Three significant digits in s, ms or us; "-" for a missing time."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_ratio(ratio: float, *, fine: bool = False) -> str:
    """``0.36x``, ``12.5x``; ``fine``: two significant digits below 0.1x (``0.052x``)."""
    if math.isnan(ratio):
        return "-"
    if ratio >= 10:
        return f"{ratio:.1f}x"
    return f"{ratio:.2g}x" if fine and ratio < 0.1 else f"{ratio:.2f}x"


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def markdown_table(
    headers: Sequence[str] | str,
    rows: Sequence[Sequence[Any]],
    *,
    pad: bool = True,
    align: str | None = None,
) -> str:
    """A markdown table; ``pad`` lines the columns up for a terminal.

    ``headers`` may be one string, ``"a | b | c"``. ``align``, one letter a column,
    ``l`` or ``r``, right-aligns the ``r`` columns in the markdown (``---:``).
    Unpadded tables are written as ``| --- |``.
    """
    if isinstance(headers, str):
        headers = [h.strip() for h in headers.split("|")]
    cells = [[str(c) for c in row] for row in rows]
    right = [a == "r" for a in (align or "l" * len(headers))]
    if not pad:
        rule = ["---:" if r else "---" for r in right]
        return "\n".join("| " + " | ".join(r) + " |" for r in [list(headers), rule, *cells])
    widths = [max(len(c) for c in col) for col in zip(headers, *cells, strict=True)]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    ends = [":" if r else "-" for r in right]
    rule = "|" + "|".join("-" * (w + 1) + e for w, e in zip(widths, ends, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def titled_table(
    title: str, limit: str, headers: Sequence[str] | str, rows: Sequence[Sequence[Any]]
) -> str:
    """A ``###`` heading, the physical limit and an unpadded table under it."""
    table = markdown_table(headers, rows, pad=False)
    return f"\n### {title}\n\nPhysical limit: {limit}\n\n{table}"


def section(intro: str, table: str, goals: Sequence[str], *tail: str) -> str:
    """A workload's text: what was run, its table, its goals, and any notes after."""
    return "\n".join([intro, "", table, "", "Goals:", *goals, *tail])


# --- the machine ------------------------------------------------------------------------


def load() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages."""
    return os.getloadavg()


def fmt_load(loads: Sequence[float], sep: str = " ") -> str:
    return sep.join(f"{x:.2f}" for x in loads)


def busy_warning(*loads: Sequence[float]) -> str | None:
    """A warning when any of these load averages (1 minute) says the machine was busy."""
    worst = max((x[0] for x in loads), default=0.0)
    if worst <= BUSY_SHARE * CORES:
        return None
    return (
        f"WARNING: the machine was busy (1-minute load average {worst:.2f} on {CORES} "
        "usable cores): times are inflated, only the ratios of this run mean anything"
    )


def compile_fenfa() -> str:
    """Byte-compile fenfa's sources, as ``pip install`` of a wheel does.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` (this sandbox sets
    it) never writes ``.pyc`` files, so every fresh interpreter would compile
    fenfa's sources again while the standard library's come precompiled: a
    start-up cost no installed user pays. Returns a line for the report.
    """
    import compileall

    import fenfa

    package = Path(fenfa.__file__).parent
    compileall.compile_dir(str(package), quiet=1)
    return f"fenfa's sources byte-compiled first ({package}), as a wheel install does"


def machine_line(*details: str, prefix: str = "- ") -> str:
    """``- N usable cores, Python X.Y.Z, <details>``: the line at the top of a report."""
    return f"{prefix}{CORES} usable cores, Python {platform.python_version()}" + "".join(
        f", {d}" for d in details
    )


def load_line(before: Sequence[float], after: Sequence[float], tail: str = "") -> str:
    """``- load average before X, after Y``, and a warning line when the machine was busy."""
    text = f"- load average before {before[0]:.2f}, after {after[0]:.2f}{tail}"
    warning = busy_warning(before, after)
    return text if warning is None else f"{text}\n- {warning}"


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a report records of the machine: cores, Python, platform, fenfa, the load."""
    import fenfa

    return {
        "usable_cores": CORES,
        "os_cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "fenfa": fenfa.__version__,
        **extra,
        "loadavg_at_start": fmt_load(load()),
    }


def whoami(_: Any) -> tuple[int, str]:
    """The parent pid and ``__main__`` name of the worker that runs it."""
    return os.getppid(), sys.modules["__main__"].__name__


def fenfa_start_method(**options: Any) -> str:
    """The start method of fenfa's process workers, inferred from one of them.

    A worker whose parent is not this process is a child of the fork server; a forked
    one still has this script as ``__main__``, a spawned one imported it as
    ``__mp_main__``.
    """
    import fenfa

    ppid, main_name = fenfa.map(whoami, [0], backend="process", **options)[0]
    if ppid != os.getpid():
        return "forkserver"
    return "fork" if main_name == "__main__" else "spawn"


def git_commit() -> str:
    """The checkout's commit, short, or ``?`` outside one."""
    args = ["git", "rev-parse", "--short", "HEAD"]
    try:
        out = subprocess.run(
            args, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return out.stdout.strip()


# --- command lines and reports ----------------------------------------------------------


def command(script: str | None = None) -> str:
    """The command line that ran this benchmark, as a reader would type it again.

    With ``script``, ``python SCRIPT ARGS...``; without, the interpreter's name and
    ``sys.argv`` as given.
    """
    if script is not None:
        return shlex.join(["python", script, *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def parser(
    doc: str | None, quick: str, reps: int | None = None, tasks: int | None = None
) -> argparse.ArgumentParser:
    """The command line the small benchmarks share: the docstring's first line as the
    description, ``--quick`` (``quick``: what it runs), ``--reps N`` and ``--tasks N``
    with their defaults when given."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    p.add_argument("--quick", action="store_true", help=quick)
    if reps is not None:
        p.add_argument("--reps", type=int, default=reps)
    if tasks is not None:
        p.add_argument("--tasks", type=int, default=tasks)
    return p


def workload_parser(
    doc: str | None, workloads: Sequence[str], *, quick: str, scale: str
) -> argparse.ArgumentParser:
    """The command line of a benchmark of named workloads: ``--quick``, ``--scale K``,
    ``--only NAME`` (repeatable), ``--out FILE.json``; check ``--scale`` with
    ``check_scale`` once parsed."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--scale", type=int, default=1, help=scale)
    p.add_argument(
        "--only", action="append", choices=workloads, help="run only this workload (repeatable)"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    return p


def check_scale(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.scale < 1:
        p.error("--scale must be >= 1")
    return args


def write_json(path: Path | str, payload: Any) -> None:
    """The raw results, for a later look; what JSON cannot hold is written as ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def run_workloads(
    title: str,
    script: str,
    workloads: Mapping[str, Callable[[], dict[str, Any]]],
    args: argparse.Namespace,
    *,
    machine: dict[str, Any],
    machine_text: str,
    settings: Any,
) -> dict[str, Any]:
    """Run the workloads ``args.only`` names (all, by default), one after the other, each
    printed as it ends; with ``args.out``, the whole report is written there as JSON.

    Each workload returns a dict with its ``text`` (printed) and its raw results; it
    gets its wall time, the load average before and after it, and a command that runs
    it alone (``args.quick`` and ``args.scale`` carried over).
    """
    quick, scale, out = args.quick, args.scale, args.out
    cmd = command(script)
    smoke = " (--quick: a smoke run, not for RESULTS.md)" if quick else ""
    print(f"# {title}{smoke}\n")
    print(f"Command: `{cmd}`\n\n{machine_text}\n", flush=True)
    if warning := busy_warning(load()):
        print(f"{warning}\n", flush=True)
    report: dict[str, Any] = {
        "command": cmd,
        "machine": machine,
        "settings": settings.__dict__,
        "workloads": {},
    }
    for name in args.only or workloads:
        run = workloads[name]
        alone = [
            "python",
            script,
            "--only",
            name,
            *(["--quick"] if quick else []),
            *(["--scale", str(scale)] if scale != 1 else []),
        ]
        start = time.perf_counter()
        before = load()
        result = run()
        after = load()
        result["wall_s"] = time.perf_counter() - start
        result["loadavg_before"], result["loadavg_after"] = fmt_load(before), fmt_load(after)
        report["workloads"][name] = result
        print(f"## {name}\n\nCommand: `{cmd}` (this workload alone: `{shlex.join(alone)}`)\n")
        print(result["text"])
        print(
            f"\n({name}: {result['wall_s']:.0f} s; load average before "
            f"{result['loadavg_before']}, after {result['loadavg_after']})\n",
            flush=True,
        )
        if warning := busy_warning(before, after):
            print(f"{warning}\n", flush=True)
    if out:
        write_json(out, report)
        print(f"JSON written to {out}")
    return report
