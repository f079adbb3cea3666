"""``flax-narrow``: one command with sub-commands. Each is a thin wrapper over an importable function.

Library errors (:class:`~flax_narrow.errors.FlaxNarrowError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flax_narrow.errors import FlaxNarrowError


def _demo(args: argparse.Namespace) -> int:
    from flax_narrow.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flax-narrow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline end-to-end demo (CPU, about a minute)")
    demo.add_argument("--out", default=None, help="output directory (default: a fresh temporary directory)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FlaxNarrowError as e:
        print(f"flax-narrow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flax-narrow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
