"""The field guide's tour of the Pool methods, done the fenfa way.

The guide compares multiprocessing.Pool's ways to hand out work:

    map             turns the iterable into a list and chunks it: memory, a bit faster
    imap            one item at a time, ordered ("对于大的iterable ... 顺序也是正确的")
    imap_unordered  like imap, in the order tasks finish
    map_async       waits for every task: the whole result or none, in input order
    apply           apply_async().get(): waits for its one task ("所以很慢")
    apply_async     one task, an AsyncResult to get (blocking) now or later

and, under "potential problems", finds that imap reads a generator ahead
into memory without limit (the fix it found: a Semaphore). fenfa keeps the
names and removes the traps: `map` pulls its input lazily too, `imap` pulls
at most `window` items ahead of you (shown below on an endless generator),
the async methods return `concurrent.futures.Future`s, and a failed task
raises your exception with the worker's traceback instead of hanging.

Code written for multiprocessing.Pool needs one line changed, the import:
`from fenfa.multiprocessing import Pool` keeps the standard library's
methods, signatures and AsyncResults, without its traps (last section below).

Run: python examples/pool_tour.py [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import Future

import fenfa
from fenfa.multiprocessing import Pool  # was: from multiprocessing import Pool


def square(x: int) -> int:
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def show(method: str, result: object, what: str) -> None:
    print(f"{method:15} {result!s:32} {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=int, default=4, help="imap's read-ahead bound")
    args = parser.parse_args()

    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with fenfa.Pool("process", args.workers) as pool:
        show("map", pool.map(square, range(8)), "a list, in input order, once all are done")

        firsts: list[int] = []
        for result in pool.imap(square, endless(), window=args.window):
            firsts.append(result)
            if len(firsts) == 5:
                break
        show("imap", firsts, "lazy and ordered, for big or endless inputs:")
        print(f"{'':15} {'':32} {pulled} pulled of an endless generator (window {args.window})")

        naps = [0.4, 0.1, 0.0, 0.2]
        order = list(pool.imap_unordered(nap, naps, chunksize=1))
        show("imap_unordered", order, "as tasks finish: the slow first input comes last")

        future = pool.map_async(square, range(8))
        kind = "a concurrent.futures.Future" if isinstance(future, Future) else type(future)
        show("map_async", kind, "the whole list later; the caller goes on meanwhile")
        show("", future.result(), "(its .result())")

        show("starmap", pool.starmap(pow, [(2, 3), (3, 2), (10, 2)]), "several arguments a task")
        show("apply", pool.apply(pow, args=(2, 10)), "one call, waited for")

        one = pool.apply_async(divmod, args=(17, 5))
        show("apply_async", one.result(), "one call, a Future: wait now, later, or never")

        future = pool.submit(sorted, [3, 1, 2], reverse=True)
        show("submit", future.result(), "apply_async with keywords, as concurrent.futures")

    print("-- multiprocessing.Pool code as it was; only the import changed:")
    pulled = 0
    with Pool(processes=args.workers) as mp_pool:
        show("mp map", mp_pool.map(square, range(8), chunksize=2), "multiprocessing's signature")
        done: list[tuple[int, int]] = []
        one_result = mp_pool.apply_async(divmod, (17, 5), callback=done.append)
        show("mp apply_async", one_result.get(timeout=30), f"an AsyncResult; callback saw {done}")
        firsts = []
        for result in mp_pool.imap(square, endless()):
            firsts.append(result)
            if len(firsts) == 5:
                break
        show("mp imap", firsts, f"{pulled} pulled of an endless generator (stdlib: all)")


if __name__ == "__main__":
    main()
