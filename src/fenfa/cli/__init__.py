"""The ``fenfa`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fenfa")
    except metadata.PackageNotFoundError:  # (run from a source tree, not installed)
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    # (Imported here: `fenfa run`, which starts once per batch of shell jobs,
    # does not pay for the other commands' modules.)
    from . import advise, bench, mapcmd

    parser = argparse.ArgumentParser(
        prog="fenfa",
        description=(
            "Dispatch work to threads, processes, coroutines or a Dask cluster, "
            "and see how it went."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fenfa {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench.add_parser(commands)
    advise.add_parser(commands)
    mapcmd.add_parser(commands)
    commands.add_parser(
        "run",
        help="run shell commands in parallel, GNU parallel style (fenfa run --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["run"]:
        # GNU parallel's syntax (COMMAND ::: ARGS, options that look like the
        # command's own) is not argparse's: `fenfa run` parses its own.
        from . import run

        try:
            return run.main(args_list[1:])
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


__all__ = ["main"]
