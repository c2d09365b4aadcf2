"""A CPU pipeline: numbers factorized on processes, described on threads, then looked into.

The guide's rule: pure-Python computing only runs in parallel on processes
(the GIL lets one thread compute at a time). When its processes did not
run in parallel on Windows it could only guess why ("猜测是win下难以启动process",
"my guess: processes are hard to start on Windows").

Here stage 1 factorizes numbers by trial division on a process pool, stage
2 formats each result on a thread pool, and the caller keeps score. The
process pool is made with `insights=True`: afterwards
`pool.insights.summary()` says how many tasks each worker ran, how busy it
was and which tasks were slowest, and `pool.insights.to_html(path)` draws
the timeline (one row per worker) in a self-contained HTML file.

Run: python examples/cpu_pipeline.py [--start 1000000000000] [--count 200] [--html FILE]
"""

from __future__ import annotations

import argparse
import time

import fenfa


def factorize(n: int) -> tuple[int, list[int]]:
    """Stage 1 (computes, pure Python): the prime factors of n, by trial division."""
    factors, rest, d = [], n, 2
    while d * d <= rest:
        while rest % d == 0:
            factors.append(d)
            rest //= d
        d += 1 if d == 2 else 2
    if rest > 1:
        factors.append(rest)
    return n, factors


def describe(item: tuple[int, list[int]]) -> tuple[int, list[int], str]:
    """Stage 2 (light): a readable line, e.g. '360 = 2^3 * 3^2 * 5'."""
    n, factors = item
    powers = [
        f"{p}^{factors.count(p)}" if factors.count(p) > 1 else f"{p}" for p in sorted(set(factors))
    ]
    return n, factors, f"{n} = {' * '.join(powers)}" + ("  (prime)" if factors == [n] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=10**12)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None, help="process workers (all CPUs)")
    parser.add_argument("--html", metavar="FILE", help="write the timeline to FILE")
    parser.add_argument("--show", type=int, default=5, help="lines to print")
    args = parser.parse_args()

    began = time.perf_counter()
    primes: list[int] = []
    most: tuple[int, str] = (0, "")  # the most prime factors, and its line
    with (
        fenfa.Pool("process", args.workers, insights=True) as crunch,
        fenfa.Pool("thread", 2) as report,
    ):
        # A range, not a generator: its known length lets fenfa shrink the last
        # batches so both workers finish together.
        factored = crunch.imap(factorize, range(args.start, args.start + args.count))
        for i, (n, factors, line) in enumerate(report.imap(describe, factored)):
            if i < args.show:
                print(line)
            if factors == [n]:
                primes.append(n)
            if len(factors) > most[0]:
                most = (len(factors), line)
    seconds = time.perf_counter() - began

    print(f"... {args.count} numbers from {args.start} in {seconds:.2f} s")
    print(f"{len(primes)} primes, the first {primes[:3]}")
    print(f"most prime factors ({most[0]}): {most[1]}")
    print(f"\nhow the {crunch.workers} process workers shared the work (pool.insights.summary()):")
    print(crunch.insights.summary(slowest=3))
    if args.html:
        print(f"\ntimeline written to {crunch.insights.to_html(args.html, title='factorize')}")


if __name__ == "__main__":
    main()
