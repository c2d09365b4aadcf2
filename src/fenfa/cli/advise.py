"""``fenfa advise MODULE:FUNC [ARG ...]``: which backend suits a function, and why.

It imports the function and runs it on the sample inputs through
``fenfa.Pool("auto")``, so the evidence is exactly what ``backend="auto"``
measures (see :mod:`fenfa.auto`), then explains the choice in the user's
terms and prints the call to write. The function really runs: measuring
needs ~20 ms of work, so the samples are repeated, cyclically, for as long
as ``auto`` is still measuring, and the output says how many runs there were.

Exit status: 0; 1 when a task raised (the advice is still printed if a
decision was made); 2 for bad usage, a bad target or bad inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..auto import MAX_PROBE_TASKS, PAIR_WAITING_BELOW, Decision
from ..pool import Pool
from ..tasks import is_coroutine_function
from .target import BadTarget, add_target, load_target, one_line, output_to_stderr

PROG = "fenfa advise"
ADVISE_EPILOG = """\
examples:
  fenfa advise work:fetch https://example.com/a https://example.com/b
      one sample each (a JSON value if it parses, else a string)
  fenfa advise work.py:resize --input samples.jsonl
      samples from a file, one JSON value per line
  fenfa advise --json work:add '[1, 2]' '[3, 4]'
      a JSON array is a call's arguments (add(1, 2)); the report as one JSON object

exit status:
  0    the advice is printed
  1    the function raised (the advice is still printed if a decision was made)
  2    bad usage, a target that cannot be imported, or unreadable samples
  130  interrupted (Ctrl-C)
