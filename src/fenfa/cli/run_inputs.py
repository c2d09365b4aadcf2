"""``fenfa run``'s inputs: sources, linking, columns, headers, and several inputs per job.

A *record* is one combination of the input groups: the product of the
groups, where a linked group (``:::+``, ``::::+``) is taken side by side with
the one before it (and the longer one cut to the shorter, as GNU parallel
20221122 does). ``--header :`` takes each source's first value as its name
(``{name}``); ``--colsep REGEX`` (``--csv``: CSV fields) splits each value into
columns, ``{1}`` ``{2}``..., while ``{}`` stays the whole value.

Several records per job (*packing*): ``-n``/``-N``/``-L N`` take N at a time;
``-X`` and ``-m`` as many as fit on a command line, shared evenly between the
job slots when they all fit (``-j2 -X`` over 5 inputs: 3, then 2). ``{1}``
... ``{N}`` are then numbered within the job (missing ones are empty); ``{}``
is every input of the job, and with ``-X`` the word around it is repeated
for each (``-X echo p{}q ::: 1 2`` runs ``echo p1q p2q``). This is done on
the template's text, once per shape of job (how many inputs it has): each
shape is then an ordinary :class:`~.run_template.Template`.
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence

from .run_args import Options, Source, UsageError
from .run_template import Template

# -X / -m: at most this many characters per command line. GNU parallel's own
# limit here (parallel --max-line-length-allowed) is 130,329; a Linux argument
# is at most 128 KiB (MAX_ARG_STRLEN), and the shell script is one argument.
MAX_CHARS = 128_000
_WHOLE = re.compile(r"\{(\.|/|//|/\.)?\}")
_NUMBERED = re.compile(r"\{(\d+)(?:\.|/|//|/\.)?\}")
_NAMED = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.|/|//|/\.)?\}")
Record = tuple[str, ...]


def _read(path: str, delimiter: str) -> Iterator[str]:
    try:
        if path == "-":
            yield from _split(sys.stdin, delimiter)
            return
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as source:
            yield from _split(source, delimiter)
    except OSError as exc:
        hint = " (options go before the command)" if path.startswith("-") else ""
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}{hint}") from None


def _split(stream: Iterable[str], delimiter: str) -> Iterator[str]:
    if delimiter == "\n":
        for line in stream:
            yield line[:-1] if line.endswith("\n") else line
        return
    pending = ""
    for chunk in stream:
        pending += chunk
        *items, pending = pending.split(delimiter)
        yield from items
    if pending:
        yield pending


def source_values(source: Source, delimiter: str) -> Iterator[str]:
    if source.kind == ":::":
        return iter(source.items)
    return itertools.chain.from_iterable(_read(path, delimiter) for path in source.items)


def records(options: Options) -> tuple[Iterator[Record], list[str]]:
    """Every record, in GNU parallel's order, and the header names (``--header :``)."""
    sources = options.sources or [Source("::::", ["-"])]
    values = [source_values(s, options.delimiter) for s in sources]
    names: list[str] = []
    if options.header:
        for n, stream in enumerate(values):
            first = next(stream, None)
            if first is None:
                raise UsageError(f"--header :, but input source {n + 1} is empty")
            names.extend(_columns(first, options) if _splits(options) else [first])
    if len(values) == 1:  # (one source: streamed, never held whole)
        return ((v,) for v in values[0]), names
    groups: list[list[Record]] = []
    for source, stream in zip(sources, values, strict=True):
        if source.linked and groups:
            groups[-1] = [(*a, b) for a, b in zip(groups[-1], stream, strict=False)]
        else:
            groups.append([(v,) for v in stream])
    product = itertools.product(*groups)
    return (tuple(itertools.chain.from_iterable(p)) for p in product), names


def _splits(options: Options) -> bool:
    return options.colsep is not None or options.csv


def _columns(value: str, options: Options) -> list[str]:
    if options.csv:
        return next(csv.reader([value]), [""])
    assert options.colsep is not None
    return re.split(options.colsep, value)


