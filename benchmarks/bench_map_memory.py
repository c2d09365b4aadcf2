"""``fenfa map`` keeps memory flat whatever the size of its input (issue 9, section 4).

Run from the repository root::

    python benchmarks/bench_map_memory.py [--quick] [--sizes-mb 100,1024] [--backend thread]

(``--quick``: 10 and 50 MB, a smoke run.)

For each size, writes a JSONL file of ~1 KB records to a temporary directory,
runs ``fenfa map`` on it as a subprocess (``benchmarks/_map_task.py:measure``,
which returns the record's length and a checksum), and reports the command's
peak RSS (``wait4``'s ``ru_maxrss``), its wall time, and that the output has
exactly one complete line per record. Flat memory means the peak RSS does not
grow with the input: the 1 GB run peaks where the 100 MB run does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

RECORD_PAYLOAD = 1000  # characters of text per record: ~1 KB lines
ROOT = Path(__file__).resolve().parent.parent


def write_input(path: Path, megabytes: int) -> int:
    """A JSONL file of about ``megabytes`` MB; returns its number of records."""
    filler = "x" * RECORD_PAYLOAD
    target = megabytes * 1_000_000
    count = written = 0
    with path.open("w") as out:
        while written < target:
            line = json.dumps({"id": count, "text": filler}) + "\n"
            out.write(line)
            written += len(line)
            count += 1
    return count


def run(input_path: Path, output: Path, backend: str) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in KiB, exit status) of one ``fenfa map`` run."""
    argv = [
        sys.executable, "-m", "fenfa", "map", "benchmarks/_map_task.py:measure",
        str(input_path), "-o", str(output), "--backend", backend,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss, proc.returncode


def check(output: Path, count: int) -> str:
    indexes = set()
    with output.open() as lines:
        for line in lines:
            record = json.loads(line)
            assert "output" in record, record
            indexes.add(record["index"])
    return "ok" if indexes == set(range(count)) else f"{len(indexes)} of {count} records"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="100,1024", help="input sizes in MB, comma-separated")
    parser.add_argument("--backend", default="thread")
    parser.add_argument("--quick", action="store_true", help="10 and 50 MB: a smoke run")
    args = parser.parse_args()
    sizes = [10, 50] if args.quick else [int(s) for s in args.sizes_mb.split(",")]
    load_before = harness.load()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fenfa-map-bench-") as tmp:
        for megabytes in sizes:
            input_path = Path(tmp) / f"in-{megabytes}.jsonl"
            output = Path(tmp) / f"out-{megabytes}.jsonl"
            count = write_input(input_path, megabytes)
            wall, peak_kib, code = run(input_path, output, args.backend)
            verdict = check(output, count) if code == 0 else f"exit {code}"
            rows.append((megabytes, count, input_path.stat().st_size, wall, peak_kib, verdict))
            input_path.unlink()
            output.unlink()
    print("## `fenfa map`: memory against input size\n")
    print(f"Command: `{harness.command('benchmarks/bench_map_memory.py')}`\n")
    print(
        harness.machine_line(
            f"backend {args.backend}; records of ~{RECORD_PAYLOAD} characters",
        )
    )
    print(harness.load_line(load_before, harness.load()) + "\n")
    table = [
        [
            f"{size / 1e6:,.0f} MB",
            f"{count:,}",
            f"{wall:.1f} s",
            f"{count / wall:,.0f}",
            f"{peak_kib / 1024:.0f} MiB",
            verdict,
        ]
        for _mb, count, size, wall, peak_kib, verdict in rows
    ]
    headers = ["input", "records", "wall", "records/s", "peak RSS of `fenfa map`", "output"]
    print(harness.markdown_table(headers, table, pad=False, align="rrrrrl"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
