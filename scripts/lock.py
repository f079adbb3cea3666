"""Write or check ``requirements.lock``: every dependency of flax-narrow (extras ``torch`` and ``dev``), pinned.

The lock is resolved by ``uv pip compile`` for CPython 3.11 on x86-64 Linux (the project's machines and CI). torch
resolves to the CPU wheel ``2.13.0+cpu`` from a local wheel folder (``--find-links``, default ``/opt/wheels``);
a plain PyPI torch would bring several GB of CUDA packages. The first line of the lock records a digest of
``pyproject.toml``'s dependency tables, so ``--check`` (run by ``make install`` and by the test suite) can tell,
offline, that the lock is out of date.

    python scripts/lock.py            # re-resolve and rewrite requirements.lock (``make lock``; needs the index)
    python scripts/lock.py --upgrade  # the same, taking the newest versions pyproject allows
    python scripts/lock.py --check    # exit 1 with one line if pyproject changed since the lock was written
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")
PYPROJECT = os.path.join(ROOT, "pyproject.toml")
EXTRAS = ("torch", "dev")
HEADER = "# pyproject-dependencies-sha256: "


def dependency_digest(pyproject: str = PYPROJECT) -> str:
    """sha256 of the parts of pyproject.toml that decide the lock (python, dependencies, the locked extras)."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project.get("optional-dependencies", {})
    decides = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "extras": {name: sorted(extras.get(name, [])) for name in EXTRAS},
    }
    return hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: str = LOCK) -> str | None:
    """The digest on the lock's first line, or None when the lock is missing or has none."""
    if not os.path.exists(lock):
        return None
    with open(lock) as f:
        first = f.readline().strip()
    return first[len(HEADER) :] if first.startswith(HEADER) else None


def write_lock(find_links: str, upgrade: bool) -> None:
    uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    cmd = [uv, "pip", "compile", PYPROJECT, "--quiet", "--python-version", "3.11"]
    cmd += ["--python-platform", "x86_64-manylinux_2_28", "--no-header", "--find-links", find_links]
    cmd += [arg for extra in EXTRAS for arg in ("--extra", extra)]
    cmd += ["--upgrade"] if upgrade else []
    # uv writes the resolution to --output-file (with --quiet, nothing to stdout); seeded with the current lock,
    # it keeps the versions already locked where pyproject still allows them (not with --upgrade).
    work = LOCK + ".uv"
    if os.path.exists(LOCK) and not upgrade:
        shutil.copyfile(LOCK, work)
    elif os.path.exists(work):
        os.remove(work)
    try:
        subprocess.run([*cmd, "--output-file", work], check=True, capture_output=True, text=True, cwd=ROOT)
        with open(work) as fh:
            pinned = "".join(line for line in fh if not line.startswith("# pyproject-dependencies-sha256:")
                             and not line.startswith("# Written by `make lock`"))  # fmt: skip
    finally:
        if os.path.exists(work):
            os.remove(work)
    if "==" not in pinned:
        sys.exit("lock: uv pip compile wrote no pins; the lock is left as it was")
    if "torch==" in pinned and "+cpu" not in pinned:
        sys.exit(f"lock: torch did not resolve to the CPU wheel; is it in {find_links}?")
    with open(LOCK + ".tmp", "w") as f:
        f.write(f"{HEADER}{dependency_digest()}\n")
        f.write("# Written by `make lock` (scripts/lock.py): CPython 3.11, x86-64 Linux. Do not edit by hand.\n")
        f.write(pinned)
    os.replace(LOCK + ".tmp", LOCK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the lock matches pyproject.toml")
    ap.add_argument("--upgrade", action="store_true", help="re-resolve to the newest allowed versions")
    ap.add_argument("--find-links", default="/opt/wheels", help="folder holding the torch CPU wheel")
    args = ap.parse_args(argv)
    if args.check:
        if recorded_digest() != dependency_digest():
            print("requirements.lock is out of date with pyproject.toml: run `make lock`", file=sys.stderr)
            return 1
        return 0
    write_lock(args.find_links, args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