def name_fields(text: str, names: Sequence[str]) -> str:
    """``{name}`` (``{name.}``...) as ``{N}``: N the column the header names."""
    where = {name: n for n, name in reversed(list(enumerate(names, 1)))}

    def number(match: re.Match[str]) -> str:
        n = where.get(match.group(1))
        return match.group(0) if n is None else _field(n, match.group(2))

    return _NAMED.sub(number, text)


def packed(options: Options) -> bool:
    """Whether jobs need the general path (columns, or several inputs a job)."""
    if options.pipe:
        return False
    return _splits(options) or options.max_args is not None or options.context or options.multi


class Packer:
    """Jobs for the general path: each job's values and the Template for its shape."""

    def __init__(self, options: Options, text: str, shell: str, workers: int) -> None:
        self.options = options
        self.text = text
        self.shell = shell
        self.workers = workers
        self.split = _splits(options)
        numbers = [int(n) for n in _NUMBERED.findall(text)]
        self.highest = max(numbers, default=0)
        self._templates: dict[tuple[int, int], Template] = {}

    def jobs(self, source: Iterator[Record]) -> Iterator[tuple[Template, Record, Record]]:
        """Each job: the Template of its shape, its values, and its inputs as given."""
        for group in self._groups(source):
            inputs = whole = tuple(itertools.chain.from_iterable(group))
            if self.split:
                columns = [c for value in whole for c in _columns(value, self.options)]
            else:
                columns = list(whole)
                whole = ()
            count = len(columns)
            columns.extend([""] * (self.highest - count))
            yield self.template(count, len(whole)), (*columns, *whole), inputs

    def _groups(self, source: Iterator[Record]) -> Iterator[list[Record]]:
        options = self.options
        if options.max_args == 0:  # -N0: one record a job, none of it in the command
            for _ in source:
                yield []
            return
        if options.max_args is not None:
            while chunk := list(itertools.islice(source, options.max_args)):
                yield chunk
            return
        if not (options.context or options.multi):
            for record in source:
                yield [record]
            return
        every = list(source)  # -X/-m: shared evenly, so counted first
        share = max(1, math.ceil(len(every) / max(1, self.workers)))
        repeats = max(1, len(_WHOLE.findall(self.text)))
        group: list[Record] = []
        size = len(self.text)
        for record in every:
            cost = sum(len(v) + 3 for v in record) * repeats
            if group and (len(group) >= share or size + cost > MAX_CHARS):
                yield group
                group, size = [], len(self.text)
            group.append(record)
            size += cost
        if group:
            yield group

    def template(self, count: int, wholes: int) -> Template:
        """The Template for a job of ``count`` inputs (``wholes`` whole values after them)."""
        key = (count, wholes)
        if key not in self._templates:
            first = max(self.highest, count) + 1 if wholes else 1  # where {}'s values are
            numbers = list(range(first, first + (wholes or count)))
            # A field past the job's inputs is empty, as in GNU parallel: a word of
            # its own vanishes ("{2}" of a one-input job), else it adds nothing.
            text = _NUMBERED.sub(lambda m: "" if int(m.group(1)) > count else m.group(0), self.text)
            text = _expand(text, numbers, self.options.context)
            total = max(self.highest, count) + wholes
            self._templates[key] = Template(text, total, self.shell)
        return self._templates[key]


def _expand(text: str, numbers: list[int], context: bool) -> str:
    """``{}`` (and ``{.}``...) as the fields ``{a} {b} ...``; with ``context`` its whole word."""

    def each(word: str) -> str:
        return " ".join(_WHOLE.sub(functools.partial(_numbered, n), word) for n in numbers)

    if not context:
        return _WHOLE.sub(lambda m: " ".join(_field(n, m.group(1)) for n in numbers), text)
    return "".join(each(w) if _WHOLE.search(w) else w for w in _words(text))


def _numbered(number: int, match: re.Match[str]) -> str:
    return _field(number, match.group(1))


def _field(number: int, how: str | None) -> str:
    return f"{{{number}{how or ''}}}"


def _words(text: str) -> Iterator[str]:
    """``text`` cut into words and the blanks between them (quotes kept inside their word)."""
    start = i = 0
    quote = ""
    while i < len(text):
        char = text[i]
        if char == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in " \t\n":
            if start < i:
                yield text[start:i]
            yield char
            start = i + 1
        i += 1
    if start < len(text):
        yield text[start:]
