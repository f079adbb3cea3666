"""``flax-narrow``: one command with sub-commands. Each is a thin wrapper over importable functions.

Every module in ``COMMAND_MODULES`` has ``register(subparsers)``, which adds its sub-commands and sets
``func`` on them; ``demo`` is registered here and imports its program (``flax_narrow.train.demo``, or
``flax_narrow.convert.parity_demo`` with ``--parity``) only when run. Library errors
(:class:`~flax_narrow.errors.FlaxNarrowError`) become one line on stderr and exit code 2; nothing else is printed
for them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from flax_narrow.errors import FlaxNarrowError

COMMAND_MODULES = (
    "flax_narrow.convert.cli",
    "flax_narrow.train.cli",
    "flax_narrow.train.finetune_cli",
)


def _register_demo(sub) -> None:
    """``flax-narrow demo``."""
    p = sub.add_parser("demo", help="offline pretraining demo: NarrowBERT vs BERT at equal time on CPU (minutes)")
    p.add_argument("--out", default=None, help="output directory (default: a fresh temporary directory)")
    p.add_argument(
        "--seconds", type=float, default=None, help="training seconds of each model (default 150; both train at once)"
    )
    p.add_argument("--steps", type=int, default=None, help="at most this many training steps per model")
    p.add_argument("--parity", action="store_true", help="run the BORT checkpoint parity demo instead")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    logging.getLogger("flax_narrow").setLevel(logging.WARNING)
    if args.seconds is not None and not args.seconds > 0:
        raise FlaxNarrowError(f"--seconds must be > 0, got {args.seconds}")
    if args.steps is not None and args.steps < 1:
        raise FlaxNarrowError(f"--steps must be >= 1, got {args.steps}")
    if args.parity:
        from flax_narrow.convert.parity_demo import run_parity_demo

        run_parity_demo(args.out)
    else:
        from flax_narrow.train.demo import run_demo
        from flax_narrow.train.runtime import enable_compilation_cache

        enable_compilation_cache("auto")  # JAX_COMPILATION_CACHE_DIR wins; see train/runtime.py

        run_demo(args.out, seconds=args.seconds, steps=args.steps)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (what was wrong, and where the help is) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="flax-narrow", description="BORT and NarrowBERT in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_demo(sub)
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