"""
WIDTH = 88  # the explanation's lines
# Above this share of the measuring time spent queued for a core held by
# other programs, the GIL test cannot tell threads from processes (auto.py).
BUSY_MACHINE_ABOVE = 0.25


# -- the inputs ---------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line ARG: JSON if it parses as JSON, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_inputs(path: str) -> list[Any]:
    """One JSON value per non-blank line of a file."""
    try:
        with open(path, encoding="utf-8") as lines:
            text = lines.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise BadTarget(f"cannot read {path!r}: {reason}") from exc
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except ValueError as exc:
            raise BadTarget(f"{path!r} line {number} is not JSON: {exc}") from exc
    return values


def _while_measuring(samples: list[Any], pool: Pool, pulled: list[int]) -> Iterator[Any]:
    """Every sample once, then the samples again, cyclically, while ``auto`` still measures.

    auto decides after ~10-20 ms of work; with fewer tasks its probe runs out
    of input and it can only say "run it serially". The probe pulls the input
    lazily and the pool records its decision before the rest is pulled, so
    this stops repeating as soon as the measurement is over. The cap is the
    most tasks the probe ever runs.
    """
    while True:
        for item in samples:
            done = pulled[0] >= len(samples)
            if done and (pool.insights.decision is not None or pulled[0] >= MAX_PROBE_TASKS):
                return
            pulled[0] += 1
            yield item


# -- the advice ---------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def evidence_lines(decision: Decision) -> list[str]:
    slowdown = decision.parallel_slowdown
    cores = decision.cores_used
    rows = [
        ("wall time per call", _duration(decision.task_seconds)),
        ("CPU time per call", _duration(decision.cpu_seconds)),
        ("CPU / wall time", _percent(decision.cpu_ratio)),
        (
            "two at once on threads",
            "n/a"
            if slowdown is None
            else f"{slowdown:.2f}x slower each (1.00: in parallel, 2.00: taking turns)",
        ),
        ("cores one call keeps busy", "n/a" if cores is None else f"{cores:.1f}"),
        ("waiting for a busy CPU", _percent(decision.contention)),
        ("calls measured", str(decision.tasks_measured)),
    ]
    return [f"  {name:<27}{value}" for name, value in rows]


def explain(decision: Decision, name: str) -> str:
    """Why this backend, in one paragraph of the user's terms."""
    ratio = decision.cpu_ratio or 0.0
    per_call = _duration(decision.task_seconds)
    slowdown = decision.parallel_slowdown
    cores_together = 2 / slowdown if slowdown else None
    together = f"{cores_together:.1f}" if cores_together is not None else "n/a"
    backend = decision.backend
    if backend == "async":
        return (
            f"{name} is a coroutine function (async def): it runs on an event loop, where "
            "one thread interleaves many calls, switching at every await while each waits. "
            "Threads or processes would only get coroutine objects that nobody awaits. "
            "fenfa runs at most `workers` calls at once (100 by default)."
        )
    if backend == "thread" and slowdown is None:
        return (
            f"{name} mostly waits: its CPU was busy only {ratio:.0%} of its wall time (for the "
            "network, a disk, a subprocess or a sleep). A waiting thread does not hold "
            "Python's GIL, so many threads wait side by side at almost no cost; processes "
            "would wait just as well but cost more to start and to ship data to."
        )
    if backend == "thread" and (cores_together or 0.0) < PAIR_WAITING_BELOW:
        return (
            f"{name} looked busy alone (CPU {ratio:.0%} of its wall time, as first calls "
            f"that import and warm up often are), but two copies on threads kept only "
            f"{together} cores busy together, less than the 1.0 of copies taking turns on "
            "Python's GIL: it mostly waits, and waiting threads run side by side at almost "
            "no cost."
        )
    if backend == "thread":
        return (
            f"{name} computes, but in C code that releases Python's GIL (as hashlib, zlib and "
            f"NumPy do): two copies on threads kept {together} cores busy together. Threads "
            "therefore use every core, without copying inputs and results to other processes."
        )
    if backend == "process" and slowdown is not None:
        text = (
            f"{name} computes in pure Python: its CPU was busy {ratio:.0%} of the time, and "
            f"two copies on threads kept only {together} cores busy together, because threads "
            "take turns holding Python's GIL. Only separate processes, each with its own "
            f"interpreter, run it on several cores at once, and at {per_call} a call the "
            "cost of shipping inputs and results to them is small next to the work."
        )
        if (decision.contention or 0.0) > BUSY_MACHINE_ABOVE:
            text += (
                " (This machine was busy, which blurs the GIL test; fenfa then errs towards "
                "processes, which run both pure Python and GIL-releasing code in parallel.)"
            )
        return text
    if backend == "serial" and (decision.cores_used or 0.0) > 1.5 and ratio >= 0.5:
        return (
            f"One call of {name} already kept {decision.cores_used:.1f} cores busy by itself: "
            "it uses a library that runs on several threads (such as BLAS under NumPy). "
            "Copies side by side would only compete for the same cores, so a plain loop in "
            "the caller is fastest."
        )
    if backend == "serial" and slowdown is None and decision.task_seconds is not None:
        return (
            f"One call of {name} takes only {per_call}, less than handing it to another "
            "process and taking its result back costs. Workers would spend more time "
            "shipping work than doing it, so a plain loop in the caller is fastest; to run "
            "such work in parallel, make each task bigger (a batch of inputs per call)."
        )
    return f"fenfa auto chose {backend!r}: {decision.reason}."


# -- the command --------------------------------------------------------


