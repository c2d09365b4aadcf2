"""``journal=`` (fenfa.journaled): a map that resumes after a crash, a Ctrl-C or a kill -9."""

from __future__ import annotations

import collections
import functools
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fenfa
from fenfa.journaled import JournalError
from helpers import endless, script, script_output, wait_for

BACKENDS = ["serial", "thread", "process"]


def logged(directory: str, x: int) -> int:
    """Triple ``x``, noting the execution in a file per process (appends are whole lines)."""
    with open(os.path.join(directory, f"ran-{os.getpid()}"), "a") as log:
        log.write(f"{x}\n")
    return 3 * x


def fails_while(flag: str, x: int) -> int:
    """Fails for multiples of 5 while the file ``flag`` exists."""
    if x % 5 == 0 and os.path.exists(flag):
        raise ValueError(f"no {x}")
    return x + 1


def executions(directory: Path) -> collections.Counter[int]:
    ran: collections.Counter[int] = collections.Counter()
    for log in directory.glob("ran-*"):
        ran.update(int(line) for line in log.read_text().splitlines())
    return ran


def journal_size(path: Path) -> int:
    """Grows as records are written (the header and one tiny record: ~150 bytes)."""
    return path.stat().st_size if path.exists() else 0


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


def clear(directory: Path) -> None:
    for log in directory.glob("ran-*"):
        log.unlink()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rerun_returns_everything_and_runs_only_what_is_missing(
    backend: str, tmp_path: Path, logs: Path
) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(logged, str(logs))
    stream = fenfa.imap(fn, range(200), journal=journal, backend=backend, workers=2, chunksize=4)
    got = list(itertools.islice(stream, 50))
    stream.close()  # as a consumer that stops (or a Ctrl-C) leaves it
    assert got == [3 * x for x in range(50)]
    assert fenfa.map(fn, range(200), journal=journal, backend=backend, workers=2) == [
        3 * x for x in range(200)
    ]
    ran = executions(logs)
    assert set(ran) == set(range(200))
    assert all(ran[x] == 1 for x in range(50))  # handed out, so in the journal
    # Run again: what the closed call still ran, unseen (at most its window).
    assert max(ran.values()) <= 2
    assert sum(ran.values()) - 200 <= 2 * 4 * 4
    clear(logs)  # (the second call ran behind the first's leftovers: none is left)
    assert fenfa.map(fn, range(200), journal=journal, backend=backend) == [
        3 * x for x in range(200)
    ]
    assert not executions(logs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_imap_unordered_gives_the_multiset_and_pool_methods_take_journal(
    backend: str, tmp_path: Path, logs: Path
) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(logged, str(logs))
    with fenfa.Pool(backend, workers=2) as pool:
        assert pool.map(fn, range(0, 40, 2), journal=journal) == [3 * x for x in range(0, 40, 2)]
        clear(logs)
        got = list(pool.imap_unordered(fn, range(40), journal=journal))
        assert sorted(got) == [3 * x for x in range(40)]
        assert sorted(executions(logs)) == list(range(1, 40, 2))
        clear(logs)
        assert list(pool.imap(fn, range(40), journal=journal)) == [3 * x for x in range(40)]
        assert not executions(logs)


def test_duplicated_inputs_are_counted(tmp_path: Path, logs: Path) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(logged, str(logs))
    assert fenfa.map(fn, [1, 1, 2], journal=journal, backend="thread") == [3, 3, 6]
    clear(logs)
    assert fenfa.map(fn, [2, 1, 1, 1, 2], journal=journal, backend="thread") == [6, 3, 3, 3, 6]
    assert executions(logs) == {1: 1, 2: 1}


def test_starmap_and_several_iterables_share_keys(tmp_path: Path) -> None:
    journal = tmp_path / "run.fenfa"
    assert fenfa.starmap(pow, [(2, 3), (3, 2)], journal=journal, backend="serial") == [8, 9]
    with fenfa.Pool("thread") as pool:
        assert pool.map(pow, [2, 3, 4], [3, 2, 1], journal=journal) == [8, 9, 4]
        assert pool.starmap(pow, [[4, 1]], journal=journal) == [4]


def test_a_torn_last_record_is_ignored_and_truncated(tmp_path: Path, logs: Path) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(logged, str(logs))
    assert fenfa.map(fn, range(10), journal=journal, backend="serial", chunksize=1)
    whole = journal.stat().st_size
    with journal.open("r+b") as file:
        file.truncate(whole - 3)  # the last record, torn by a kill in its write
    clear(logs)
    assert fenfa.map(fn, range(10), journal=journal, backend="serial") == [3 * x for x in range(10)]
    assert executions(logs) == {9: 1}
    whole = journal.stat().st_size  # (task 9 now in a record of the resumed run's kind)
    with journal.open("ab") as file:
        file.write(b"FJ\x02\x00garbage")  # a damaged tail (a machine crash's leftovers)
    clear(logs)
    assert fenfa.map(fn, range(10), journal=journal, backend="serial") == [3 * x for x in range(10)]
    assert not executions(logs)
    assert journal.stat().st_size == whole  # the garbage went; the file is whole again


def test_another_functions_journal_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "run.fenfa"
    fenfa.map(abs, [-1, 2], journal=journal, backend="serial")
    before = journal.read_bytes()
    with pytest.raises(JournalError, match=r"builtins\.abs.*builtins\.len") as caught:
        fenfa.map(len, ["ab"], journal=journal, backend="serial")
    assert isinstance(caught.value, fenfa.FenfaError)
    assert isinstance(caught.value, ValueError)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(JournalError, match="not a fenfa journal"):
        fenfa.map(abs, [1], journal=other, backend="serial")
    assert other.read_text() == "my notes\n"
    assert journal.read_bytes() == before


def test_a_journal_in_use_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "run.fenfa"
    first = fenfa.imap(abs, range(5), journal=journal, backend="thread")
    with pytest.raises(JournalError, match="in use"):
        fenfa.map(abs, range(5), journal=journal, backend="thread")
    assert list(first) == list(range(5))
    assert fenfa.map(abs, range(5), journal=journal, backend="thread") == list(range(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_failures_are_recorded_and_rerun_only_when_asked(backend: str, tmp_path: Path) -> None:
    journal, flag = tmp_path / "run.fenfa", tmp_path / "flag"
    flag.touch()
    fn = functools.partial(fails_while, str(flag))
    first = fenfa.map(fn, range(12), journal=journal, backend=backend, on_error="return")
    assert [type(r) for r in first[::5]] == [ValueError] * 3
    assert "fenfa: task 5 failed; input: 5" in first[5].__notes__
    flag.unlink()  # they would succeed now, but they are done: the recorded failure comes back
    second = fenfa.map(fn, range(12), journal=journal, backend=backend, on_error="return")
    assert [str(r) for r in second[::5]] == ["no 0", "no 5", "no 10"]
    assert any("read from journal" in note for note in second[10].__notes__)
    with pytest.raises(ValueError, match="no 0"):
        fenfa.map(fn, range(12), journal=journal, backend=backend)
    assert fenfa.map(fn, range(12), journal=journal, backend=backend, on_error="skip") == [
        x + 1 for x in range(12) if x % 5
    ]
    retried = fenfa.map(fn, range(12), journal=journal, backend=backend, journal_retry_failed=True)
    assert retried == [x + 1 for x in range(12)]
    assert fenfa.map(fn, range(12), journal=journal, backend=backend) == retried


def test_raise_records_what_finished_and_not_the_failure(tmp_path: Path) -> None:
    journal, flag = tmp_path / "run.fenfa", tmp_path / "flag"
    flag.touch()
    fn = functools.partial(fails_while, str(flag))
    with pytest.raises(ValueError, match="no 5") as caught:
        fenfa.map(fn, range(1, 12), journal=journal, backend="serial")
    assert "fenfa: task 4 failed; input: 5" in caught.value.__notes__
    flag.unlink()
    assert fenfa.map(fn, range(1, 12), journal=journal, backend="serial") == list(range(2, 13))


def returns_or_raises(directory: str, x: int) -> object:
    """Returns an exception for 1 (a value like any other), raises for 2."""
    logged(directory, x)
    if x == 1:
        return KeyError("returned, not raised")
    if x == 2:
        raise KeyError("raised")
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_journal_tells_a_returned_exception_from_a_failure(
    backend: str, tmp_path: Path, logs: Path
) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(returns_or_raises, str(logs))
    first = fenfa.map(fn, range(4), journal=journal, backend=backend, on_error="return")
    assert [type(r) for r in first] == [int, KeyError, KeyError, int]
    assert not getattr(first[1], "__notes__", None)  # a value: no failure note
    assert "fenfa: task 2 failed; input: 2" in first[2].__notes__
    clear(logs)
    again = fenfa.map(fn, range(4), journal=journal, backend=backend, on_error="skip")
    assert [str(r) if isinstance(r, KeyError) else r for r in again] == [
        0,
        "'returned, not raised'",
        3,
    ]
    assert not executions(logs)  # the failure was recorded too (on_error="return")


def test_a_fresh_journals_inputs_are_keyed_as_a_resumed_run_keys_them(
    tmp_path: Path, logs: Path
) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(noted, str(logs))
    inputs = ["a", (1, 2), {"k": [1.5, None]}, 10**30, b"\x00", -0.0, "a"]
    assert fenfa.map(fn, inputs, journal=journal, backend="thread") == inputs
    assert len(list(logs.glob("ran-*"))) == 1
    clear(logs)
    assert fenfa.map(fn, inputs, journal=journal, backend="process") == inputs
    assert not list(logs.glob("ran-*"))  # every one found by its key: none ran again
    pairs = tmp_path / "pairs.fenfa"
    assert fenfa.starmap(pow, [[2, 3], [3, 2]], journal=pairs, backend="serial") == [8, 9]
    assert os.path.getsize(pairs) > 0
    assert fenfa.starmap(pow, [(3, 2), (2, 3), (2, 2)], journal=pairs) == [9, 8, 4]
    assert fenfa.starmap(pow, [], journal=tmp_path / "empty.fenfa") == []
    assert fenfa.map(pow, [], [], journal=tmp_path / "empty.fenfa") == []


def noted(directory: str, x: object) -> object:
    with open(os.path.join(directory, f"ran-{os.getpid()}"), "a") as log:
        log.write(f"{x!r}\n")
    return x


def unpicklable_result(x: int) -> object:
    return threading.Lock() if x == 3 else x


def test_a_fresh_journal_fails_only_what_it_cannot_record(tmp_path: Path) -> None:
    journal = tmp_path / "run.fenfa"
    got = fenfa.map(
        unpicklable_result, range(6), journal=journal, backend="thread", on_error="return"
    )
    assert [r for i, r in enumerate(got) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(got[3], fenfa.SerializationError)
    assert "the result of task 3 could not be pickled to be recorded" in str(got[3])
    locks = [1, threading.Lock(), 2]
    got = fenfa.map(
        identity, locks, journal=tmp_path / "locks.fenfa", backend="thread", on_error="return"
    )
    assert got[0] == 1
    assert got[2] == 2
    assert "the input of task 1 could not be pickled for its key" in str(got[1])


def identity(x: object) -> object:
    return x


def test_imap_is_lazy_and_ordered_on_an_endless_input(tmp_path: Path, logs: Path) -> None:
    journal = tmp_path / "run.fenfa"
    fn = functools.partial(logged, str(logs))
    pulled = itertools.count()

    def counted(items: Iterator[int]) -> Iterator[int]:
        for item in items:
            next(pulled)
            yield item

    for run, take in ((1, 30), (2, 60)):
        stream = fenfa.imap(fn, counted(endless()), journal=journal, backend="thread", window=8)
        assert list(itertools.islice(stream, take)) == [3 * x for x in range(take)], run
        stream.close()
    # Run 2 read 30 from the journal and ran the rest: each run pulled at most
    # what it handed out plus a window (and the results waiting in order).
    assert next(pulled) <= 30 + 60 + 2 * (8 + 8)
    assert min(executions(logs)[x] for x in range(60)) == 1


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_results_are_written_before_they_are_handed_out(backend: str, tmp_path: Path) -> None:
    # A report's frames are written together once it is absorbed: never held
    # back past the moment its results reach the caller.
    empty = tmp_path / "empty.fenfa"
    assert fenfa.map(abs, [], journal=empty) == []
    header = journal_size(empty)  # a journal with no result in it
    journal = tmp_path / "run.fenfa"
    with fenfa.Pool(backend, 2) as pool:
        stream = pool.imap(abs, endless(), journal=journal, window=64)
        sizes = []
        for _ in range(200):
            next(stream)
            sizes.append(journal_size(journal))
        stream.close()
    assert sizes[0] > header, "the first result was handed out before it was written"
    assert sizes == sorted(sizes)
    assert len(set(sizes)) > 1  # written as the call went, not all at once


def test_option_mistakes_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="journal_fsync"):
        fenfa.map(abs, [1], journal=tmp_path / "j", journal_fsync="never", backend="serial")
    with pytest.raises(ValueError, match="go with journal"):
        fenfa.map(abs, [1], journal_retry_failed=True, backend="serial")
    assert fenfa.map(abs, [-1], journal=None, backend="serial") == [1]
    with pytest.raises(ValueError, match="chunksize"):
        fenfa.imap(abs, [1], journal=tmp_path / "j", chunksize=0, backend="serial")
    assert fenfa.map(abs, [-2], journal=tmp_path / "j", journal_fsync="every") == [2]


# -- a real crash: a script killed by SIGKILL, or stopped by Ctrl-C --------

N = 300
WORKERS, CHUNK = 2, 1
SCRIPT = f"""
import json, os, sys, time
import fenfa

def work(x):
    with open(os.path.join(sys.argv[2], f"ran-{{os.getpid()}}"), "a") as log:
        log.write(f"{{x}}\\n")
    time.sleep(0.005)  # (the work)
    return x * 3

if __name__ == "__main__":
    out = fenfa.map(work, range({N}), journal=sys.argv[1], backend="process",
                    workers={WORKERS}, chunksize={CHUNK})
    with open(sys.argv[3], "w") as f:
        json.dump(out, f)
"""


def crash_then_rerun(tmp_path: Path, logs: Path, stop: Callable[[int], None]) -> None:
    journal, out = tmp_path / "run.fenfa", tmp_path / "out.json"
    args = (str(journal), str(logs), str(out))
    with script(tmp_path, SCRIPT, *args) as proc:
        wait_for(lambda: journal_size(journal) > 2_000, "records in the journal", 60)
        stop(proc.pid)
        proc.wait(timeout=30)
    assert proc.returncode != 0, script_output(tmp_path)
    assert not out.exists()
    with script(tmp_path, SCRIPT, *args) as proc:
        assert proc.wait(timeout=60) == 0, script_output(tmp_path)
    import json

    assert json.loads(out.read_text()) == [3 * x for x in range(N)]
    ran = executions(logs)
    assert set(ran) == set(range(N))
    twice = [x for x, times in ran.items() if times > 1]
    # Run twice: what was running at the stop, and results on their way
    # back to the caller that it had not written yet (a worker's one each).
    assert len(twice) <= 2 * WORKERS * CHUNK, twice
    assert max(ran.values()) <= 2


@pytest.mark.timeout(180)
def test_a_kill_9_mid_run_then_a_rerun(tmp_path: Path, logs: Path) -> None:
    crash_then_rerun(tmp_path, logs, lambda pid: os.killpg(pid, signal.SIGKILL))


@pytest.mark.timeout(180)
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_mid_run_then_a_rerun(tmp_path: Path, logs: Path) -> None:
    crash_then_rerun(tmp_path, logs, lambda pid: os.kill(pid, signal.SIGINT))
