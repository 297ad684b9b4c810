"""The appliance's command line: ``python -m app predict|propagate`` (what the image runs).

The development commands (training, export, evaluation, benchmarks) live in the top-level
``flare22`` command (``flare22/cli.py``), which reuses ``dispatch`` below. Each command is a
module with ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

from . import assist, predict
from .argtypes import OneLineParser
from .errors import Flare22Error

# name -> (loader of the command's module, one-line help)
Loader = Callable[[], ModuleType]
COMMANDS: dict[str, tuple[Loader, str]] = {
    "predict": (lambda: predict, "segment every *_0000 CT in a folder with a model bundle"),
    "propagate": (lambda: assist, "fill a CT's label volume from a few annotated slices"),
}


def dispatch(prog: str, description: str, commands: dict[str, tuple[Loader, str]], argv: list[str] | None) -> int:
    """Parse ``argv`` against ``commands`` and run the chosen one; 2 for a usage error.

    A user error (the project's own errors, an OS error naming a file) is one line on stderr
    and exit 2, never a traceback; anything else is one line too, exit 1. ``--debug``
    anywhere on the line (or FLARE22_DEBUG=1) lets the traceback through instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLARE22_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
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
    cmd.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = cmd.parse_args(rest)
    if debug:
        logging.getLogger("flare22").setLevel(logging.DEBUG)
        return int(module.run(args) or 0)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog} {name}: interrupted", file=sys.stderr)
        return 130
    except Flare22Error as exc:
        print(f"{prog} {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog} {name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line; --debug shows the traceback
        detail = " ".join(str(exc).split())[:300]
        print(f"{prog} {name}: {type(exc).__name__}: {detail} (--debug shows the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m app", "flare22 appliance: CT in, FLARE22 labels out", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
