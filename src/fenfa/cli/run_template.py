"""``fenfa run``'s command template: how each job's command is made, and shown.

An input is never text the shell parses. A command with shell syntax runs as
``SHELL -c SCRIPT SHELL VALUE...``: each field in SCRIPT is a reference to a
positional parameter, written for the quoting it stands in, and the values
travel as arguments. A plain word list (no shell syntax, every field bare) is
exec'd directly. The shell is chosen as GNU parallel chooses it
(:func:`choose_shell`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .._shell import _direct
from .run_args import UsageError

# -- the template -----------------------------------------------------------------
#
# An input is never text the shell parses. A command with shell syntax runs as
# ``/bin/sh -c SCRIPT /bin/sh VALUE...``: each field in SCRIPT is a reference to
# a positional parameter, written for the quoting it stands in (bare: "${1}";
# inside "...": ${1}; inside '...': '"${1}"', closing and reopening the quotes;
# in $((...)): ${1}), and the values travel as arguments. A plain word list
# (no shell syntax, every field bare) is exec'd directly with the values in
# its argument list, as the shell would have run it, without paying for the
# shell. Either way a file named ``$(rm -rf ~)`` is one argument. What is
# shown (--dry-run, the journals) is the same command with the values quoted
# for where they stand: it does what the run does.

_FIELD = re.compile(r"\{(\d*)(\.|/|//|/\.)?\}|\{#\}|\{%\}")
_SH = "/bin/sh"
# Shells that take ``-c SCRIPT NAME ARG...`` and read ``"${1}"`` as POSIX sh does:
# fenfa's guarantee (an input is an argument, never syntax) holds in them.
POSIX_SHELLS = frozenset(
    {"sh", "ash", "dash", "bash", "rbash", "ksh", "ksh93", "lksh", "mksh", "pdksh", "posh",
     "yash", "zsh", "rzsh", "busybox"}
)  # fmt: skip
# The others GNU parallel knows (csh, tcsh, fish, rc ...): found as the parent or in
# $SHELL they give way to /bin/sh; asked for by name they are refused.
_KNOWN_SHELLS = POSIX_SHELLS | {"csh", "bsd-csh", "tcsh", "fish", "fizsh", "rc", "rush", "sash"}


def _transform(value: str, how: str | None) -> str:
    if how is None:
        return value
    if how == ".":
        return os.path.splitext(value)[0]
    if how == "/":
        return os.path.basename(value)
    if how == "//":
        return os.path.dirname(value) or "."
    return os.path.splitext(os.path.basename(value))[0]  # "/."


def has_fields(template: str) -> bool:
    return any(isinstance(piece, _Field) for piece in _scan(template))


@dataclass(frozen=True)
class _Field:
    text: str  # as written: "{}", "{2/.}", "{#}"
    source: int | None  # 1-based; None: every source ("{}", "{.}" ...)
    how: str | None  # the transform: None . / // /.
    quoting: str  # where it stands: "bare", "double", "single" or "arith"


def _scan(template: str) -> Iterator[str | _Field]:
    """The template as literal text and fields, each field with the quoting around it.

    Follows POSIX sh quoting: '...', "...", backslashes, $(...), `...`,
    $((...)). (A field it places wrongly, say in a here-document, is still
    only a parameter reference: the value cannot become shell syntax.)
    """
    # What the text at i is inside, innermost last ("cmd": bare text in $(...),
    # "tick": in `...`), and for $(...) and $((...)) how many parentheses are open.
    inside, depth = ["bare"], [0]
    i = start = 0
    n = len(template)
    while i < n:
        quoting = inside[-1]
        char = template[i]
        if quoting == "single":
            if char == "'":
                _leave(inside, depth)
                i += 1
                continue
        elif char == "\\":
            i += 2  # an escaped character (an escaped "{" starts no field)
            continue
        elif template.startswith("$(", i):  # $((...)) arithmetic, or $(...) a command
            arith = template.startswith("$((", i)
            _enter(inside, depth, "arith" if arith else "cmd", 2 if arith else 1)
            i += 3 if arith else 2
            continue
        elif char == "`":
            if quoting == "tick":
                _leave(inside, depth)
            else:
                _enter(inside, depth, "tick", 0)
            i += 1
            continue
        elif quoting == "double":
            if char == '"':
                _leave(inside, depth)
                i += 1
                continue
        elif char in "()" and quoting in ("arith", "cmd"):
            depth[-1] += 1 if char == "(" else -1
            if depth[-1] == 0:
                _leave(inside, depth)
            i += 1
            continue
        elif quoting != "arith" and char in "'\"":
            _enter(inside, depth, "single" if char == "'" else "double", 0)
            i += 1
            continue
        match = _FIELD.match(template, i) if char == "{" else None
        if match is None:
            i += 1
            continue
        if start < i:
            yield template[start:i]
        text = match.group(0)
        number, how = match.group(1), match.group(2)
        where = "bare" if quoting in ("cmd", "tick") else quoting
        yield _Field(text, int(number) if number else None, how, where)
        i = start = match.end()
    if start < n:
        yield template[start:]


def _enter(inside: list[str], depth: list[int], quoting: str, parentheses: int) -> None:
    inside.append(quoting)
    depth.append(parentheses)


def _leave(inside: list[str], depth: list[int]) -> None:
    if len(inside) > 1:  # (an unbalanced closer is the shell's error to report)
        inside.pop()
        depth.pop()


def _quote(value: str, quoting: str) -> str:
    """``value`` written so that the shell reads it back, where it stands (for display)."""
    if quoting == "bare":
        return shlex.quote(value)
    if quoting == "single":
        return value.replace("'", "'\\''")
    return re.sub(r'([\\$`"])', r"\\\1", value)  # inside "..." (and $((...)))


class Template:
    """A command template, compiled once: how each job's command is made and shown."""

    def __init__(self, template: str, sources: int, shell: str = _SH) -> None:
        self.template = template
        self.sources = sources
        self.shell = shell
        self.pieces = list(_scan(template))
        fields = [p for p in self.pieces if isinstance(p, _Field)]
        for f in fields:
            if f.source is not None and not 1 <= f.source <= sources:
                raise UsageError(f"{f.text} in the command, but there are {sources} sources")
        # Positional parameters: the sources' values, then each transformed value.
        self.derived: list[tuple[int | None, str]] = list(
            dict.fromkeys((f.source, f.how) for f in fields if f.how is not None)
        )
        self.argv = self._words()
        self.script = "".join(self._reference(p) for p in self.pieces)

    def _parameters(self, f: _Field) -> list[int]:
        if f.how is not None:
            return [self.sources + 1 + self.derived.index((f.source, f.how))]
        return [f.source] if f.source is not None else list(range(1, self.sources + 1))

    def _reference(self, piece: str | _Field) -> str:
        if isinstance(piece, str):
            return piece
        if piece.text in ("{#}", "{%}"):
            return piece.text  # (replaced by digits per job: safe in any quoting)
        numbers = self._parameters(piece)
        if piece.quoting == "bare":
            return " ".join(f'"${{{k}}}"' for k in numbers)
        joined = " ".join(f"${{{k}}}" for k in numbers)
        return f"'\"{joined}\"'" if piece.quoting == "single" else joined

    def _words(self) -> list[list[str | _Field]] | None:
        """The template as words of text and fields, if it can be exec'd without a shell."""
        if any(isinstance(p, _Field) and p.quoting != "bare" for p in self.pieces):
            return None
        marks: dict[str, _Field] = {}
        text = ""
        for piece in self.pieces:
            if isinstance(piece, str):
                text += piece
            else:
                mark = f"\ue000{len(marks)}\ue001"  # (private-use characters: plain words)
                marks[mark] = piece
                text += mark
        if _direct(text) is None:  # shell syntax, or not a program on PATH
            return None
        words = shlex.split(text)
        if "\ue000" in words[0]:
            return None  # the program is an input: let the shell find it
        split = re.compile("(\ue000\\d+\ue001)")
        return [
            [marks.get(part, part) for part in split.split(word) if part] or [""] for word in words
        ]

    def _values(self, f: _Field, values: Sequence[str], seq: int, slot: int) -> list[str]:
        if f.text == "{#}":
            return [str(seq)]
        if f.text == "{%}":
            return [str(slot)]
        if f.source is not None:
            return [_transform(values[f.source - 1], f.how)]
        if f.how is None:
            return list(values)
        return [_transform(" ".join(values), f.how)]

    def command(self, values: Sequence[str], seq: int, slot: int) -> list[str]:
        """The argument list to run: the program and its arguments, or sh -c and the values."""
        if self.argv is not None:
            argv: list[str] = []
            for word in self.argv:
                argv.append("")
                for piece in word:
                    if isinstance(piece, str):
                        argv[-1] += piece
                        continue
                    first, *more = self._values(piece, values, seq, slot)
                    argv[-1] += first
                    argv.extend(more)
            return argv
        script = self.script
        if "{#}" in script or "{%}" in script:
            script = script.replace("{#}", str(seq)).replace("{%}", str(slot))
        derived = [
            _transform(values[s - 1] if s is not None else " ".join(values), how)
            for s, how in self.derived
        ]
        return [self.shell, "-c", script, self.shell, *values, *derived]

    def render(self, values: Sequence[str], seq: int, slot: int) -> str:
        """The command as text, each value quoted for where it stands (what is shown)."""
        out = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            shown = self._values(piece, values, seq, slot)
            if piece.quoting == "bare":
                out.append(" ".join(_quote(v, "bare") for v in shown))
            else:
                out.append(_quote(" ".join(shown), piece.quoting))
        return "".join(out)

    def text(self, values: Sequence[str], seq: int, slot: int) -> str:
        """The template with each field replaced by its value as it is (a tag: shown, not run)."""
        return "".join(
            p if isinstance(p, str) else " ".join(self._values(p, values, seq, slot))
            for p in self.pieces
        )


