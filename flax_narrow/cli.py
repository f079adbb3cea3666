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
import os
import sys

from flax_narrow.errors import FlaxNarrowError

log = logging.getLogger(__name__)

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


def _other_jax_plugins() -> list[str]:
    """Names of installed JAX PJRT plugins other than libtpu (CUDA, ROCm, ...)."""
    import importlib.metadata
    import pkgutil

    names = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # a namespace package the CUDA / ROCm plugins install into
    except ImportError:
        return names
    return names + [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]


def skip_absent_tpu() -> bool:
    """Use the CPU backend when libtpu is installed on a machine with no TPU and nothing else asks otherwise.

    Without this, every command on such a machine (``make test`` installs libtpu for the deviceless TPU
    compile) first lets libtpu search for a TPU VM's metadata, which prints several lines of warnings and takes
    its lock file, before JAX falls back to the CPU. Left alone: a ``JAX_PLATFORMS`` the user set, a machine
    with TPU chips, and any other accelerator plugin installed. ``--compile-only --topology`` still works: libtpu
    describes the topology without the TPU backend. Returns whether it set ``jax_platforms`` to ``cpu``.
    """
    import importlib.util

    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or _other_jax_plugins():
        return False
    import jax
    from jax._src import hardware_utils  # how jax itself counts the TPU chips (PCI ids), without libtpu

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def main(argv: list[str] | None = None) -> int:
    skipped = skip_absent_tpu()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if skipped:
        log.debug(
            "libtpu is installed but this machine has no TPU: using the CPU backend (set JAX_PLATFORMS to choose)"
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
