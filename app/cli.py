"""The appliance's command line: ``python -m app predict|propagate`` (what the image runs).

The development commands (training, export, evaluation, benchmarks) live in the top-level
``flare22`` command (``flare22/cli.py``), which reuses ``dispatch`` below. Each command is a
module with ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType

from . import assist, predict
from .argtypes import OneLineParser

# name -> (loader of the command's module, one-line help)
Loader = Callable[[], ModuleType]
COMMANDS: dict[str, tuple[Loader, str]] = {
    "predict": (lambda: predict, "segment every *_0000 CT in a folder with a model bundle"),
    "propagate": (lambda: assist, "fill a CT's label volume from a few annotated slices"),
}


def dispatch(prog: str, description: str, commands: dict[str, tuple[Loader, str]], argv: list[str] | None) -> int:
    """Parse ``argv`` against ``commands`` and run the chosen one; 2 for a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_loader, helptext) in commands.items():
        sub.add_parser(name, help=helptext, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        parser.print_help(sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"{prog}: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    loader, helptext = commands[name]
    module = loader()
    cmd = OneLineParser(prog=f"{prog} {name}", description=helptext)
    module.add_arguments(cmd)
    args = cmd.parse_args(rest)
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m app", "flare22 appliance: CT in, FLARE22 labels out", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
