"""Regenerate docs/cli.md from the CLI's own ``--help`` (a test checks the file is current).

python scripts/gen_cli_docs.py            # rewrite docs/cli.md
python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = "110"


def render() -> str:
    os.environ["COLUMNS"] = WIDTH  # argparse reads the width when it formats
    from flax_narrow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [
        "# CLI reference\n",
        f"Generated from `--help` by `python scripts/gen_cli_docs.py` (`COLUMNS={WIDTH}`); a test fails when this",
        "file and the CLI disagree.\n",
        "## flax-narrow\n",
        "```",
        parser.format_help().rstrip(),
        "```\n",
    ]
    for name, sp in sub.choices.items():
        parts += [f"## flax-narrow {name}\n", "```", sp.format_help().rstrip(), "```\n"]
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="regenerate docs/cli.md from --help")
    p.add_argument("--check", action="store_true", help="only check that docs/cli.md is current")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if DOC.read_text() != text:
            print(f"{DOC} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
