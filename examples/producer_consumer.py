"""The field guide's producer-consumer example, rewritten as a fenfa pipeline.

The guide (after the multiprocessing docs) starts 4 processes that loop over
a task Queue until a 'STOP' sentinel, and a done Queue the parent drains:

    task_queue, done_queue = Queue(), Queue()
    for task in TASKS1: task_queue.put(task)
    for i in range(4): Process(target=worker, args=(task_queue, done_queue)).start()
    for i in range(len(TASKS1)): print(done_queue.get())
    ...
    for i in range(4): task_queue.put('STOP')

Everything that can go wrong there — a worker dying (the parent waits on
done_queue forever), a `join()` before the queue is drained (the guide's
deadlock), a producer faster than the consumers (the queue grows without
bound), forgetting a 'STOP' (the program never exits) — has no place to
happen below: there are no queues, sentinels or joins to get wrong. Each
stage pulls from the one before only when it has room, so the slowest stage
sets the pace and memory stays bounded; an error anywhere stops every stage
and reaches the caller with the failing task named.

Run: python examples/producer_consumer.py
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import fenfa


def mul(a: int, b: int) -> int:
    time.sleep(0.5 * random.random() / 10)  # the guide sleeps up to 0.5 s; a tenth here
    return a * b


def plus(a: int, b: int) -> int:
    time.sleep(0.5 * random.random() / 10)
    return a + b


Task = tuple[Callable[[int, int], int], tuple[int, int]]


def calculate(task: Task) -> str:
    """The guide's calculate(): run the task and say who ran it."""
    func, args = task
    result = func(*args)
    me = fenfa.current_worker()
    return f"{me.process_name} says that {func.__name__}{args} = {result}"


def produce() -> Iterator[Task]:
    """The tasks, produced lazily: nothing is queued ahead of the workers."""
    yield from ((mul, (i, 7)) for i in range(20))
    yield from ((plus, (i, 8)) for i in range(10))


def shout(line: str) -> str:
    """A second stage, on threads: it waits (here, on nothing) rather than computes."""
    return line.upper()


def main() -> None:
    print("Unordered results:")
    for line in fenfa.imap_unordered(calculate, produce(), backend="process", workers=4):
        print("\t", line)

    print("A two-stage pipeline, in order, bounded at every stage:")
    lines = fenfa.imap(calculate, produce(), backend="process", workers=4, window=8)
    for line in fenfa.imap(shout, lines, backend="thread", window=8):
        print("\t", line)


if __name__ == "__main__":
    main()
