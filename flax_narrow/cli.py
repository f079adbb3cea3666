"""``flax-narrow``: one command with sub-commands. Each is a thin wrapper over importable functions.

Every module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its sub-commands and sets
``func`` on them. Library errors (:class:`~flax_narrow.errors.FlaxNarrowError`) become one line on stderr and
exit code 2; nothing else is printed for them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flax_narrow.errors import FlaxNarrowError

COMMAND_MODULES = (
    "flax_narrow.demo",
    "flax_narrow.convert.cli",
    "flax_narrow.train.cli",
    "flax_narrow.train.finetune_cli",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (what was wrong, and where the help is) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flax-narrow", description="BORT and NarrowBERT in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except FlaxNarrowError as e:
        print(f"flax-narrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flax-narrow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
