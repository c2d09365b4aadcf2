"""``journal=`` on a fresh journal: the whole call runs, and each batch is written whole.

When the journal holds no result yet (a first run, the common case), no
input can be skipped, so nothing needs a key while the call runs: the call
is a plain run of the caller's function (no wrapper in the worker), whose
:attr:`~fenfa.window.Run.witness` hands each batch's final outcomes to
:class:`_Writer` as they arrive, in the caller's thread, before they are
handed out::

    xs ─▶ Run (on_error="return") ─▶ witness(batch, start, values) ─▶ one bulk frame:
                                      │   pickle((star, inputs, failed)) + pickle(values)
                                      ▼
                                   results, in the order the call promised, on_error applied

Two pickles a batch, at C speed, replace a key (pickle and BLAKE2b), a
record header and a pickle per task; the keys are made when the journal is
read back by a later run (:meth:`fenfa.journal_file.Journal._index_bulk`),
from the stored inputs, the same way a run over a journal with results
makes them from its own inputs. A journal that already holds results goes
through :mod:`fenfa.journaled`, which keys each input to skip those stored.

Failures: an exception raised by a task is told from an exception a task
returns by the run's witness (its ``failed`` flag), not by its type. A batch
whose inputs or results cannot be pickled even by cloudpickle is written
task by task; a task whose input cannot be pickled (no key could find it
again) or whose result cannot be recorded fails with a
:class:`~fenfa.errors.SerializationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

from .errors import SerializationError, pack_failure
from .journal_file import Journal, dumps
from .tasks import Style

if TYPE_CHECKING:
    from .tasks import Batch
    from .window import Run

__all__ = ["fresh"]


class _Writer:
    """The run's witness: one bulk frame per batch of final outcomes."""

    def __init__(self, journal: Journal, star: bool, on_error: str) -> None:
        self.journal, self.star, self.on_error = journal, star, on_error
        self.failures: set[int] = set()  # ids of the failures among the values not yet out

    def __call__(self, batch: Batch, start: int, values: list[Any], failed: bool) -> None:
        offset = start - batch.start
        items = batch.items[offset : offset + len(values)]
        if failed:
            self.failures.add(id(values[0]))
            if self.on_error == "return":  # (raise and skip record nothing: it runs again)
                self._write(items, [pack_failure(values[0])], (0,))
            return
        try:
            self._write(items, values, ())
        except Exception:
            self._one_by_one(start, items, values)

    def _write(self, items: list[Any], values: list[Any], failed: tuple[int, ...]) -> None:
        self.journal.append_bulk(dumps((self.star, items, failed)), dumps(values))

    def flush(self) -> None:
        # One write for a report's pieces (a process worker's batch comes back
        # in several): each write lets go of the GIL, and getting it back from
        # the backend's threads cost ~80 us, 37 ms of a 90 ms call.
        self.journal.flush()

    def _one_by_one(self, start: int, items: list[Any], values: list[Any]) -> None:
        """A batch that cannot be pickled whole: the tasks that can are written."""
        kept_items, kept_values = [], []
        for index, (item, value) in enumerate(zip(items, values, strict=True)):
            for what, obj in (("input", item), ("result", value)):
                try:
                    dumps(obj)
                except Exception as exc:
                    reason = "pickled for its key" if what == "input" else "pickled to be recorded"
                    error = SerializationError(
                        f"journal=: the {what} of task {start + index} could not be {reason}: "
                        f"{type(exc).__name__}: {exc}"
                    )
                    values[index] = error  # (the run hands this list out next)
                    self.failures.add(id(error))
                    break
            else:
                kept_items.append(item)
                kept_values.append(value)
        if kept_items:
            self._write(kept_items, kept_values, ())

    def applied(self, values: list[Any]) -> list[Any]:
        """``values`` with the caller's ``on_error`` applied to the failures among them."""
        failures, out = self.failures, []
        for value in values:
            if id(value) not in failures:
                out.append(value)
                continue
            failures.discard(id(value))
            if self.on_error == "raise":
                raise value
            if self.on_error == "return":
                out.append(value)
        return out


def fresh(
    run_call: Callable[..., Run],
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    star: bool,
    journal: Journal,
    options: dict[str, Any],
    on_error: str,
    ordered: bool,
) -> Generator[list[Any], None, None]:
    """Lists of results of ``fn`` over the inputs, each batch written to ``journal`` first.

    ``run_call`` is the pool's ``_run``; ``options`` are the call's, with
    ``on_error="return"`` (``on_error`` is the caller's, applied here).
    """
    if len(iterables) > 1:
        source: Iterable[Any] = zip(*iterables, strict=False)
        total = None
    else:
        source = iterables[0]
        total = len(source) if hasattr(source, "__len__") else None  # type: ignore[arg-type]
    writer = _Writer(journal, star, on_error)
    try:
        run = run_call(
            fn,
            Style.STAR if star else Style.ONE,
            source,
            total=total,
            ordered=ordered,
            options=options,
        )
    except BaseException:
        journal.close()
        raise
    run.witness = writer
    pieces = run.pieces()
    try:
        for values in pieces:
            yield writer.applied(values) if writer.failures else values
    finally:
        pieces.close()
        journal.close()