@dataclass
class Outcome:
    """What one ``fenfa advise`` run did and found."""

    target: str
    module_name: str
    code_name: str
    coroutine: bool
    star: bool
    samples: int
    runs: int = 0
    seconds: float = 0.0
    decision: Decision | None = None
    failure: BaseException | None = None

    @property
    def call(self) -> str | None:
        if self.decision is None:
            return None
        verb = "starmap" if self.star else "map"
        return f'fenfa.{verb}({self.code_name}, inputs, backend="{self.decision.backend}")'

    def as_json(self) -> str:
        report: dict[str, Any] = {"backend": None}
        if self.decision is not None:
            report = asdict(self.decision)
        failure = self.failure
        report.update(
            target=self.target,
            call=self.call,
            runs=self.runs,
            samples=self.samples,
            seconds=self.seconds,
            error=None
            if failure is None
            else {"type": type(failure).__name__, "message": str(failure)},
        )
        return json.dumps(report, indent=2)

    def as_text(self) -> str:
        count = f"{self.samples} sample input{'s' * (self.samples != 1)}"
        how = f"your {count}, each once"
        if self.runs > self.samples:
            how = (
                f"your {count}, repeated cyclically while fenfa measured (it needs ~20 ms of work)"
            )
        times = f"{'at most ' * (self.failure is not None)}{self.runs} time{'s' * (self.runs != 1)}"
        ran = f"ran {self.code_name} {times} ({_duration(self.seconds)} in all): {how}"
        lines = [f"{PROG} {self.target}", textwrap.fill(ran, WIDTH)]
        decision = self.decision
        if decision is None:
            lines.append("no decision was made: the call failed before anything was measured")
            return "\n".join(lines)
        measured = decision.tasks_measured > 0 or decision.cpu_ratio is not None
        lines += ["", "evidence:" if measured else "evidence: not measured"]
        lines += evidence_lines(decision) if measured else []
        lines += [
            "",
            f"recommended backend: {decision.backend}",
            "",
            textwrap.fill(explain(decision, self.code_name), WIDTH),
            "",
            "the call to write:",
            f"  import {self.module_name}",
            f"  results = {self.call}",
        ]
        if self.coroutine:
            lines.append(
                f"  # or, in a coroutine: results = await fenfa.amap({self.code_name}, inputs)"
            )
        elif measured:
            lines.append('  # backend="auto" measures each call and would choose the same way')
        return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        if args.args and args.input is not None:
            raise BadTarget("give sample inputs as ARGs or with --input, not both")
        samples = [parse_value(a) for a in args.args]
        if args.input is not None:
            samples = read_inputs(args.input)
        fn, module_name, code_name = load_target(args.target)
        if not samples:
            raise BadTarget(
                "sample inputs are needed to measure the function: give ARGs or --input FILE"
            )
    except BadTarget as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    # An array is a call's positional arguments; any other value is its one argument.
    star = any(isinstance(s, list) for s in samples)
    if star:
        samples = [tuple(s) if isinstance(s, list) else (s,) for s in samples]
    outcome = Outcome(
        args.target, module_name, code_name, is_coroutine_function(fn), star, len(samples)
    )
    pulled = [0]
    begin = time.perf_counter()
    with Pool("auto") as pool, output_to_stderr():
        inputs = _while_measuring(samples, pool, pulled)
        try:
            results = pool.starmap(fn, inputs) if star else pool.map(fn, inputs)
            pulled[0] = len(results)
        except Exception as exc:  # the user's function raised: report it, advise anyway
            outcome.failure = exc
        outcome.decision = pool.insights.decision
    outcome.seconds = time.perf_counter() - begin
    outcome.runs = pulled[0]
    print(outcome.as_json() if args.json else outcome.as_text())
    if outcome.failure is not None:
        notes = " ".join(getattr(outcome.failure, "__notes__", []))
        where = f" ({notes})" if notes else ""
        print(f"{PROG}: {code_name} raised {one_line(outcome.failure)}{where}", file=sys.stderr)
        return 1
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "advise",
        help="measure a function on sample inputs and say which backend suits it",
        description=(
            "Run MODULE:FUNC on sample inputs the way backend='auto' does, show what was\n"
            "measured, and say which backend to use and why. The function really runs,\n"
            "several times: the samples are repeated while measuring (about 20 ms of work).\n"
            "What the function prints goes to stderr; stdout holds the advice."
        ),
        epilog=ADVISE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target(parser, "it is called with each sample")
    parser.add_argument(
        "args",
        metavar="ARG",
        nargs="*",
        default=[],
        help="one sample input each, as JSON if it parses (else a string); "
        "a JSON array is a call's positional arguments",
    )
    parser.add_argument(
        "--input",
        metavar="FILE.jsonl",
        help="sample inputs, one JSON value per line (an array: positional arguments)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=main)
