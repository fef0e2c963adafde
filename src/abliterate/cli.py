"""Command-line entry point: `abliterate <command> ...`.

Each command lives in `abliterate.commands.<module>` and defines `HELP`,
`add_arguments(parser)` and `run(args) -> int`. The library does the work; commands only
parse arguments and print.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import AbliterateError
from .logs import logger, setup_logging

# (command name, module under abliterate.commands)
COMMANDS = [
    ("demo-model", "demo_model"),
    ("inspect", "inspect"),
    ("measure", "measure"),
    ("convert", "convert"),
    ("analyze", "analyze"),
    ("evaluate", "evaluate"),
    ("aggregate", "sweep"),
    ("plan", "plan"),
    ("ablate", "ablate"),
    ("verify", "verify"),
    ("compare", "compare"),
    ("chat", "chat"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="abliterate",
        description="Measure, analyse and remove a behaviour direction from LLM weights.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"abliterate.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        return int(args._run(args) or 0)
    except AbliterateError as error:
        logger.error("error: %s", error)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