def quote_words(words: Sequence[str]) -> str:
    """-q: the command's words as one command, each quoted (its fields left as fields)."""
    return " ".join(
        "".join(
            p if _FIELD_SPLIT.fullmatch(p) else shlex.quote(p) for p in _FIELD_SPLIT.split(w) if p
        )
        or "''"
        for w in words
    )


_FIELD_SPLIT = re.compile(r"(\{(?:\d*|[A-Za-z_]\w*)(?:\.|/|//|/\.)?\}|\{#\}|\{%\})")


def render(template: str, values: Sequence[str], seq: int, slot: int) -> str:
    """The command for one job as text, values quoted where they stand."""
    return Template(template, len(values)).render(values, seq, slot)


def choose_shell(asked: str | None, environ: dict[str, str] | os._Environ[str]) -> str:
    """The shell jobs with shell syntax run under, chosen as GNU parallel chooses it.

    ``--shell``, else ``$PARALLEL_SHELL``, else the nearest ancestor process that
    is a shell (the one ``fenfa run`` was typed in), else ``$SHELL``, else
    ``/bin/sh``. A shell named by ``--shell`` or ``$PARALLEL_SHELL`` must be a
    POSIX one (a csh or fish would read the parameter references differently);
    one that is merely found (an ancestor, ``$SHELL``) gives way to ``/bin/sh``.
    """
    for name, given in (("--shell", asked), ("$PARALLEL_SHELL", environ.get("PARALLEL_SHELL"))):
        if given:
            return _usable(given, name)
    for found in (_parent_shell(), environ.get("SHELL")):
        if found and os.path.basename(found).lstrip("-") in POSIX_SHELLS:
            path = found if os.sep in found else shutil.which(found)
            if path and os.access(path, os.X_OK):
                return path
    return _SH


def _usable(shell: str, name: str) -> str:
    path = shell if os.sep in shell else shutil.which(shell)
    if not path or not os.access(path, os.X_OK):
        raise UsageError(f"{name}: shell {shell!r} not found")
    if os.path.basename(path) not in POSIX_SHELLS:
        raise UsageError(
            f'{name}: {shell!r} is not a POSIX shell (fenfa passes inputs as "${{1}}"...; '
            f"use sh, dash, bash, ksh or zsh)"
        )
    return path


def _parent_shell(limit: int = 16) -> str | None:
    """The executable of the nearest ancestor that is a shell GNU parallel knows, if any."""
    pid = os.getppid()
    for _ in range(limit):
        if pid <= 1:
            return None
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # (pid (comm) state ppid ...: comm may hold spaces and parentheses)
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return None
        if os.path.basename(exe) in _KNOWN_SHELLS:
            return exe
        pid = ppid
    return None
